"""Reliability, CI subset, the real model: states of SmolLM2 damaged in every persistent tier, a full
disk under the cache, damaged sessions; every answer compared bit for bit (logits and greedy tokens)
with an uncached LLM.

The long runs of the same scenarios: scripts/reliability.py (figures in RELIABILITY.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import scenarios as S
from faults import can_mount

from promptcache import LLM

pytest_plugins = ["redis_fixture"]  # a real redis-server on a free loopback port


@pytest.fixture(scope="module")
def oracle() -> S.Oracle:
    return S.Oracle()


@pytest.fixture(scope="module")
def llm() -> LLM:
    with LLM(n_ctx=512, cache=None) as model:
        yield model


@pytest.mark.parametrize("tier", ["disk", "redis", "tiered"])
def test_damaged_model_states_are_exact_or_recomputed(
    tier: str,
    llm: LLM,
    oracle: S.Oracle,
    tmp_path: Path,
    redis_url: str,
) -> None:
    tally = S.llm_corruption(llm, oracle, tier, 1, tmp_path, redis_url=redis_url, seed=5)
    assert S.passed(tally), dict(tally)


def test_damaged_long_states_read_through_a_memory_map_are_exact_or_recomputed(
    llm: LLM, oracle: S.Oracle, tmp_path: Path
) -> None:
    tally = S.llm_long_state_corruption(llm, oracle, 2, tmp_path, seed=7)
    assert S.passed(tally), dict(tally)


@pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root with CAP_SYS_ADMIN")
def test_a_full_disk_under_the_cache_never_changes_an_answer(
    llm: LLM, oracle: S.Oracle, tmp_path: Path
) -> None:
    tally = S.llm_disk_full(llm, oracle, 1, tmp_path)
    assert S.passed(tally), dict(tally)


def test_every_damaged_session_is_refused(llm: LLM, oracle: S.Oracle) -> None:
    tally = S.session_corruption(llm, oracle, 24, seed=6)
    assert S.passed(tally), dict(tally)
    assert tally["error"] == 24  # the checksum catches every flip and every cut
