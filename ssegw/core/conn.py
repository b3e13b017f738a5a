"""One connection's lifecycle, in one table: what state it is in, and whether it may be written.

Rules (after h11's ``_state.py``: every transition is a row, anything else is an error):

    state      event            next       meaning
    HEAD       REQUEST          BODY       a request head was parsed; its body follows
    BODY       REQUEST_DONE     RESPOND    the request is complete; a handler owns it
    RESPOND    KEEP_ALIVE       HEAD       answered; the next request may come
    RESPOND    ACCEPT_STREAM    STARTING   a stream was admitted: subscribed, replay pending
    STARTING   STREAM_OPEN      STREAM     head and replay handed out; live from here
    STARTING   START_FAILED     RESPOND    the replay failed: the stream is undone, an error
                                           answer follows (and the connection closes)
    STREAM     END              DRAINING   we end the stream: last bytes queued, FIN next
    STARTING   END              DRAINING   (drain or shutdown before the replay arrived)
    any        CLOSE            CLOSED     the socket is gone or we abort it
    CLOSED     CLOSE            CLOSED     (idempotent)

Two facts are kept apart from the state, because they change independently of it:
- ``wpaused``: the transport asked us to stop writing (``pause_writing``) and has not yet
  said ``resume_writing``.  It is set and cleared in *any* state -- a keep-alive answer or
  pipelined responses can fill the transport before a stream ever starts.
- ``backlog``: output we still owe the client (a replay being paced out, events held while
  the transport was paused), as references to shared event bytes.  ``None`` when empty.
A replay floor (``floor``, see core/fanout.py) is the third input.

From state, ``wpaused``, ``backlog`` and ``floor`` follows one derived field, ``route``,
recomputed by :func:`refresh` after every change and read by the fan-out once per connection
per flush:

    LIVE  STREAM, transport writable, nothing owed, no floor: the shared bytes go out now.
    HOLD  STARTING, or STREAM with the transport paused, something owed or a floor: the
          events go through :meth:`Fanout.slow` (filter, hold in the backlog, or write).
    OFF   every other state: nothing may be written (an HTTP exchange owns the socket, or
          the stream is ending); events for it are dropped.

Whether a held connection must be closed is decided by :func:`verdict`, from how long its
backlog has stayed over ``max_buffer`` (a burst is not slowness) and how long the client has
made no progress at all.
"""

from __future__ import annotations

from collections import deque

from .errors import ProtocolError
from .history import Event
from .wheel import Timer

# States.
HEAD, BODY, RESPOND, STARTING, STREAM, DRAINING, CLOSED = range(7)
STATE_NAMES = ("HEAD", "BODY", "RESPOND", "STARTING", "STREAM", "DRAINING", "CLOSED")

# Events.
REQUEST, REQUEST_DONE, KEEP_ALIVE, ACCEPT_STREAM, STREAM_OPEN, START_FAILED, END, CLOSE = range(8)
EVENT_NAMES = ("REQUEST", "REQUEST_DONE", "KEEP_ALIVE", "ACCEPT_STREAM", "STREAM_OPEN", "START_FAILED", "END",
               "CLOSE")

# Routes.
LIVE, HOLD, OFF = 0, 1, 2

#: (state, event) -> next state.  CLOSE is accepted from every state (below).
TRANSITIONS: dict[tuple[int, int], int] = {
    (HEAD, REQUEST): BODY,
    (BODY, REQUEST_DONE): RESPOND,
    (RESPOND, KEEP_ALIVE): HEAD,
    (RESPOND, ACCEPT_STREAM): STARTING,
    (STARTING, STREAM_OPEN): STREAM,
    (STARTING, START_FAILED): RESPOND,
    (STREAM, END): DRAINING,
    (STARTING, END): DRAINING,
}
for _s in range(7):
    TRANSITIONS[(_s, CLOSE)] = CLOSED

# Verdicts.
KEEP, DROP_BUFFER, DROP_STALL = 0, 1, 2


class LocalProtocolError(ProtocolError):
    """A transition the table does not have: a bug of ours, never the client's."""

    status_hint = 500
    code = "internal"


class Backlog:
    """Output owed to one client: events in delivery order, as references to shared frames.

    Events pushed with ``conflate`` are tracked by (topic, key): a newer one for the same key
    makes the older one stale, and stale entries are skipped when taken (and compacted away
    once they outnumber live ones, so a stalled ticker client's queue stays about as long as
    its key set).  Events pushed without it (a replay, a ``drop`` topic) are never skipped.
    ``nbytes`` and ``live`` count live entries only.
    """

    __slots__ = ("q", "latest", "stale", "nbytes", "live")

    def __init__(self) -> None:
        self.q: deque[Event] = deque()
        self.latest: dict[tuple[str, str | None], Event] | None = None  # conflated keys
        self.stale: set[int] | None = None  # id() of replaced entries still in ``q``
        self.nbytes = 0
        self.live = 0

    def __len__(self) -> int:
        return self.live

    def push(self, ev: Event, conflate: bool) -> bool:
        """Append ``ev``; with ``conflate``, it replaces a held conflated event of the same
        key.  Returns True when an older event was replaced."""
        replaced = False
        if conflate:
            latest = self.latest
            if latest is None:
                latest = self.latest = {}
            k = (ev.topic, ev.key)
            old = latest.get(k)
            latest[k] = ev
            if old is not None:
                stale = self.stale
                if stale is None:
                    stale = self.stale = set()
                stale.add(id(old))  # ``old`` stays alive in ``q`` until skipped
                self.nbytes -= len(old.frame)
                self.live -= 1
                replaced = True
        self.q.append(ev)
        self.nbytes += len(ev.frame)
        self.live += 1
        if replaced and len(self.q) > 2 * self.live + 64:
            self._compact()
        return replaced

    def take(self, limit: int) -> list[Event]:
        """Pop live events from the front, at least one and about ``limit`` bytes at most."""
        q, latest, stale = self.q, self.latest, self.stale
        out: list[Event] = []
        size = 0
        while q and (not out or size < limit):
            ev = q.popleft()
            if stale and id(ev) in stale:
                stale.discard(id(ev))
                continue  # replaced by a newer event of the same key
            if latest is not None:
                k = (ev.topic, ev.key)
                if latest.get(k) is ev:
                    del latest[k]
            out.append(ev)
            size += len(ev.frame)
        self.nbytes -= size
        self.live -= len(out)
        return out

    def _compact(self) -> None:
        stale = self.stale
        assert stale is not None
        self.q = deque(e for e in self.q if id(e) not in stale)
        stale.clear()


