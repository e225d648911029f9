"""The places that store and evict report what they hold (holdings.py): a PromptCache's ledger and
an engine's SequenceTable, heard by a listener that keeps holder -> tokens, checked after random
operations against what the place itself says it holds. Synthetic states, no model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic import WIDTH, synthetic_state

from promptcache import FixedWidthCodec, PromptCache
from promptcache.engines.llama_cpp.sequences import SequenceTable
from promptcache.keys import token_bytes
from promptcache.store import MemoryStore


class Heard:
    """A listener that records what each holder covers now."""

    def __init__(self) -> None:
        self.held: dict[object, tuple[int, ...]] = {}

    def holds(self, holder: object, tokens: object) -> None:
        if isinstance(tokens, bytes):
            tokens = tuple(
                int.from_bytes(tokens[i : i + 4], "little") for i in range(0, len(tokens), 4)
            )
        if tokens:
            self.held[holder] = tuple(tokens)
        else:
            assert holder in self.held, "a release of a holder never heard"
            del self.held[holder]

    def cleared(self) -> None:
        self.held.clear()


sequences = st.lists(st.integers(0, 3), min_size=1, max_size=24)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("insert"), st.lists(st.integers(0, 3), min_size=1, max_size=12)),
            st.tuples(st.just("remove"), st.integers(0, 50)),
            st.tuples(st.just("clear"), st.just(0)),
        ),
        min_size=3,
        max_size=25,
    )
)
def test_the_cache_reports_every_entry_it_indexes_and_forgets(ops: list) -> None:
    # Room for 16 tokens: a few inserts evict.
    cache = PromptCache(MemoryStore(16 * WIDTH), codec=FixedWidthCodec(WIDTH), block_size=4)
    heard, other = Heard(), Heard()
    cache.listen(heard, fingerprint="fp")
    cache.insert([9, 9, 9, 9, 9], synthetic_state([9, 9, 9, 9, 9]), "other-model")
    inserted: list[list[int]] = []
    for op, arg in ops:
        if op == "insert":
            cache.insert(arg, synthetic_state(arg), "fp")
            inserted.append(arg)
        elif op == "remove" and inserted:
            cache.remove(inserted[arg % len(inserted)], "fp")
        elif op == "clear":
            cache.clear()
        index = cache._indexes.get("fp")
        nodes = list(index.sequences()) if index else []
        entries = {tuple(_ids(index.tokens_of(n))) for n in nodes}
        assert set(heard.held.values()) == entries
        assert all(holder == ("fp", token_bytes(list(t))) for holder, t in heard.held.items())
    # A listener that comes late hears what is cached now.
    cache.listen(other, fingerprint="fp")
    assert other.held == heard.held


def _ids(tokens_le: bytes) -> list[int]:
    return [int.from_bytes(tokens_le[i : i + 4], "little") for i in range(0, len(tokens_le), 4)]


@settings(max_examples=80, deadline=None)
@given(
    granularity=st.integers(1, 4),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["add", "set", "remove", "clear"]),
            st.integers(0, 3),
            sequences,
            st.integers(0, 24),
        ),
        max_size=30,
    ),
)
def test_the_sequence_table_reports_each_reusable_prefix(granularity: int, ops: list) -> None:
    table = SequenceTable(4)
    heard = Heard()
    table.listen(heard, granularity)
    for op, seq, tokens, n in ops:
        if op == "add":
            table.add(seq, tokens, min(n, len(tokens)))
        elif op == "set" and seq in table:
            held = table.get(seq)  # as the engine does after a round: new tokens, then report
            held.tokens, held.n_reusable = list(tokens), min(n, len(tokens))
            table.report(held)
        elif op == "remove":
            table.remove(seq)
        elif op == "clear":
            table.clear()
        expected = {}
        for held in table:
            cut = held.n_reusable // granularity * granularity
            if cut:
                expected[(table.name, held.seq_id)] = tuple(held.tokens[:cut])
        assert heard.held == expected
