"""Raw-socket clients and probes for the regression tests (test_regressions.py).

No client library sits between a test and the bytes: every helper here is a plain socket.

- ``stalled``: a subscriber with a tiny receive buffer (set before connect, so the window
  it advertises stays small) that sends its request and then reads nothing -- or only the
  response head -- so the gateway's output backs up into its own memory.
- ``FastReader``: a thread that ``recv()``s as fast as it can and keeps the raw bytes; the
  SSE parsing happens afterwards, so parsing never makes the reader slow.
- ``read_response``: one HTTP/1.1 response (head + Content-Length body) off a keep-alive
  connection, leaving whatever follows in the caller's buffer.
- ``rss_kib``: a process's resident set size from ``/proc/PID/status``.
- ``InProcess``: the real ``Worker`` on real sockets, its event loop in a thread, for the
  few defects whose trigger is an internal interleaving a subprocess cannot pin down.  It
  touches only ``Worker(cfg, broker)``, ``start``, ``bound_ports``, ``drain`` and
  ``wait_stopped``; the config comes from the command-line parser.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import dechunk, read_head
from sse_parser import Ev, parse

#: Receive buffer of a stalled client; the kernel doubles it and clamps at its minimum.
TINY_RCVBUF = 4096


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def connect_small(port: int, rcvbuf: int = TINY_RCVBUF, timeout: float = 10.0) -> socket.socket:
    """A socket to 127.0.0.1:``port`` whose receive buffer was made small before connecting."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def stream_request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode()


def stalled(port: int, path: str, read_head_first: bool = True) -> tuple[socket.socket, bytes]:
    """A subscriber with a tiny receive buffer that (optionally) reads its 200 head, then
    reads nothing more.  Returns (socket, stream bytes read along with the head)."""
    s = connect_small(port)
    s.sendall(stream_request(path))
    buf = bytearray()
    if read_head_first:
        status, _, _ = read_head(s, buf, 10)
        assert status == 200, f"stream refused: {status}"
    return s, bytes(buf)


def read_response(sock: socket.socket, buf: bytearray, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Read one response (head + Content-Length body) from ``sock``; what follows stays in
    ``buf``.  Raises ConnectionError on EOF, TimeoutError on timeout."""
    status, headers, _ = read_head(sock, buf, timeout)
    n = int(headers.get("content-length", "0"))
    deadline = time.monotonic() + timeout
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("response body incomplete")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside a response body")
        buf += chunk
    body = bytes(buf[:n])
    del buf[:n]
    return status, headers, body


def read_for(sock: socket.socket, seconds: float) -> tuple[bytes, str | None]:
    """Everything ``sock`` delivers within ``seconds``; (bytes, "eof"/"reset"/None)."""
    out = bytearray()
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(out), None
        sock.settimeout(min(left, 0.5))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return bytes(out), "reset"
        if not chunk:
            return bytes(out), "eof"
        out += chunk


def sse_events(raw: bytes) -> tuple[list[Ev], bool]:
    """(events, ended) of a chunked SSE body given as received (after the response head)."""
    payload, _, ended = dechunk(raw)
    return parse(payload.decode("utf-8", errors="replace")).events, ended


class FastReader(threading.Thread):
    """A subscriber that reads as fast as the kernel hands it bytes (default buffers)."""

    def __init__(self, port: int, path: str, timeout: float) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(stream_request(path))
        buf = bytearray()
        self.status, self.headers, _ = read_head(self.sock, buf, 10)
        self.raw = bytearray(buf)
        self.end: str | None = None  # "eof" / "reset" once the server closed it
        self.stop_at = time.monotonic() + timeout
        self.stopped = threading.Event()

    def run(self) -> None:
        s = self.sock
        s.settimeout(0.2)
        while not self.stopped.is_set() and time.monotonic() < self.stop_at:
            try:
                chunk = s.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                self.end = "reset"
                return
            if not chunk:
                self.end = "eof"
                return
            self.raw += chunk

    def finish(self) -> None:
        self.stopped.set()
        self.join(5)
        self.sock.close()


class InProcess:
    """The real Worker on real loopback sockets, its asyncio loop in a background thread.

    Args:
        flags: ``ssegw serve`` flags (ports are 0).
        broker: callable cfg -> broker; default: the broker the CLI would wire.
    """

    def __init__(self, *flags: str, broker: Callable[[Any], Any] | None = None) -> None:
        from ssegw import cli, config

        argv = ["serve", "--port", "0", "--admin-port", "0", "--drain-timeout", "1s", *flags]
        args = cli.build_parser().parse_args(argv)
        self.cfg = config.load(args, environ={})
        self.broker = (broker or cli.make_broker)(self.cfg)
        self.loop = asyncio.new_event_loop()  # plain asyncio: its transports are Python objects
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.worker: Any = None
        self.port = self.admin_port = 0

    def __enter__(self) -> InProcess:
        from ssegw.server.worker import Worker

        self.thread.start()

        async def start() -> tuple[int, int]:
            self.worker = Worker(self.cfg, self.broker)
            await self.worker.start()
            return self.worker.bound_ports()

        self.port, self.admin_port = self.run(start())
        return self

    def run(self, coro: Any, timeout: float = 20.0) -> Any:
        """Run ``coro`` on the worker's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Run ``fn()`` on the worker's loop (between its callbacks) and return the result."""

        async def wrap() -> Any:
            return fn()

        return self.run(wrap(), timeout)

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if self.worker is not None:
                self.call(self.worker.drain)
                self.run(self.worker.wait_stopped(), 30)
        except Exception:
            # A test that broke a transport on purpose may make the drain fail too; its
            # own assertion error is the one to report.
            if exc_type is None:
                raise
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.loop.is_running():
                self._close_loop()

    def _close_loop(self) -> None:
        # Transports still open (a test's deliberately broken one) are closed first so no
        # ResourceWarning fires from a finaliser after the test.
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        try:
            self.loop.run_until_complete(asyncio.sleep(0.05))
        finally:
            self.loop.close()