class Conn:
    """One connection's record.  The server's protocol class subclasses it, so a
    connection costs one Python object; the table holds it in a slot."""

    __slots__ = (
        "slot",
        "state",
        "route",
        "wpaused",
        "backlog",
        "floor",
        "transport",
        "ip",
        "topics",
        "chunked",
        "last_write_ms",
        "progress_ms",
        "over_ms",
        "due_ms",
        "timer",
        "deadline",
    )

    def init_conn(self) -> None:
        self.slot = -1
        self.state = HEAD
        self.route = OFF
        self.wpaused = False
        self.backlog: Backlog | None = None
        # topic -> highest seq its replay covered; None once live (see core/fanout.py).
        self.floor: dict[str, int] | None = None
        self.transport: object = None
        self.ip = ""
        self.topics: tuple[str, ...] = ()
        self.chunked = True
        self.last_write_ms = 0  # last bytes handed to the transport (heartbeat due)
        self.progress_ms = 0  # last time the client took bytes (writable again / written)
        self.over_ms = 0  # since when the backlog has been over max_buffer (0: it is not)
        self.due_ms = 0  # idle/head deadline, checked lazily when ``timer`` fires
        self.timer: Timer | None = None  # one wheel entry: head/idle timeout, then liveness
        self.deadline: Timer | None = None  # lifetime / token expiry / drain close


def advance(conn: Conn, event: int) -> int:
    """Apply ``event`` to ``conn``'s state by the table; returns the new state.

    Raises:
        LocalProtocolError: the table has no such transition (a bug of ours).
    """
    nxt = TRANSITIONS.get((conn.state, event))
    if nxt is None:
        raise LocalProtocolError(f"no transition from {STATE_NAMES[conn.state]} on {EVENT_NAMES[event]}")
    conn.state = nxt
    refresh(conn)
    return nxt


def refresh(conn: Conn) -> None:
    """Recompute ``route`` from state, ``wpaused``, ``backlog`` and ``floor``."""
    state = conn.state
    if state == STREAM:
        conn.route = HOLD if conn.wpaused or conn.backlog is not None or conn.floor is not None else LIVE
    elif state == STARTING:
        conn.route = HOLD
    else:
        conn.route = OFF


def set_wpaused(conn: Conn, paused: bool, now_ms: int) -> None:
    """The transport paused (True) or resumed (False) writing; resuming is progress."""
    conn.wpaused = paused
    if not paused:
        conn.progress_ms = now_ms
    refresh(conn)


def owed(conn: Conn, now_ms: int, max_buffer: int) -> None:
    """Note the backlog's size after it changed: start or stop the over-``max_buffer`` clock,
    and drop an emptied backlog (its connection can go back to the fast path)."""
    b = conn.backlog
    if b is not None and not b.live:
        conn.backlog = b = None
        refresh(conn)
    if b is not None and b.nbytes > max_buffer:
        if not conn.over_ms:
            conn.over_ms = now_ms or 1
    else:
        conn.over_ms = 0


def verdict(conn: Conn, now_ms: int, grace_ms: int, stall_ms: int, conflate_only: bool) -> int:
    """Must a held connection be closed?

    - ``DROP_BUFFER``: its backlog has stayed over ``max_buffer`` for ``grace_ms`` (a client
      that drains a burst or a replay within the grace is never dropped, however large).
    - ``DROP_STALL``: the transport has been paused, and the client has taken nothing, for
      ``stall_ms`` -- unless every topic of the connection conflates (a stalled ticker
      client keeps only the newest value per key, at bounded cost, and is kept).
    - ``KEEP`` otherwise.
    """
    if conn.over_ms and now_ms - conn.over_ms >= grace_ms:
        return DROP_BUFFER
    if conn.wpaused and not conflate_only and now_ms - conn.progress_ms >= stall_ms:
        return DROP_STALL
    return KEEP


def next_check(conn: Conn, now_ms: int, grace_ms: int, stall_ms: int) -> int:
    """When a held connection must be looked at again: its grace or stall deadline, never
    in the past.  A stall deadline already passed and survived (a stalled stream whose every
    topic conflates, with a live peer) comes round again a stall period later, so a stalled
    stream costs one look per ``stall_ms``, not one per tick."""
    due = 0
    if conn.over_ms and conn.over_ms + grace_ms > now_ms:
        due = conn.over_ms + grace_ms
    if conn.wpaused:
        stall = conn.progress_ms + stall_ms
        if stall <= now_ms:
            stall = now_ms + stall_ms
        due = min(due, stall) if due else stall
    return due or now_ms + stall_ms
