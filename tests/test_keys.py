"""keys.py: PromptKeys (a request's prompt hashed once) gives exactly what block_keys gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache import keys as K

prompts = st.lists(st.integers(min_value=0, max_value=3), max_size=60)


@settings(max_examples=200, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 4, 8]),
    calls=st.lists(
        st.tuples(st.sampled_from(["fp-a", "fp-b"]), prompts, st.integers(0, 20)), max_size=8
    ),
)
def test_prompt_keys_equal_block_keys(
    block_size: int, calls: list[tuple[str, list[int], int]]
) -> None:
    """Whatever prompts came before (sharing blocks, diverging inside a block, another
    fingerprint), the reused keys equal a fresh hash of the prompt."""
    memo = K.PromptKeys(block_size)
    for fingerprint, tokens, asked in calls:
        tb = K.token_bytes(tokens)
        n_blocks = min(asked, len(tokens) // block_size)
        expected = K.block_keys(fingerprint, tb, block_size, n_blocks)
        assert memo.block_keys(fingerprint, tb, n_blocks) == expected


@given(a=prompts, b=prompts, block_size=st.sampled_from([1, 3, 8]))
def test_shared_blocks_is_the_common_full_block_prefix(
    a: list[int], b: list[int], block_size: int
) -> None:
    n = 0
    while (n + 1) * block_size <= min(len(a), len(b)) and a[
        n * block_size : (n + 1) * block_size
    ] == b[n * block_size : (n + 1) * block_size]:
        n += 1
    got = K.shared_blocks(K.token_bytes(a), K.token_bytes(b), block_size, limit=10**6)
    assert got == n
    assert K.shared_blocks(K.token_bytes(a), K.token_bytes(b), block_size, limit=1) == min(n, 1)
