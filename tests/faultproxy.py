"""A TCP proxy in front of a real ``redis-server`` that can lose a reply or a request and
then play "Redis is down" for a while.

The proxy runs its own asyncio loop in a daemon thread and listens on 127.0.0.1 on a free
port below the ephemeral range (like ``redis_harness``), so that it can stop listening and
listen again on the same port.  Its control methods may be called from any thread:

- ``lose_next_reply(match, outage)``: client->Redis bytes are forwarded as usual; once a
  chunk containing ``match`` has been forwarded, the next Redis->client data on that
  connection is *not* forwarded.  Instead the proxy aborts every proxied connection and
  stops listening (connects are refused) for ``outage`` seconds, then listens again.
  Redis ran the command; the client never hears so -- Redis dying between executing a
  command and answering it.
- ``drop_next_request(match, outage)``: the same, but the chunk containing ``match`` is
  not forwarded at all (Redis never runs it) and the outage starts at once.
- ``cut(outage)``: the outage alone, now.
- ``close()``: stop everything (also on ``with`` exit).

``faults`` counts the outages started; ``wait_fault`` / ``wait_listening`` wait for them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from redis_harness import free_port

T = TypeVar("T")

#: Bytes of the previous chunk kept so that a ``match`` split over two reads is still found.
_TAIL = 1024


@dataclass
class _Fault:
    match: bytes
    outage: float
    drop: bool  # True: do not forward the request; False: forward it, lose the reply


class _Conn:
    """One proxied connection: the client side and the Redis side."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.lose_reply: float | None = None  # outage to start when Redis answers

    def abort(self) -> None:
        self.client.transport.abort()
        self.upstream.transport.abort()


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.faults = 0
        self._armed: _Fault | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task] = set()
        self._relisten: asyncio.Task | None = None
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self._thread.start()
        self._call(self._first_listen)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def listening(self) -> bool:
        return self._server is not None

    # -- controls (any thread) -----------------------------------------------------------

    def lose_next_reply(self, match: bytes, outage: float) -> None:
        self._arm(_Fault(match, outage, drop=False))

    def drop_next_request(self, match: bytes, outage: float) -> None:
        self._arm(_Fault(match, outage, drop=True))

    def cut(self, outage: float) -> None:
        self._call(lambda: self._fault(outage))

    def wait_fault(self, n: int = 1, timeout: float = 10.0) -> bool:
        """Wait until ``n`` outages have started."""
        return _wait(lambda: self.faults >= n, timeout)

    def wait_listening(self, timeout: float = 15.0) -> bool:
        return _wait(lambda: self.listening, timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside the loop -----------------------------------------------------------------

    def _arm(self, fault: _Fault) -> None:
        assert 0 < len(fault.match) <= _TAIL
        self._call(lambda: setattr(self, "_armed", fault))

    def _call(self, fn: Callable[[], T | asyncio.Future]) -> T:
        """Run ``fn`` on the proxy's loop and return its result (awaited if a coroutine)."""

        async def run():  # noqa: ANN202
            r = fn()
            return await r if asyncio.iscoroutine(r) else r

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    async def _first_listen(self) -> None:
        for _ in range(20):
            self.port = free_port()
            try:
                await self._listen()
                return
            except OSError:
                continue
        raise RuntimeError("faultproxy: no free port")

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def _listen_after(self, outage: float) -> None:
        await asyncio.sleep(outage)
        for _ in range(100):  # the port is ours, but be patient with a slow kernel
            try:
                await self._listen()
                return
            except OSError:
                await asyncio.sleep(0.05)

    def _fault(self, outage: float) -> None:
        """Stop listening, abort every proxied connection, listen again after ``outage``."""
        self.faults += 1
        if self._server is not None:
            self._server.close()
            self._server = None
        for c in list(self._conns):
            c.abort()
        if self._relisten is not None:
            self._relisten.cancel()
        self._relisten = self._loop.create_task(self._listen_after(outage))

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        faults = self.faults
        try:  # (a cancelled handler would make asyncio's stream callback raise: end normally)
            try:
                ureader, uwriter = await asyncio.open_connection(*self.upstream)
            except OSError:
                cwriter.transport.abort()  # Redis itself is down
                return
            if self.faults != faults:  # an outage began while we were connecting
                cwriter.transport.abort()
                uwriter.transport.abort()
                return
            conn = _Conn(cwriter, uwriter)
            self._conns.add(conn)
            pipes = [asyncio.ensure_future(self._up(conn, creader)), asyncio.ensure_future(self._down(conn, ureader))]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pipes:
                    p.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
                conn.abort()
                self._conns.discard(conn)
        except asyncio.CancelledError:
            pass
        finally:
            self._handlers.discard(task)

    async def _up(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        """Client -> Redis."""
        tail = b""
        while data := await reader.read(65536):
            fault = self._armed
            if fault is not None:
                buf = tail + data
                # Only a match that ends in the new bytes: the tail was looked at before.
                if buf.find(fault.match, max(0, len(tail) - len(fault.match) + 1)) >= 0:
                    self._armed = None
                    if fault.drop:
                        self._fault(fault.outage)
                        return
                    conn.lose_reply = fault.outage
            tail = (tail + data)[-_TAIL:]
            conn.upstream.write(data)
            await conn.upstream.drain()

    async def _down(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        """Redis -> client."""
        while data := await reader.read(65536):
            if conn.lose_reply is not None:
                self._fault(conn.lose_reply)
                return
            conn.client.write(data)
            await conn.client.drain()

    async def _shutdown(self) -> None:
        if self._relisten is not None:
            self._relisten.cancel()
            await asyncio.gather(self._relisten, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for c in list(self._conns):
            c.abort()  # the handlers see EOF and end
        if self._handlers:
            _, pending = await asyncio.wait(list(self._handlers), timeout=2)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # Let the aborted transports run their connection_lost callbacks.
        await asyncio.sleep(0)


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True
