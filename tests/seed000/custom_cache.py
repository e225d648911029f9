from promptcache.compat import BaseLlamaCache, Llama
from typing import Optional, Tuple  # the seed uses these names without importing them
from promptcache import default_model_path; MODEL_PATH = str(default_model_path())  # noqa: E702
import json
import hashlib
from pathlib import Path

class JSONDiskCache(BaseLlamaCache):
    """Custom cache using JSON files for storage."""
    
    def __init__(self, cache_dir: str = ".json_cache"):
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(exist_ok=True)
    
    def _key_to_filename(self, key: Tuple[int, ...]) -> str:
        """Convert cache key to filename."""
        key_str = str(key)
        key_hash = hashlib.md5(key_str.encode()).hexdigest()
        return f"{key_hash}.json"
    
    def __getitem__(self, key: Tuple[int, ...]) -> Optional[object]:
        file_path = self.cache_dir / self._key_to_filename(key)
        if file_path.exists():
            with open(file_path, 'r') as f:
                return json.load(f)
        return None
    
    def __setitem__(self, key: Tuple[int, ...], value: object) -> None:
        file_path = self.cache_dir / self._key_to_filename(key)
        with open(file_path, 'w') as f:
            json.dump(value, f)
    
    def __contains__(self, key: Tuple[int, ...]) -> bool:
        file_path = self.cache_dir / self._key_to_filename(key)
        return file_path.exists()
    
    def __len__(self) -> int:
        return len(list(self.cache_dir.glob("*.json")))

# Use custom cache
custom_cache = JSONDiskCache("./custom_cache")
llm = Llama(model_path=MODEL_PATH)
llm.set_cache(custom_cache)
