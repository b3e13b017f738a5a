"""Coordinator-side pieces: subscriber processes, the publisher, the admin prober.

All of it runs on the coordinator's uvloop (pinned to the client core with the subscriber
processes).  HTTP is spoken by hand over ``asyncio.Protocol``: a keep-alive request/response
client just good enough for ``POST /publish`` and the admin GETs.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
import time
from collections.abc import Callable

from common import BENCH, PYTHON, log

_CLEN = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


# -- a keep-alive HTTP/1.1 client --------------------------------------------------------


class HTTPConn(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.tr: asyncio.Transport | None = None
        self.buf = b""
        self.fut: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            buf = self.buf
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                return
            m = _CLEN.search(buf, 0, i + 2)
            n = int(m.group(1)) if m else 0
            if len(buf) < i + 4 + n:
                return
            status = int(buf[9:12])
            body = buf[i + 4:i + 4 + n]
            self.buf = buf[i + 4 + n:]
            fut, self.fut = self.fut, None
            if fut is not None and not fut.done():
                fut.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        fut, self.fut = self.fut, None
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionError("connection closed"))

    def request(self, head: bytes, body: bytes = b"") -> asyncio.Future[tuple[int, bytes]]:
        assert self.fut is None and self.tr is not None
        self.fut = asyncio.get_running_loop().create_future()
        self.tr.write(head + body)
        return self.fut


async def http_conn(port: int, host: str = "127.0.0.1") -> HTTPConn:
    _, proto = await asyncio.get_running_loop().create_connection(HTTPConn, host, port)
    return proto


class Admin:
    """GETs on the admin listener over one keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: HTTPConn | None = None
        self.lock = asyncio.Lock()

    async def get(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        async with self.lock:
            for attempt in (1, 2):  # the server closes keep-alive connections idle for 75 s
                if self.conn is None or self.conn.closed:
                    self.conn = await http_conn(self.port)
                try:
                    return await asyncio.wait_for(self.conn.request(head), timeout)
                except ConnectionError:
                    self.conn = None
                    if attempt == 2:
                        raise
                except BaseException:  # timeout or cancel: the answer may still come; never reuse
                    self.close()
                    self.conn = None
                    raise
            raise AssertionError("unreachable")

    async def stats(self) -> dict[str, object]:
        _, body = await self.get("/admin/stats")
        return json.loads(body)["workers"][0]  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.conn is not None and self.conn.tr is not None:
            self.conn.tr.close()


class Prober:
    """Round-trip time of ``GET /healthz`` every ``period`` s: how long the server's event
    loop is blocked (a flush sweep runs to completion before anything else is served)."""

    def __init__(self, admin: Admin, period: float = 0.2, rss: Callable[[], int] | None = None) -> None:
        self.admin = admin
        self.period = period
        self.rtts: list[float] = []
        self.rss = rss
        self.rss_max = 0
        self.task: asyncio.Task[None] | None = None
        self.rss_task: asyncio.Task[None] | None = None
        self.halt = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._run())
        if self.rss is not None:
            self.rss_task = loop.create_task(self._rss())

    async def _rss(self) -> None:
        assert self.rss is not None
        while not self.halt:
            try:
                self.rss_max = max(self.rss_max, self.rss())
            except (OSError, RuntimeError):
                return
            await asyncio.sleep(0.1)

    async def _run(self) -> None:
        while not self.halt:
            t = time.monotonic()
            try:
                await self.admin.get("/healthz", timeout=60)
            except Exception:  # noqa: BLE001 - a failed probe is recorded as a very long one
                self.rtts.append(math.inf)
            else:
                self.rtts.append(time.monotonic() - t)
            await asyncio.sleep(self.period)

    async def stop(self) -> dict[str, object]:
        # A flag as well as cancel(): on Python 3.11 asyncio.wait_for drops a cancel that
        # arrives in the same loop turn as its answer, and the probe loop would go on.
        self.halt = True
        for t in (self.task, self.rss_task):
            for _ in range(120):  # bounded: a probe times out after 60 s anyway
                if t is None or t.done():
                    break
                t.cancel()
                await asyncio.wait({t}, timeout=0.5)
        out = summarize_ms(self.rtts)
        if self.rss is not None:
            out["server_rss_max_mib"] = round(self.rss_max / 2**20, 1)
        return out


