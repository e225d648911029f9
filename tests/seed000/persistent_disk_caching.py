from promptcache.compat import Llama, LlamaDiskCache
from promptcache import default_model_path; MODEL_PATH = str(default_model_path())  # noqa: E702

# Create disk cache in custom directory
cache = LlamaDiskCache(cache_dir="./my_llama_cache")

llm = Llama(model_path=MODEL_PATH)
llm.set_cache(cache)

# Generate text with caching
for i in range(3):
    response = llm.create_completion(
        prompt=f"Write a fact about number {i}:",
        max_tokens=50,
    )
    print(f"Response {i}: {response['choices'][0]['text']}")

# Cache persists across program restarts
print(f"Disk cache contains {len(cache)} items")
