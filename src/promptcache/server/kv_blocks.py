"""Event blocks: the blocks of `block_size` tokens a server announces in its KV events, counted by
how many holders (live sequences, cached entries) of one medium cover each.

Owns turning holder-level changes ("this holder now covers these tokens") into block-level events
(stored when a block gets its first holder, removed when it loses its last) and the blocks' content
hashes, alike on every server; pure: no sockets, no threads, no clock (kv_events.py sends them).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from hashlib import blake2b
from typing import NewType

import numpy as np

from promptcache.keys import shared_blocks

# A block's hash: 63 bits (a non-negative int64, which every consumer decodes) of a blake2b chain
# over the parent block's hash and the block's token ids. It names only content, so every server
# gives the same blocks the same hashes: vllm-router anchors a block by its hash for all workers and
# mediums at once (an experiment with 0.1.17: a second worker's or medium's store of the same
# hashes is credited, and its removal leaves the others' claims).
BlockHash = NewType("BlockHash", int)
_MASK = (1 << 63) - 1
ROOT = BlockHash(int.from_bytes(blake2b(b"promptcache/kv-events/v1").digest()[:8], "big") & _MASK)


def chain_hash(parent: int, block_le: bytes | memoryview) -> BlockHash:
    """The hash of a block of token ids (uint32 little-endian bytes) following block `parent`."""
    h = blake2b(parent.to_bytes(8, "big"), digest_size=8)
    h.update(block_le)
    return BlockHash(int.from_bytes(h.digest(), "big") & _MASK)


@dataclass(frozen=True)
class Stored:
    """Blocks that became servable, in chain order: `parent` (None for a prompt's first block) was
    announced before them; `tokens` are their token ids, block_size per hash."""

    hashes: tuple[BlockHash, ...]
    parent: BlockHash | None
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Removed:
    """Blocks no longer servable, deepest first."""

    hashes: tuple[BlockHash, ...]


@dataclass
class _Block:
    parent: BlockHash | None
    tokens: bytes  # uint32 little-endian
    holders: int


class BlockCounts:
    """The announced blocks of one medium: a block is announced while at least one holder covers
    it. Each holder covers a prefix of a prompt, so the announced blocks of a prompt always form a
    prefix too, and a stored block's parent is always announced."""

    def __init__(self, block_size: int) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError("block_size must be an int >= 1")
        self.block_size = block_size
        self._holders: dict[Hashable, tuple[bytes, list[BlockHash]]] = {}
        self._blocks: dict[BlockHash, _Block] = {}

    def __len__(self) -> int:
        """Blocks announced."""
        return len(self._blocks)

    def __contains__(self, block: object) -> bool:
        return block in self._blocks

    def hold(self, holder: Hashable, tokens_le: bytes) -> list[Stored | Removed]:
        """`holder` now covers exactly `tokens_le` (uint32 little-endian token ids; a partial last
        block counts for nothing); returns the events that keep the announced blocks equal to the
        blocks some holder covers: stores first (each chained onto an announced parent), then
        removals."""
        step = 4 * self.block_size
        n = len(tokens_le) // step
        tokens_le = bytes(tokens_le[: n * step])
        old_tokens, old = self._holders.pop(holder, (b"", []))
        k = shared_blocks(old_tokens, tokens_le, self.block_size, min(len(old), n))
        new = old[:k]
        parent = new[-1] if new else ROOT
        view = memoryview(tokens_le)
        for i in range(k, n):
            parent = chain_hash(parent, view[i * step : (i + 1) * step])
            new.append(parent)
        if n:
            self._holders[holder] = (tokens_le, new)
        events: list[Stored | Removed] = self._count_in(new, k, tokens_le)
        gone = [h for h in reversed(old[k:]) if self._count_out(h)]
        if gone:
            events.append(Removed(tuple(gone)))
        return events

    def release(self, holder: Hashable) -> list[Stored | Removed]:
        """`holder` covers nothing now."""
        return self.hold(holder, b"")

    def release_all(self) -> list[Removed]:
        """Every holder covers nothing now: one removal of every announced block, deepest first (a
        block is announced after its parent, so the reverse of that order)."""
        gone = tuple(reversed(self._blocks))
        self._holders.clear()
        self._blocks.clear()
        return [Removed(gone)] if gone else []

    def restate(self) -> list[Stored]:
        """Stores that announce every block again, parents first (after an AllBlocksCleared)."""
        out: list[Stored] = []
        done: set[BlockHash] = set()
        for _, chain in self._holders.values():
            out += self._runs(chain, 0, lambda h: h not in done)
            done.update(chain)
        return out

    # ------------------------------------------------------------------------------ counting

    def _count_in(self, chain: list[BlockHash], start: int, tokens_le: bytes) -> list[Stored]:
        """Count the holder in on chain[start:]; stores for the blocks it is the first to hold."""
        step = 4 * self.block_size
        first: set[BlockHash] = set()
        for i in range(start, len(chain)):
            block = self._blocks.get(chain[i])
            if block is None:
                parent = chain[i - 1] if i else None
                block = _Block(parent, tokens_le[i * step : (i + 1) * step], 0)
                self._blocks[chain[i]] = block
                first.add(chain[i])
            block.holders += 1
        return self._runs(chain, start, first.__contains__)

    def _count_out(self, block: BlockHash) -> bool:
        """Count one holder out of `block`; True when it lost its last."""
        held = self._blocks[block]
        held.holders -= 1
        if held.holders:
            return False
        del self._blocks[block]
        return True

    def _runs(
        self, chain: list[BlockHash], start: int, wanted: Callable[[BlockHash], bool]
    ) -> list[Stored]:
        """One Stored per run of consecutive wanted blocks of chain[start:]."""
        out = []
        for lo, hi in _spans([wanted(h) for h in chain[start:]]):
            hashes = tuple(chain[start + lo : start + hi])
            parent = self._blocks[hashes[0]].parent
            body = b"".join(self._blocks[h].tokens for h in hashes)
            tokens = tuple(np.frombuffer(body, dtype="<u4").tolist())
            out.append(Stored(hashes, parent, tokens))
        return out


def _spans(flags: list[bool]) -> Iterator[tuple[int, int]]:
    """(start, stop) of every run of True in flags."""
    lo = None
    for i, flag in enumerate(flags):
        if flag and lo is None:
            lo = i
        elif not flag and lo is not None:
            yield lo, i
            lo = None
    if lo is not None:
        yield lo, len(flags)


__all__ = ["BlockCounts", "BlockHash", "ROOT", "Removed", "Stored", "chain_hash"]
