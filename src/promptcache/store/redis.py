"""Redis tier: a byte store on a real redis-server or a Redis Cluster (or Valkey), shared by every
process and machine that can reach it.

Owns the values under its namespace and the order in which values and their accounting change
(redis_ledger.py holds the accounting); never unpickles, never parses states, never raises because
Redis is away (an unreachable Redis is a miss, with one warning and a counter).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from promptcache.errors import CapacityError, CorruptEntryError, ModelMismatchError
from promptcache.store import envelope
from promptcache.store import redis_upkeep as upkeep
from promptcache.store.base import BaseStore
from promptcache.store.compression import Compressor, decompress, get_compressor
from promptcache.store.counters import base_stats
from promptcache.store.policies import get_policy
from promptcache.store.redis_client import Outages, RedisTarget, redact
from promptcache.store.redis_ledger import DELETE_IF_UNCHANGED, Ledger, RedisKeys
from promptcache.store.redis_upkeep import Connection

log = logging.getLogger(__name__)

_RESERVE_ATTEMPTS = 4  # a reservation that other clients' writes keep outrunning is skipped
_SKIPPED = {0: "another client writes or deletes it", 2: "other clients took the room"}

T = TypeVar("T")

_NAMESPACE = re.compile(r"[0-9A-Za-z_.-]{1,64}")


class RedisStore(BaseStore):
    """Entries as Redis strings under `<namespace>:v:<key>`; capacity held across every client and node.

    url: one Redis (redis://host:port/db, rediss://..., unix:///path), or a Redis Cluster: the
    URL of any node ("redis://10.0.0.5:7000"), several comma-separated
    ("redis://10.0.0.5:7000,redis://10.0.0.6:7001") or a list of URLs (any reachable one is enough
    to find the others). cluster: None (default) detects a cluster at the first call (a list is
    one; a single URL is one when its node answers INFO with cluster_enabled:1); True or False
    says so without asking. A cluster has only db 0.

    capacity_bytes: the bytes of packed entries (value plus an envelope of about 40 bytes plus key
    and fingerprint) the namespace may hold in the whole store, every node together; Redis adds its
    own overhead of roughly 100 bytes per key. ttl: seconds an entry lives (Redis expires the value
    itself; expire()/gc() drop its accounting); required by policy "ttl". compression: as
    DiskStore's; readers decompress by the entry's flags. Clients sharing a namespace should agree
    on policy and capacity.

    Accounting across nodes (redis_ledger.py, with the measurements behind it): values carry no
    hash tag, so they spread over every slot and node; the accounting (order, write times, sizes,
    the byte total, leases) carries the tag {namespace}: one slot, where each Lua script runs
    atomically. A put reserves its bytes once they fit (first dooming victims, deleting their
    values and releasing them), writes its value, then commits; a delete dooms, deletes the value,
    then releases. Bytes are counted from before a value is written until after it is deleted, so
    the counted total never passes the capacity and the values on all nodes never outweigh it:
    capacity and LRU order are the whole store's, as on one server. A client that dies mid-put
    leaves a lease another client may take over after `lease_seconds`; gc() deletes what it left.

    Availability: the client connects lazily with short timeouts and no retries of its own. When a
    call finds Redis unreachable, it is a miss (get), False (contains, delete) or a no-op (put), one
    warning is logged, `unavailable` counts every call answered that way, and calls skip Redis
    until a retry after `retry_after` seconds (doubling up to `max_retry_after`) finds it back.
    """

    name = "redis"
    latency_rank = 2
    lease_seconds = 30.0  # far above the three socket timeouts a put or delete takes at worst

    def __init__(
        self,
        url: str | Sequence[str] = "redis://127.0.0.1:6379/0",
        capacity_bytes: int = 1 << 30,
        *,
        namespace: str = "promptcache",
        ttl: float | None = None,
        policy: str = "lru",
        compression: str | Compressor | None = None,
        cluster: bool | None = None,
        socket_timeout: float = 2.0,
        connect_timeout: float = 0.25,
        retry_after: float = 0.5,
        max_retry_after: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Prepare a client for `url` (nothing is sent until the first call).

        Raises ValueError for a malformed URL (or list of URLs), namespace, capacity, policy, ttl
        or compression.
        """
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be a positive int")
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ValueError(
                f"namespace must be 1 to 64 characters of [0-9A-Za-z_.-], got {namespace!r}"
            )
        self.policy = get_policy(policy, ttl, age_setting="ttl")
        self._target = RedisTarget.parse(url, cluster)
        self.url = self._target.url
        self._outages = Outages(redact(self.url), retry_after, max_retry_after, log)
        self.capacity_bytes = capacity_bytes
        self.namespace = namespace
        self.ttl = ttl
        self.compressor = get_compressor(compression)
        self._timeouts = (socket_timeout, connect_timeout)
        self._clock = clock
        self._keys = RedisKeys(namespace)
        self._owner = uuid.uuid4().hex[:12]  # names this client's leases
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self.hits = self.misses = self.puts = self.evictions = self.expirations = 0
        self.corrupt = 0

    @property
    def persistent(self) -> bool:
        return True

    @property
    def cluster(self) -> bool | None:
        """Whether the store speaks to a Redis Cluster; None until the first call has found out."""
        return self._conn.cluster if self._conn is not None else self._target.cluster

    @property
    def available(self) -> bool:
        """False while an outage is being waited out (no call is made to find out)."""
        return self._outages.available

    def __repr__(self) -> str:
        return (
            f"RedisStore({redact(self.url)!r}, capacity_bytes={self.capacity_bytes}, "
            f"namespace={self.namespace!r}, policy={self.policy.name!r})"
        )

    # -- plumbing -------------------------------------------------------------------------------

    def _bump(self, counter: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + n)

    def _connection(self) -> Connection:
        """The connection, made at the first call (raises what redis-py raises when Redis is away)."""
        with self._connect_lock:  # not self._lock: counters need not wait for a cluster's slot map
            if self._conn is None:
                client, cluster = self._target.connect(*self._timeouts)
                ledger = Ledger(client, self._keys, self._owner, self.lease_seconds)
                remover = client.register_script(DELETE_IF_UNCHANGED)
                self._conn = Connection(client, self._keys, ledger, remover, cluster)
            return self._conn

    def _call(self, action: str, fn: Callable[[Connection], T], default: T) -> T:
        """fn(connection), or `default` while Redis is unreachable or when it refuses `action`."""
        return self._outages.call(action, lambda: fn(self._connection()), default)

    def _vkey(self, key: str) -> str:
        return self._keys.value(key)

    @staticmethod
    def _check_key(key: str) -> None:
        if not isinstance(key, str) or not key or len(key) > 1000:
            raise ValueError(
                f"Redis cache keys are non-empty strings of at most 1000 characters, got {key!r}"
            )

    def _forget_if_unchanged(self, key: str, blob: bytes, why: str) -> None:
        """Remove key's value only if it is still `blob` (a writer may have replaced it), and its
        accounting with it."""
        digest = hashlib.sha1(blob, usedforsecurity=False).hexdigest()
        self._call("delete", lambda c: upkeep.remove_if_unchanged(c, key, digest, self._clock()), 0)
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
        order = self._keys.metadata[0]

        def fetch(c: Connection) -> list[Any]:
            pipe = c.client.pipeline(transaction=False)
            pipe.get(self._vkey(key))
            if self.policy.redis_touch:
                pipe.zadd(order, {key: now}, xx=True, ch=True)
            else:
                pipe.zscore(order, key)
            return pipe.execute()

        reply = self._call("read", fetch, None)
        if reply is None:
            self._bump("misses")
            return None
        blob, member = reply
        if blob is None:
            if member:  # accounted for but gone: expired by TTL, or evicted by Redis's maxmemory
                self._call("delete", lambda c: upkeep.remove(c, [key]), 0)
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
        it a no-op (counted in stats()["unavailable"]), as does another client writing or deleting
        the same key at the same moment, or holding the room in reservations (logged at debug).
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
        stored = self._call("write", lambda c: self._write(c, key, blob), None)
        if stored is None:
            return
        if stored[0]:
            self._bump("puts")
        self._bump("evictions", stored[1])

    def _write(self, c: Connection, key: str, blob: bytes) -> tuple[bool, int]:
        """Reserve (first deleting the victims a reservation asks for), write, commit: (stored, evicted).

        The victims' values are deleted before this value is written, and their bytes released
        only after: with the values of a cluster on several nodes, no moment holds both.
        """
        now = self._clock()
        status, evicted, released, reclaimed = -1, 0, [], False
        for _attempt in range(_RESERVE_ATTEMPTS):
            status, victims = c.ledger.reserve(key, len(blob), self.capacity_bytes, released)
            evicted, released = evicted + len(released), []
            if status == -1 and not reclaimed:  # leases a dead client left may hold the room
                reclaimed = True
                if upkeep.reclaim(c):
                    continue
            if status != 2:
                break
            upkeep.delete_values(c, victims)
            released = victims
        evicted += c.ledger.release(released)  # doomed and deleted, but the room went to others
        if status != 1:
            log.debug("Redis put of %s skipped: %s", key, _SKIPPED.get(status, "no room"))
            return False, evicted
        c.client.set(self._vkey(key), blob, px=int(self.ttl * 1000) if self.ttl else None)
        if c.ledger.commit(key, len(blob), self.policy.redis_score(now, len(blob)), now):
            return True, evicted
        # The reservation is gone (FLUSHALL, or reclaimed after a stall): the value must go too.
        digest = hashlib.sha1(blob, usedforsecurity=False).hexdigest()
        c.delete_if_unchanged(keys=[self._vkey(key)], args=[digest])
        return False, evicted

    def delete(self, key: str) -> bool:
        """Remove key; True if it was there (False also when Redis is unreachable). Raises ValueError for a malformed key."""
        self._check_key(key)
        return bool(self._call("delete", lambda c: upkeep.remove(c, [key]), 0))

    def contains(self, key: str) -> bool:
        """Whether the value key exists (no checksum check); False when Redis is unreachable."""
        self._check_key(key)
        return bool(self._call("check", lambda c: c.client.exists(self._vkey(key)), 0))

    def size(self) -> int:
        """Bytes counted in the namespace (0 when Redis is unreachable): the packed entries, and
        those being written or deleted by some client right now."""
        raw = self._call("read", lambda c: c.client.get(self._keys.metadata[3]), None)
        return max(0, self._counter(raw))

    def _counter(self, raw: bytes | None) -> int:
        """The byte counter's value; -1 (logged) when it is damaged: the next put rebuilds it."""
        try:
            return int(raw or 0)
        except ValueError:
            log.warning(
                "Redis byte counter %s is damaged (%r); the next write rebuilds it",
                self._keys.metadata[3],
                raw[:32] if raw else raw,
            )
            return -1

    def __len__(self) -> int:
        return int(self._call("read", lambda c: c.client.zcard(self._keys.metadata[1]), 0))

    def keys(self) -> Iterator[str]:
        """The namespace's keys, oldest written first (none when Redis is unreachable)."""
        ctime = self._keys.metadata[1]
        members = self._call("read", lambda c: c.client.zrange(ctime, 0, -1), [])
        return iter([m.decode() for m in members])

    def clear(self) -> None:
        """Remove every key of the namespace on every node, for every client (a no-op when Redis is unreachable)."""

        def wipe(c: Connection) -> None:
            batch: list[bytes] = []
            for k in c.client.scan_iter(match=self._keys.pattern, count=1000):
                batch.append(k)
                if len(batch) >= upkeep.BATCH:
                    c.client.unlink(*batch)
                    batch.clear()
            if batch:
                c.client.unlink(*batch)

        self._call("clear", wipe, None)

    def stats(self) -> dict[str, int | float | str]:
        """This client's counters (hits, misses, puts, evictions, expirations, corrupt, unavailable,
        outages, errors), the namespace's entries and bytes (-1 when Redis is unreachable), and
        cluster (1 for a Redis Cluster, 0 for one server, -1 not known yet)."""
        ctime, nbytes_key = self._keys.metadata[1], self._keys.metadata[3]

        def read(c: Connection) -> tuple[int, int]:
            pipe = c.client.pipeline(transaction=False)
            pipe.zcard(ctime)
            pipe.get(nbytes_key)
            n, nbytes = pipe.execute()
            return int(n), self._counter(nbytes)

        entries, nbytes = self._call("read", read, (-1, -1))
        return {
            **base_stats(self, entries, nbytes),
            "unavailable": self._outages.unavailable,
            "outages": self._outages.outages,
            "errors": self._outages.errors,
            "available": int(self.available),
            "url": redact(self.url),
            "cluster": -1 if self.cluster is None else int(self.cluster),
            "namespace": self.namespace,
            "compression": self.compressor.name,
        }

    # -- maintenance ----------------------------------------------------------------------------

    def expire(self) -> int:
        """Drop entries written more than ttl seconds ago (values and accounting); returns how many."""
        if not self.ttl:
            return 0
        cutoff = self._clock() - self.ttl
        n = int(self._call("expire", lambda c: upkeep.expire(c, cutoff), 0))
        self._bump("expirations", n)
        return n

    def gc(self) -> dict[str, int]:
        """Expire, reconcile the accounting with the values, and evict down to capacity_bytes.

        Accounting whose value is gone (expired by Redis, evicted by maxmemory, deleted by hand) is
        dropped; a value without accounting (its metadata deleted by hand) is removed; what a
        client that died mid-write or mid-delete left is deleted once its lease has run out.
        Returns counts: expired, reclaimed, stale_rows, orphans_removed, evicted. Redis being
        unreachable gives zeros.
        """
        zeros = {"reclaimed": 0, "stale_rows": 0, "orphans_removed": 0, "evicted": 0}
        expired = self.expire()
        counts = self._call(
            "collect garbage", lambda c: upkeep.reconcile(c, self.capacity_bytes), zeros
        )
        self._bump("evictions", counts["evicted"])
        return {"expired": expired, **counts}

    def entries(self) -> list[dict[str, str | int | float]]:
        """Every entry's key, size, fingerprint, ctime and (where reads rescore) atime, most recently written first.

        Reads the accounting and the first bytes of each value (the envelope's header). Empty when
        Redis is unreachable.
        """
        return self._call("list entries", lambda c: upkeep.entries(c, self.policy.redis_touch), [])

    def ping(self) -> bool:
        """Whether Redis answers now (also ends an outage early when it does)."""
        self._outages.retry_now()
        return bool(self._call("ping", lambda c: c.client.ping(), False))

    def close(self) -> None:
        """Close this client's connections; later calls reconnect. Never raises."""
        with self._connect_lock:
            conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.client.close()
        except Exception as exc:  # noqa: BLE001 - closing must not fail
            log.debug("closing the Redis client: %s", exc)

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["RedisStore", "redact"]
