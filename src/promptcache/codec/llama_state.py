"""Parse, slice and join the bytes of llama.cpp's `llama_state_seq_get_data` for one sequence.

Owns the byte layout and the segment format only; it never calls llama.cpp, stores or hashes entries.

The state, as written by llama-cpp-python 0.3.36's llama.cpp (src/llama-kv-cache.cpp,
`llama_kv_cache::state_write`, `state_write_meta`, `state_write_data`), all little-endian:

    u32 magic 0xaf143cd8, i32 source seq_id        (llama-context.cpp, state_seq_write_data)
    u32 n_stream; per stream: u32 cell_count, and when cell_count > 0:
      cell_count x (i32 pos, u32 n_seq_id, [llama_kv_cell_ext,] n_seq_id x i32 seq_id)
      u32 v_trans, u32 n_layer
      per layer: i32 k_type, u64 k_row_size, cell_count x k_row_size bytes
      per layer, v_trans 0: i32 v_type, u64 v_row_size, cell_count x v_row_size bytes
      per layer, v_trans 1: i32 v_type, u32 v_el_size, u32 n_embd_v_gqa,
                            n_embd_v_gqa x (cell_count x v_el_size bytes)

Only one stream holding one sequence whose cells have positions 0..n-1 in order is understood.
Interleaved-SWA models append a second cache and recurrent models use another format: their
states do not parse to the last byte, and every such state raises CodecError (store it whole).

A segment is this codec's own format, self-describing so that it can be checked on its own:

    4s b"PCKV", u16 version, u16 0, i32 source seq_id, u32 start, u32 n_cells, u32 layout_len
    layout_len bytes: Layout.encode() (the per-layer headers of the state, without the data)
    n_cells cell records, as in the state
    per layer: n_cells K rows
    per layer: n_cells V rows, or (v_trans) the n_embd_v_gqa x n_cells block of V elements

so a segment is the state's bytes for its cells with the per-layer headers moved up front.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b
from itertools import pairwise

import numpy as np

from promptcache.errors import CodecError

Buffer = bytes | bytearray | memoryview

STATE_MAGIC = 0xAF143CD8
SEGMENT_MAGIC = b"PCKV"
SEGMENT_VERSION = 1

# llama_kv_cell_ext is written only by models with several positions per embedding (M-RoPE):
# two i32 (x, y) in llama.cpp of 0.3.36; later llama.cpp adds a token id. The size is not in
# the bytes, so each is tried and exactly one must parse.
CELL_EXT_SIZES = (0, 8, 12)

_HEAD = struct.Struct("<Ii")  # magic, source seq_id
_U32 = struct.Struct("<I")
_U32x2 = struct.Struct("<II")
_ROW_HEAD = struct.Struct("<iQ")  # type, row size (K, and V without v_trans)
_VT_HEAD = struct.Struct("<iII")  # type, element size, n_embd_v_gqa (V with v_trans)
_LAYOUT_HEAD = struct.Struct("<IIII")  # n_stream, v_trans, n_layer, cell_ext_bytes
_SEG_HEAD = struct.Struct("<4sHHiIII")

_MAX_LAYERS = 4096
_UNDERSTOOD = "the llama.cpp state layout is not understood"


@dataclass(frozen=True)
class Layout:
    """What a state's bytes look like per token, apart from how many tokens there are.

    Per layer: K type (ggml_type id) and row size in bytes; V type, and V row size (without
    v_trans) or element size and n_embd_v_gqa (with v_trans; v_row_sizes is then their product).
    v_el_sizes and n_embd_v_gqa are 0 where the state does not record them (v_trans off).
    """

    n_stream: int
    v_trans: bool
    cell_ext_bytes: int
    k_types: tuple[int, ...]
    k_row_sizes: tuple[int, ...]
    v_types: tuple[int, ...]
    v_row_sizes: tuple[int, ...]
    v_el_sizes: tuple[int, ...]
    n_embd_v_gqa: tuple[int, ...]

    @property
    def n_layer(self) -> int:
        return len(self.k_types)

    @property
    def cell_ext(self) -> bool:
        """Whether each cell record carries llama_kv_cell_ext (M-RoPE models)."""
        return self.cell_ext_bytes > 0

    @property
    def cell_bytes(self) -> int:
        """Bytes of one cell record: pos, n_seq_id (always 1 here), ext, one seq_id."""
        return 12 + self.cell_ext_bytes

    @property
    def bytes_per_token(self) -> int:
        return self.cell_bytes + sum(self.k_row_sizes) + sum(self.v_row_sizes)

    def k_heads(self) -> list[bytes]:
        """Per layer, the header the state writes before that layer's K rows."""
        return [_ROW_HEAD.pack(t, r) for t, r in zip(self.k_types, self.k_row_sizes, strict=True)]

    def v_heads(self) -> list[bytes]:
        """Per layer, the header the state writes before that layer's V rows or V block."""
        if self.v_trans:
            return [
                _VT_HEAD.pack(t, e, n)
                for t, e, n in zip(self.v_types, self.v_el_sizes, self.n_embd_v_gqa, strict=True)
            ]
        return [_ROW_HEAD.pack(t, r) for t, r in zip(self.v_types, self.v_row_sizes, strict=True)]

    def encode(self) -> bytes:
        """Four u32 (n_stream, v_trans, n_layer, cell_ext_bytes), then every K and V header."""
        head = _LAYOUT_HEAD.pack(self.n_stream, self.v_trans, self.n_layer, self.cell_ext_bytes)
        return b"".join([head, *self.k_heads(), *self.v_heads()])

    @classmethod
    def decode(cls, blob: Buffer) -> Layout:
        """The inverse of encode. Raises CodecError if blob is not one whole encoded layout."""
        cur = _Cursor(blob)
        n_stream, v_trans, n_layer, ext = cur.take(_LAYOUT_HEAD)
        if (
            n_stream != 1
            or v_trans not in (0, 1)
            or ext not in CELL_EXT_SIZES
            or not 0 < n_layer <= _MAX_LAYERS
        ):
            raise CodecError("the segment's layout header is corrupt")
        k = [cur.take(_ROW_HEAD) for _ in range(n_layer)]
        if v_trans:
            vt = [cur.take(_VT_HEAD) for _ in range(n_layer)]
            v = [(t, e * n, e, n) for t, e, n in vt]
        else:
            v = [(t, r, 0, 0) for t, r in (cur.take(_ROW_HEAD) for _ in range(n_layer))]
        cur.expect_end("segment layout")
        layout = cls(
            n_stream,
            bool(v_trans),
            ext,
            *(tuple(x) for x in zip(*k, strict=True)),  # type: ignore[arg-type]
            *(tuple(x) for x in zip(*v, strict=True)),  # type: ignore[arg-type]
        )
        layout._check()
        return layout

    def _check(self) -> None:
        sizes = self.k_row_sizes + self.v_row_sizes + self.v_el_sizes + self.n_embd_v_gqa
        if min(self.k_row_sizes + self.v_row_sizes) <= 0 or min(sizes) < 0:
            raise CodecError(f"{_UNDERSTOOD}: a K or V row size is not positive")


