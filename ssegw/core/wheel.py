"""Hierarchical timing wheel holding every timer of one worker process.

Strategy: the hashed, hierarchical wheel of the Linux kernel's old
``kernel/time/timer.c`` cascade (and Kafka's ``TimingWheel``).  There is one wheel per
worker process, ticked by a single loop callback that calls :meth:`TimerWheel.advance`
with the loop's clock and dispatches what comes back; heartbeats, idle and token expiry
never get a loop handle each.  ``schedule`` is O(1) (pick a level from the bit length of
the delta, append to a bucket) and ``cancel`` is O(1) and lazy (clear ``target``; the
bucket drops the dead timer when it is next processed), so tens of thousands of
connections re-arming an idle timer on every event cost almost nothing.

Level ``l`` has ``2**bits`` buckets and holds timers ``2**(bits*l) <= delta <
2**(bits*(l+1))`` ticks away, in bucket ``(tick >> bits*l) & mask``.  When the current
tick crosses a multiple of ``2**(bits*l)``, the level-``l`` bucket it indexes holds exactly
the timers due in the next ``2**(bits*l)`` ticks and is re-placed ("cascaded") into the
lower levels; level 0 buckets hold a single tick and simply expire.  Deltas beyond the
top level's horizon are clamped into the top level and re-placed when cascaded.
"""

from __future__ import annotations

__all__ = ["Timer", "TimerWheel"]

# Timer.tick of a timer advance() has returned.  Live ticks are never negative (see
# schedule), so cancel() can tell "already fired" apart and keep len() right when a
# callback cancels its own timer after it fired.
_FIRED = -1

# advance() walks up to this many ticks one by one (O(1) each); a longer gap (suspended
# process, huge clock step) re-places all timers once instead of spinning a Python loop
# for millions of ticks.
_MAX_WALK_TICKS = 1 << 16


class Timer:
    """A scheduled timer, as returned by :meth:`TimerWheel.schedule`.

    ``deadline_ms`` and ``kind`` are the caller's; ``target`` is the caller's object and
    becomes ``None`` on cancel; ``tick`` is internal (the rounded-up expiry tick, ``-1``
    once fired).
    """

    __slots__ = ("deadline_ms", "kind", "target", "tick")

    def __init__(self, deadline_ms: int, kind: int, target: object | None, tick: int) -> None:
        self.deadline_ms = deadline_ms
        self.kind = kind
        self.target = target
        self.tick = tick

    @property
    def active(self) -> bool:
        """True unless cancelled (a fired timer stays active until cancelled)."""
        return self.target is not None

    def __repr__(self) -> str:
        return f"Timer(deadline_ms={self.deadline_ms}, kind={self.kind}, active={self.active})"


