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

Two things may come before the protocol sees a connection, both in the accepting task that
exists anyway (``connect_accepted_socket`` is a coroutine):

- ``proxy_protocol``: the PROXY protocol header (``core/proxyproto.py``), read straight from
  the socket -- before any TLS, which it precedes on the wire -- and only from a
  ``trusted_proxies`` peer; others, malformed headers and headers not complete within
  ``head_timeout`` are closed and counted.  Exactly the header's bytes are consumed (peeked
  first), so what follows is the client's, untouched.  The protocol is then made with the
  client's address (admission, ``ip_allow``/``ip_deny``, the logs use it).
- TLS (``tls_cert``): uvloop's TLS transport, the handshake bounded by ``head_timeout``.

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
import ssl
import sys
from collections.abc import Callable

from ..core.proxyproto import MAX_HEADER, ProxyHeaderError, parse

log = logging.getLogger("ssegw.worker")

#: Connections accepted per readiness event at most (then other callbacks run).
ACCEPT_BATCH = 128
#: How long accepting pauses when the process or the kernel is out of descriptors/memory.
PAUSE_S = 0.25
_RESOURCE = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():  # the reader may fire again before the waiting task has run
        fut.set_result(None)


class ProxyPolicy:
    """Who may send a PROXY protocol header, how long it may take, and where refusals are
    counted (``refused(reason)``, a ``metrics.REFUSED_REASONS`` name)."""

    __slots__ = ("trusted", "timeout", "refused")

    def __init__(self, trusted: Callable[[str], bool], timeout: float, refused: Callable[[str], None]) -> None:
        self.trusted = trusted
        self.timeout = timeout
        self.refused = refused


class Acceptor:
    """Accepts connections on one listening socket for ``factory`` (a protocol factory,
    called with the client's address from a PROXY header, or None).

    Args:
        tls: the TLS context of the listener (None: plain TCP); ``tls_timeout`` bounds each
            handshake and ``tls_failed`` counts the ones that fail.
        proxy: read a PROXY protocol header first (None: no header).
    """

    __slots__ = ("loop", "sock", "factory", "fd", "watching", "starved", "resume_handle", "tls", "tls_timeout",
                 "tls_failed", "proxy")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[str | None], asyncio.Protocol], tls: ssl.SSLContext | None = None,
                 tls_timeout: float = 10.0, tls_failed: Callable[[], None] | None = None,
                 proxy: ProxyPolicy | None = None) -> None:
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.fd = sock.fileno()
        self.watching = False
        self.starved = False  # accept() failed for lack of resources; logged once
        self.resume_handle: asyncio.TimerHandle | None = None
        self.tls = tls
        self.tls_timeout = tls_timeout
        self.tls_failed = tls_failed
        self.proxy = proxy
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
                conn, addr = accept()
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
            self.loop.create_task(self._connect(conn, addr))
        if self.starved:
            self.starved = False
            log.warning("accepting connections again")

    async def _connect(self, conn: socket.socket, addr: tuple) -> None:
        client: str | None = None
        proxy = self.proxy
        if proxy is not None:
            peer = addr[0] if addr else ""
            if not proxy.trusted(peer):
                proxy.refused("proxy_untrusted")
                conn.close()
                return
            try:
                client = await asyncio.wait_for(self._proxy_header(conn), proxy.timeout)
            except (ProxyHeaderError, OSError, EOFError, TimeoutError) as e:
                proxy.refused("proxy_header")
                log.debug("PROXY header from %s refused: %s", peer, e or type(e).__name__)
                conn.close()
                return
        factory = self.factory
        try:
            if self.tls is None:
                await self.loop.connect_accepted_socket(lambda: factory(client), conn)
            else:
                await self.loop.connect_accepted_socket(lambda: factory(client), conn, ssl=self.tls,
                                                        ssl_handshake_timeout=self.tls_timeout)
        except (OSError, ssl.SSLError, EOFError, TimeoutError):  # reset, or the handshake failed
            if self.tls is not None and self.tls_failed is not None:
                self.tls_failed()
            conn.close()

    async def _proxy_header(self, conn: socket.socket) -> str | None:
        """Read exactly the PROXY header off ``conn``: the client's address, or None (the
        balancer's own LOCAL/UNKNOWN connection)."""
        loop = self.loop
        fd = conn.fileno()
        got = b""
        while True:
            ready = loop.create_future()
            loop.add_reader(fd, _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            data = conn.recv(MAX_HEADER - len(got), socket.MSG_PEEK)
            if not data:
                raise EOFError("closed before its PROXY header")
            r = parse(got + data)
            if r is None:
                # All of it is the start of the header: take it and wait for the rest.
                got += conn.recv(len(data))
                continue
            n, client = r
            rest = n - len(got)
            if rest > 0 and len(conn.recv(rest)) != rest:  # peeked, so it is there
                raise EOFError("PROXY header cut short")
            return sys.intern(client) if client is not None else None

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
