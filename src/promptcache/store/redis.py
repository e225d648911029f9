"""Redis tier: a byte store on a real redis-server, shared by every process and machine that can reach it.

Owns the keys under its namespace and their accounting; never unpickles, never parses states, never
raises because Redis is away (an unreachable Redis is a miss, with one warning and a counter).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from promptcache.errors import CapacityError, CorruptEntryError, ModelMismatchError
from promptcache.store import envelope
from promptcache.store.base import BaseStore
from promptcache.store.compression import Compressor, decompress, get_compressor
from promptcache.store.counters import base_stats
from promptcache.store.policies import get_policy

log = logging.getLogger(__name__)

T = TypeVar("T")

_NAMESPACE = re.compile(r"[0-9A-Za-z_.-]{1,64}")
_BATCH = 500  # members handled per script call in maintenance, so that Redis is never blocked long

# Every script keeps four structures in step: the value key, the eviction-order zset, the
# write-time zset and the size hash, plus the byte counter (the sum of the size hash). Value keys
# of victims are built from ARGV, so these scripts need a single Redis node (not Redis Cluster).
_FORGET = """
local function total_bytes()
  -- a damaged counter (not a number) is rebuilt from the size hash instead of failing every write
  local total = tonumber(redis.call('GET', KEYS[4]) or '0')
  if total then return total end
  total = 0
  for _, s in ipairs(redis.call('HVALS', KEYS[3])) do total = total + (tonumber(s) or 0) end
  redis.call('SET', KEYS[4], total)
  return total
end
local function forget(m)
  local size = redis.call('HGET', KEYS[3], m)
  total_bytes()
  if size then
    redis.call('HDEL', KEYS[3], m)
    redis.call('DECRBY', KEYS[4], size)
  end
  redis.call('ZREM', KEYS[1], m)
  redis.call('ZREM', KEYS[2], m)
  return redis.call('DEL', ARGV[1] .. m) + (size and 1 or 0)
end
local function evict_to(limit)
  local total = total_bytes()
  local evicted = 0
  while total > limit do
    local victim = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
    if not victim then break end
    forget(victim)
    evicted = evicted + 1
    total = tonumber(redis.call('GET', KEYS[4]) or '0')
  end
  return evicted
end
"""

# KEYS: order, ctime, sizes, bytes. ARGV: value prefix, member, blob, order score, now, capacity, ttl ms.
_PUT = (
    _FORGET
    + """
forget(ARGV[2])
local size = string.len(ARGV[3])
local evicted = evict_to(tonumber(ARGV[6]) - size)
if tonumber(ARGV[7]) > 0 then
  redis.call('SET', ARGV[1] .. ARGV[2], ARGV[3], 'PX', ARGV[7])
else
  redis.call('SET', ARGV[1] .. ARGV[2], ARGV[3])
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], size)
redis.call('INCRBY', KEYS[4], size)
return evicted
"""
)

# ARGV: value prefix, member, and optionally the sha1 of the value read: remove only if it is still that one.
_DELETE = (
    _FORGET
    + """
if ARGV[3] then
  local now = redis.call('GET', ARGV[1] .. ARGV[2])
  if now and redis.sha1hex(now) ~= ARGV[3] then return -1 end
end
return forget(ARGV[2])
"""
)

# ARGV: value prefix, cutoff (write time), limit. Removes up to `limit` entries written before cutoff.
_EXPIRE = (
    _FORGET
    + """
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(old) do forget(m) end
return #old
"""
)

# ARGV: value prefix, capacity. Recounts the byte counter from the size hash, then evicts down to capacity.
_TRIM = (
    _FORGET
    + """
local total = 0
local sizes = redis.call('HVALS', KEYS[3])
for _, s in ipairs(sizes) do total = total + tonumber(s) end
redis.call('SET', KEYS[4], total)
return evict_to(tonumber(ARGV[2]))
"""
)

_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def redact(url: str) -> str:
    """The URL without its password, for logs and stats."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def _connect(url: str, socket_timeout: float, connect_timeout: float) -> redis.Redis:
    """A lazy client for `url` (nothing is sent yet). Raises ValueError for a malformed URL."""
    try:
        return redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            # One immediate retry replaces a pooled connection a Redis restart broke; more
            # would only stall requests while Redis is away (RedisStore backs off instead).
            retry=Retry(NoBackoff(), 1),
            health_check_interval=0,
        )
    except ValueError as exc:
        raise ValueError(
            f"invalid Redis URL {redact(url)!r}: {exc}; use redis://host:port/db, rediss://... or unix:///path"
        ) from None


