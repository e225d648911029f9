"""genlm-control's own examples (tests/genlm_control_examples, unchanged) on PromptcacheLM and the real default model.

Their Python blocks run as a notebook runs them (top-level await); only the line that builds the LM
differs. Each run is checked against the example's own constraint.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import regex

pytest.importorskip(
    "genlm.control", reason="the genlm-control examples need the lm extra: pip install -e '.[lm]'"
)

from genlm.control import AWRS, BoolCFG, PromptedLLM  # noqa: E402
from genlm.control.constant import EndOfSequence  # noqa: E402

from promptcache.genlm import PromptcacheLM  # noqa: E402

EXAMPLES = Path(__file__).parent / "genlm_control_examples"
README = Path(__file__).parents[1] / "README.md"
HUB_LM = re.compile(r'PromptedLLM\.from_name\(\s*"openai-community/gpt2"')


@pytest.fixture(scope="module")
def lm() -> PromptcacheLM:
    return PromptcacheLM.from_pretrained(None, n_seq=16, n_ctx=512)


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, re.S | re.M)


def on_promptcache(block: str) -> str:
    """The one line that differs: PromptedLLM.from_name("openai-community/gpt2", ...) -> PromptedLLM(lm, ...)."""
    changed, n = HUB_LM.subn("PromptedLLM(lm", block)
    assert n == 1, block
    return changed


def run_cells(cells: list[str], namespace: dict) -> list:
    """Run notebook cells in order in one namespace and one event loop (PromptedLLM keeps its
    prompt in a context variable), awaiting top-level awaits; returns `sequences` after each cell."""
    results = []

    async def run() -> None:
        for i, cell in enumerate(cells):
            code = compile(cell, f"<cell {i}>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            result = eval(code, namespace)  # the cell's own code, as a notebook evaluates it
            if inspect.iscoroutine(result):
                await result
            results.append(namespace.get("sequences"))

    asyncio.run(run())
    return results


def texts(sequences, finished: bool = True) -> list[bytes]:
    """The bytes of each particle of nonzero weight (that ended with EOS, with finished)."""
    out = []
    for context, log_weight in sequences:
        if not np.isfinite(log_weight):
            continue
        done = bool(context) and isinstance(context[-1], EndOfSequence)
        assert done or not finished, context
        out.append(b"".join(t for t in context if not isinstance(t, EndOfSequence)))
    assert out, "every particle has zero weight"
    return out


def test_readme_regex_example(lm, capsys):
    (regex_block, *_) = python_blocks((EXAMPLES / "README.md").read_text())
    assert "BoolFSA.from_regex" in regex_block
    before = lm.engine.stats.queries
    (sequences,) = run_cells([on_promptcache(regex_block)], {"lm": lm})
    assert lm.engine.stats.queries > before  # the particles' queries ran on promptcache's engine
    assert len(sequences) == 10
    for text in texts(sequences):
        assert re.fullmatch(" SMC is (🔥🔥|😍😍|🤌🤌) with LMs", text.decode()), text
    assert set(sequences.decoded_posterior) <= {f" SMC is {e * 2} with LMs" for e in "🔥😍🤌"}


def test_getting_started_sampling_product_and_regex(lm, capsys):
    blocks = python_blocks((EXAMPLES / "docs" / "getting_started.md").read_text())
    basic, product, regex = blocks[:3]  # then the sentiment critic: a DistilBERT from the hub
    assert "direct_token_sampler" in basic and "bos_llm" in product and "AWRS" in regex
    ns = {"lm": lm}
    sampled, _, constrained = run_cells([on_promptcache(basic), product, regex], ns)
    assert len(sampled) == len(constrained) == 5
    for text in texts(sampled, finished=False):  # '.' ends a sequence: never inside one
        assert b"." not in text, text
    assert ns["mtl_llm"].model is ns["bos_llm"].model is lm  # spawn() shares the LM
    for text in texts(constrained, finished=False):
        assert re.match(rb"\sthe\s(best|worst)", text), text


def test_a_cfg_program_samples_only_sentences_of_its_grammar(lm):
    """A BoolCFG (the grammar of genlm-control's docs/potentials.md) under AWRS and SMC."""
    llm = PromptedLLM(lm, eos_byte_strings=[b"."])
    llm.set_prompt_from_str("A short sentence about pets:")
    cfg = BoolCFG.from_lark(
        """
        start: np vp
        np: ("the" | "a") WS n
        vp: WS v WS np
        n: "cat" | "dog"
        v: "saw" | "chased"
        %import common.WS
        """
    )
    sampler = AWRS(llm, cfg.coerce(llm, f=b"".join))
    np.random.seed(0)
    sequences = asyncio.run(sampler.smc(n_particles=4, ess_threshold=0.5, max_tokens=12))
    sentence = rb"(the|a)\s+(cat|dog)\s+(saw|chased)\s+(the|a)\s+(cat|dog)"
    for text in texts(sequences):
        assert re.fullmatch(sentence, text), text


def test_the_readme_program_runs_as_written(capsys):
    """README, "Probabilistic programs": the genlm-control program on PromptcacheLM, as printed."""
    (program,) = [b for b in python_blocks(README.read_text()) if "PromptcacheLM" in b]
    namespace: dict = {}
    exec(program, namespace)  # builds its own LM on the default model, runs asyncio.run(...)
    reply = rb" (cat|dog|owl)( [a-z]+)*"
    for context, log_weight in namespace["sequences"]:
        text = b"".join(t for t in context if not isinstance(t, EndOfSequence))
        if np.isfinite(log_weight) and context and isinstance(context[-1], EndOfSequence):
            assert re.fullmatch(reply, text), text
        assert regex.fullmatch(reply, text, partial=True), text  # unfinished: a prefix of one
    assert str(namespace["sequences"].decoded_posterior) in capsys.readouterr().out
