"""The only network code in gpt2kit: fetch a model folder from the Hugging Face hub into its cache.

huggingface_hub does the work (cache, revisions, HF_HUB_OFFLINE, HF_ENDPOINT, tokens); this module
chooses which files to fetch and turns its exception types into one-line HubErrors.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import HubError

CONFIG = ["config.json", "generation_config.json"]
TOKENIZER = ["tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json",
             "tokenizer_config.json", "added_tokens.json"]
SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
PICKLES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of `repo_id` at `revision` (default: the main branch), fetching
    config, tokenizer and weights files not yet cached. Safetensors weights are fetched when the
    repo has them; the pickle `.bin` files only when it has no safetensors."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HubError(f"downloading {repo_id!r} from the hub needs huggingface_hub: "
                       "pip install huggingface_hub (or pass a local folder path)") from None

    try:
        folder = Path(snapshot_download(repo_id, revision=revision,
                                        allow_patterns=CONFIG + TOKENIZER + SAFETENSORS))
        if not any((folder / f).is_file() for f in SAFETENSORS[:2]):
            # The snapshot folder is named by its commit: fetch the pickles of that same commit.
            folder = Path(snapshot_download(repo_id, revision=folder.name, allow_patterns=PICKLES))
        return folder
    except Exception as e:
        error = _explain(e, repo_id, revision)
        if error is None:
            raise
        raise error from e


def _explain(e: Exception, repo_id: str, revision: str | None) -> HubError | None:
    """A one-line HubError for one of huggingface_hub's exception types (None: not one we know).
    Classified by type only: their messages are for people and change between versions."""
    from huggingface_hub import constants, errors
    name = repr(repo_id) + (f" (revision {revision!r})" if revision else "")
    where = constants.ENDPOINT
    unreachable = HubError(f"could not reach the Hugging Face hub at {where} to download {name} "
                           "(no network?); connect and try again, or pass a local folder path")
    if isinstance(e, errors.HFValidationError):
        return HubError(f"{repo_id!r} is neither an existing path nor a valid hub model id "
                        "(like gpt2 or openai-community/gpt2-large)")
    if isinstance(e, errors.GatedRepoError):  # before RepositoryNotFoundError, its base class
        return HubError(f"model {name} is gated on the Hugging Face hub: accept its terms on the "
                        "model page and log in (hf auth login)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return HubError(f"model {name} was not found on the Hugging Face hub (check the name, "
                        "or pass a local folder path)")
    if isinstance(e, errors.RevisionNotFoundError):
        return HubError(f"revision {revision!r} of model {repo_id!r} was not found on the "
                        "Hugging Face hub")
    if isinstance(e, errors.IncompleteSnapshotError):
        return HubError(f"the cached copy of {name} is incomplete and the hub at {where} cannot "
                        "be reached; connect to the network and try again")
    if isinstance(e, errors.LocalEntryNotFoundError):  # not cached, and the hub did not answer
        if constants.is_offline_mode():
            return HubError(f"{repo_id} is not in the local cache and offline mode is on "
                            "(HF_HUB_OFFLINE=1); unset it to download, or pass a local folder path")
        if isinstance(e.__cause__, errors.HfHubHTTPError):
            return HubError(f"the Hugging Face hub at {where} answered HTTP "
                            f"{e.__cause__.response.status_code} for {name} and the model is not "
                            "in the local cache; try again later")
        return unreachable
    if isinstance(e, _transport_errors()):  # the connection dropped during a file transfer
        return unreachable
    if isinstance(e, errors.HfHubHTTPError):
        return HubError(f"the Hugging Face hub at {where} refused to serve {name} "
                        f"(HTTP {e.response.status_code})")
    if isinstance(e, OSError):  # writing the cache: disk full, permissions
        return HubError(f"could not store {name} in the Hugging Face cache at "
                        f"{constants.HF_HUB_CACHE}: {e.strerror or e}")
    return None


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's connection-error class: huggingface_hub 2.x uses httpx2, 1.x httpx
    (0.x used requests, whose errors are OSErrors)."""
    for module in ("httpx2", "httpx"):
        try:
            return (importlib.import_module(module).TransportError,)
        except ImportError:
            continue
    return ()
