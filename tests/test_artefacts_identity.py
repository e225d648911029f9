"""Artefact keys: what produced an artefact, so that a change to any part is a miss and nothing else is."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache.artefacts import artefact_key, function_identity, value_identity
from promptcache.artefacts.identity import canonical_json

SRC = str(Path(__file__).resolve().parents[1] / "src")

SCALE = 2


def scaled(batch):  # noqa: ANN001, ANN201
    return {"y": [x * SCALE for x in batch["x"]]}


def make_adder(n: int):  # noqa: ANN201
    def add(batch):  # noqa: ANN001, ANN202
        return {"y": [x + n for x in batch["x"]]}

    return add


def key_of(fn, version=None) -> str:  # noqa: ANN001
    return artefact_key("t", "source", function_identity(fn, version))


def test_closure_values_are_in_the_key() -> None:
    assert key_of(make_adder(1)) == key_of(make_adder(1))
    assert key_of(make_adder(1)) != key_of(make_adder(2))


def test_globals_the_code_names_are_in_the_key() -> None:
    global SCALE
    before = key_of(scaled)
    SCALE = 3
    try:
        assert key_of(scaled) != before
    finally:
        SCALE = 2
    assert key_of(scaled) == before


def test_source_and_code_are_in_the_key() -> None:
    namespace: dict = {}
    exec(
        "def f(batch):\n    return {'y': [x + 1 for x in batch['x']]}", namespace
    )  # no source file
    first = key_of(namespace["f"])
    exec("def f(batch):\n    return {'y': [x - 1 for x in batch['x']]}", namespace)
    assert key_of(namespace["f"]) != first


def test_explicit_version_replaces_inspection() -> None:
    assert key_of(make_adder(1), version="v1") == key_of(make_adder(2), version="v1")
    assert key_of(make_adder(1), version="v1") != key_of(make_adder(1), version="v2")


def test_partials_lambdas_arrays_and_cache_identity() -> None:
    assert value_identity(functools.partial(make_adder, 1)) != value_identity(
        functools.partial(make_adder, 2)
    )
    assert value_identity(lambda b: b) != value_identity(lambda b: {**b})
    a = np.arange(10, dtype=np.int32)
    assert value_identity(a) == value_identity(a.copy()) != value_identity(a.astype(np.int64))

    class Tok:
        def __init__(self, vocab: str) -> None:
            self.vocab = vocab

        def __cache_identity__(self) -> str:
            return self.vocab

    assert value_identity(Tok("a")) == value_identity(Tok("a")) != value_identity(Tok("b"))


def test_unidentifiable_value_is_a_type_error() -> None:
    import threading

    lock = threading.Lock()

    def uses_lock(batch):  # noqa: ANN001, ANN202
        with lock:
            return batch

    try:
        function_identity(uses_lock)
    except TypeError as exc:
        assert "__cache_identity__" in str(exc)
    else:  # dill may serialize some locks; then the identity must at least be stable
        assert function_identity(uses_lock) == function_identity(uses_lock)


def test_key_is_stable_across_processes() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, {tests!r})
        from test_artefacts_identity import key_of, make_adder, scaled
        print(key_of(make_adder(5)), key_of(scaled))
        """
    ).format(tests=str(Path(__file__).parent))
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": SRC, "PYTHONHASHSEED": "123"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [key_of(make_adder(5)), key_of(scaled)]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
        | st.frozensets(st.integers(), max_size=3)
    ),
    max_leaves=10,
)


def typed(value):  # noqa: ANN001, ANN201
    """Brute-force oracle: equality that also compares types (1, 1.0 and True are different parameters)."""
    if isinstance(value, dict):
        return ("dict", frozenset((typed(k), typed(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(typed(v) for v in value))
    if isinstance(value, frozenset):
        return ("set", frozenset(typed(v) for v in value))
    if isinstance(value, float):
        return (
            "float",
            repr(value),
        )  # -0.0 is another parameter than 0.0 (a needless miss at worst)
    return (type(value).__name__, value)


@settings(max_examples=300)
@given(json_values, json_values)
def test_identity_equal_exactly_when_values_equal(a, b) -> None:  # noqa: ANN001
    same = canonical_json(value_identity(a)) == canonical_json(value_identity(b))
    assert same == (typed(a) == typed(b))