class _Cursor:
    """Reads fixed-size little-endian fields from a buffer, raising CodecError past its end."""

    def __init__(self, buf: Buffer, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf)

    def take(self, fmt: struct.Struct) -> tuple:
        if self.pos + fmt.size > self.end:
            raise CodecError(f"{_UNDERSTOOD}: it ends inside a header (truncated?)")
        values = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return values

    def skip(self, n: int) -> int:
        """Advances past n bytes of data; returns where they start."""
        start = self.pos
        if n < 0 or start + n > self.end:
            raise CodecError(f"{_UNDERSTOOD}: it ends inside its data (truncated?)")
        self.pos += n
        return start

    def expect_end(self, what: str) -> None:
        if self.pos != self.end:
            raise CodecError(
                f"{_UNDERSTOOD}: {what} has {self.end - self.pos} bytes after its last field "
                "(a second cache, as interleaved-SWA models write, or a foreign format)"
            )


@dataclass(frozen=True)
class _Cells:
    """Numpy views of one sequence's cells in a state or a segment (no copies).

    cells: (n, cell_bytes) uint8. k[l]: (n, k_row) uint8. v[l]: (n, v_row) uint8, or with
    v_trans the (n_embd_v_gqa, n * el) uint8 block whose row j holds element j of every cell.
    """

    layout: Layout
    seq_id: int
    start: int
    n: int
    cells: np.ndarray
    k: list[np.ndarray]
    v: list[np.ndarray]

    def body_parts(self, a: int, b: int) -> list[np.ndarray]:
        """Views of cells [a, b) (relative), in segment body order."""
        lay = self.layout
        parts = [self.cells[a:b]] + [k[a:b] for k in self.k]
        if lay.v_trans:
            parts += [v[:, a * el : b * el] for v, el in zip(self.v, lay.v_el_sizes, strict=True)]
        else:
            parts += [v[a:b] for v in self.v]
        return parts


