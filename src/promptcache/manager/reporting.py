"""Reporting: what a CacheManager's stats(), metrics() and inspect() show, from its tiers, named
caches, artefact caches and cleanup.

Owns the report's rows and their derived numbers (hit rates, usage, eviction counts); never changes
an entry, except that inspect() reads each KV entry it lists (to count its tokens).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from promptcache.errors import CodecError, PromptCacheError
from promptcache.store.tiered import TieredStore

if TYPE_CHECKING:
    from promptcache.artefacts import ArtefactStore
    from promptcache.cache import PromptCache

log = logging.getLogger(__name__)

CACHE_STATS = (
    "sequences",
    "lookups",
    "hits",
    "hit_rate",
    "tokens_looked_up",
    "tokens_reused",
    "hits_by_tier",
    "bytes_written",
)
"""The part of each named PromptCache's stats() that the manager's stats() shows."""


@dataclass(frozen=True)
class EntryInfo:
    """One stored entry as `inspect` shows it. tokens: None when the value is not a KV segment."""

    tier: str
    cache: str
    key: str
    fingerprint: str
    bytes: int
    tokens: int | None
    age_s: float | None


def _rates(raw: dict[str, Any]) -> dict[str, Any]:
    """A store's stats row with hit_rate, usage (bytes / capacity) and eviction_count."""
    row = dict(raw)
    hits, misses = int(row.get("hits", 0)), int(row.get("misses", 0))
    nbytes, capacity = int(row.get("bytes", 0)), int(row.get("capacity_bytes", 0))
    row["hit_rate"] = hits / (hits + misses) if hits + misses else 0.0
    row["usage"] = nbytes / capacity if capacity and nbytes >= 0 else 0.0
    row["eviction_count"] = int(row.pop("evictions", 0))
    return row


def artefact_rows(stores: dict[str, ArtefactStore]) -> dict[str, dict[str, Any]]:
    """Each artefact store's stats row (with its path), or {"error", "path"} where it cannot answer."""
    out: dict[str, dict[str, Any]] = {}
    for kind, store in stores.items():
        try:
            out[kind] = {**_rates(store.stats()), "path": str(store.path)}
        except PromptCacheError as exc:
            out[kind] = {"error": str(exc), "path": str(store.path)}
    return out


def cache_rows(caches: Iterable[tuple[str, PromptCache]]) -> dict[str, dict[str, Any]]:
    """Each named PromptCache's lookups and reuse (CACHE_STATS of its stats())."""
    out = {}
    for name, cache in caches:
        s = cache.stats()
        out[name] = {k: s[k] for k in CACHE_STATS}
    return out


def stats(
    store: TieredStore,
    caches: Iterable[tuple[str, PromptCache]],
    artefacts: dict[str, ArtefactStore],
    cleanup: dict[str, Any],
) -> dict[str, Any]:
    """CacheManager.stats(): the tiers' totals and rows, the named caches', the artefact caches'
    and the cleanup's report (see CacheManager.stats for the keys)."""
    totals = store.stats()
    tiers = {name: _rates(raw) for name, raw in store.tier_stats().items()}

    def usage(tier: str) -> int | None:
        nbytes = int(tiers[tier]["bytes"]) if tier in tiers else -1
        return nbytes if nbytes >= 0 else None  # -1: the tier could not be asked (Redis away)

    return {
        "hit_rate": totals["hit_rate"],
        "hits": totals["hits"],
        "misses": totals["misses"],
        "promotions": totals["promotions"],
        "memory_usage": usage("memory"),
        "disk_usage": usage("disk"),
        "redis_usage": usage("redis"),
        "eviction_count": sum(t["eviction_count"] for t in tiers.values()),
        "tiers": tiers,
        "caches": cache_rows(caches),
        "artefacts": artefact_rows(artefacts),
        "cleanup": cleanup,
    }


