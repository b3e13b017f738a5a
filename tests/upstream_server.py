"""A controllable upstream SSE server for the upstream-route tests, on loopback.

It runs its own asyncio loop in a thread.  Every request is recorded (path and headers); a
request to any path gets the answer the test set up (``status``, ``content_type``, a
``prelude`` written right after the head, or ``hang`` for no head at all), then stays open as
a stream that :meth:`send` writes to (chunked).  The test can make it die (:meth:`stop`,
connections reset), come back on the same port (:meth:`start`), drop every stream
(:meth:`drop`) or go silent (by sending nothing).
"""

from __future__ import annotations

import asyncio
import threading
import time

from redis_harness import free_port


class Upstream:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.status = 200
        self.content_type = "text/event-stream"
        self.prelude = b""  # raw SSE bytes after the head (retry:, replayed events ...)
        self.hang = False  # read the request, answer nothing
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.open: set[asyncio.StreamWriter] = set()
        self.closed_total = 0
        self._all: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    # -- control (from the test's thread) -------------------------------------------------

    def start(self) -> Upstream:
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()

            async def main() -> None:
                self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
                ready.set()

            loop.run_until_complete(main())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(5), "upstream did not start"
        return self

    def stop(self) -> None:
        """Die: stop listening and reset every stream."""
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for w in list(self._all):
                w.transport.abort()
            self.open.clear()
            await asyncio.sleep(0.05)  # the aborted transports close their sockets
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        assert self._thread is not None
        self._thread.join(5)
        self._loop = None

    def _call(self, fn, *args) -> None:  # noqa: ANN001
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    def send(self, raw: bytes) -> None:
        """Write raw SSE bytes to every open stream (one chunk)."""
        def go() -> None:
            for w in list(self.open):
                w.write(b"%x\r\n%b\r\n" % (len(raw), raw))
        self._call(go)

    def event(self, data: str, id: str | None = None, event: str | None = None) -> None:
        out = b""
        if id is not None:
            out += b"id: " + id.encode() + b"\n"
        if event is not None:
            out += b"event: " + event.encode() + b"\n"
        out += b"".join(b"data: " + line.encode() + b"\n" for line in data.split("\n")) + b"\n"
        self.send(out)

    def drop(self) -> None:
        """End every stream cleanly (last chunk, close)."""
        def go() -> None:
            for w in list(self.open):
                w.write(b"0\r\n\r\n")
                w.close()
        self._call(go)

    def wait_open(self, n: int, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.open) == n:
                return True
            time.sleep(0.02)
        return len(self.open) == n

    def wait_requests(self, n: int, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.requests) >= n:
                return True
            time.sleep(0.02)
        return len(self.requests) >= n

    # -- serving (in the server's loop) -------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._all.add(writer)
        try:
            await self._answer(reader, writer)
        finally:
            self._all.discard(writer)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1]
        headers = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            if k:
                headers[k.strip().lower()] = v.strip()
        self.requests.append((path, headers))
        if self.hang:
            self.open.add(writer)
        elif self.status != 200:
            body = b'{"error":"nope"}'
            writer.write(b"HTTP/1.1 %d Oops\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%b" % (self.status, len(body), body))
            writer.close()
            return
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\nTransfer-Encoding: chunked\r\n\r\n"
                         % self.content_type.encode())
            if self.prelude:
                writer.write(b"%x\r\n%b\r\n" % (len(self.prelude), self.prelude))
            self.open.add(writer)
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        finally:
            if writer in self.open:
                self.open.discard(writer)
                self.closed_total += 1
            writer.close()
