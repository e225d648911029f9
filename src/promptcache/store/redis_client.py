"""How the Redis tier reaches Redis: the URL forms (one server; a Redis Cluster or Valkey cluster by any
node or a list of nodes), cluster detection, clients with short timeouts, and outages met without raising.

Owns connections and their failures; never builds a key or reads a value (redis_ledger.py, redis.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import parse_url
from redis.retry import Retry

log = logging.getLogger(__name__)

T = TypeVar("T")
Client = redis.Redis | RedisCluster

_SCHEMES = ("redis://", "rediss://", "unix://")
_FORMS = (
    "use redis://host:port/db, rediss://..., unix:///path, or a Redis Cluster's nodes "
    "as 'redis://host:port,redis://host:port' or a list of such URLs"
)

# Faults that mean "Redis is away": a miss now, retried after a backoff. RedisClusterException is
# what redis-py raises when no node of a cluster answers (the configuration errors it also signals
# are refused earlier, by RedisTarget.parse); CLUSTERDOWN is a cluster without a quorum or a slot.
UNREACHABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.RedisClusterException,
    redis.exceptions.ClusterDownError,
    OSError,
)


def redact(url: str) -> str:
    """The URL (or comma-separated URLs) without passwords, for logs and stats."""
    if "," in url:
        return ",".join(redact(part) for part in url.split(","))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def _without_db(url: str) -> str:
    """`url` naming no database (a redis:// path or a db= query), so that a client selects db 0."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return url
    query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("db="))
    return urlunsplit(parts._replace(path="", query=query))


@dataclass(frozen=True)
class RedisTarget:
    """Where the Redis tier is: node URLs (one for a single server) and whether they form a cluster
    (None: ask the node at the first call, INFO cluster's cluster_enabled)."""

    urls: tuple[str, ...]
    cluster: bool | None

    @classmethod
    def parse(cls, url: str | Sequence[str], cluster: bool | None = None) -> RedisTarget:
        """The target of `url`: one URL, several comma-separated, or a list of URLs (a cluster).

        Raises ValueError for a malformed URL, a list with cluster=False, a unix:// socket or a db
        other than 0 in a cluster, or nodes of one cluster with different credentials or schemes.
        """
        if isinstance(url, str):
            parts = [u.strip() for u in url.split(",")]
        elif isinstance(url, (list, tuple)):
            parts = list(url)
        else:
            raise ValueError(
                f"a Redis URL is a str or a list of str, got {type(url).__name__}; {_FORMS}"
            )
        if not parts or not all(isinstance(u, str) and u.startswith(_SCHEMES) for u in parts):
            raise ValueError(f"invalid Redis URL {redact(str(url))!r}; {_FORMS}")
        options = []
        for part in parts:
            try:
                options.append(parse_url(part))
            except ValueError as exc:
                raise ValueError(f"invalid Redis URL {redact(part)!r}: {exc}; {_FORMS}") from None
        if len(parts) > 1:
            if cluster is False:
                raise ValueError(
                    "several Redis URLs name a cluster's nodes; cluster=False takes one URL"
                )
            cluster = True
        if "path" in options[0]:  # unix://: a cluster's nodes announce TCP addresses
            if cluster:
                raise ValueError(
                    "a Redis Cluster is reached over TCP (redis://, rediss://), not unix://"
                )
            cluster = False
        if cluster:
            cls._check_cluster_nodes(parts, options)
        return cls(tuple(parts), cluster)

    @staticmethod
    def _check_cluster_nodes(parts: list[str], options: list[dict]) -> None:
        if any(o.get("db", 0) != 0 for o in options):
            raise ValueError("a Redis Cluster has only db 0; drop the /db from its URLs")
        if any("path" in o for o in options):
            raise ValueError(
                "a Redis Cluster is reached over TCP (redis://, rediss://), not unix://"
            )
        shared = {
            (urlsplit(p).scheme, o.get("username"), o.get("password"))
            for p, o in zip(parts, options, strict=True)
        }
        if len(shared) > 1:
            raise ValueError("the nodes of one Redis Cluster share a scheme, user and password")

    @property
    def url(self) -> str:
        """The URLs as one string (comma-separated for several): what RedisStore(url) accepts."""
        return ",".join(self.urls)

    def connect(self, socket_timeout: float, connect_timeout: float) -> tuple[Client, bool]:
        """A client and whether it speaks to a cluster. A cluster client asks its nodes for the
        slot map at once (a single server's client connects at its first command). Raises what
        redis-py raises when Redis is away (UNREACHABLE)."""
        common = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            # One immediate retry replaces a pooled connection a Redis restart broke; more would
            # only stall requests while Redis is away (Outages backs off instead).
            "retry": Retry(NoBackoff(), 1),
            "health_check_interval": 0,
        }
        first, cluster = self.urls[0], self.cluster
        if (
            cluster is None
        ):  # one URL (a list is a cluster): ask its node, in db 0 (SELECT fails there)
            in_db0 = _without_db(first)
            with redis.Redis.from_url(in_db0, **common) as probe:
                cluster = bool(probe.info("cluster").get("cluster_enabled"))
            if cluster and parse_url(first).get("db", 0) != 0:
                log.warning(
                    "%s is a Redis Cluster node: using db 0, a cluster's only db", redact(first)
                )
                first = in_db0
        if not cluster:
            return redis.Redis.from_url(first, **common), False
        others = [
            ClusterNode(o["host"], o.get("port", 6379)) for o in map(parse_url, self.urls[1:])
        ]
        return RedisCluster(url=first, startup_nodes=others, **common), True