def metrics(report: dict[str, Any]) -> dict[str, Any]:
    """LlamaHome's metrics from a stats() report: hit_rate, memory_usage and eviction_count over
    every cache type, and per type under "by_type" ("prompt": the KV tiers; each artefact cache)."""
    tiers = report["tiers"].values()
    by_type: dict[str, dict[str, Any]] = {
        "prompt": {
            "hit_rate": report["hit_rate"],
            "hits": report["hits"],
            "misses": report["misses"],
            "memory_usage": report["memory_usage"],
            "bytes": sum(max(int(t.get("bytes", 0)), 0) for t in tiers),
            "capacity_bytes": sum(int(t.get("capacity_bytes", 0)) for t in tiers),
            "eviction_count": report["eviction_count"],
        }
    }
    for kind, row in report["artefacts"].items():
        if "error" in row:
            by_type[kind] = dict(row)
            continue
        by_type[kind] = {
            "hit_rate": row["hit_rate"],
            "hits": row["hits"],
            "misses": row["misses"],
            "memory_usage": 0,  # artefacts live on disk, memory-mapped
            "bytes": row["bytes"],
            "capacity_bytes": row["capacity_bytes"],
            "eviction_count": row["eviction_count"],
        }
    for row in by_type.values():
        if "capacity_bytes" in row:
            cap = row["capacity_bytes"]
            row["usage"] = row["bytes"] / cap if cap else 0.0
    rows = [r for r in by_type.values() if "error" not in r]
    hits, lookups = sum(r["hits"] for r in rows), sum(r["hits"] + r["misses"] for r in rows)
    return {
        "hit_rate": hits / lookups if lookups else 0.0,
        "memory_usage": report["memory_usage"],
        "eviction_count": sum(r["eviction_count"] for r in rows),
        "by_type": by_type,
    }


def inspect(
    store: TieredStore,
    artefacts: dict[str, ArtefactStore],
    limit: int | None = None,
    tier: str | None = None,
) -> list[EntryInfo]:
    """The entries of every tier and artefact cache (or of `tier`), most recently used first, at
    most `limit` each; see CacheManager.inspect. Tiers that cannot be listed are skipped."""
    now = time.time()
    out: list[EntryInfo] = []
    for part in store.tiers:
        if tier is None or part.name == tier:
            out += _tier_entries(part, limit, now)
    for kind, artefact_store in artefacts.items():
        if tier is not None and kind != tier:
            continue
        try:
            listed = sorted(artefact_store.entries(), key=lambda a: a.atime, reverse=True)
        except PromptCacheError as exc:
            log.warning("cannot list the %s: %s", kind, exc)
            continue
        for info in listed[:limit] if limit is not None else listed:
            out.append(EntryInfo(kind, kind, info.key, "", info.size, None, now - info.ctime))
    return out


def _tier_entries(store: Any, limit: int | None, now: float) -> list[EntryInfo]:
    """One tier's entries, each read to count its tokens (a KV segment says how many it covers)."""
    from promptcache.codec.llama_state import LlamaStateCodec

    codec = LlamaStateCodec()
    try:
        rows = store.entries()
    except PromptCacheError as exc:
        log.warning("cannot list the %s tier: %s", store.name, exc)
        return []
    out = []
    for row in rows[:limit] if limit is not None else rows:
        key = str(row["key"])
        value = store.get(key)
        tokens = None
        if value is not None:
            try:
                tokens = codec.n_tokens(value)
            except CodecError:
                tokens = None
        name, _, rest = key.partition(":")
        ctime = row.get("ctime")
        out.append(
            EntryInfo(
                tier=store.name,
                cache=name if rest else "",
                key=key,
                fingerprint=str(row.get("fingerprint", "")),
                bytes=int(row.get("size") or (len(value) if value is not None else 0)),
                tokens=tokens,
                age_s=now - float(ctime) if ctime is not None else None,
            )
        )
    return out


__all__ = ["CACHE_STATS", "EntryInfo", "artefact_rows", "cache_rows", "inspect", "metrics", "stats"]
