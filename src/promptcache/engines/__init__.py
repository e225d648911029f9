"""Engines: model runtimes wired to PromptCache. llama.cpp (through llama-cpp-python) first.

Each engine owns its model and context; none of them stores bytes itself.
"""

from promptcache.engines.llama_cpp import LLM, Completion, GenerationConfig, RunStats

__all__ = ["LLM", "GenerationConfig", "Completion", "RunStats"]
