"""Is a model spec a local path or a hub id? Decided before anything is read or fetched.

A spec that exists on disk is a path. A spec that merely looks like one (`./my-model`,
`~/models/x`, `a/b/c`, `model.safetensors`) but does not exist is an error, never a hub download:
a typo in a path must not send a request to the network (a user's files may be private).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from .weights import TORCH_SUFFIXES, WEIGHT_NAMES

PATH_SUFFIXES = (".safetensors", ".json", *TORCH_SUFFIXES)


def looks_like_path(spec: str) -> bool:
    seps = spec.count(os.sep) + (spec.count(os.altsep) if os.altsep else 0)
    return spec.startswith((".", "/", "~")) or seps >= 2 or spec.endswith(PATH_SUFFIXES)


def resolve_spec(spec: str) -> Path | str:
    """An absolute Path for a spec on disk, else the spec itself as a hub model id."""
    if not spec or not spec.strip():
        raise CheckpointError("no model given: pass a hub id (like gpt2) or a model folder path")
    try:
        path = Path(spec).expanduser()
    except RuntimeError:  # "~someone/x" for a user that does not exist
        path = Path(spec)
    if path.exists():
        return path.absolute()
    if looks_like_path(spec):
        raise CheckpointError(f"no such file or folder: {spec} (a model is a folder holding "
                              f"{', '.join(WEIGHT_NAMES)}, or one such weights file)")
    return spec
