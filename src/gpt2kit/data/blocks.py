"""Packed token blocks: the interface between data preparation and training.

A corpus is one flat array of token ids (documents each followed by <|endoftext|>), usually a
memory-mapped file, cut into consecutive non-overlapping blocks of `block_size` tokens; no padding
is ever trained on. The model predicts each token from the ones before it inside its block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch


class TokenBlocks:
    """Blocks of `block_size` tokens over a 1-D token array (a numpy array or memmap)."""

    def __init__(self, tokens: np.ndarray, block_size: int):
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        self.tokens = tokens
        self.block_size = block_size

    @classmethod
    def from_file(cls, path: str | Path, block_size: int, dtype: str = "uint16") -> "TokenBlocks":
        """Blocks over a raw token file written by data preparation (never read into memory whole)."""
        return cls(np.memmap(path, dtype=np.dtype(dtype), mode="r"), block_size)

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
        """A (len(indices), block_size) int64 tensor of the given blocks."""
        return torch.from_numpy(np.stack([self.block(int(i)).astype(np.int64) for i in indices]))

    def order(self, epoch: int, seed: int) -> torch.Tensor:
        """The shuffled block order of `epoch`: a pure function of (seed, epoch), so a resumed run
        replays exactly the batches an uninterrupted one would have seen."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=g)
