"""The prefix index: a radix tree over token ids with token-granular longest-prefix match.

Owns which token sequences are cached and their recency; holds no state bytes and no store.
Edges are token ids packed as little-endian uint32 bytes, so matching an edge is one memcmp
(`bytes.startswith`), and a match costs O(prompt length), not O(number of entries).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_counter = itertools.count()


class Node:
    """One edge of the tree: the tokens `edge` that lead from `parent` to this node."""

    __slots__ = ("edge", "children", "parent", "depth", "terminal", "value", "last_access", "seq")

    def __init__(self, edge: bytes, parent: Node | None, depth: int) -> None:
        self.edge = edge
        self.children: dict[bytes, Node] = {}
        self.parent = parent
        self.depth = depth  # tokens from the root to the end of this edge
        self.terminal = False
        self.value: Any = None
        self.last_access = 0.0
        self.seq = next(_counter)  # tie-breaker for equal access times


@dataclass(frozen=True)
class Match:
    """Longest cached prefix of a query: `length` tokens, ending inside (or at the end of) `node`'s edge.

    `terminals` are the cached sequences that are themselves prefixes of the query, shortest first.
    """

    length: int
    node: Node
    terminals: tuple[Node, ...]


def _common_prefix_tokens(a: bytes, a_off: int, b: bytes) -> int:
    """Number of whole tokens b shares with a[a_off:], by binary search on memcmp."""
    lo, hi = 0, min(len(b), len(a) - a_off) // 4
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a.startswith(b[: mid * 4], a_off):
            lo = mid
        else:
            hi = mid - 1
    return lo


class RadixIndex:
    """Radix tree of cached token sequences with leaves-first LRU eviction."""

    def __init__(self) -> None:
        self.root = Node(b"", None, 0)
        self._n_sequences = 0

    def __len__(self) -> int:
        return self._n_sequences

    def match(self, tokens_le: bytes) -> Match:
        """Longest prefix of `tokens_le` shared with any cached sequence (token-granular)."""
        node, off, terminals = self.root, 0, []
        n = len(tokens_le)
        while off < n:
            child = node.children.get(tokens_le[off : off + 4])
            if child is None:
                break
            if tokens_le.startswith(child.edge, off):
                node, off = child, off + len(child.edge)
                if child.terminal:
                    terminals.append(child)
                continue
            return Match(
                (off // 4) + _common_prefix_tokens(tokens_le, off, child.edge),
                child,
                tuple(terminals),
            )
        return Match(off // 4, node, tuple(terminals))

    def insert(self, tokens_le: bytes, value: Any = None) -> tuple[Node, bool]:
        """Mark `tokens_le` as a cached sequence; returns (its node, whether it is new)."""
        if not tokens_le:
            raise ValueError("cannot index an empty token sequence")
        node, off, n = self.root, 0, len(tokens_le)
        while off < n:
            head = tokens_le[off : off + 4]
            child = node.children.get(head)
            if child is None:
                leaf = Node(tokens_le[off:], node, n // 4)
                node.children[head] = leaf
                node = leaf
                break
            k = _common_prefix_tokens(tokens_le, off, child.edge) * 4
            if k < len(child.edge):
                child = self._split(child, k)
            node, off = child, off + k
        is_new = not node.terminal
        if is_new:
            node.terminal = True
            self._n_sequences += 1
        node.value = value if value is not None else node.value
        self.touch(node)
        return node, is_new

    def _split(self, child: Node, k: int) -> Node:
        """Cut child's edge after k bytes; returns the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = Node(child.edge[:k], parent, child.depth - (len(child.edge) - k) // 4)
        upper.last_access = child.last_access
        parent.children[child.edge[:4]] = upper
        child.edge = child.edge[k:]
        child.parent = upper
        upper.children[child.edge[:4]] = child
        return upper

    def touch(self, node: Node, now: float | None = None) -> None:
        """Record a use of `node` and its ancestors (a shared prefix is at least as recent as a branch)."""
        now = time.monotonic() if now is None else now
        while node is not None:
            node.last_access = now
            node = node.parent

    def remove(self, node: Node) -> None:
        """Forget the sequence ending at `node`; prunes and merges nodes left without purpose."""
        if not node.terminal:
            raise KeyError("node is not a cached sequence")
        node.terminal = False
        node.value = None
        self._n_sequences -= 1
        while node is not self.root and not node.terminal and not node.children:
            parent = node.parent
            assert parent is not None
            del parent.children[node.edge[:4]]
            node = parent
        if node is not self.root and not node.terminal and len(node.children) == 1:
            (only,) = node.children.values()
            parent = node.parent
            assert parent is not None
            only.edge = node.edge + only.edge
            only.parent = parent
            parent.children[only.edge[:4]] = only

    def find(self, tokens_le: bytes) -> Node | None:
        """The node of exactly this cached sequence, or None."""
        m = self.match(tokens_le)
        if (
            m.length * 4 == len(tokens_le)
            and m.node.depth * 4 == len(tokens_le)
            and m.node.terminal
        ):
            return m.node
        return None

    def terminal_below(self, node: Node) -> Node:
        """Some cached sequence that passes through `node` (the most recently used one)."""
        while not node.terminal:
            node = max(node.children.values(), key=lambda c: c.last_access)
        return node

    def tokens_of(self, node: Node) -> bytes:
        """The whole token sequence (uint32 LE bytes) from the root to the end of `node`."""
        parts = []
        while node is not None and node is not self.root:
            parts.append(node.edge)
            node = node.parent
        return b"".join(reversed(parts))

    def sequences(self) -> Iterator[Node]:
        """Every cached sequence's node, depth first."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.terminal:
                yield node
            stack.extend(node.children.values())

    def lru_leaf(self, exclude: Node | None = None) -> Node | None:
        """The least recently used cached sequence that no other cached sequence extends.

        Falls back to the least recently used of any sequence when every one is extended
        (only `exclude` left as a leaf).
        """
        best = fallback = None
        for node in self.sequences():
            if node is exclude:
                continue
            age = (node.last_access, node.seq)
            if not node.children and (best is None or age < (best.last_access, best.seq)):
                best = node
            if fallback is None or age < (fallback.last_access, fallback.seq):
                fallback = node
        return best if best is not None else fallback
