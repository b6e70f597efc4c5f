"""Shared fixtures: tiny random GPT-2 checkpoints, generated jokes, and a guard that fails any network access.

No test may reach beyond this machine: connections to anything but loopback raise at once.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # in-process loads never ask a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if host is not None:
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise RuntimeError(f"test tried to reach the network ({address}); tests must stay offline")
    return _real_connect(self, address)


socket.socket.connect = _guarded_connect


def tiny_hf_model(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257, seed=0, **config):
    """A small random transformers GPT2LMHeadModel (the oracle), in eval mode; `config`: more
    GPT2Config fields."""
    import torch
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                  n_positions=n_positions, vocab_size=vocab_size, **config)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A Hugging Face-layout folder holding a tiny random GPT-2 (full GPT-2 vocabulary)."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_hf_model().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def jokes_csv(tmp_path_factory) -> Path:
    """A CSV shaped like onelinefun.csv (columns ID and Joke, 2,950 rows), generated (jokes.py)."""
    from jokes import write_jokes_csv
    return write_jokes_csv(tmp_path_factory.mktemp("jokes") / "onelinefun.csv")


@pytest.fixture(scope="session")
def tiny_model(tiny_folder):
    import gpt2kit
    return gpt2kit.load(tiny_folder, device="cpu")


@pytest.fixture(autouse=True)
def _library_logger_as_it_was():
    """The CLI's main(), run in-process by some tests, routes the `gpt2kit` logger to stderr and
    stops it propagating (cli/messages.py); later tests' caplog would then see nothing."""
    import logging
    logger = logging.getLogger("gpt2kit")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
