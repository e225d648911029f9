from promptcache.compat import Llama, LlamaDiskCache
from promptcache import default_model_path; MODEL_PATH = str(default_model_path())  # noqa: E702
import os
import time

# Create disk cache
cache = LlamaDiskCache(cache_dir="./temp_cache")

# Use cache
llm = Llama(model_path=MODEL_PATH)
llm.set_cache(cache)

# Generate some cached content
for i in range(5):
    llm.create_completion(
        prompt=f"Example prompt {i}",
        max_tokens=20,
    )

print(f"Cache directory size: {len(cache)} items")

# Manual cache cleanup
cache_dir = cache.cache_dir
if os.path.exists(cache_dir):
    # Get cache directory size
    total_size = sum(
        os.path.getsize(os.path.join(cache_dir, f))
        for f in os.listdir(cache_dir)
    )
    print(f"Cache directory size: {total_size / 1024 / 1024:.2f}MB")
    
    # Clean up old files (example: older than 1 hour)
    current_time = time.time()
    for filename in os.listdir(cache_dir):
        file_path = os.path.join(cache_dir, filename)
        if os.path.getmtime(file_path) < current_time - 3600: # 1 hour
            os.remove(file_path)
            print(f"Removed old cache file: {filename}")
