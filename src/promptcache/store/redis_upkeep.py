"""The Redis tier's upkeep: entries removed in the accounting protocol's order (doom, delete the values,
release), expiry, takeover of dead clients' leases, reconciliation, trimming, and the entry listing.

Owns how entries leave the namespace and how it is inspected; never serves a read or a write
(redis.py) and never changes accounting but through the ledger's scripts (redis_ledger.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from promptcache.errors import CorruptEntryError
from promptcache.store import envelope
from promptcache.store.redis_client import Client
from promptcache.store.redis_ledger import Ledger, RedisKeys

BATCH = 500  # members handled per script call or pipeline, so that Redis is never blocked long


@dataclass(frozen=True)
class Connection:
    """What a RedisStore holds once connected: the client (of one server or of a cluster), the
    ledger bound to it, the value-side script that removes an unusable value only if unchanged."""

    client: Client
    keys: RedisKeys
    ledger: Ledger
    delete_if_unchanged: Any
    cluster: bool


def delete_values(c: Connection, members: list[str]) -> int:
    """Delete the members' values (one pipeline over the nodes that hold them); how many were there."""
    if not members:
        return 0
    pipe = c.client.pipeline(transaction=False)
    for m in members:
        pipe.delete(c.keys.value(m))
    return sum(int(n) for n in pipe.execute())


def remove(c: Connection, members: list[str]) -> int:
    """Doom, delete the values, release: how many members had a value or accounting."""
    codes = c.ledger.doom(members)
    deleted = delete_values(c, [m for m, code in zip(members, codes, strict=True) if code])
    doomed = [m for m, code in zip(members, codes, strict=True) if code == 1]
    return max(deleted, c.ledger.release(doomed))


def remove_if_unchanged(c: Connection, key: str, digest: str, now: float) -> int:
    """Remove key's value if its sha1 is still `digest`, and its accounting with it; a value
    replaced meanwhile is kept (its entry committed again). 1 removed, 0 not."""
    (code,) = c.ledger.doom([key])
    if code == 0:
        return 0  # another client writes or deletes it right now
    removed = int(c.delete_if_unchanged(keys=[c.keys.value(key)], args=[digest]))
    if code == 1 and removed < 0:
        c.ledger.revive(key, now)
    elif code == 1:
        c.ledger.release([key])
    return int(removed > 0)


def reclaim(c: Connection) -> int:
    """Delete what clients that died mid-write or mid-delete left (leases past their time)."""
    members = c.ledger.reclaim()
    delete_values(c, members)
    return c.ledger.release(members)


def expire(c: Connection, cutoff: float) -> int:
    """Remove the committed entries written before cutoff (values and accounting); how many."""
    total = 0
    while True:
        members = c.ledger.expired(cutoff, BATCH)
        delete_values(c, members)
        total += c.ledger.release(members)
        if len(members) < BATCH:
            return total


def reconcile(c: Connection, capacity: int) -> dict[str, int]:
    """Take over dead clients' leases, drop accounting whose value is gone, remove values without
    accounting and the untagged layout's keys, and trim to capacity. Returns counts: reclaimed,
    stale_rows, orphans_removed, evicted."""
    counts = {"reclaimed": reclaim(c), "stale_rows": 0, "orphans_removed": 0}
    members = [m.decode() for m, _ in c.client.zscan_iter(c.keys.metadata[1], count=1000)]
    for i in range(0, len(members), BATCH):
        chunk = members[i : i + BATCH]
        pipe = c.client.pipeline(transaction=False)
        for m in chunk:
            pipe.exists(c.keys.value(m))
        gone = [m for m, exists in zip(chunk, pipe.execute(), strict=True) if not exists]
        counts["stale_rows"] += remove(c, gone) if gone else 0
    prefix = c.keys.value_prefix.encode()
    values = list(c.client.scan_iter(match=c.keys.value_prefix + "*", count=1000))
    for i in range(0, len(values), BATCH):
        chunk = values[i : i + BATCH]
        pipe = c.client.pipeline(transaction=False)
        for vkey in chunk:
            pipe.hexists(c.keys.metadata[2], vkey[len(prefix) :])
        orphans = [v for v, known in zip(chunk, pipe.execute(), strict=True) if not known]
        if orphans:  # unaccounted: not even reserved, so no writer is about to commit them
            counts["orphans_removed"] += int(c.client.unlink(*orphans))
    c.client.unlink(*c.keys.legacy)
    victims = c.ledger.trim(capacity)
    delete_values(c, victims)
    counts["evicted"] = c.ledger.release(victims)
    return counts


def entries(c: Connection, touch: bool) -> list[dict[str, str | int | float]]:
    """Every entry's key, size, fingerprint, ctime and atime (the order score where reads rescore,
    `touch`), most recently written first, from the accounting and each value's first bytes."""
    ctime_key, order_key, sizes_key = c.keys.metadata[1], c.keys.metadata[0], c.keys.metadata[2]
    rows = c.client.zrange(ctime_key, 0, -1, desc=True, withscores=True)
    out: list[dict[str, str | int | float]] = []
    for i in range(0, len(rows), BATCH):
        chunk = rows[i : i + BATCH]
        pipe = c.client.pipeline(transaction=False)
        for m, _ in chunk:
            pipe.hget(sizes_key, m)
            pipe.zscore(order_key, m)
            pipe.getrange(c.keys.value(m.decode()), 0, 1023)
        replies = pipe.execute()
        for j, (m, ctime) in enumerate(chunk):
            size, order, head = replies[3 * j : 3 * j + 3]
            try:
                _key, fp, _n = envelope.peek(head)
            except CorruptEntryError:
                fp = "?"
            atime = order if touch and order is not None else ctime
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


__all__ = [
    "BATCH",
    "Connection",
    "delete_values",
    "entries",
    "expire",
    "reclaim",
    "reconcile",
    "remove",
    "remove_if_unchanged",
]
