"""lm-evaluation-harness against the server (issue 13): a small local multiple-choice task scored
through `local-completions` (echo + logprobs, token-exact through the server's /tokenize), once with
the prefix cache and once with `--cache none`; the log-likelihoods must be equal bit for bit while
most prompt tokens come from the cache. Fully offline: the task and its data are written to tmp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from server_process import ServerProcess, cached_and_uncached, serving

PREAMBLE = (
    "The following are questions about farm animals, answered by a careful farmer who has kept "
    "cows, horses, ducks, sheep, pigs and hens for thirty years on a small farm by the river."
)
QUESTIONS = [
    ("Which animal says moo?", ["cow", "duck", "hen"], 0),
    ("Which animal lays eggs?", ["pig", "hen", "horse"], 1),
    ("Which animal gives wool?", ["duck", "cow", "sheep"], 2),
    ("Which animal swims on the pond?", ["duck", "pig", "sheep"], 0),
    ("Which animal pulls a cart?", ["hen", "horse", "duck"], 1),
    ("Which animal rolls in the mud?", ["sheep", "hen", "pig"], 2),
    ("Which animal says quack?", ["duck", "cow", "horse"], 0),
    ("Which animal gives milk?", ["hen", "cow", "duck"], 1),
    ("Which animal says oink?", ["cow", "sheep", "pig"], 2),
    ("Which animal says neigh?", ["horse", "hen", "pig"], 0),
]


def _write_task(tmp: Path) -> Path:
    data = tmp / "farm.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS
        )
    )
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "farm.yaml").write_text(
        "task: promptcache_farm\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        f"description: {json.dumps(PREAMBLE + chr(10) + chr(10))}\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return tasks


def _run_lm_eval(server: ServerProcess, tasks: Path, out: Path) -> list[list[float]]:
    """Each request's log-likelihood, in document and choice order."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(out / "hf"),
        "OPENAI_API_KEY": "unused",
    }
    model_args = (
        f"base_url={server.url}/v1/completions,model=default,tokenizer_backend=remote,"
        "tokenized_requests=True,num_concurrent=1,max_retries=1,timeout=600"
    )
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "local-completions",
        "--model_args",
        model_args,
        "--tasks",
        "promptcache_farm",
        "--include_path",
        str(tasks),
        "--output_path",
        str(out),
        "--log_samples",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    (samples,) = out.rglob("samples_promptcache_farm_*.jsonl")
    docs = [json.loads(line) for line in samples.read_text().splitlines()]
    docs.sort(key=lambda d: d["doc_id"])
    # lm-eval logs each float as its repr, which round-trips exactly.
    return [[float(resp[0][0]) for resp in d["resps"]] for d in docs]


def test_lm_eval_scores_equal_uncached_while_the_cache_serves_most_tokens(
    tmp_path: Path,
) -> None:
    tasks = _write_task(tmp_path)
    with serving(cached_and_uncached(tmp_path, "--n-ctx", "512", "--workers", "1")) as servers:
        scores = {
            name: _run_lm_eval(s, tasks, tmp_path / f"out-{name}") for name, s in servers.items()
        }
        stats = {
            name: httpx.get(f"{s.url}/v1/cache/stats", timeout=30).json()
            for name, s in servers.items()
        }
    assert len(scores["cached"]) == len(QUESTIONS)
    assert all(len(row) == 3 and all(x < 0 for x in row) for row in scores["cached"])
    assert scores["cached"] == scores["none"]  # bit for bit: floats compared with ==
    # lm-eval asks for echo plus one generated token: the echo scores the prompt, then the token's
    # generation restores the prompt from the live context on both servers. The echoes make the
    # difference: uncached, each evaluates its whole prompt; cached, only what follows the shared
    # prefix (its KV and its prompt logprobs restored).
    cached, cold = stats["cached"]["tokens"], stats["none"]["tokens"]
    assert cached["prompt_tokens"] == cold["prompt_tokens"]
    assert cached["tokens_evaluated"] < cold["tokens_evaluated"] / 2, (cached, cold)