def _check_cells(cells: np.ndarray, layout: Layout, start: int) -> None:
    words = cells.view("<i4")
    n = len(words)
    if not np.array_equal(words[:, 0], np.arange(start, start + n)):
        raise CodecError(f"{_UNDERSTOOD}: cell positions are not {start}..{start + n - 1} in order")
    if n and not (words[:, 1] == 1).all():
        raise CodecError(f"{_UNDERSTOOD}: a cell belongs to more or fewer than one sequence")


@dataclass(frozen=True)
class _Stream:
    """Where one KV stream's parts lie in a state: n cells at cells_at, then per layer a K block
    (type, row size, offset) and a V block (type, row size, element size, n_embd_v_gqa, offset;
    the last two are 0 without v_trans); `end` is the offset just past its last byte."""

    n: int
    cells_at: int
    v_trans: bool
    k: tuple[tuple[int, int, int], ...]
    v: tuple[tuple[int, int, int, int, int], ...]
    end: int


def _read_stream(cur: _Cursor, n: int, ext: int) -> _Stream:
    """The parts of one stream of n > 0 cells whose records start at the cursor (each cell one
    sequence, `ext` bytes of cell extension); leaves the cursor past it. Raises CodecError."""
    cells_at = cur.skip(n * (12 + ext))
    v_trans, n_layer = cur.take(_U32x2)
    if v_trans not in (0, 1) or not 0 < n_layer <= _MAX_LAYERS:
        raise CodecError(f"{_UNDERSTOOD}: v_trans {v_trans}, n_layer {n_layer}")
    k, v = [], []
    for _ in range(n_layer):
        k_type, row = cur.take(_ROW_HEAD)
        k.append((k_type, row, cur.skip(n * row)))
    for _ in range(n_layer):
        if v_trans:
            v_type, el, n_embd = cur.take(_VT_HEAD)
            v.append((v_type, el * n_embd, el, n_embd, cur.skip(n * el * n_embd)))
        else:
            v_type, row = cur.take(_ROW_HEAD)
            v.append((v_type, row, 0, 0, cur.skip(n * row)))
    return _Stream(n, cells_at, bool(v_trans), tuple(k), tuple(v), cur.pos)


def _parse_state(state: Buffer, ext: int) -> _Cells | None:
    """The cells of a llama.cpp state read with `ext` bytes of cell extension, or None if empty."""
    cur = _Cursor(state)
    magic, seq_id = cur.take(_HEAD)
    if magic != STATE_MAGIC:
        raise CodecError(f"{_UNDERSTOOD}: magic {magic:#x} is not {STATE_MAGIC:#x}")
    (n_stream,) = cur.take(_U32)
    if n_stream != 1:
        raise CodecError(f"{_UNDERSTOOD}: {n_stream} KV streams (only a unified KV cache, 1)")
    (n,) = cur.take(_U32)
    if n == 0:
        cur.expect_end("an empty state")
        return None
    stream = _read_stream(cur, n, ext)
    cur.expect_end("the state")
    k_types, k_rows, k_at = (tuple(x) for x in zip(*stream.k, strict=True))
    v_types, v_rows, v_els, v_embd, v_at = (tuple(x) for x in zip(*stream.v, strict=True))
    layout = Layout(n_stream, stream.v_trans, ext, k_types, k_rows, v_types, v_rows, v_els, v_embd)
    layout._check()
    raw = np.frombuffer(state, dtype=np.uint8)
    cell_bytes = 12 + ext
    cells = raw[stream.cells_at : stream.cells_at + n * cell_bytes].reshape(n, cell_bytes)
    _check_cells(cells, layout, 0)
    k = [raw[at : at + n * row].reshape(n, row) for at, row in zip(k_at, k_rows, strict=True)]
    if stream.v_trans:
        v = [
            raw[at : at + n * el * e].reshape(e, n * el)
            for at, el, e in zip(v_at, v_els, v_embd, strict=True)
        ]
    else:
        v = [raw[at : at + n * row].reshape(n, row) for at, row in zip(v_at, v_rows, strict=True)]
    return _Cells(layout, seq_id, 0, n, cells, k, v)


