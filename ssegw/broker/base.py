"""The broker interface: where events get their ids, their history and their way to workers.

``memory.py`` is the reference implementation (one process, one shard); a Redis broker
implements the same Protocol for many workers and hosts.  The worker never imports a
concrete broker: ``cli`` chooses one and hands it over.

Only methods that can block are ``async`` (publishing and replay may need a network round
trip); interest changes are fire-and-forget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from ..core.history import Event
from ..core.publish import Message


class Replay:
    """What a new stream gets before going live: events to replay (ascending by seq), the
    topics whose gap history no longer covers (they get ``ssegw.reset``), per replayed
    topic the sequence up to which the replay is complete (live events at or under it are
    duplicates of the replay and are skipped), and the topics whose replay is compacted
    (only the newest event of each key changed in the gap: ``ssegw.compacted``).

    ``events`` may be shared with other replays (a cached snapshot): never mutate it."""

    __slots__ = ("events", "reset", "floors", "compacted")

    def __init__(self, events: list[Event], reset: list[str], floors: dict[str, int] | None = None,
                 compacted: list[str] | None = None) -> None:
        self.events = events
        self.reset = reset
        self.floors = floors or {}
        self.compacted = compacted or []


class BrokerUnavailable(Exception):
    """The broker cannot accept a publish right now; nothing of the request was published."""


class PublishUnresolved(Exception):
    """A publish was sent but its reply was lost, and the broker stayed unreachable for
    longer than it can wait: the request may or may not have been published.  Rare (Redis
    down for over a minute with a publish in flight); answered 504 so that a publisher never
    reads "nothing was published" where something was."""


class Broker(Protocol):
    #: A name for logs and /admin/stats ("memory", "redis").
    kind: str
    #: Whether this broker keeps keyed state: ``since=snapshot`` and compacted resumes.  A
    #: broker without it refuses ``since=snapshot`` (400) and resets what history misses.
    keyed: bool

    async def start(self, deliver: Callable[[list[Event]], None],
                    on_gap: Callable[[list[str] | None], None] | None = None) -> None:
        """Begin delivering events for topics of interest to ``deliver`` (in seq order).
        ``on_gap(topics)`` reports events lost beyond repair for those topics (None: all)."""

    async def close(self) -> None: ...

    def ready(self) -> bool:
        """True when a publish would be accepted."""

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :meth:`ready`; returns it."""

    def publish_now(self, messages: Sequence[Message]) -> list[str] | None:
        """Publish without waiting, if this broker can (the embedded one): the ids, as
        :meth:`publish` returns them.  None: it cannot, and the caller awaits :meth:`publish`."""

    async def publish(self, messages: Sequence[Message]) -> list[str]:
        """Publish all messages or none.  Returns their ids in order.

        Raises:
            BrokerUnavailable: nothing was published.
            PublishUnresolved: the outcome could not be learned (see its docstring).
        """

    async def replay(
        self, topics: tuple[str, ...], after: tuple[str, tuple[int, ...]] | None, since: str | None
    ) -> Replay:
        """Events of ``topics`` after the parsed id ``after`` (epoch, seqs); or, without an
        id, the latest (``since="last"``), all retained (``"earliest"``) or the newest of
        each key (``"snapshot"``, brokers with :attr:`keyed`) events; or none."""

    def replay_now(
        self, topics: tuple[str, ...], after: tuple[str, tuple[int, ...]] | None, since: str | None
    ) -> Replay | None:
        """:meth:`replay` without waiting, if this broker can; None: await :meth:`replay`."""

    def interest(self, topic: str, on: bool) -> None:
        """This worker gained its first / lost its last subscriber of ``topic``."""

    async def subscribers(self, topic: str, local: int) -> int:
        """Subscribers of ``topic`` across the cluster (``local`` = this worker's count)."""

    async def keys(self, topic: str) -> int:
        """Keys in ``topic``'s keyed state (0 for a broker without :attr:`keyed`)."""

    def presence(self, counts: dict[str, int]) -> None:
        """This worker's subscriber count of each topic that changed (cluster presence)."""

    def tick(self, now_ms: int) -> None:
        """Periodic housekeeping (history trimming, presence refresh)."""

    def stats(self) -> dict[str, object]: ...

    async def lease(self, name: str, owner: str, ttl_ms: int, note: str | None) -> tuple[bool, str | None]:
        """Take the lease ``name`` for ``owner`` if nobody holds it, or renew it if ``owner``
        holds it, for ``ttl_ms`` (upstream routes: one upstream stream per topic).  The
        holder may store ``note`` with it (None: leave it); everyone reads it back.

        Returns:
            (whether ``owner`` holds the lease now, the note last stored).

        Raises:
            BrokerUnavailable: the lease could not be asked for (Redis unreachable).
        """

    async def release(self, name: str, owner: str) -> None:
        """Give the lease ``name`` up if ``owner`` holds it."""


#: Lease notes an embedded broker keeps (an upstream's last id outlives its stream, so that
#: the next stream of the topic resumes; bounded, the oldest forgotten first).
LOCAL_NOTES = 65_536


class LocalLeases:
    """Leases within one process (the embedded broker).  Real leases all the same: during a
    single-process reload two generations of workers share the broker, and only one of them
    may run a topic's upstream stream (the old one keeps it until it stops and gives it up,
    or until the lease lapses)."""

    async def lease(self, name: str, owner: str, ttl_ms: int, note: str | None) -> tuple[bool, str | None]:
        leases: dict[str, tuple[str, float]] = self.__dict__.setdefault("_leases", {})
        notes: dict[str, str] = self.__dict__.setdefault("_notes", {})
        now = time.monotonic()
        cur = leases.get(name)
        held = cur is None or cur[0] == owner or cur[1] <= now
        if held:
            leases[name] = (owner, now + ttl_ms / 1000)
            if note is not None:
                notes.pop(name, None)
                notes[name] = note  # newest last: the oldest go first past LOCAL_NOTES
                if len(notes) > LOCAL_NOTES:
                    del notes[next(iter(notes))]
        return held, notes.get(name)

    async def release(self, name: str, owner: str) -> None:
        leases: dict[str, tuple[str, float]] = self.__dict__.setdefault("_leases", {})
        cur = leases.get(name)
        if cur is not None and cur[0] == owner:
            del leases[name]