class Outages:
    """Calls to Redis that never raise because Redis is away: an unreachable Redis makes a call
    return its default, logs one warning per outage, and skips Redis until a retry after
    `retry_after` seconds (doubling up to `max_retry_after`) finds it back.

    Counters: unavailable (calls answered by default because Redis was away), outages (warnings
    logged), errors (calls Redis refused: out of memory under maxmemory, a read-only replica, ...).
    Messages go to `logger` (the store's own).
    """

    def __init__(
        self, where: str, retry_after: float, max_retry_after: float, logger: logging.Logger
    ) -> None:
        """Raises ValueError unless 0 < retry_after <= max_retry_after."""
        if retry_after <= 0 or max_retry_after < retry_after:
            raise ValueError("retry_after must be positive and at most max_retry_after")
        self.where = where
        self.log = logger
        self.retry_after = retry_after
        self.max_retry_after = max_retry_after
        self.unavailable = self.outages = self.errors = 0
        self._lock = threading.Lock()
        self._down = False
        self._retry_at = 0.0
        self._backoff = retry_after

    @property
    def available(self) -> bool:
        """False while an outage is being waited out (no call is made to find out)."""
        return not self._down

    def retry_now(self) -> None:
        """Let the next call try Redis even if the backoff has not run out."""
        self._retry_at = 0.0

    def call(self, action: str, fn: Callable[[], T], default: T) -> T:
        """fn(), or `default` while Redis is unreachable or when it refuses `action`."""
        if self._down and time.monotonic() < self._retry_at:
            with self._lock:
                self.unavailable += 1
            return default
        try:
            result = fn()
        except UNREACHABLE as exc:
            self._went_away(action, exc)
            return default
        except redis.exceptions.RedisError as exc:  # e.g. OOM under maxmemory, a read-only replica
            with self._lock:
                self.errors += 1
            self.log.warning("Redis at %s refused to %s: %s", self.where, action, exc)
            return default
        if self._down:
            with self._lock:
                was_down, self._down, self._backoff = self._down, False, self.retry_after
            if was_down:
                self.log.info("Redis at %s is reachable again; using the Redis tier", self.where)
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
            self.log.warning(
                "Redis at %s is unreachable (%s, while trying to %s); skipping the Redis tier, "
                "retrying after %g s and backing off up to %g s",
                self.where,
                exc,
                action,
                self.retry_after,
                self.max_retry_after,
            )
        else:
            self.log.debug("Redis at %s is still unreachable: %s", self.where, exc)


__all__ = ["Client", "Outages", "RedisTarget", "UNREACHABLE", "redact"]