def _read_state(state: Buffer) -> _Cells | None:
    """Parses a whole state; exactly one cell-extension size must account for every byte."""
    found, errors = [], []
    for ext in CELL_EXT_SIZES:
        try:
            cells = _parse_state(state, ext)
        except CodecError as exc:
            errors.append(exc)
            continue
        if cells is None:  # empty: no cells, nothing else to parse
            return None
        found.append(cells)
    if not found:
        raise errors[0]
    if len(found) > 1:
        raise CodecError(f"{_UNDERSTOOD}: its cell records parse with more than one size")
    return found[0]


@functools.lru_cache(maxsize=64)
def _decode_layout(blob: bytes) -> Layout:
    """Layout.decode, memoized: every segment of one model repeats the same layout bytes."""
    return Layout.decode(blob)


@dataclass(frozen=True)
class _SegmentBody:
    """A segment's header fields and its body as one flat uint8 view (no per-layer views)."""

    layout: Layout
    seq_id: int
    start: int
    n: int
    body: np.ndarray


def _read_segment_body(segment: Buffer) -> _SegmentBody:
    """The checks of _read_segment (magic, version, exact length, cell positions) without the
    per-layer views: what join needs, at a fraction of the cost per segment."""
    cur = _Cursor(segment)
    magic, version, _, seq_id, start, n, layout_len = cur.take(_SEG_HEAD)
    if magic != SEGMENT_MAGIC or version != SEGMENT_VERSION:
        raise CodecError(
            f"not a {LlamaStateCodec.name} segment (magic {magic!r}, version {version})"
        )
    at = cur.skip(layout_len)
    layout = _decode_layout(bytes(memoryview(segment)[at : at + layout_len]))
    body_at = cur.skip(n * layout.bytes_per_token)
    cur.expect_end("the segment")
    body = np.frombuffer(segment, dtype=np.uint8, count=n * layout.bytes_per_token, offset=body_at)
    _check_cells(body[: n * layout.cell_bytes].reshape(n, layout.cell_bytes), layout, start)
    return _SegmentBody(layout, seq_id, start, n, body)


