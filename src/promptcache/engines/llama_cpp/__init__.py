"""llama.cpp engine: one Engine of many sequences under every path, and LLM, a handle on one of them.

Owns nothing itself: re-exports engine (Engine, Advance), llm (LLM), generation (GenerationConfig,
RunStats, Completion), plan (the reuse rules) and model (Model); never imports llama_cpp at import time.
"""

from promptcache.engines.llama_cpp.engine import Advance, Engine, EngineStats
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
from promptcache.engines.llama_cpp.model import Model
from promptcache.engines.llama_cpp.plan import (
    Finish,
    LiveSequence,
    Prefill,
    Query,
    ReuseRules,
    common_prefix,
)

__all__ = [
    "LLM",
    "Engine",
    "EngineStats",
    "Advance",
    "Model",
    "Query",
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
