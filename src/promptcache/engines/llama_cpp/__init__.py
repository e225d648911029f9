"""llama.cpp engine: LLM with automatic prefix caching, as a package of one concept a module.

Owns nothing itself: re-exports llm (LLM), generation (GenerationConfig, RunStats, Completion),
plan (the reuse rules), context, probe and session; never imports llama_cpp at import time.
"""

from promptcache.engines.llama_cpp.generation import (
    Completion,
    GenerationConfig,
    KeepReply,
    RunStats,
    TextStream,
    sample,
    stop_prefix_len,
)
from promptcache.engines.llama_cpp.llm import LLM
from promptcache.engines.llama_cpp.plan import (
    Finish,
    LiveSequence,
    Prefill,
    ReuseRules,
    common_prefix,
)

__all__ = [
    "LLM",
    "GenerationConfig",
    "RunStats",
    "Completion",
    "KeepReply",
    "TextStream",
    "sample",
    "stop_prefix_len",
    "ReuseRules",
    "LiveSequence",
    "Prefill",
    "Finish",
    "common_prefix",
]