def _join_bodies(parts: Sequence[_SegmentBody]) -> bytes:
    """llama.cpp's state bytes for consecutive segments: runs of equal-size segments are stacked
    once and scattered into the output with a few strided copies per layer, instead of one small
    copy per segment and layer (164 segments of 8 tokens joined in a third of the time).

    One function on purpose (a measured kernel, over the ~60-line guide): the offsets, the
    preallocated output and the per-layer loops share locals on the hot restore path; split into
    helpers, they cost calls and re-derived offsets per layer."""
    first = parts[0]
    lay = first.layout
    n = sum(p.n for p in parts)
    cb = lay.cell_bytes
    head = _HEAD.pack(STATE_MAGIC, first.seq_id) + _U32x2.pack(lay.n_stream, n)
    mid = _U32x2.pack(lay.v_trans, lay.n_layer)
    k_heads, v_heads = lay.k_heads(), lay.v_heads()
    total = len(head) + n * cb + len(mid) + sum(map(len, k_heads)) + sum(map(len, v_heads))
    total += n * (sum(lay.k_row_sizes) + sum(lay.v_row_sizes))
    out = np.empty(total, dtype=np.uint8)
    at = 0

    def take(size: int) -> np.ndarray:
        nonlocal at
        region = out[at : at + size]
        at += size
        return region

    def put(raw: bytes) -> None:
        take(len(raw))[:] = np.frombuffer(raw, dtype=np.uint8)

    put(head)
    cells_out = take(n * cb)
    put(mid)
    k_out = []
    for k_head, r in zip(k_heads, lay.k_row_sizes, strict=True):
        put(k_head)
        k_out.append(take(n * r))
    v_out = []
    for v_head, r in zip(v_heads, lay.v_row_sizes, strict=True):
        put(v_head)
        v_out.append(take(n * r))
    if at != total:
        raise CodecError(f"joined {at} bytes, expected {total}")

    tok, i = 0, 0
    while i < len(parts):
        j = i
        while j < len(parts) and parts[j].n == parts[i].n:
            j += 1
        run, m = parts[i:j], parts[i].n
        S = len(run)
        X = (np.concatenate([p.body for p in run]) if S > 1 else run[0].body).reshape(
            S, m * lay.bytes_per_token
        )
        off = 0
        cells_out[tok * cb : (tok + S * m) * cb].reshape(S, m * cb)[:] = X[:, off : off + m * cb]
        off += m * cb
        for dst, r in zip(k_out, lay.k_row_sizes, strict=True):
            dst[tok * r : (tok + S * m) * r].reshape(S, m * r)[:] = X[:, off : off + m * r]
            off += m * r
        for il, (dst, r) in enumerate(zip(v_out, lay.v_row_sizes, strict=True)):
            if lay.v_trans:  # row j of the result is row j of every segment, in order
                e, el = lay.n_embd_v_gqa[il], lay.v_el_sizes[il]
                block = dst.reshape(e, n * el)[:, tok * el : (tok + S * m) * el].reshape(
                    e, S, m * el
                )
                if not np.shares_memory(
                    block, out
                ):  # numpy made a copy: writing to it would be lost
                    raise CodecError("internal: V block is not a view of the output")
                block[:] = X[:, off : off + m * r].reshape(S, e, m * el).transpose(1, 0, 2)
            else:
                dst[tok * r : (tok + S * m) * r].reshape(S, m * r)[:] = X[:, off : off + m * r]
            off += m * r
        tok += S * m
        i = j
    return out.tobytes()


_FEW_SEGMENTS = 8  # up to this many, one b"".join of per-layer views copies least (measured)


def _join_views(parts: Sequence[_Cells]) -> bytes:
    """llama.cpp's state bytes for a few consecutive segments: one b"".join of per-layer views."""
    first = parts[0]
    lay = first.layout
    n = sum(p.n for p in parts)
    pieces: list[Buffer | np.ndarray] = [
        _HEAD.pack(STATE_MAGIC, first.seq_id) + _U32x2.pack(lay.n_stream, n),
        *(p.cells for p in parts),
        _U32x2.pack(lay.v_trans, lay.n_layer),
    ]
    for il, head in enumerate(lay.k_heads()):
        pieces.append(head)
        pieces += [p.k[il] for p in parts]  # consecutive rows: b"".join concatenates them
    for il, head in enumerate(lay.v_heads()):
        pieces.append(head)
        if lay.v_trans:  # row j of the result is row j of every segment, in order
            pieces.append(np.concatenate([p.v[il] for p in parts], axis=1))
        else:
            pieces += [p.v[il] for p in parts]
    return b"".join(pieces)


def _read_segment(segment: Buffer) -> _Cells:
    """A segment's cells with per-layer numpy views into its bytes (checked as _read_segment_body)."""
    seg = _read_segment_body(segment)
    layout, n = seg.layout, seg.n
    sizes = [layout.cell_bytes, *layout.k_row_sizes, *layout.v_row_sizes]
    views, at = [], 0
    for size in sizes:
        views.append(seg.body[at : at + n * size])
        at += n * size
    cells = views[0].reshape(n, layout.cell_bytes)
    k = [
        b.reshape(n, r)
        for b, r in zip(views[1 : 1 + layout.n_layer], layout.k_row_sizes, strict=True)
    ]
    v_blocks = views[1 + layout.n_layer :]
    if layout.v_trans:
        v = [
            b.reshape(e, n * el)
            for b, e, el in zip(v_blocks, layout.n_embd_v_gqa, layout.v_el_sizes, strict=True)
        ]
    else:
        v = [b.reshape(n, r) for b, r in zip(v_blocks, layout.v_row_sizes, strict=True)]
    return _Cells(layout, seg.seq_id, seg.start, n, cells, k, v)


