"""Real-process, real-socket helpers for the end-to-end tests.

``Gateway`` starts ``python -m ssegw serve`` as a subprocess on ports the kernel picks
(``--port 0``) and reads the bound ports from its log line.  ``Stream`` is a raw-socket SSE
client that parses with the independent spec parser in ``sse_parser``.  ``request`` is a raw
HTTP/1.1 request over a fresh socket (no client library between the test and the bytes).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from sse_parser import Ev, Parser

ROOT = Path(__file__).resolve().parent.parent
_SERVING = re.compile(r"serving on http://[^:]+:(\d+) \(admin http://[^:]+:(\d+)\)")


class Gateway:
    def __init__(self, *args: str, env: dict[str, str] | None = None, config: str | None = None,
                 tmp_path: Path | None = None) -> None:
        self.args = list(args)
        self.env = dict(os.environ)
        self.env.pop("SSEGW_CONFIG", None)
        for k in list(self.env):
            if k.startswith("SSEGW_"):
                del self.env[k]
        if env:
            self.env.update(env)
        self.config = config
        self.tmp_path = tmp_path
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.admin_port = 0
        self.log: list[str] = []
        self._reader: threading.Thread | None = None
        #: run the gateway through this command (e.g. ``ip netns exec NS``)
        self.prefix: list[str] = []

    def start(self, timeout: float = 15.0) -> Gateway:
        cmd = [*self.prefix, sys.executable, "-m", "ssegw", "serve", "--port", "0", "--admin-port", "0", *self.args]
        if self.config is not None:
            assert self.tmp_path is not None
            cfg = self.tmp_path / f"ssegw-{time.monotonic_ns()}.toml"
            cfg.write_text(self.config)
            cmd += ["--config", str(cfg)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = _SERVING.search(line)
            if m:
                self.port, self.admin_port = int(m.group(1)), int(m.group(2))
                self._reader = threading.Thread(target=self._drain_log, daemon=True)
                self._reader.start()
                return self
        self.kill()
        raise RuntimeError("gateway did not start:\n" + "".join(self.log))

    def _drain_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        self._close_pipes()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self._reader is not None:
            self._reader.join(5)
        if self.proc is not None and self.proc.stderr is not None and not self.proc.stderr.closed:
            self.proc.stderr.close()

    # -- HTTP helpers --------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                admin: bool = False, timeout: float = 10.0) -> Response:
        return request(self.admin_port if admin else self.port, method, path, body, headers, timeout)

    def publish(self, msgs: object, headers: dict[str, str] | None = None) -> Response:
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        return self.request("POST", "/publish", json.dumps(msgs).encode(), h)

    def stats(self) -> dict:
        return self.request("GET", "/admin/stats", admin=True).json()["workers"][0]

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.request("GET", "/metrics", admin=True).body.decode())

    def wait_slots(self, n: int = 0, timeout: float = 5.0) -> int:
        """Wait until the table holds ``n`` slots besides the admin connection asking."""
        deadline = time.monotonic() + timeout
        used = -1
        while time.monotonic() < deadline:
            used = self.stats()["slots_in_use"] - 1
            if used == n:
                return used
            time.sleep(0.05)
        return used

    def stream(self, path: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> Stream:
        return Stream(self.port, path, headers, timeout)

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            pass


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{"name{labels}": value}`` (sample lines as exposed)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, raw_head: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.raw_head = raw_head

    def json(self) -> dict:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.body[:200]!r})"


def read_head(sock: socket.socket, buf: bytearray, timeout: float) -> tuple[int, dict[str, str], bytes]:
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no response head")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {bytes(buf)!r}")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, head


def recv_all(sock: socket.socket, buf: bytearray, n: int | None, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while n is None or len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 10.0, host: str = "127.0.0.1") -> Response:
    h = {"Host": f"{host}:{port}", "Connection": "close"}
    if body is not None:
        h["Content-Length"] = str(len(body))
    h.update(headers or {})
    req = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(
        f"{k}: {v}\r\n".encode("latin-1") for k, v in h.items()) + b"\r\n" + (body or b"")
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(req)
        buf = bytearray()
        status, hdrs, raw = read_head(s, buf, timeout)
        if "content-length" in hdrs:
            data = recv_all(s, buf, int(hdrs["content-length"]), timeout)
        else:
            data = recv_all(s, buf, None, timeout)
    return Response(status, hdrs, data, raw)


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, close_write: bool = False) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        return recv_all(s, bytearray(), None, timeout)


def dechunk(data: bytes) -> tuple[bytes, bytes, bool]:
    """Decode as many complete chunks as there are.  Returns (payload, rest, ended)."""
    out = bytearray()
    pos = 0
    while True:
        i = data.find(b"\r\n", pos)
        if i < 0:
            return bytes(out), data[pos:], False
        size = int(data[pos:i].split(b";")[0], 16)
        if size == 0:
            return bytes(out), data[i + 2:], True
        if len(data) < i + 2 + size + 2:
            return bytes(out), data[pos:], False
        out += data[i + 2:i + 2 + size]
        assert data[i + 2 + size:i + 4 + size] == b"\r\n", "bad chunk framing"
        pos = i + 4 + size


class Stream:
    """A raw-socket SSE subscriber."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None, timeout: float,
                 http10: bool = False) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.open(sock, "127.0.0.1", port, path, headers, timeout, http10)

    def open(self, sock: socket.socket, host: str, port: int, path: str, headers: dict[str, str] | None,
             timeout: float, http10: bool = False) -> None:
        """Ask for ``path`` on the connected ``sock`` and read the answer's head (subclasses
        that connect otherwise -- another address, a network namespace -- call this)."""
        self.sock = sock
        h = {"Host": f"{host}:{port}", "Accept": "text/event-stream"}
        h.update(headers or {})
        ver = "HTTP/1.0" if http10 else "HTTP/1.1"
        self.sock.sendall(f"GET {path} {ver}\r\n".encode() + b"".join(
            f"{k}: {v}\r\n".encode("latin-1") for k, v in h.items()) + b"\r\n")
        buf = bytearray()
        self.status, self.headers, self.raw_head = read_head(self.sock, buf, timeout)
        self.chunked = self.headers.get("transfer-encoding") == "chunked"
        self.raw = bytearray()  # stream bytes as received (still chunk-framed)
        self._pending = bytes(buf)
        self.ended = False  # saw the last chunk
        self.closed = False  # saw EOF
        self.parser = Parser()
        self.body = bytearray()  # de-chunked SSE bytes
        self.error_body = b""
        if self.status != 200:
            self.error_body = recv_all(self.sock, bytearray(self._pending), int(self.headers.get("content-length", 0)), timeout)
            self.sock.close()
            self.closed = True
        else:
            self._consume(b"")

    def _consume(self, data: bytes) -> None:
        self.raw += data
        data = self._pending + data
        if self.chunked:
            payload, rest, ended = dechunk(data)
            self._pending = rest
            if ended:
                self.ended = True
        else:
            payload, self._pending = data, b""
        if payload:
            self.body += payload
            self.parser.feed(payload.decode("utf-8"))

    def pump(self, timeout: float) -> bool:
        """Read once (up to ``timeout``).  False on EOF/timeout."""
        if self.closed:
            return False
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not r:
            return False
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, OSError):
            data = b""
        if not data:
            self.closed = True
            return False
        self._consume(data)
        return True

    @property
    def events(self) -> list[Ev]:
        return self.parser.events

    def wait_events(self, n: int, timeout: float = 5.0) -> list[Ev]:
        deadline = time.monotonic() + timeout
        while len(self.events) < n and time.monotonic() < deadline and not self.closed:
            self.pump(deadline - time.monotonic())
        return self.events

    def wait_closed(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self.pump(deadline - time.monotonic())
        return self.closed

    def wait_for(self, pred, timeout: float = 5.0) -> bool:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while not pred(self) and time.monotonic() < deadline and not self.closed:
            self.pump(min(0.1, deadline - time.monotonic()))
        return bool(pred(self))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed = True

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(pred, timeout: float = 5.0, interval: float = 0.02) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


signal_names = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
