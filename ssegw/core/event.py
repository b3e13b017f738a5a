"""A published event: what history keeps, keyed state indexes and the fan-out writes.

Its own module so that ``history.py`` and ``keyed.py``, which both hold events, import it and
not each other.
"""

from __future__ import annotations


class Event:
    """One published event as every subscriber will receive it.

    ``frame`` is the complete SSE block (``id:``, ``event:``, ``data:``, blank line),
    encoded once and shared.  ``seq`` orders events of one broker shard; ``n`` is the
    order in which this process queued events for fan-out (set by ``Fanout.publish``),
    the only order that holds across shards.
    """

    # __weakref__: a broker may keep a weak index of events still held somewhere, so that
    # replays of the same history share frames (broker/redis.py); 8 bytes per event.
    __slots__ = ("topic", "seq", "ts_ms", "frame", "key", "n", "__weakref__")

    def __init__(self, topic: str, seq: int, ts_ms: int, frame: bytes, key: str | None) -> None:
        self.topic = topic
        self.seq = seq
        self.ts_ms = ts_ms
        self.frame = frame
        self.key = key
        self.n = 0

    def __repr__(self) -> str:
        return f"Event({self.topic!r}, seq={self.seq})"


__all__ = ["Event"]