class RedisStore(BaseStore):
    """Entries as Redis strings under `<namespace>:v:<key>`; capacity held across every client.

    url: a redis://, rediss:// or unix:// URL. capacity_bytes: the bytes of packed entries (value plus
    an envelope of about 40 bytes plus key and fingerprint) this namespace may hold; Redis adds its
    own overhead of roughly 100 bytes per key. Each put evicts by policy in one Lua script, so
    clients on several machines keep the total within the capacity of whichever one writes.

    Accounting lives in Redis beside the values: `<ns>:order` (a sorted set: last access time for
    "lru", write time for "fifo" and "ttl", minus the size for "size"), `<ns>:ctime` (write times),
    `<ns>:sizes` (a hash of entry sizes) and `<ns>:bytes` (their sum). Clients sharing a namespace
    should agree on policy and capacity.

    ttl: seconds an entry lives (Redis expires the value itself; expire()/gc() drop its accounting);
    required by policy "ttl". compression: as DiskStore's; readers decompress by the entry's flags.

    Availability: the client connects lazily with short timeouts and no retries of its own. When a
    call finds Redis unreachable, it is a miss (get), False (contains, delete) or a no-op (put), one
    warning is logged, `unavailable` counts every call answered that way, and calls skip Redis
    until a retry after `retry_after` seconds (doubling up to `max_retry_after`) finds it back.
    """

    name = "redis"
    latency_rank = 2

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        capacity_bytes: int = 1 << 30,
        *,
        namespace: str = "promptcache",
        ttl: float | None = None,
        policy: str = "lru",
        compression: str | Compressor | None = None,
        socket_timeout: float = 2.0,
        connect_timeout: float = 0.25,
        retry_after: float = 0.5,
        max_retry_after: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Prepare a client for `url` (nothing is sent until the first call).

        Raises ValueError for a malformed URL, namespace, capacity, policy, ttl or compression.
        """
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be a positive int")
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ValueError(
                f"namespace must be 1 to 64 characters of [0-9A-Za-z_.-], got {namespace!r}"
            )
        self.policy = get_policy(policy, ttl, age_setting="ttl")
        if retry_after <= 0 or max_retry_after < retry_after:
            raise ValueError("retry_after must be positive and at most max_retry_after")
        self.url = url
        self.capacity_bytes = capacity_bytes
        self.namespace = namespace
        self.ttl = ttl
        self.compressor = get_compressor(compression)
        self.retry_after = retry_after
        self.max_retry_after = max_retry_after
        self._clock = clock
        self._client = _connect(url, socket_timeout, connect_timeout)
        prefix = f"{namespace}:"
        self._value_prefix = prefix + "v:"
        self._meta = [prefix + "order", prefix + "ctime", prefix + "sizes", prefix + "bytes"]
        self._put = self._client.register_script(_PUT)
        self._delete = self._client.register_script(_DELETE)
        self._expire = self._client.register_script(_EXPIRE)
        self._trim = self._client.register_script(_TRIM)
        self._lock = threading.Lock()
        self._down = False
        self._retry_at = 0.0
        self._backoff = retry_after
        self.hits = self.misses = self.puts = self.evictions = self.expirations = 0
        self.corrupt = self.unavailable = self.outages = self.errors = 0

    @property
    def persistent(self) -> bool:
        return True

    def __repr__(self) -> str:
        return (
            f"RedisStore({redact(self.url)!r}, capacity_bytes={self.capacity_bytes}, "
            f"namespace={self.namespace!r}, policy={self.policy.name!r})"
        )

    # -- plumbing -------------------------------------------------------------------------------

    def _bump(self, counter: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + n)

    def _call(self, action: str, fn: Callable[[], T], default: T) -> T:
        """fn(), or `default` while Redis is unreachable (one warning per outage, then quiet retries)."""
        if self._down and time.monotonic() < self._retry_at:
            self._bump("unavailable")
            return default
        try:
            result = fn()
        except _UNREACHABLE as exc:
            self._went_away(action, exc)
            return default
        except redis.exceptions.RedisError as exc:  # e.g. OOM under maxmemory, a read-only replica
            self._bump("errors")
            log.warning("Redis at %s refused to %s: %s", redact(self.url), action, exc)
            return default
        if self._down:
            with self._lock:
                was_down, self._down, self._backoff = self._down, False, self.retry_after
            if was_down:
                log.info("Redis at %s is reachable again; using the Redis tier", redact(self.url))
        return result

    def _went_away(self, action: str, exc: BaseException) -> None:
        with self._lock:
            self.unavailable += 1
            first = not self._down
            if first:
                self._down = True
                self.outages += 1
                self._backoff = self.retry_after
            else:
                self._backoff = min(self._backoff * 2, self.max_retry_after)
            self._retry_at = time.monotonic() + self._backoff
        if first:
            log.warning(
                "Redis at %s is unreachable (%s, while trying to %s); skipping the Redis tier, "
                "retrying after %g s and backing off up to %g s",
                redact(self.url),
                exc,
                action,
                self.retry_after,
                self.max_retry_after,
            )
        else:
            log.debug("Redis at %s is still unreachable: %s", redact(self.url), exc)

    @property
    def available(self) -> bool:
        """False while an outage is being waited out (no call is made to find out)."""
        return not self._down

    def _vkey(self, key: str) -> str:
        return self._value_prefix + key

    @staticmethod
    def _check_key(key: str) -> None:
        if not isinstance(key, str) or not key or len(key) > 1000:
            raise ValueError(
                f"Redis cache keys are non-empty strings of at most 1000 characters, got {key!r}"
            )

    def _forget_if_unchanged(self, key: str, blob: bytes, why: str) -> None:
        digest = hashlib.sha1(blob, usedforsecurity=False).hexdigest()
        self._call(
            "delete",
            lambda: self._delete(keys=self._meta, args=[self._value_prefix, key, digest]),
            None,
        )
        log.warning("Redis cache entry %s is unusable, removed it: %s", self._vkey(key), why)

    # -- the Store protocol ---------------------------------------------------------------------

    def get(self, key: str, *, fingerprint: str | None = None) -> bytes | None:
        """The value, or None on a miss.

        A corrupt or foreign entry (bad envelope or checksum, another key, another fingerprint when
        `fingerprint` is given) is a miss that is logged, counted in stats()["corrupt"] and removed.
        An unreachable Redis is a miss. Raises ValueError only for a malformed key.
        """
        self._check_key(key)
        now = self._clock()

        def fetch() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.get(self._vkey(key))
            if self.policy.redis_touch:
                pipe.zadd(self._meta[0], {key: now}, xx=True, ch=True)
            else:
                pipe.zscore(self._meta[0], key)
            return pipe.execute()

        reply = self._call("read", fetch, None)
        if reply is None:
            self._bump("misses")
            return None
        blob, member = reply
        if blob is None:
            if member:  # accounted for but gone: expired by TTL, or evicted by Redis's maxmemory
                self._call(
                    "delete",
                    lambda: self._delete(keys=self._meta, args=[self._value_prefix, key]),
                    None,
                )
            self._bump("misses")
            return None
        try:
            payload, flags, _fp = envelope.unpack(blob, key=key, fingerprint=fingerprint)
            value = decompress(payload, flags)
        except (CorruptEntryError, ModelMismatchError) as exc:
            self._bump("corrupt")
            self._bump("misses")
            self._forget_if_unchanged(key, blob, str(exc))
            return None
        self._bump("hits")
        return value

    def put(self, key: str, value: bytes | memoryview, *, fingerprint: str = "") -> None:
        """Store value under key, evicting by policy so that the namespace stays within capacity_bytes.

        Raises ValueError for a malformed key, TypeError for a value that is not bytes-like and
        CapacityError when the entry is larger than the whole capacity. An unreachable Redis makes
        it a no-op (counted in stats()["unavailable"]).
        """
        self._check_key(key)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"Redis cache values are bytes, got {type(value).__name__}")
        payload, flags = self.compressor.compress(value)
        blob = envelope.pack(key, bytes(payload), fingerprint, flags)
        if len(blob) > self.capacity_bytes:
            raise CapacityError(
                f"entry of {len(blob)} bytes exceeds the Redis store's capacity of {self.capacity_bytes}; "
                "raise capacity_bytes"
            )
        now = self._clock()
        ttl_ms = int(self.ttl * 1000) if self.ttl else 0
        args = [
            self._value_prefix,
            key,
            blob,
            self.policy.redis_score(now, len(blob)),
            now,
            self.capacity_bytes,
            ttl_ms,
        ]
        evicted = self._call("write", lambda: self._put(keys=self._meta, args=args), None)
        if evicted is None:
            return
        self._bump("puts")
        self._bump("evictions", int(evicted))

    def delete(self, key: str) -> bool:
        """Remove key; True if it was there (False also when Redis is unreachable). Raises ValueError for a malformed key."""
        self._check_key(key)
        removed = self._call(
            "delete", lambda: self._delete(keys=self._meta, args=[self._value_prefix, key]), 0
        )
        return bool(removed and int(removed) > 0)

    def contains(self, key: str) -> bool:
        """Whether the value key exists (no checksum check); False when Redis is unreachable."""
        self._check_key(key)
        return bool(self._call("check", lambda: self._client.exists(self._vkey(key)), 0))

    def size(self) -> int:
        """Bytes of packed entries in the namespace (0 when Redis is unreachable)."""
        return max(
            0, self._counter(self._call("read", lambda: self._client.get(self._meta[3]), None))
        )

    def _counter(self, raw: bytes | None) -> int:
        """The byte counter's value; -1 (logged) when it is damaged: the next put rebuilds it."""
        try:
            return int(raw or 0)
        except ValueError:
            log.warning(
                "Redis byte counter %s is damaged (%r); the next write rebuilds it",
                self._meta[3],
                raw[:32] if raw else raw,
            )
            return -1

    def __len__(self) -> int:
        return int(self._call("read", lambda: self._client.zcard(self._meta[1]), 0))

    def keys(self) -> Iterator[str]:
        """The namespace's keys, oldest written first (none when Redis is unreachable)."""
        members = self._call("read", lambda: self._client.zrange(self._meta[1], 0, -1), [])
        return iter([m.decode() for m in members])

    def clear(self) -> None:
        """Remove every key of the namespace, for every client (a no-op when Redis is unreachable)."""

        def wipe() -> None:
            batch: list[bytes] = []
            for k in self._client.scan_iter(match=f"{self.namespace}:*", count=1000):
                batch.append(k)
                if len(batch) >= _BATCH:
                    self._client.unlink(*batch)
                    batch.clear()
            if batch:
                self._client.unlink(*batch)

        self._call("clear", wipe, None)

    def stats(self) -> dict[str, int | float | str]:
        """This client's counters (hits, misses, puts, evictions, expirations, corrupt, unavailable,
        outages, errors) and the namespace's entries and bytes (-1 when Redis is unreachable)."""

        def read() -> tuple[int, int]:
            pipe = self._client.pipeline(transaction=False)
            pipe.zcard(self._meta[1])
            pipe.get(self._meta[3])
            n, nbytes = pipe.execute()
            return int(n), self._counter(nbytes)

        entries, nbytes = self._call("read", read, (-1, -1))
        return {
            **base_stats(self, entries, nbytes),
            "unavailable": self.unavailable,
            "outages": self.outages,
            "errors": self.errors,
            "available": int(self.available),
            "url": redact(self.url),
            "namespace": self.namespace,
            "compression": self.compressor.name,
        }

    # -- maintenance ----------------------------------------------------------------------------

    def expire(self) -> int:
        """Drop entries written more than ttl seconds ago (values and accounting); returns how many."""
        if not self.ttl:
            return 0
        cutoff = self._clock() - self.ttl
        total = 0
        while True:
            n = self._call(
                "expire",
                lambda: self._expire(keys=self._meta, args=[self._value_prefix, cutoff, _BATCH]),
                0,
            )
            total += int(n)
            if int(n) < _BATCH:
                break
        self._bump("expirations", total)
        return total

    def gc(self) -> dict[str, int]:
        """Expire, reconcile the accounting with the values, and evict down to capacity_bytes.

        Accounting whose value is gone (expired by Redis, evicted by maxmemory, deleted by hand) is
        dropped; a value without accounting (its metadata deleted by hand) is removed. Returns counts:
        expired, stale_rows, orphans_removed, evicted. Redis being unreachable gives zeros.
        """
        counts = {"expired": self.expire(), "stale_rows": 0, "orphans_removed": 0, "evicted": 0}

        def reconcile() -> None:
            members = [m for m, _ in self._client.zscan_iter(self._meta[1], count=1000)]
            for i in range(0, len(members), _BATCH):
                chunk = members[i : i + _BATCH]
                pipe = self._client.pipeline(transaction=False)
                for m in chunk:
                    pipe.exists(self._vkey(m.decode()))
                for m, exists in zip(chunk, pipe.execute(), strict=True):
                    if not exists:
                        self._delete(keys=self._meta, args=[self._value_prefix, m])
                        counts["stale_rows"] += 1
            batch: list[bytes] = []
            for vkey in self._client.scan_iter(match=f"{self._value_prefix}*", count=1000):
                batch.append(vkey)
            for i in range(0, len(batch), _BATCH):
                chunk = batch[i : i + _BATCH]
                pipe = self._client.pipeline(transaction=False)
                for vkey in chunk:
                    pipe.hexists(self._meta[2], vkey[len(self._value_prefix) :])
                orphans = [v for v, known in zip(chunk, pipe.execute(), strict=True) if not known]
                if orphans:
                    counts["orphans_removed"] += int(self._client.unlink(*orphans))
            counts["evicted"] = int(
                self._trim(keys=self._meta, args=[self._value_prefix, self.capacity_bytes])
            )

        self._call("collect garbage", reconcile, None)
        self._bump("evictions", counts["evicted"])
        return counts

    def entries(self) -> list[dict[str, str | int | float]]:
        """Every entry's key, size, fingerprint, ctime and (where reads rescore) atime, most recently written first.

        Reads the accounting and the first bytes of each value (the envelope's header). Empty when
        Redis is unreachable.
        """

        def read() -> list[dict[str, str | int | float]]:
            rows = self._client.zrange(self._meta[1], 0, -1, desc=True, withscores=True)
            out: list[dict[str, str | int | float]] = []
            for i in range(0, len(rows), _BATCH):
                chunk = rows[i : i + _BATCH]
                pipe = self._client.pipeline(transaction=False)
                for m, _ in chunk:
                    pipe.hget(self._meta[2], m)
                    pipe.zscore(self._meta[0], m)
                    pipe.getrange(self._vkey(m.decode()), 0, 1023)
                replies = pipe.execute()
                for j, (m, ctime) in enumerate(chunk):
                    size, order, head = replies[3 * j : 3 * j + 3]
                    try:
                        _key, fp, _n = envelope.peek(head)
                    except CorruptEntryError:
                        fp = "?"
                    atime = order if self.policy.redis_touch and order is not None else ctime
                    out.append(
                        {
                            "key": m.decode(),
                            "size": int(size or 0),
                            "fingerprint": fp,
                            "ctime": ctime,
                            "atime": atime,
                        }
                    )
            return out

        return self._call("list entries", read, [])

    def ping(self) -> bool:
        """Whether Redis answers now (also ends an outage early when it does)."""
        if self._down:
            self._retry_at = 0.0
        return bool(self._call("ping", self._client.ping, False))

    def close(self) -> None:
        """Close this client's connections; later calls reconnect. Never raises."""
        try:
            self._client.close()
        except Exception as exc:  # noqa: BLE001 - closing must not fail
            log.debug("closing the Redis client: %s", exc)

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["RedisStore", "redact"]