class TimerWheel:
    """Timers with millisecond deadlines, expired in ``tick_ms`` granularity, never early.

    Args:
        tick_ms: wheel resolution; deadlines are rounded *up* to a whole tick.
        now_ms: the current time (any non-negative monotonic millisecond clock).
        bits: log2 of the buckets per level.
        levels: number of levels (>= 2); the horizon is ``2**(bits*levels)`` ticks;
            later deadlines wait in the top level, re-checked once per revolution.
    """

    def __init__(self, tick_ms: int, now_ms: int, bits: int = 6, levels: int = 4) -> None:
        if tick_ms < 1 or now_ms < 0 or bits < 1 or levels < 2:
            raise ValueError("need tick_ms >= 1, now_ms >= 0, bits >= 1, levels >= 2")
        self._tick_ms = tick_ms
        self._bits = bits
        self._levels = levels
        self._mask = (1 << bits) - 1
        self._horizon = 1 << (bits * levels)
        self._max_walk = min(self._horizon, _MAX_WALK_TICKS)
        self._now_ms = now_ms
        self._cur = now_ms // tick_ms  # current tick; its level-0 bucket is done
        self._wheel: list[list[list[Timer]]] = [[[] for _ in range(1 << bits)] for _ in range(levels)]
        # Timers whose deadline had already passed when scheduled: the wheel only holds
        # ticks > current, and these must come out of the very next advance().
        self._due: list[Timer] = []
        self._live = 0
        #: Entries held, live or cancelled-but-not-yet-reached (cancelling is lazy): what
        #: the wheel costs in memory, as opposed to len().
        self.stored = 0

    @property
    def now_ms(self) -> int:
        """The ``now_ms`` of the last forward :meth:`advance` (or of construction)."""
        return self._now_ms

    def __len__(self) -> int:
        """Number of live timers: scheduled, not cancelled, not yet returned by advance."""
        return self._live

    def schedule(self, deadline_ms: int, kind: int, target: object) -> Timer:
        """Arm a timer; O(1).

        Args:
            deadline_ms: absolute time on the ``now_ms`` clock; if it is not after
                :attr:`now_ms` the timer comes out of the next :meth:`advance` call.
            kind: any int, handed back untouched (lets the dispatcher switch on it).
            target: the object the timer is for; must not be ``None`` (means cancelled).

        Returns:
            The :class:`Timer`, to keep for :meth:`cancel`.
        """
        if target is None:
            raise ValueError("target must not be None (None marks a cancelled timer)")
        # Round up so nothing fires early; clamp at 0 so -1 stays free for _FIRED.
        timer = Timer(deadline_ms, kind, target, max(-(-deadline_ms // self._tick_ms), 0))
        self._place(timer)
        return timer

    def rearm(self, timer: Timer, deadline_ms: int) -> Timer:
        """Schedule again a timer that :meth:`advance` returned (same kind and target),
        reusing its object: a stream's heartbeat timer is then one object for the stream's
        whole life, not a new one every interval scattered through memory.  O(1).

        Raises:
            ValueError: ``timer`` is still scheduled, or cancelled.
        """
        if timer.tick != _FIRED or timer.target is None:
            raise ValueError("only an active timer that advance() returned can be re-armed")
        timer.deadline_ms = deadline_ms
        timer.tick = max(-(-deadline_ms // self._tick_ms), 0)
        self._place(timer)
        return timer

    def _place(self, timer: Timer) -> None:
        self._live += 1
        self.stored += 1
        if timer.deadline_ms <= self._now_ms:
            self._due.append(timer)
        else:  # here tick > self._cur, as the wheel requires
            level, idx = self._slot(timer.tick)
            self._wheel[level][idx].append(timer)

    def cancel(self, timer: Timer) -> None:
        """Cancel ``timer`` in O(1); idempotent, and harmless on a timer already fired.

        Cancelling a fired timer still clears its ``target``, so a dispatcher that checks
        ``timer.active`` skips it if an earlier callback of the same batch cancelled it.

        Args:
            timer: a timer returned by :meth:`schedule` on this wheel.
        """
        if timer.target is None:
            return
        timer.target = None
        if timer.tick != _FIRED:
            self._live -= 1  # it stays in its bucket until that bucket is processed

    def purge(self) -> int:
        """Drop every cancelled timer now instead of when its bucket comes up; O(stored).

        For after a burst (the worker calls it before handing memory back): a flood of short
        connections leaves one cancelled timer per connection in buckets seconds or minutes
        away, small objects allocated in the middle of the burst's memory that would keep
        it from being returned.  Order within a bucket is kept.  Returns the timers dropped.
        """
        dropped = 0
        for row in self._wheel:
            for i, bucket in enumerate(row):
                if bucket:
                    kept = [t for t in bucket if t.target is not None]
                    if len(kept) != len(bucket):
                        dropped += len(bucket) - len(kept)
                        row[i] = kept
        if self._due:
            kept = [t for t in self._due if t.target is not None]
            dropped += len(self._due) - len(kept)
            self._due = kept
        self.stored -= dropped
        return dropped

    def advance(self, now_ms: int) -> list[Timer]:
        """Move the clock to ``now_ms`` and collect what is due.

        Args:
            now_ms: the current time; earlier than :attr:`now_ms` makes this a no-op.

        Returns:
            Every active timer whose tick ``ceil(deadline_ms / tick_ms)`` is at or before
            ``now_ms // tick_ms`` (so ``deadline_ms <= now_ms``), plus any scheduled with
            an already-passed deadline; ordered by tick, FIFO within a tick, with the
            already-passed ones first within their tick.  Cancelled timers are dropped.
        """
        if now_ms < self._now_ms:
            return []  # a clock going backwards must neither fire nor rewind anything
        self._now_ms = now_ms
        out: list[Timer] = []
        if self._due:
            due, self._due = self._due, []
            due.sort(key=_tick_of)  # stable: FIFO within a tick
            self._expire(due, out)
        target = now_ms // self._tick_ms
        if target - self._cur > self._max_walk:
            self._jump(target, out)
        elif target > self._cur:
            self._walk(target, out)
        return out

    # -- internals ---------------------------------------------------------------------

    def _slot(self, tick: int) -> tuple[int, int]:
        """(level, bucket) for a timer expiring at ``tick`` >= the current tick."""
        delta = tick - self._cur
        # Beyond the horizon the *level* is clamped to the top, but the bucket is still
        # the tick's own: the timer is cascaded once per wheel revolution, put straight
        # back into the same bucket while still out of reach, and moves down exactly
        # when its range begins, so it is never early.  (Clamping the *expiry* instead,
        # as the kernel did, spreads equal ticks over different buckets and loses FIFO.)
        level = min(max(delta.bit_length() - 1, 0) // self._bits, self._levels - 1)
        return level, (tick >> (self._bits * level)) & self._mask

    def _expire(self, timers: list[Timer], out: list[Timer]) -> None:
        self.stored -= len(timers)
        for timer in timers:
            if timer.target is not None:  # cancelled ones are simply dropped here
                timer.tick = _FIRED
                out.append(timer)
                self._live -= 1

    def _walk(self, target: int, out: list[Timer]) -> None:
        row0, mask, bits = self._wheel[0], self._mask, self._bits
        cur = self._cur
        while cur < target:
            cur += 1
            self._cur = cur
            # Cascade bottom-up, like the kernel: with _cascade prepending, the groups
            # from higher (earlier-scheduled) levels end up in front, keeping FIFO.
            level = 1
            while level < self._levels and not cur & ((1 << (bits * level)) - 1):
                self._cascade(level)
                level += 1
            bucket = row0[cur & mask]
            if bucket:
                row0[cur & mask] = []
                self._expire(bucket, out)

    def _cascade(self, level: int) -> None:
        row = self._wheel[level]
        idx = (self._cur >> (self._bits * level)) & self._mask
        bucket = row[idx]
        if not bucket:
            return
        row[idx] = []
        moved: dict[tuple[int, int], list[Timer]] = {}
        for timer in bucket:
            if timer.target is not None:
                moved.setdefault(self._slot(timer.tick), []).append(timer)
            else:
                self.stored -= 1
        # Prepend, not append: for one tick, a timer on a higher level was always
        # scheduled before any timer already on a lower level (its delta was larger),
        # so putting the cascaded group first keeps expiry FIFO within a tick.
        for (lvl, i), timers in moved.items():
            self._wheel[lvl][i][:0] = timers

    def _jump(self, target: int, out: list[Timer]) -> None:
        # Gather top level first (for one tick, higher levels hold earlier-scheduled
        # timers and each tick has a single bucket per level), expire the due ones with
        # a stable sort, and re-place the rest against the new tick in that same order.
        alive = [
            timer for row in reversed(self._wheel) for bucket in row for timer in bucket if timer.target is not None
        ]
        self._wheel = [[[] for _ in range(self._mask + 1)] for _ in range(self._levels)]
        self._cur = target
        self.stored = len(alive) + len(self._due)
        due = [t for t in alive if t.tick <= target]
        later = [t for t in alive if t.tick > target]
        due.sort(key=_tick_of)
        self._expire(due, out)
        for timer in later:
            level, idx = self._slot(timer.tick)
            self._wheel[level][idx].append(timer)


def _tick_of(timer: Timer) -> int:
    return timer.tick
