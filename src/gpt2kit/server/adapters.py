"""Serving LoRA fine-tunes beside the base (`--lora NAME=PATH`): the request's `model` picks one,
and GET /v1/models lists them with `parent` and `root` as vLLM does."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from ..inference.adapters import BASE
from .errors import APIError
from .schemas import ModelCard


class ServedModel(ModelCard):
    root: str = ""  # where the weights came from: the base model's folder or id, an adapter's folder
    parent: str | None = None  # an adapter's base model; None for the base itself


class ServedModels(BaseModel):
    object: Literal["list"] = "list"
    data: list[ServedModel]


def model_list(served: str, root: str, adapters: dict[str, str], created: int, max_len: int) -> ServedModels:
    base = ServedModel(id=served, root=root, created=created, max_model_len=max_len)
    return ServedModels(data=[base] + [ServedModel(id=name, root=path, parent=served, created=created,
                                                   max_model_len=max_len) for name, path in adapters.items()])


def pick(requested: str | None, served: str, adapters: list[str]) -> tuple[str, int]:
    """(the model name to answer with, the adapter's index, BASE for the base model)."""
    if requested is None or requested == served:
        return served, BASE
    if requested in adapters:
        return requested, adapters.index(requested)
    names = ", ".join(repr(name) for name in [served, *adapters])
    raise APIError(404, f"the model {requested!r} does not exist; this server serves {names}",
                   param="model", code="model_not_found")