def _write_segment(src: _Cells, a: int, b: int) -> bytes:
    """The segment for src's cells [a, b) (relative to src.start)."""
    blob = src.layout.encode()
    head = _SEG_HEAD.pack(
        SEGMENT_MAGIC, SEGMENT_VERSION, 0, src.seq_id, src.start + a, b - a, len(blob)
    )
    # One b"".join into a fresh bytes object: cheaper than filling a numpy buffer and then
    # copying it into bytes (a second 20+ MB allocation, page faults included, for 1,000 tokens).
    # Only v_trans blocks are strided and need their own (per-layer) copy.
    parts = [np.ascontiguousarray(p) for p in src.body_parts(a, b)]
    return b"".join([head, blob, *parts])


class LlamaStateCodec:
    """Cuts llama.cpp sequence states (`llama_state_seq_get_data`) into token-range segments.

    Raises CodecError for every state it cannot be sure of (several streams, a second cache,
    recurrent state, cells out of order); the caller then keeps such states whole.
    """

    name = "llama-seq-v1"
    splittable = True

    def layout(self, state: Buffer) -> Layout:
        """The layout of a state or a segment. Raises CodecError (also for an empty state)."""
        cells = _read_any(state)
        if cells is None:
            raise CodecError("an empty state has no layout")
        return cells.layout

    def layout_id(self, state: Buffer) -> str:
        """A short string naming the layout (not the length), stable across runs and machines."""
        digest = blake2b(self.layout(state).encode(), digest_size=8).hexdigest()
        return f"{self.name}:{digest}"

    def n_tokens(self, state: Buffer) -> int:
        """How many tokens a state (or a segment) covers. Raises CodecError."""
        cells = _read_any(state)
        return 0 if cells is None else cells.n

    def split(self, state: Buffer, bounds: Sequence[int]) -> list[bytes]:
        """Segments for [bounds[0], bounds[1]), ... of a whole state. Raises CodecError."""
        src = _read_state(state)
        if src is None:
            raise CodecError("an empty state cannot be split")
        bounds = list(bounds)
        if not bounds or bounds != sorted(bounds) or bounds[0] < 0 or bounds[-1] > src.n:
            raise CodecError(f"bounds {bounds[:4]}... do not fit a state of {src.n} tokens")
        return [_write_segment(src, a, b) for a, b in pairwise(bounds)]

    def join(self, segments: Sequence[Buffer]) -> bytes:
        """The llama.cpp state of consecutive segments starting at token 0. Raises CodecError."""
        if not segments:
            raise CodecError("nothing to join")
        parts = [_read_segment_body(s) for s in segments]
        first = parts[0]
        if first.start != 0:
            raise CodecError(f"the first segment starts at token {first.start}, not 0")
        for prev, nxt in pairwise(parts):
            if nxt.layout != first.layout:
                raise CodecError("segments of different KV layouts do not join")
            if nxt.start != prev.start + prev.n:
                raise CodecError(
                    f"segments are not consecutive: [{prev.start}, {prev.start + prev.n}) "
                    f"then [{nxt.start}, {nxt.start + nxt.n})"
                )
        if sum(p.n for p in parts) == 0:
            return _HEAD.pack(STATE_MAGIC, first.seq_id) + _U32x2.pack(first.layout.n_stream, 0)
        if len(parts) > _FEW_SEGMENTS:
            return _join_bodies(parts)
        return _join_views([_read_segment(s) for s in segments])

    def cut(self, segment: Buffer, n: int) -> bytes:
        """The segment of the first n tokens of `segment`. Raises CodecError."""
        src = _read_segment(segment)
        if not 0 <= n <= src.n:
            raise CodecError(f"cannot cut {n} tokens from a segment of {src.n}")
        return _write_segment(src, 0, n)


def _read_any(buf: Buffer) -> _Cells | None:
    if bytes(memoryview(buf)[:4]) == SEGMENT_MAGIC:
        return _read_segment(buf)
    return _read_state(buf)
