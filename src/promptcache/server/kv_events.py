"""KV events: what a server can serve, published on a ZMQ PUB socket in vLLM's wire format, for
prefix-aware routers (vllm-router's kv_aware, Dynamo's KV router, llm-d's indexer).

Owns the publisher thread (the only one that touches the sockets, numbers the batches and encodes
them), the listeners it hands to the engines and the prefix cache (they only queue a change), the
wire layouts and the replay socket. Never blocks an engine round or a cache insert on the network,
and never decides what is servable (the sequence table and the cache's ledger report it).

Frames, as vLLM's ZmqEventPublisher sends them: (topic, sequence number as 8 bytes big-endian,
msgpack payload); the payload is [timestamp, events, data-parallel rank 0]. Sequence numbers start
at 0 and grow by one per batch, never skipping: vllm-router purges a worker's blocks on a gap.
Layouts (README, "A fleet"): "map" (the default: events are maps tagged "type" with every field of
vLLM's structs, the only form vllm-router 0.1.17 accepts; Dynamo and vLLM >= 0.26 consumers read it
too) and "array" (tagged arrays, vLLM <= 0.23's array_like form: Dynamo, llm-d's indexer, older
consumers). The replay socket (a ROUTER) answers [b"", start sequence] with every buffered batch from
there as [b"", topic, sequence, payload], then sequence -1: the 4-frame form vllm-router applies.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from promptcache.holdings import TokenIds
from promptcache.keys import token_bytes
from promptcache.server.kv_blocks import BlockCounts, Removed, Stored

if TYPE_CHECKING:
    from promptcache.store import Store

log = logging.getLogger(__name__)

LAYOUTS = ("map", "array")
# Mediums as vLLM names them; vllm-router credits GPU fully, CPU at --kv-penalty-host (0.8) and
# DISK at --kv-penalty-disk (0.3).
LIVE, RAM, DISK = "GPU", "CPU", "DISK"
REPLAY_BATCHES = 10_000  # batches kept for the replay socket (a router that missed some asks)
_POLL_S = 0.02  # how long the thread waits for a change before it looks at the replay socket
_END = (-1).to_bytes(8, "big", signed=True)
_CLEARED = object()  # a queued "every holder of this medium released"
_RESET = object()  # a queued "tell consumers to forget everything, then state what is held"
_NOTHING = object()


@dataclass
class EventCounts:
    """What the publisher sent, for /v1/cache/stats and /metrics."""

    batches: int = 0
    events: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("BlockStored", "BlockRemoved", "AllBlocksCleared"), 0
        )
    )
    blocks_stored: int = 0
    blocks_removed: int = 0
    replays: int = 0
    last_seq: int = -1


class _Listener:
    """A HoldingsListener for one medium: queues each change for the publisher thread."""

    def __init__(self, changes: queue.SimpleQueue, medium: str) -> None:
        self._changes = changes
        self.medium = medium

    def holds(self, holder: Hashable, tokens: TokenIds) -> None:
        self._changes.put((self.medium, holder, tokens))

    def cleared(self) -> None:
        self._changes.put((self.medium, _CLEARED, b""))


def encode(events: list[tuple[str, Stored | Removed | None]], layout: str, block_size: int) -> list:
    """The events (medium, event; None for AllBlocksCleared) in one of LAYOUTS."""
    out: list[Any] = []
    for medium, event in events:
        if event is None:
            out.append({"type": "AllBlocksCleared"} if layout == "map" else ["AllBlocksCleared"])
        elif isinstance(event, Stored):
            hashes, tokens = list(event.hashes), list(event.tokens)
            if layout == "map":
                out.append(
                    {
                        "type": "BlockStored",
                        "block_hashes": hashes,
                        "parent_block_hash": event.parent,
                        "token_ids": tokens,
                        "block_size": block_size,
                        "lora_id": None,
                        "medium": medium,
                        "lora_name": None,
                    }
                )
            else:
                stored = [
                    "BlockStored",
                    hashes,
                    event.parent,
                    tokens,
                    block_size,
                    None,
                    medium,
                    None,
                ]
                out.append(stored)
        elif layout == "map":
            out.append(
                {"type": "BlockRemoved", "block_hashes": list(event.hashes), "medium": medium}
            )
        else:
            out.append(["BlockRemoved", list(event.hashes), medium])
    return out


class KVEventPublisher:
    """Publishes BlockStored / BlockRemoved / AllBlocksCleared batches on a PUB socket bound at
    `endpoint` (tcp://*:5557), blocks of `block_size` tokens (the router's --kv-event-block-size),
    in `layout`, under `topic` ("" for vllm-router, "kv@<pod>@<model>" for llm-d), with an optional
    ROUTER socket bound at `replay` for consumers that ask for missed batches. Raises ValueError for
    a bad setting and zmq.ZMQError when an endpoint cannot be bound."""

    def __init__(
        self,
        endpoint: str,
        *,
        block_size: int = 16,
        layout: str = "map",
        topic: str = "",
        replay: str | None = None,
    ) -> None:
        import msgpack
        import zmq

        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError("block_size must be an int >= 1")
        self.endpoint, self.block_size, self.layout, self.topic = (
            endpoint,
            block_size,
            layout,
            topic,
        )
        self.replay_endpoint = replay
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._zmq = zmq.Context()
        try:
            self._pub = self._zmq.socket(zmq.PUB)
            self._pub.setsockopt(zmq.SNDHWM, 100_000)  # a slow subscriber loses batches late
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.bind(endpoint)
            self._router = None
            if replay:
                self._router = self._zmq.socket(zmq.ROUTER)
                self._router.setsockopt(zmq.LINGER, 0)
                self._router.bind(replay)
        except zmq.ZMQError:
            self._zmq.destroy(linger=0)
            raise
        self._changes: queue.SimpleQueue = queue.SimpleQueue()
        self._media: dict[str, BlockCounts] = {}
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=REPLAY_BATCHES)
        self.counts = EventCounts()
        self._thread = threading.Thread(target=self._run, name="promptcache-kv-events", daemon=True)
        self._thread.start()
        log.info(
            "publishing KV events on %s (%s layout, blocks of %d)", endpoint, layout, block_size
        )

    def listener(self, medium: str) -> _Listener:
        """A HoldingsListener whose holders' blocks are published under `medium`."""
        return _Listener(self._changes, medium)

    def stats(self) -> dict[str, Any]:
        c = self.counts
        return {
            "endpoint": self.endpoint,
            "replay": self.replay_endpoint,
            "layout": self.layout,
            "block_size": self.block_size,
            "batches": c.batches,
            "events": dict(c.events),
            "blocks_stored": c.blocks_stored,
            "blocks_removed": c.blocks_removed,
            "blocks_announced": {m: len(b) for m, b in list(self._media.items())},
            "replays": c.replays,
            "last_seq": c.last_seq,
        }

    def reset(self) -> None:
        """Publish AllBlocksCleared, then what is still held (the server's prefix cache was reset:
        consumers start over from this batch)."""
        self._changes.put(("", _RESET, b""))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every change queued before this call is published; False on timeout."""
        done = threading.Event()
        self._changes.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Publish what is queued, stop the thread and close the sockets (idempotent)."""
        if self._thread.is_alive():
            self._changes.put(None)
            self._thread.join(timeout)
        self._zmq.destroy(linger=0)

    # ------------------------------------------------------------------ the publisher thread

    def _run(self) -> None:
        wait = _POLL_S if self._router is not None else None
        while True:
            try:
                first = self._changes.get(timeout=wait)
            except queue.Empty:
                first = _NOTHING
            changes = [] if first is _NOTHING else [first]
            while True:  # everything queued meanwhile goes into the same batch
                try:
                    changes.append(self._changes.get_nowait())
                except queue.Empty:
                    break
            try:
                stop = self._publish(changes)
                self._answer_replays()
            except Exception:  # noqa: BLE001 - the thread must outlive a bad change or a socket error
                log.exception("publishing KV events failed")
                stop = None in changes
            if stop:
                return

    def _publish(self, changes: list) -> bool:
        """Turn the queued changes into one batch and send it; True when close() was asked."""
        events: list[tuple[str, Stored | Removed | None]] = []
        flushed: list[threading.Event] = []
        stop = False
        for change in changes:
            if change is None:
                stop = True
            elif isinstance(change, threading.Event):
                flushed.append(change)
            else:
                events += self._apply(*change)
        if events:
            self._send(events)
        for done in flushed:
            done.set()
        return stop

    def _apply(
        self, medium: str, holder: Any, tokens: TokenIds
    ) -> list[tuple[str, Stored | Removed | None]]:
        if holder is _RESET:
            # AllBlocksCleared makes a consumer forget every medium of this server: what is still
            # held is stated again right after it.
            out: list[tuple[str, Stored | Removed | None]] = [("", None)]
            for other, blocks in self._media.items():
                out += [(other, e) for e in blocks.restate()]
            return out
        counts = self._media.setdefault(medium, BlockCounts(self.block_size))
        if holder is _CLEARED:
            return [(medium, e) for e in counts.release_all()]
        tokens_le = tokens if isinstance(tokens, bytes) else token_bytes(tokens)
        return [(medium, e) for e in counts.hold(holder, tokens_le)]

    def _send(self, events: list[tuple[str, Stored | Removed | None]]) -> None:
        payload = self._pack([time.time(), encode(events, self.layout, self.block_size), 0])
        seq = self.counts.last_seq + 1
        self._pub.send_multipart([self.topic.encode(), seq.to_bytes(8, "big"), payload])
        self._buffer.append((seq, payload))
        c = self.counts
        c.last_seq, c.batches = seq, c.batches + 1
        for _, event in events:
            kind = (
                "AllBlocksCleared"
                if event is None
                else ("BlockStored" if isinstance(event, Stored) else "BlockRemoved")
            )
            c.events[kind] += 1
            if isinstance(event, Stored):
                c.blocks_stored += len(event.hashes)
            elif isinstance(event, Removed):
                c.blocks_removed += len(event.hashes)

    def _answer_replays(self) -> None:
        """Answer every waiting [identity, b"", start] with the buffered batches from start on."""
        import zmq

        if self._router is None:
            return
        while self._router.poll(0, zmq.POLLIN):
            frames = self._router.recv_multipart()
            identity, start = frames[0], int.from_bytes(frames[-1][:8], "big", signed=True)
            topic = self.topic.encode()
            for seq, payload in list(self._buffer):
                if seq >= start:
                    self._router.send_multipart(
                        [identity, b"", topic, seq.to_bytes(8, "big"), payload]
                    )
            self._router.send_multipart([identity, b"", topic, _END, b""])
            self.counts.replays += 1


def cache_medium(store: Store) -> str | None:
    """The medium a prefix cache's entries are published under: CPU when it has a RAM tier, DISK
    when its own tier is a disk, None when it is only a shared tier (Redis: every server of the
    fleet can restore from it, so it says nothing about where to route)."""
    names = set(store.tier_names())
    if "memory" in names:
        return RAM
    if "disk" in names:
        return DISK
    return None


__all__ = [
    "DISK",
    "KVEventPublisher",
    "LAYOUTS",
    "LIVE",
    "RAM",
    "REPLAY_BATCHES",
    "cache_medium",
    "encode",
]
