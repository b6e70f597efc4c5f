"""Prefix caching: prompts that start alike (a system text, few-shot examples) reuse the keys and
values computed for their common start instead of prefilling it again (issue 16, item 5).

Keys and values are kept in blocks of `block` tokens, in a trie: a block's node is found by the
block's tokens among its parent's children, so a block is reused only after exactly the same
tokens from position 0 (as vLLM's block hashes and SGLang's radix tree do; keys compare whole
token tuples, so no hash collision can hand out another prompt's keys). Only whole blocks are kept,
and never a context's last token: its logits are needed, so the prefill always computes at least
that one.

Positions: a block's keys and values were computed at positions j*block..(j+1)*block-1, and they
stay right wherever the running batch puts them, since a row's positions count from 0 after its
padding (running_batch.py) whatever slot it starts at.

Keys and values also depend on the weights: with several LoRA adapters served (adapters.py),
each adapter's blocks live in a trie of their own (`space`: the adapter's index, -1 the base).

Memory is bounded by `budget` bytes; past it, the least recently used block that no other block
extends is evicted (a node is always touched after its children, so the oldest is such a leaf).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .adapters import BASE
from .kv_cache import KVCache

BLOCK = 16  # tokens per block: vLLM's default; smaller blocks match more, copy in more pieces


@dataclass(eq=False)
class Block:
    """The keys and values, each (n_layer, nh, block, hs), of one block of tokens after its parent's."""

    tokens: tuple[int, ...]
    k: torch.Tensor
    v: torch.Tensor
    parent: "Block | None"
    space: int  # the adapter whose weights computed it (-1: the base model)
    children: dict[tuple[int, ...], "Block"] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class PrefixStats:
    """What the cache saved: prompt tokens looked up, of them found in the cache; blocks held."""

    looked_up: int = 0
    reused: int = 0
    stored: int = 0
    evicted: int = 0


class PrefixCache:
    """An LRU of prefix blocks within `budget` bytes; `block` tokens per block."""

    def __init__(self, budget: int, block: int = BLOCK):
        self.budget, self.block = budget, block
        self.roots: dict[int, dict[tuple[int, ...], Block]] = {}  # by space, then first block's tokens
        self.lru: OrderedDict[int, Block] = OrderedDict()  # id(block) -> block, oldest first
        self.nbytes = 0
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self.lru)

    def match(self, tokens: Sequence[int], space: int = BASE) -> list[Block]:
        """The cached blocks `tokens` starts with (never its last token), outermost first."""
        path: list[Block] = []
        children = self.roots.get(space, {})
        for j in range((len(tokens) - 1) // self.block):
            node = children.get(self._piece(tokens, j))
            if node is None:
                break
            path.append(node)
            children = node.children
        return path

    def load(self, tokens: Sequence[int], cache: KVCache, row: int, slot: int, space: int = BASE) -> int:
        """Copy the cached blocks `tokens` starts with into batch row `row` of `cache` from `slot`
        on; return how many tokens were copied (their prefill can be skipped)."""
        path = self.match(tokens, space)
        for j, node in enumerate(path):
            cache.write_slots(row, slot + j * self.block, node.k, node.v)
        self._touch(path)
        self.stats.looked_up += len(tokens)
        self.stats.reused += len(path) * self.block
        return len(path) * self.block

    def store(self, tokens: Sequence[int], cache: KVCache, row: int, slot: int, space: int = BASE) -> None:
        """Keep the whole blocks of `tokens` (written to row `row` of `cache` from `slot` on) that
        are not cached yet, evicting the least recently used blocks to stay within the budget."""
        path = self.match(tokens, space)
        children = path[-1].children if path else self.roots.setdefault(space, {})
        for j in range(len(path), (len(tokens) - 1) // self.block):
            k, v = cache.read_slots(row, slot + j * self.block, self.block)
            if not self._make_room(k.nbytes + v.nbytes, path):
                break
            node = Block(self._piece(tokens, j), k, v, path[-1] if path else None, space)
            children[node.tokens] = node
            self.lru[id(node)] = node
            self.nbytes += node.nbytes
            self.stats.stored += 1
            path.append(node)
            children = node.children
        self._touch(path)

    def shares_new_block(self, contexts: Sequence[Sequence[int]], spaces: Sequence[int]) -> list[bool]:
        """For each context, whether an earlier one will store the block it would look up next:
        joining it after that one lets it reuse the block instead of computing it too."""
        seen, later = set(), []
        for tokens, space in zip(contexts, spaces):
            n = len(self.match(tokens, space))
            key = (space, *tokens[:(n + 1) * self.block]) if (len(tokens) - 1) // self.block > n else None
            later.append(key is not None and key in seen)
            seen.add(key)
        return later

    def _piece(self, tokens: Sequence[int], j: int) -> tuple[int, ...]:
        return tuple(tokens[j * self.block:(j + 1) * self.block])

    def _touch(self, path: list[Block]) -> None:
        for node in reversed(path):  # children before parents: a parent is never the older
            self.lru.move_to_end(id(node))

    def _make_room(self, nbytes: int, keep: list[Block]) -> bool:
        """Evict old leaves (not those in `keep`) until `nbytes` more fit; False if they cannot."""
        if nbytes > self.budget:
            return False
        kept = {id(node) for node in keep}
        while self.nbytes + nbytes > self.budget:
            victim = next((b for b in self.lru.values() if not b.children and id(b) not in kept), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, node: Block) -> None:
        siblings = node.parent.children if node.parent is not None else self.roots[node.space]
        del siblings[node.tokens]
        del self.lru[id(node)]
        self.nbytes -= node.nbytes
        self.stats.evicted += 1