def summarize_ms(vals: list[float]) -> dict[str, object]:
    if not vals:
        return {"n": 0}
    v = sorted(vals)
    n = len(v)
    return {"n": n, "p50_ms": round(v[n // 2] * 1000, 2), "p99_ms": round(v[min(n - 1, int(n * 0.99))] * 1000, 2),
            "max_ms": round(v[-1] * 1000, 2)}


# -- subscriber processes ----------------------------------------------------------------


class Clients:
    """``--procs`` subscriber processes (bench/client.py), pinned to ``core``."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.ready: list[dict[str, object]] = []
        self.count = "scan"

    @classmethod
    async def start(cls, port: int, conns: int, procs: int, topic: str, sample: int, core: str,
                    per_src: int = 10_000, max_life: float = 1800, count: str = "scan",
                    path: str | None = None) -> Clients:
        self = cls()
        self.count = count
        base = 0
        src_i = 2
        for p in range(procs):
            n = conns // procs + (1 if p < conns % procs else 0)
            s = sample // procs + (1 if p < sample % procs else 0)
            nsrc = max(1, math.ceil(n / per_src))
            srcs = ",".join(f"127.0.{(src_i + k) // 250}.{2 + (src_i + k) % 250}" for k in range(nsrc))
            src_i += nsrc
            cmd = ["taskset", "-c", core, PYTHON, str(BENCH / "client.py"), "--port", str(port), "--conns", str(n),
                   "--topic", topic, "--offset", str(base), "--sample", str(s), "--src", srcs,
                   "--max-life", str(max_life), "--count", count, *(("--path", path) if path else ())]
            proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.PIPE,
                                                        stdout=asyncio.subprocess.PIPE, limit=64 * 1024 * 1024)
            self.procs.append(proc)
            base += n
        for proc in self.procs:
            line = await asyncio.wait_for(proc.stdout.readline(), 600)  # type: ignore[union-attr]
            if not line:
                raise RuntimeError("subscriber process died while connecting")
            self.ready.append(json.loads(line))
        log(f"subscribers ready: {self.ready}")
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @property
    def ok(self) -> int:
        return sum(int(r["ok"]) for r in self.ready)  # type: ignore[call-overload]

    async def cmd(self, line: str, timeout: float = 300) -> list[dict[str, object]]:
        for p in self.procs:
            p.stdin.write(line.encode() + b"\n")  # type: ignore[union-attr]
        out = []
        for p in self.procs:
            raw = await asyncio.wait_for(p.stdout.readline(), timeout)  # type: ignore[union-attr]
            if not raw:
                raise RuntimeError("subscriber process died")
            out.append(json.loads(raw))
        return out

    async def snap(self, *extra: str) -> dict[str, object]:
        """Totals over the processes of ``snap`` (since the last ``mark``)."""
        parts = await self.cmd(" ".join(("snap", *extra)))
        agg: dict[str, object] = {
            "t": max(float(p["t"]) for p in parts),  # type: ignore[arg-type]
            "sum": sum(int(p["sum"]) for p in parts),  # type: ignore[call-overload]
            "min": min(int(p["min"]) for p in parts),  # type: ignore[call-overload]
            "max": max(int(p["max"]) for p in parts),  # type: ignore[call-overload]
            "open": sum(int(p["open"]) for p in parts),  # type: ignore[call-overload]
            "lost": sum(int(p["lost"]) for p in parts),  # type: ignore[call-overload]
            "gaps": sum(int(p["gaps"]) for p in parts),  # type: ignore[call-overload]
            "dups": sum(int(p["dups"]) for p in parts),  # type: ignore[call-overload]
            "parts": parts,
        }
        if "counts" in extra:
            counts: dict[int, int] = {}
            for p in parts:
                counts.update({int(k): v for k, v in p["counts"].items()})  # type: ignore[union-attr]
            agg["counts"] = counts
        return agg

    async def quit(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                try:
                    p.stdin.write(b"quit\n")  # type: ignore[union-attr]
                    p.stdin.close()  # type: ignore[union-attr]
                except (BrokenPipeError, ConnectionResetError):
                    pass
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 30)
            except TimeoutError:
                p.kill()  # our own child, by PID
                await p.wait()


# -- the publisher -----------------------------------------------------------------------

# ~120-byte ticker event data; "t" (the publisher's time.time()) must come first: the
# subscribers' sampled connections find it with  \ndata: {"t":([0-9.]+)
_PAD = b"x" * 40
_MSG = b'{"topic":"%s","data":{"t":%.6f,"sym":"ACME","px":%d.%02d,"qty":%d,"n":%d,"pad":"' + _PAD + b'"}}'


def ticker_body(topic: bytes) -> Callable[[int, int], tuple[bytes, None]]:
    """Batch maker for fan-out: ``k`` messages on one topic, all stamped now."""

    def make(k: int, first: int) -> tuple[bytes, None]:
        t = time.time()
        px = 10000 + first % 5000
        parts = [_MSG % (topic, t, px // 100, px % 100, 100 + i, first + i) for i in range(k)]
        return b"[" + b",".join(parts) + b"]", None

    return make


class Publisher:
    """Paced batch publisher over ``nconns`` keep-alive connections.

    Every ``tick`` the messages due so far (``rate * elapsed``) are sent as one POST (at most
    ``max_batch`` messages per request) on an idle connection; if every connection is waiting
    for an answer the backlog grows and goes out in bigger batches, so a slow server shows up
    as a lower achieved rate and longer POST round trips, not as a silent stall."""

    def __init__(self, port: int, nconns: int = 4, max_batch: int = 1000, tick: float = 0.01) -> None:
        self.port = port
        self.nconns = nconns
        self.max_batch = max_batch
        self.tick = tick
        self.conns: list[HTTPConn] = []

    async def connect(self) -> None:
        self.conns = [await http_conn(self.port) for _ in range(self.nconns)]

    def close(self) -> None:
        for c in self.conns:
            if c.tr is not None:
                c.tr.close()

    async def fresh(self) -> None:
        """Replace connections the server closed (it closes keep-alive connections idle for
        75 s, e.g. while we waited for a quiet machine)."""
        self.conns = [c for c in self.conns if not c.closed and c.tr is not None and not c.tr.is_closing()]
        while len(self.conns) < self.nconns:
            self.conns.append(await http_conn(self.port))

    async def post(self, body: bytes) -> tuple[int, bytes]:
        await self.fresh()
        c = next((c for c in self.conns if c.fut is None and not c.closed), None)
        if c is None:
            c = await http_conn(self.port)
            self.conns.append(c)
        head = (b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        return await asyncio.wait_for(c.request(head, body), 60)

    async def run(self, rate: float, duration: float, make: Callable[[int, int], tuple[bytes, None]]) -> dict[str, object]:
        loop = asyncio.get_running_loop()
        await self.fresh()
        idle = list(self.conns)
        sent = ok = failed = requests = 0
        statuses: dict[int, int] = {}
        rtts: list[float] = []
        pending: set[asyncio.Future[tuple[int, bytes]]] = set()

        def done(c: HTTPConn, k: int, t0: float, fut: asyncio.Future[tuple[int, bytes]]) -> None:
            nonlocal ok, failed
            pending.discard(fut)
            rtts.append(loop.time() - t0)
            if fut.cancelled() or fut.exception() is not None:
                failed += k
                statuses[0] = statuses.get(0, 0) + 1
                return
            status, _ = fut.result()
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                ok += k
            else:
                failed += k
            if not c.closed:
                idle.append(c)

        reconnecting = 0

        def reconnected(task: asyncio.Task[HTTPConn]) -> None:
            nonlocal reconnecting
            reconnecting -= 1
            if not task.cancelled() and task.exception() is None:
                self.conns.append(task.result())
                idle.append(task.result())

        def post(c: HTTPConn, k: int, first: int) -> None:
            """One POST /publish of ``k`` messages numbered from ``first``, on ``c``."""
            body, _ = make(k, first)
            head = (b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body))
            fut = c.request(head, body)
            pending.add(fut)
            fut.add_done_callback(functools.partial(done, c, k, loop.time()))

        start = loop.time()
        wall_start = time.time()
        end = start + duration
        next_tick = start
        max_backlog = 0
        while True:
            now = loop.time()
            if now >= end:
                break
            due = min(int(rate * (now - start)) + 1, int(rate * duration)) - sent
            max_backlog = max(max_backlog, due)
            while due > 0 and idle:
                c = idle.pop()
                if c.closed or c.tr is None or c.tr.is_closing():
                    # The server closed it (e.g. idle keep-alive timeout): replace it.
                    reconnecting += 1
                    task = loop.create_task(http_conn(self.port))
                    task.add_done_callback(reconnected)
                    continue
                k = min(due, self.max_batch)
                post(c, k, sent)
                sent += k
                due -= k
                requests += 1
            next_tick += self.tick
            await asyncio.sleep(max(0.0, next_tick - loop.time()))
        # The last messages due (the loop can end a tick before rate x duration is reached).
        rest = int(rate * duration) - sent
        if rest > 0 and idle:
            c = idle.pop()
            if not c.closed and c.tr is not None and not c.tr.is_closing():
                k = min(rest, self.max_batch)
                post(c, k, sent)
                sent += k
                requests += 1
        elapsed = loop.time() - start
        if pending:
            await asyncio.wait(pending, timeout=60)
        return {
            "target_rate": rate, "duration_s": round(elapsed, 3), "wall_start": wall_start,
            "target_msgs": int(rate * duration), "sent_msgs": sent, "ok_msgs": ok, "failed_msgs": failed,
            "unanswered_msgs": sent - ok - failed, "requests": requests,
            "achieved_rate": round(ok / elapsed, 1), "max_backlog_msgs": max_backlog,
            "statuses": {str(k): v for k, v in statuses.items()}, "post_rtt": summarize_ms(rtts),
        }
