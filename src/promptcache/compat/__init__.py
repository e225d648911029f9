"""Drop-in LlamaRAMCache, LlamaDiskCache, LlamaCache and BaseLlamaCache for `llama_cpp.Llama.set_cache`.

Re-exports the drop-ins and their helpers; owns nothing itself. Nothing here pickles or prints.

llama-cpp-python calls a cache three ways (llama_cpp/llama.py, `_create_completion`):
`if self.cache:`, then `self.cache[prompt_tokens]` (a KeyError is a miss; any other
exception fails the completion) followed by `load_state`, and after generating
`self.cache[prompt_tokens + completion_tokens] = self.save_state()`. These classes keep
that contract and the original semantics (longest shared prefix wins, LRU within
`capacity_bytes`) and replace the parts that hurt: a linear scan over every key, pickled
disk entries, disk entries deleted when read, writes to stderr, and no model check.

The rooms:
- identity.py: which model calls (the calling Llama, found by a stack walk) and its fingerprint
  (the GGUF's whole-file digest and the settings a state's layout depends on); a lookup is served
  only from entries of the caller's fingerprint and state shape.
- entry.py: the entry byte format (a compact LlamaState, and the manifest that indexes it).
- adapter.py: users' BaseLlamaCache subclasses, written as llama-cpp-python's docs show, work
  unchanged (PortableLlamaState).
- caches.py, disk.py: BaseLlamaCache, and the caches as thin layers over promptcache's own stores
  (MemoryStore, DiskStore: they hold the bytes and evict) and RadixIndex (longest-prefix lookup).
"""

from llama_cpp import Llama
from llama_cpp.llama import LlamaState

from promptcache.compat.adapter import PortableLlamaState
from promptcache.compat.caches import BaseLlamaCache, LlamaCache, LlamaRAMCache
from promptcache.compat.disk import LlamaDiskCache
from promptcache.compat.identity import llama_fingerprint

__all__ = [
    "BaseLlamaCache",
    "Llama",
    "LlamaCache",
    "LlamaDiskCache",
    "LlamaRAMCache",
    "LlamaState",
    "PortableLlamaState",
    "llama_fingerprint",
]
