"""Accepting public connections: many per readiness event, and a pause instead of a spin.

Why not ``loop.create_server``: libuv (since 1.45, bundled by uvloop) accepts one connection
per listening socket per loop iteration.  Under fan-out load an iteration can take tens of
milliseconds (a flush slice), so a busy worker accepted ~75 connections/s: a flood of
connects -- or a reconnect storm -- filled the kernel's accept queue, and new clients waited
10-19 s before the per-IP limits even saw them (``bench/flood.py``).  Here the listening
socket is watched with ``add_reader`` and each readiness event accepts up to
:data:`ACCEPT_BATCH` connections (nginx's ``multi_accept``), handing each to
``loop.connect_accepted_socket``, which builds the same transport ``create_server`` would
(TCP_NODELAY included).  Admission (capacity, descriptors, rate, per-IP) then answers or
closes each connection at once, so a flood is turned away at the rate it arrives.

When ``accept()`` fails for lack of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM),
accepting pauses for :data:`PAUSE_S` (the connections wait in the kernel's queue, they are
not dropped) and the condition is logged once until accepting works again -- never a busy
loop on a readable socket that cannot be accepted.  The worker's descriptor reserve
(``sockets.descriptor_budget``) normally keeps this from happening at all.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("ssegw.worker")

#: Connections accepted per readiness event at most (then other callbacks run).
ACCEPT_BATCH = 128
#: How long accepting pauses when the process or the kernel is out of descriptors/memory.
PAUSE_S = 0.25
_RESOURCE = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class Acceptor:
    """Accepts connections on one listening socket for ``factory`` (a protocol factory)."""

    __slots__ = ("loop", "sock", "factory", "fd", "watching", "starved", "resume_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[], asyncio.Protocol]) -> None:
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.fd = sock.fileno()
        self.watching = False
        self.starved = False  # accept() failed for lack of resources; logged once
        self.resume_handle: asyncio.TimerHandle | None = None
        sock.setblocking(False)

    def start(self) -> None:
        if not self.watching and self.fd >= 0:
            self.loop.add_reader(self.fd, self._ready)
            self.watching = True

    def close(self) -> None:
        """Stop accepting and close the listening socket (connections queued in it are reset
        by the kernel; a supervisor's slot socket is closed only in this process)."""
        if self.watching:
            self.loop.remove_reader(self.fd)
            self.watching = False
        if self.resume_handle is not None:
            self.resume_handle.cancel()
            self.resume_handle = None
        self.fd = -1
        self.sock.close()

    def _ready(self) -> None:
        accept = self.sock.accept
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as e:
                if e.errno in _RESOURCE:
                    self._pause(e)
                else:
                    log.error("accept failed on %s: %s", self.sock.getsockname(), e)
                return
            conn.setblocking(False)
            self.loop.create_task(self._connect(conn))
        if self.starved:
            self.starved = False
            log.warning("accepting connections again")

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError:  # the client reset before its transport existed
            conn.close()

    def _pause(self, e: OSError) -> None:
        if not self.starved:
            self.starved = True
            log.warning("cannot accept connections (%s): pausing accepts for %.2fs at a time until it clears",
                        errno.errorcode.get(e.errno or 0, e), PAUSE_S)
        if self.watching:
            self.loop.remove_reader(self.fd)
            self.watching = False
        self.resume_handle = self.loop.call_later(PAUSE_S, self._resume)

    def _resume(self) -> None:
        self.resume_handle = None
        self.start()
