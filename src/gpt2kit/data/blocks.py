"""Packed token blocks: the interface between data preparation and training.

A corpus is one flat array of token ids (documents each followed by <|endoftext|>), usually a
memory-mapped file, cut into consecutive non-overlapping blocks of `block_size` tokens; no padding
is ever trained on. The model predicts each token from the ones before it inside its block.

Chat data also has a mask (one byte per token, 1 if the token is trained on): a batch then carries
it inside the ids, IGNORED added to each token that is context only, so it reaches the loss
through every wrapper (DDP, FSDP, compile) that passes a tensor; `split_ignored` takes it out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

IGNORED = 1 << 40  # added to the id of a token that is not a training target (far above any vocabulary)


class TokenBlocks:
    """Blocks of `block_size` tokens over a 1-D token array (a numpy array or memmap), and
    optionally a mask of the same length (nonzero: the token is trained on)."""

    def __init__(self, tokens: np.ndarray, block_size: int, mask: np.ndarray | None = None):
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        if mask is not None and len(mask) != len(tokens):
            raise ValueError(f"the mask has {len(mask)} entries for {len(tokens)} tokens")
        self.tokens = tokens
        self.block_size = block_size
        self.mask = mask

    @classmethod
    def from_file(cls, path: str | Path, block_size: int, dtype: str = "uint16",
                  masked: bool = False) -> "TokenBlocks":
        """Blocks over a raw token file written by data preparation (never read into memory whole);
        `masked`: with its mask file (`mask_path`)."""
        mask = np.memmap(mask_path(Path(path)), dtype=np.uint8, mode="r") if masked else None
        return cls(np.memmap(path, dtype=np.dtype(dtype), mode="r"), block_size, mask)

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def block(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range (0..{len(self) - 1})")
        start = i * self.block_size
        return self.tokens[start:start + self.block_size]

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """A (len(indices), block_size) int64 tensor of the given blocks; with a mask, IGNORED is
        added to the tokens that are not trained on."""
        x, trained = self.batch_and_mask(indices)
        return x if trained is None else x + IGNORED * ~trained

    def batch_and_mask(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The given blocks' token ids (len(indices), block_size) int64 and, with a mask, where
        they are trained on (bool, same shape); without one, None."""
        x = torch.from_numpy(np.stack([self.block(int(i)).astype(np.int64) for i in indices]))
        if self.mask is None:
            return x, None
        size = self.block_size
        return x, torch.from_numpy(np.stack([self.mask[int(i) * size:(int(i) + 1) * size] for i in indices]) != 0)

    def order(self, epoch: int, seed: int) -> torch.Tensor:
        """The shuffled block order of `epoch`: a pure function of (seed, epoch), so a resumed run
        replays exactly the batches an uninterrupted one would have seen."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=g)


def split_ignored(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, trained) of a batch: the ids without IGNORED, and where it was not added."""
    trained = x < IGNORED
    return torch.where(trained, x, x - IGNORED), trained


def mask_path(tokens: Path) -> Path:
    """The mask file beside a token file: train.bin -> train.mask.bin."""
    return tokens.with_suffix(".mask.bin")
