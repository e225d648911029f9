"""CacheConfig's sections: every flat name (keyword, attribute, file, PROMPTCACHE_ variable) reaches
its nested field, the nested form round-trips, and errors name the flat setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptcache.config import CacheConfig, build_cache
from promptcache.config.sections import FLAT_NAMES
from promptcache.config.settings import SETTING_NAMES
from promptcache.errors import ConfigError

# A value other than the default, for each field name, as an environment variable would spell it.
SAMPLES = {
    "size": ("3MB", 3 << 20),
    "policy": ("SIZE", "size"),
    "compression": ("lz4", "lz4"),
    "cleanup_interval": ("5m", 300.0),
    "max_items": ("9", 9),
    "use_mmap": ("true", True),
    "url": ("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/0"),
    "cluster": ("true", True),
    "max_age": ("2h", 7200.0),
    "format": ("safetensors", "safetensors"),
    "batch_buffer": ("9", 9),
    "prefetch": ("9", 9),
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("PROMPTCACHE_CONFIG", "CACHE_MEMORY_SIZE", "CACHE_DISK_SIZE", "CACHE_POLICY"):
        monkeypatch.delenv(name, raising=False)
    for name in SETTING_NAMES:
        monkeypatch.delenv(f"PROMPTCACHE_{name.upper()}", raising=False)
    monkeypatch.setenv("PROMPTCACHE_DISK_PATH", str(tmp_path / "kv"))


def nested(config: CacheConfig, place: tuple[str, ...]) -> object:
    value: object = config
    for part in place:
        value = getattr(value, part)
    return value


def sample(name: str, tmp_path: Path) -> tuple[str, object]:
    field = FLAT_NAMES[name][-1]
    if field == "path":
        return str(tmp_path / name), tmp_path / name
    if name == "model_cache_compression":
        return "true", True
    return SAMPLES[field]


@pytest.mark.parametrize("name", sorted(FLAT_NAMES))
def test_every_flat_name_reaches_its_section(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    raw, expected = sample(name, tmp_path)
    place = FLAT_NAMES[name]
    assert nested(CacheConfig(), place) != expected  # the sample is not the default
    by_keyword = CacheConfig(**{name: raw})
    assert nested(by_keyword, place) == expected == getattr(by_keyword, name)
    monkeypatch.setenv(f"PROMPTCACHE_{name.upper()}", raw)
    by_environment = CacheConfig()
    assert nested(by_environment, place) == expected == getattr(by_environment, name)


def test_every_setting_has_a_row_in_the_documented_table() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    documented = {name for line in rows for name in line.split("|")[1].split("`")[1::2]}
    assert set(SETTING_NAMES) <= documented
    assert len(SETTING_NAMES) == 40


def test_nested_form_round_trips_and_flat_names_outrank_it(tmp_path: Path) -> None:
    config = CacheConfig(memory_size="4MB", system_cache_path=tmp_path / "t", policy="fifo")
    dumped = config.model_dump()
    assert dumped["memory"]["size"] == 4 << 20
    assert dumped["artefacts"]["system_cache"]["path"] == tmp_path / "t"
    assert CacheConfig(**dumped) == config
    again = CacheConfig(**{**dumped, "memory_size": "1MB", "system_cache_max_age": "1h"})
    assert (again.memory.size, again.artefacts.system_cache.max_age) == (1 << 20, 3600.0)
    assert again.artefacts.system_cache.path == tmp_path / "t"  # the rest of the section stays
    assert CacheConfig(memory={"size": "2MB"}).memory.size == 2 << 20


def test_keywords_outrank_the_file_section_by_section(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[cache.memory]\nsize = "7MB"\ntype = "fifo"\n')
    config = CacheConfig.from_file(path, memory={"size": "1MB"})
    assert (config.memory.size, config.memory.policy) == (1 << 20, "fifo")


def test_errors_name_the_flat_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"invalid cache setting training_cache_prefetch=-1"):
        CacheConfig(artefacts={"training_cache": {"prefetch": -1}})
    with pytest.raises(ConfigError, match=r"unknown cache setting 'memory_colour'"):
        CacheConfig(memory={"colour": 1})
    monkeypatch.setenv("PROMPTCACHE_REDIS_URL", "http://x")
    with pytest.raises(ConfigError, match=r"invalid cache setting redis_url='http://x'"):
        CacheConfig()


def test_tier_and_artefact_sections_by_name() -> None:
    config = CacheConfig(disk_policy="fifo")
    assert config.tier("disk") is config.disk and config.tier_policy("disk") == "fifo"
    assert config.artefact("system_cache") is config.artefacts.system_cache
    with pytest.raises(ValueError, match="memory, disk, redis"):
        config.tier("tape")
    with pytest.raises(ValueError, match="model_cache, training_cache, system_cache"):
        config.artefact_cache("tape")


def test_none_is_a_cache_name() -> None:
    assert build_cache("none") is None
    with pytest.raises(ValueError, match="'none'"):
        build_cache("ssd")
