"""Connection flood next to live subscribers: ``python bench/flood.py [--subs 5000 --rate 100 ...]``.

While ``--subs`` subscribers (bench/client.py, one topic) receive ``--rate`` msg/s, three
windows are measured with ``run.window`` (mark -> paced publish -> drain -> latency):

1. ``calm`` (``--calm`` s): nothing else;
2. ``flood`` (``--flood`` s): attacker processes (this file, ``_attack``; core 1) hit the
   gateway from their own 127.0.0.x source addresses with four kinds at once, each loop
   bounded by the window and by its concurrency:
   ``idle``     connect and send nothing;
   ``slowhead`` ``GET /events?topic=x HTTP/1.1\\r\\nHost: a\\r\\nX-Slow: `` then a byte every
                ``--trickle`` s (slowloris);
   ``streams``  full ``GET /events?topic=flood`` requests: read the head, close, repeat;
   ``bigpost``  ``POST /publish`` with ``Content-Length: 1048575`` and no credentials, then
                the body (as far as the gateway lets it go);
3. ``after`` (``--after`` s), once the attackers' connections are gone.

In every window a new subscriber arrives every 0.5 s (``Newcomers``: time to its 200 head),
and during the flood the gateway's RSS, connections and accept queue (``ss``) are sampled.
``--cycles N`` repeats flood + after on the same gateway (does RSS climb again?).  The
gateway runs from a ``git archive`` snapshot of ``--code`` (HEAD; scale.py's ``use_code``).

The gateway runs with auth on (HS256 JWT, ``[auth]`` in a TOML file of ours): subscribers
carry a subscribe token for their topic (``?token=``), the publisher a publish token
(``Authorization: Bearer``), ``bigpost`` nothing (401 from the head).  Edge limits:
``max_conns_per_ip`` 64, ``conn_rate`` 20/s with ``conn_burst`` 64, ``head_timeout`` 5 s,
``max_connections`` subscribers + 5,000.  Subscribers connect from enough addresses to stay
within the per-IP limits (``--per-src``, 60 per address); the attackers from other ones.

Prints one JSON line (attack outcomes per kind, latency per window, events lost, gateway
RSS before / peak / after, /admin/stats and /metrics deltas, targets pass/fail) and appends
it to ``bench/results/flood.jsonl``.  Everything but the gateway is pinned to core 1; only
processes started here are stopped, by PID.  See bench/README.md, "flood.py".
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import math
import os
import random
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loadgen  # noqa: E402
import run  # noqa: E402
from client import IP_BIND_ADDRESS_NO_PORT  # noqa: E402
from common import ALLOCATORS, GATEWAY_ENV, PYTHON, RESULTS, CpuSampler, Server, emit, log, wait_quiet  # noqa: E402
from loadgen import Admin, Clients, HTTPConn, Publisher, ticker_body  # noqa: E402
from run import CLIENT_CORE, SERVER_CORE, Env, pin_self, wait_streams, window, with_retries  # noqa: E402
from scale import use_code  # noqa: E402  (patches run.CpuSampler too: ours is set below, after it)

KIND = "flood"
KINDS = ("idle", "slowhead", "streams", "bigpost")
BIGPOST_LEN = 1048575
CHUNK = b"x" * 65536


# -- auth --------------------------------------------------------------------------------------


def make_token(secret: str, sub: str, claim: dict[str, list[str]], life: float = 7200) -> str:
    import jwt

    return jwt.encode({"sub": sub, "exp": int(time.time() + life), "ssegw": claim}, secret, algorithm="HS256")


class AuthConn(HTTPConn):
    """``loadgen.HTTPConn`` that adds ``Authorization: Bearer`` to every ``POST /publish``."""

    bearer = b""

    def request(self, head: bytes, body: bytes = b"") -> asyncio.Future[tuple[int, bytes]]:
        if self.bearer and head.startswith(b"POST /publish "):
            head = head.replace(b"\r\n", b"\r\nAuthorization: Bearer " + self.bearer + b"\r\n", 1)
        return super().request(head, body)


async def auth_http_conn(port: int, host: str = "127.0.0.1") -> HTTPConn:
    _, proto = await asyncio.get_running_loop().create_connection(AuthConn, host, port)
    return proto


# The publisher (loadgen.Publisher) opens its connections with loadgen.http_conn, also when
# it replaces one mid-window: make those authenticated.
loadgen.http_conn = auth_http_conn  # type: ignore[assignment]


class FloodCpuSampler(CpuSampler):
    """``CpuSampler`` that also samples the attacker processes (:attr:`extra`), so that they
    count as ours and not as ``foreign_pct`` (run.window builds its sampler by name)."""

    extra: dict[str, int] = {}

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__({**pids, **self.extra})


run.CpuSampler = FloodCpuSampler  # type: ignore[misc]


# -- addresses ---------------------------------------------------------------------------------


def src_addr(i: int) -> str:
    """Source address number ``i``, as loadgen.Clients numbers them (2 -> 127.0.0.4)."""
    return f"127.0.{i // 250}.{2 + i % 250}"


def subscriber_srcs(subs: int, procs: int, per_src: int) -> list[str]:
    """The addresses loadgen.Clients.start gives ``subs`` subscribers over ``procs`` processes."""
    n = 0
    for p in range(procs):
        k = subs // procs + (1 if p < subs % procs else 0)
        n += max(1, math.ceil(k / per_src))
    return [src_addr(2 + k) for k in range(n)]


# -- the gateway, subscribers and publisher ------------------------------------------------------


class FloodEnv(Env):
    """``run.Env`` with our gateway (auth and edge limits), subscribers spread over addresses
    that fit the per-IP limits and carrying a token, and an authenticated publisher."""

    def __init__(self, args: argparse.Namespace, server_args: list[str], sub_topic: str, per_src: int,
                 bearer: bytes) -> None:
        k = max(args.min_sample, min(args.sample, int(args.parse_budget // args.rate)))
        super().__init__(args, "flood", args.subs, args.topic, k)
        self.server_args = server_args
        self.sub_topic = sub_topic
        self.per_src = per_src
        self.bearer = bearer
        self.newcomer_req = (f"GET /events?topic={sub_topic} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             f"Accept: text/event-stream\r\n\r\n").encode()

    async def open(self) -> FloodEnv:
        args = self.args
        AuthConn.bearer = self.bearer
        self.srv = srv = Server(SERVER_CORE, self.server_args,
                                RESULTS / f"server-flood-{time.strftime('%Y%m%d-%H%M%S')}.log").start()
        self.admin = admin = Admin(srv.admin_port)
        self.clients = clients = await Clients.start(srv.port, self.conns, args.procs, self.sub_topic, self.sample,
                                                     CLIENT_CORE, per_src=self.per_src, count=args.count)
        if clients.ok < self.conns:
            raise RuntimeError(f"only {clients.ok} of {self.conns} subscribers connected: {clients.ready}")
        st = await wait_streams(admin, clients.ok)
        log(f"server streams_open={st['streams_open']} rss={srv.rss() / 2**20:.1f} MiB")
        self.pub = Publisher(srv.port, args.pub_conns)
        await self.pub.connect()
        await self._warm_fanout()
        return self


# -- gateway curves and counters ----------------------------------------------------------------

STAT_KEYS = ("connections_accepted", "streams_opened", "head_timeouts", "protocol_errors", "refused_capacity",
             "publish_requests", "events_published", "events_delivered", "paced", "held", "write_errors")
METRIC_RE = re.compile(r"^(ssegw_[a-z_]+(?:\{[^}]*\})?) ([0-9.eE+-]+)$", re.M)
METRIC_NAMES = ("ssegw_http_responses", "ssegw_head_timeouts", "ssegw_protocol_errors", "ssegw_connections_accepted",
                "ssegw_streams_opened", "ssegw_slow_consumer_closed", "ssegw_streams_paced", "ssegw_publish_requests")


def stats_span(a: dict[str, object], b: dict[str, object]) -> dict[str, object]:
    """/admin/stats counter deltas from ``a`` to ``b`` (responses and slow_closed per key)."""
    out: dict[str, object] = {k: int(b.get(k, 0)) - int(a.get(k, 0)) for k in STAT_KEYS}  # type: ignore[call-overload]
    for key in ("responses", "slow_closed"):
        da: dict[str, int] = a.get(key) or {}  # type: ignore[assignment]
        db: dict[str, int] = b.get(key) or {}  # type: ignore[assignment]
        out[key] = {k: db.get(k, 0) - da.get(k, 0) for k in sorted(set(da) | set(db)) if db.get(k, 0) != da.get(k, 0)}
    out["connections_open_at_end"] = b.get("connections_open")
    out["streams_open_at_end"] = b.get("streams_open")
    return out


def metric_delta(before: str, after: str) -> dict[str, float]:
    """Non-zero deltas of the counters in :data:`METRIC_NAMES` (one entry per label set)."""
    a = {m[0]: float(m[1]) for m in METRIC_RE.findall(before)}
    b = {m[0]: float(m[1]) for m in METRIC_RE.findall(after)}
    out = {}
    for k, v in b.items():
        if k.startswith(METRIC_NAMES) and v != a.get(k, 0.0):
            out[k] = round(v - a.get(k, 0.0))
    return out


TCP_EXT = ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPReqQFullDoCookies", "SyncookiesSent",
           "TCPSynRetrans", "TCPTimeouts", "TCPAbortOnData", "TCPAbortOnClose", "TCPBacklogDrop")


def tcp_ext() -> dict[str, int]:
    """Machine-wide TcpExt counters (/proc/net/netstat) of :data:`TCP_EXT`: accept-queue
    overflows, SYN-ACK retransmits, ... (other people's traffic on the machine counts too)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for a, b in zip(lines[::2], lines[1::2], strict=False):
        if a.startswith("TcpExt:"):
            d = dict(zip(a.split()[1:], (int(x) for x in b.split()[1:]), strict=False))
            return {k: d.get(k, 0) for k in TCP_EXT}
    return {}


async def accept_queue(port: int) -> int:
    """Connections waiting in the gateway's accept queue (``ss -ltn``: Recv-Q of the listener);
    -1 if ss cannot say."""
    try:
        proc = await asyncio.create_subprocess_exec("ss", "-ltnH", f"sport = :{port}", stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(proc.communicate(), 5)
        return int(out.split()[1])
    except (OSError, TimeoutError, IndexError, ValueError):
        return -1


NEWCOMER_SRC = "127.0.0.2"  # below loadgen.Clients' first subscriber address (127.0.0.4), not an attacker's


class Newcomers:
    """A new subscriber every ``period`` s for ``duration`` s (from :data:`NEWCOMER_SRC`, a
    valid token): connect, send the request, time until the response head; then close.  How
    long a legitimate client waits to get in, next to whatever else is going on."""

    def __init__(self, port: int, req: bytes, duration: float, period: float = 0.5, timeout: float = 20.0) -> None:
        self.port, self.req, self.duration, self.period, self.timeout = port, req, duration, period, timeout
        self.times: list[float] = []
        self.failed: dict[str, int] = {}
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _one(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((NEWCOMER_SRC, 0))
            sock.setblocking(False)

            async def talk() -> str:
                await loop.sock_connect(sock, ("127.0.0.1", self.port))
                await loop.sock_sendall(sock, self.req)
                buf = b""
                while True:
                    data = await loop.sock_recv(sock, 4096)
                    if not data:
                        return "closed_no_answer"
                    buf += data
                    status = _head_status(buf)
                    if status is not None:
                        return status

            outcome = await asyncio.wait_for(talk(), self.timeout)
        except TimeoutError:
            outcome = "timeout"
        except OSError as e:
            outcome = type(e).__name__
        finally:
            sock.close()
        if outcome == "http_200":
            self.times.append(loop.time() - t0)
        else:
            self.failed[outcome] = self.failed.get(outcome, 0) + 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.duration
        tasks = []
        while loop.time() < end:
            tasks.append(loop.create_task(self._one()))
            await asyncio.sleep(self.period)
        await asyncio.wait(tasks, timeout=self.timeout + 5)

    async def result(self) -> dict[str, object]:
        if self.task is not None:
            await asyncio.wait({self.task}, timeout=self.duration + self.timeout + 10)
        return {"ok": len(self.times), "time_to_head_ms": _dist(self.times, 1000, 1), "failed": self.failed}


class Curve:
    """Every ``period`` s: gateway RSS, connections_open, streams_open and its accept queue,
    until stopped."""

    def __init__(self, srv: Server, admin: Admin, period: float = 0.5) -> None:
        self.srv, self.admin, self.period = srv, admin, period
        self.t0 = time.monotonic()
        self.rows: list[tuple[float, float, int, int, int]] = []
        self.task: asyncio.Task[None] | None = None
        self.halt = False

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self.halt:
            try:
                rss = self.srv.rss() / 2**20
                st = await self.admin.stats()
                backlog = await accept_queue(self.srv.port)
            except (OSError, RuntimeError, ConnectionError, TimeoutError):
                return
            self.rows.append((round(time.monotonic() - self.t0, 1), round(rss, 1), int(st["connections_open"]),  # type: ignore[call-overload]
                              int(st["streams_open"]), backlog))  # type: ignore[call-overload]
            await asyncio.sleep(self.period)

    async def stop(self) -> None:
        self.halt = True
        for _ in range(120):  # bounded: an admin request times out after 30 s
            if self.task is None or self.task.done():
                return
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=0.5)

    def span(self, t_from: float, t_to: float) -> list[tuple[float, float, int, int, int]]:
        return [r for r in self.rows if t_from <= r[0] <= t_to]


# -- attacker processes (coordinator side) --------------------------------------------------------


class Attacker:
    """One ``flood.py _attack`` child on the client core; spec on stdin, then ``go``."""

    def __init__(self, proc: asyncio.subprocess.Process, kinds: list[str]) -> None:
        self.proc = proc
        self.kinds = kinds

    @classmethod
    async def start(cls, spec: dict[str, object], nice: int, max_life: float) -> Attacker:
        cmd = ["taskset", "-c", CLIENT_CORE, PYTHON, os.path.abspath(__file__), "_attack", "--nice", str(nice),
               "--max-life", str(max_life)]
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, limit=16 * 1024 * 1024)
        self = cls(proc, list(spec["kinds"]))  # type: ignore[call-overload]
        proc.stdin.write(json.dumps(spec).encode() + b"\n")  # type: ignore[union-attr]
        ready = await self.read(60)
        if ready.get("type") != "ready":
            raise RuntimeError(f"attacker did not start: {ready}")
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def read(self, timeout: float) -> dict[str, object]:
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)  # type: ignore[union-attr]
        if not raw:
            rc = await asyncio.wait_for(self.proc.wait(), 10)
            raise RuntimeError(f"attacker process {self.proc.pid} ended without a report (exit status {rc})")
        return json.loads(raw)  # type: ignore[no-any-return]

    def go(self) -> None:
        self.proc.stdin.write(b"go\n")  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
            except (BrokenPipeError, ConnectionResetError):
                pass
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()  # our own child, by PID
            await self.proc.wait()


def attack_plan(args: argparse.Namespace, first_src: int, stream_token: str | None) -> tuple[list[dict[str, object]], dict[str, list[str]]]:
    """The attacker processes' specs: each kind gets ``--attack-addrs`` source addresses of its
    own, numbered on from ``first_src``; with two processes the holding kinds (idle, slowhead)
    run in one and the churning ones (streams, bigpost) in the other."""
    conc = {"idle": args.idle_conc, "slowhead": args.slowhead_conc, "streams": args.streams_conc,
            "bigpost": args.bigpost_conc}
    kinds = [k for k in KINDS if conc[k] > 0]
    pools: dict[str, list[str]] = {}
    i = first_src
    for k in kinds:
        pools[k] = [src_addr(i + j) for j in range(args.attack_addrs)]
        i += args.attack_addrs
    groups = [kinds] if args.attack_procs == 1 else [[k for k in kinds if k in ("idle", "slowhead")],
                                                     [k for k in kinds if k in ("streams", "bigpost")]]
    specs = []
    for g in groups:
        if not g:
            continue
        specs.append({"port": 0, "duration": args.flood, "trickle": args.trickle, "ramp": args.ramp,
                      "stream_token": stream_token,
                      "kinds": {k: {"conc": conc[k], "srcs": pools[k]} for k in g}})
    return specs, pools


# -- attacker process (flood.py _attack) ------------------------------------------------------------


def _dist(vals: list[float], scale: float = 1.0, nd: int = 3) -> dict[str, object]:
    if not vals:
        return {"n": 0}
    v = sorted(vals)
    n = len(v)
    return {"n": n, "p50": round(v[n // 2] * scale, nd), "p99": round(v[min(n - 1, int(n * 0.99))] * scale, nd),
            "max": round(v[-1] * scale, nd)}


class KindState:
    """One attacker kind's requests and tallies."""

    def __init__(self, kind: str, srcs: list[str], stream_token: str | None) -> None:
        self.kind = kind
        self.srcs = srcs
        self.i = 0
        self.body = 0
        self.trickle = False
        if kind == "idle":
            self.first = b""
        elif kind == "slowhead":
            self.first = b"GET /events?topic=x HTTP/1.1\r\nHost: a\r\nX-Slow: "
            self.trickle = True
        elif kind == "streams":
            q = f"&token={stream_token}" if stream_token else ""
            self.first = f"GET /events?topic=flood{q} HTTP/1.1\r\nHost: a\r\nAccept: text/event-stream\r\n\r\n".encode()
        else:
            self.first = (b"POST /publish HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % BIGPOST_LEN)
            self.body = BIGPOST_LEN
        self.attempts = self.connected = self.accepted = 0
        self.connect_errors: dict[str, int] = {}
        self.outcomes: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.ended: dict[str, int] = {}
        self.held: list[float] = []  # accepted connections: connect -> end
        self.unresolved = 0
        self.unresolved_age: list[float] = []
        self.answer: list[float] = []  # refused connections: connect -> refusal
        self.body_sent: list[int] = []

    def next_src(self) -> str:
        self.i += 1
        return self.srcs[self.i % len(self.srcs)]

    def error(self, what: str) -> None:
        self.connect_errors[what] = self.connect_errors.get(what, 0) + 1

    def record(self, outcome: str, dt: float, body_sent: int) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if self.body:
            self.body_sent.append(body_sent)
        if outcome in ("open_at_end", "unanswered_at_end"):
            # Neither taken nor refused when the window ended: held by the gateway, waiting
            # in its accept queue, or never known to it at all (when the accept queue is full
            # the kernel drops the handshake's last ACK, and our side believes it connected).
            self.unresolved += 1
            self.unresolved_age.append(dt)
            return
        if self.kind in ("idle", "slowhead"):
            # Held by the gateway until its head timeout cut it (408, or a close for a
            # connection that never sent a byte).
            accepted = outcome == "http_408" or (outcome in ("closed_no_answer", "reset") and dt >= 1.0)
        elif self.kind == "streams":
            accepted = outcome == "http_200"
        else:
            accepted = outcome.startswith("http_2") or outcome == "http_100"
        if accepted:
            self.accepted += 1
            self.ended[outcome] = self.ended.get(outcome, 0) + 1
            self.held.append(dt)
        else:
            self.refused[outcome] = self.refused.get(outcome, 0) + 1
            self.answer.append(dt)

    def report(self, elapsed: float, conc: int) -> dict[str, object]:
        out: dict[str, object] = {
            "concurrency": conc, "addrs": len(self.srcs), "srcs": f"{self.srcs[0]}..{self.srcs[-1]}",
            "attempts": self.attempts, "attempts_per_s": round(self.attempts / elapsed, 1),
            "connected": self.connected, "connect_errors": self.connect_errors,
            "accepted": self.accepted, "accepted_per_s": round(self.accepted / elapsed, 1),
            "refused": self.refused, "accepted_ended": self.ended,
            "unresolved_at_end": self.unresolved, "unresolved_age_s": _dist(self.unresolved_age),
            "accepted_held_s": _dist(self.held), "refused_answer_ms": _dist(self.answer, 1000, 1),
        }
        if self.body:
            bs = sorted(self.body_sent)
            out["body_bytes_sent"] = {"max": bs[-1] if bs else 0, "p50": bs[len(bs) // 2] if bs else 0}
        return out


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _head_status(buf: bytes) -> str | None:
    """``http_NNN`` once a response head is complete (or too long), else None."""
    if b"\r\n\r\n" not in buf and len(buf) < 16384:
        return None
    parts = buf.split(b"\r\n", 1)[0].split(b" ", 2)
    ok = len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit()
    return "http_" + parts[1].decode() if ok else "garbage"


async def converse(loop: asyncio.AbstractEventLoop, sock: socket.socket, ks: KindState, end: float,
                   trickle: float) -> tuple[str, int]:
    """Drive one attacking connection until its first answer, its end, or the end of the window:
    write the kind's request (and body, as far as the socket takes it; a byte every ``trickle``
    s for slowhead) and read.  Plain non-blocking socket calls and ``add_reader``/``add_writer``
    wake-ups: no transports, so the socket's life is entirely ours.  Returns (outcome, body
    bytes the kernel accepted)."""
    fd = sock.fileno()
    buf = b""
    body_left = ks.body
    sent = 0
    next_byte = loop.time() + trickle if ks.trickle else math.inf
    try:
        if ks.first:
            sock.send(ks.first)  # a few dozen bytes into an empty send buffer
        while True:
            while body_left > 0:
                try:
                    n = sock.send(CHUNK if body_left >= len(CHUNK) else CHUNK[:body_left])
                except BlockingIOError:
                    break
                except OSError:  # the gateway closed: read what it said, if anything
                    body_left = 0
                    break
                body_left -= n
                sent += n
            try:
                data = sock.recv(16384)
            except BlockingIOError:
                data = None
            if data is not None:
                if not data:
                    return ("partial_answer" if buf else "closed_no_answer"), sent
                buf += data
                status = _head_status(buf)
                if status is not None:
                    return status, sent
                continue
            now = loop.time()
            if now >= end:
                # Held (idle, slowhead), or a request the gateway had not answered yet.
                return ("open_at_end" if ks.kind in ("idle", "slowhead") else "unanswered_at_end"), sent
            if now >= next_byte:
                sock.send(b"a")
                next_byte += trickle
                continue
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _wake, fut)
            if body_left:
                loop.add_writer(fd, _wake, fut)
            try:
                await asyncio.wait({fut}, timeout=min(end, next_byte) - now)
            finally:
                loop.remove_reader(fd)
                if body_left:
                    loop.remove_writer(fd)
    except ConnectionResetError:
        return ("partial_answer" if buf else "reset"), sent
    except OSError as e:
        return ("partial_answer" if buf else type(e).__name__), sent


async def attack_worker(ks: KindState, port: int, end: float, trickle: float, ramp: float) -> None:
    loop = asyncio.get_running_loop()
    if ramp > 0:
        await asyncio.sleep(random.uniform(0, ramp))
    while True:
        now = loop.time()
        if now >= end:
            return
        ks.attempts += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((ks.next_src(), 0))
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), max(0.05, min(5.0, end - now)))
        except TimeoutError:
            sock.close()
            # No SYN-ACK yet (the gateway's accept queue was full and the SYN was dropped).
            ks.error("connect_timeout" if loop.time() < end - 0.01 else "connect_pending_at_end")
            continue
        except OSError as e:
            sock.close()
            ks.error("connect_" + (errno.errorcode.get(e.errno, str(e)) if e.errno else str(e)))
            await asyncio.sleep(0.05)  # no busy loop on a local error (EADDRNOTAVAIL, EMFILE)
            continue
        ks.connected += 1
        t0 = loop.time()
        outcome, sent = "cancelled", 0
        try:
            outcome, sent = await converse(loop, sock, ks, end, trickle)
        finally:
            ks.record(outcome, loop.time() - t0, sent)
            sock.close()


async def attack_main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    loop.call_later(args.max_life, lambda: os._exit(3))  # hard bound, whatever happens
    if args.nice:
        os.nice(args.nice)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    states = {k: KindState(k, v["srcs"], spec["stream_token"]) for k, v in spec["kinds"].items()}
    out({"type": "ready", "pid": os.getpid(), "kinds": list(states)})
    line = await reader.readline()
    if line.strip() != b"go":
        return
    t0 = loop.time()
    end = t0 + float(spec["duration"])
    tasks = [loop.create_task(attack_worker(states[k], int(spec["port"]), end, float(spec["trickle"]),
                                            float(spec["ramp"])))
             for k, v in spec["kinds"].items() for _ in range(int(v["conc"]))]
    _, pending = await asyncio.wait(tasks, timeout=float(spec["duration"]) + 15)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=10)
    elapsed = loop.time() - t0
    out({"type": "report", "elapsed_s": round(elapsed, 2), "unfinished_workers": len(pending),
         "kinds": {k: s.report(elapsed, int(spec["kinds"][k]["conc"])) for k, s in states.items()}})


def out(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# -- the benchmark ----------------------------------------------------------------------------------


def seconds(text: str) -> float:
    """``5s`` / ``500ms`` / ``5`` in seconds (the gateway's own parser is ssegw.config.parse_duration)."""
    t = text.strip()
    return float(t[:-2]) / 1000 if t.endswith("ms") else float(t.rstrip("s"))


def window_summary(w: dict[str, object]) -> dict[str, object]:
    pr: dict[str, object] = w["publisher"]  # type: ignore[assignment]
    return {
        "published_msgs": pr["ok_msgs"], "publish_failed_msgs": pr["failed_msgs"],
        "publish_unanswered_msgs": pr["unanswered_msgs"], "achieved_rate": pr["achieved_rate"],
        "post_rtt_ms": pr["post_rtt"], "expected_events": w["expected_events"],
        "received_events": w["received_events"], "lost_events": w["lost_events"], "extra_events": w["extra_events"],
        "per_conn_min": w["per_conn_min"], "per_conn_max": w["per_conn_max"], "conns_open": w["conns_open"],
        "conns_lost": w["conns_lost"], "seq_gaps": w["seq_gaps"], "seq_dups": w["seq_dups"],
        "drain_s": w["drain_s"], "latency": w["latency"], "healthz": w["server_loop_probe"],
        "server_rss_mib": w["server_rss_mib"], "cpu": {k: w["cpu"][k] for k in ("proc_pct", "core_busy_pct",  # type: ignore[index]
                                                                               "foreign_pct", "others_pct")},
        "slow_closed": w["server"]["slow_closed"],  # type: ignore[index]
        # The gateway's own view: publish-to-flush delay and flush (sweep) duration.
        "server_hist": w["server_hist"],
        # New subscribers arriving during the window (one every 0.5 s): time to the 200 head.
        "newcomers": w.get("newcomers"),
    }


GAUGES = ("connections_open", "streams_open", "slots_in_use", "topics_active", "wheel_stored", "output_buffered",
          "streams_behind")


def gauges(st: dict[str, object]) -> dict[str, object]:
    return {k: st.get(k) for k in GAUGES}


async def measured(env: FloodEnv, args: argparse.Namespace, duration: float, make, subs: int,  # type: ignore[no-untyped-def]
                   quiet_wait: float) -> dict[str, object]:
    """``run.window`` with :class:`Newcomers` arriving during its publishing time."""
    assert env.srv and env.admin and env.clients and env.pub
    # The quiet-machine wait first, so that the newcomers arrive during the window itself.
    quiet = await wait_quiet(quiet_wait) if quiet_wait > 0 else None
    news = Newcomers(env.srv.port, env.newcomer_req, duration)
    news.start()
    res = await window(env.srv, env.admin, env.clients, env.pub, args.rate, duration, make, subs, quiet_wait=0)
    res["newcomers"] = await news.result()
    res["before_window"] = quiet
    return res


def attackers_gone(st: dict[str, object], subs: int, pub_conns: int) -> bool:
    streams = int(st["streams_open"])  # type: ignore[call-overload]
    return streams <= subs and int(st["connections_open"]) - streams <= pub_conns  # type: ignore[call-overload]


def drop_stuck(pub: Publisher) -> int:
    """Take publisher connections that still wait for an answer (the last window gave up on
    them after 60 s) out of the pool, so that the next window starts on answered ones; how
    many there were (0 unless the gateway left a publish unanswered)."""
    stuck = [c for c in pub.conns if c.fut is not None]
    for c in stuck:
        log(f"publisher connection {c.tr.get_extra_info('sockname') if c.tr else None} has had no answer: dropped")
        if c.tr is not None:
            c.tr.abort()
    pub.conns = [c for c in pub.conns if c.fut is None]
    return len(stuck)


async def flood_cycle(env: FloodEnv, args: argparse.Namespace, specs: list[dict[str, object]], make,  # type: ignore[no-untyped-def]
                      subs: int, attackers: list[Attacker]) -> dict[str, object]:
    """One flood window (attackers running) and the window after it."""
    assert env.srv and env.admin and env.clients and env.pub
    srv, admin, pub = env.srv, env.admin, env.pub
    attackers.clear()
    for spec in specs:
        spec["port"] = srv.port
        attackers.append(await Attacker.start(spec, args.attack_nice, args.flood + 300))
    quiet = await wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else None
    FloodCpuSampler.extra = {f"attacker{i}": a.pid for i, a in enumerate(attackers)}
    st_before = await admin.stats()
    m_before = (await admin.get("/metrics"))[1].decode()
    base_open = int(st_before["connections_open"])  # type: ignore[call-overload]
    stuck = drop_stuck(pub)
    curve = Curve(srv, admin)
    tcp0 = tcp_ext()
    curve.start()
    try:
        for a in attackers:
            a.go()
        t_go = time.monotonic()
        flood = await measured(env, args, args.flood, make, subs, 0)
        reports = [await a.read(args.flood + 120) for a in attackers]
        tcp1 = tcp_ext()
        t_flood_end = t_go + args.flood
        for a in attackers:
            await a.stop()
        FloodCpuSampler.extra = {}
        st_flood = await admin.stats()
        m_flood = (await admin.get("/metrics"))[1].decode()
        # The attackers' connections must be gone before "after" (bounded wait): only the
        # subscribers' streams and the publisher's connections left.
        t_wait = time.monotonic()
        st = st_flood
        while not attackers_gone(st, subs, args.pub_conns) and time.monotonic() - t_wait < 30:
            await asyncio.sleep(0.2)
            st = await admin.stats()
        stuck += drop_stuck(pub)
        gone_s = round(time.monotonic() - t_flood_end, 2)
        log(f"flood: p99 {flood['latency'].get('p99_ms')} ms lost {flood['lost_events']}; attacker connections "  # type: ignore[union-attr]
            f"gone {gone_s} s after the flood ended ({st['connections_open']} open, {base_open} before)")
        after = await measured(env, args, args.after, make, subs, 0)
        rss_after_t = round(time.monotonic() - t_flood_end, 1)
        st_end = await admin.stats()
        m_end = (await admin.get("/metrics"))[1].decode()
    finally:
        FloodCpuSampler.extra = {}
        await curve.stop()
    attack: dict[str, object] = {}
    for r in reports:
        attack.update(r["kinds"])  # type: ignore[arg-type]
    rows = curve.rows
    flood_rows = curve.span(0, args.flood + 1)
    return {
        "flood": flood, "after": after, "attack": attack,
        "attack_elapsed_s": max(float(r["elapsed_s"]) for r in reports),  # type: ignore[arg-type]
        "attack_unfinished_workers": sum(int(r.get("unfinished_workers", 0)) for r in reports),  # type: ignore[call-overload]
        "before_flood": quiet,
        "rss_before": float(flood["server_rss_mib"]["before"]),  # type: ignore[index]
        "rss_peak": max(float(flood["server_rss_mib"]["max"] or 0), max((r[1] for r in flood_rows), default=0.0)),  # type: ignore[index]
        "rss_after": float(after["server_rss_mib"]["after"]),  # type: ignore[index]
        "rss_after_t": rss_after_t, "gone_s": gone_s, "publisher_conns_stuck": stuck,
        "conns_max": max((r[2] for r in flood_rows), default=0),
        "curve": {"t_s": [r[0] for r in rows], "rss_mib": [r[1] for r in rows],
                  "connections_open": [r[2] for r in rows], "streams_open": [r[3] for r in rows],
                  "accept_queue": [r[4] for r in rows]},
        "accept_queue_max": max((r[4] for r in flood_rows), default=-1),
        "tcp_ext_delta": {k: v - tcp0.get(k, 0) for k, v in tcp1.items()},
        "gateway_stats": {"flood": stats_span(st_before, st_flood), "after": stats_span(st_flood, st_end)},
        "gauges": {"before_flood": gauges(st_before), "flood_end": gauges(st_flood), "after": gauges(st_end)},
        "metrics_delta": {"flood": metric_delta(m_before, m_flood), "after": metric_delta(m_flood, m_end)},
    }


async def cmd_flood(args: argparse.Namespace) -> None:
    per_src = args.per_src or max(1, min(args.max_conns_per_ip, args.conn_burst) - 4)
    max_conns = args.max_connections or args.subs + 5000
    secret = secrets.token_urlsafe(32)
    sub_token = make_token(secret, "bench-sub", {"subscribe": [args.topic]})
    pub_token = make_token(secret, "bench-pub", {"publish": [args.topic]})
    stream_token = make_token(secret, "flood", {"subscribe": ["flood"]}) if args.stream_token == "valid" else None
    tmp = tempfile.mkdtemp(prefix="ssegw-flood-")
    conf = os.path.join(tmp, "gateway.toml")
    limits = {"max_conns_per_ip": args.max_conns_per_ip, "conn_rate": float(args.conn_rate),
              "conn_burst": args.conn_burst, "head_timeout": args.head_timeout}
    with open(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(f'max_conns_per_ip = {args.max_conns_per_ip}\nconn_rate = {float(args.conn_rate)}\n'
                f'conn_burst = {args.conn_burst}\nhead_timeout = "{args.head_timeout}"\n\n'
                f'[auth]\njwt_algorithm = "HS256"\njwt_secret = "{secret}"\n')
    # --max-connections as a flag: Server's own command line passes one, and flags beat the file.
    server_args = ["--config", conf, "--max-connections", str(max_conns), *(args.server_arg or [])]
    sub_srcs = subscriber_srcs(args.subs, args.procs, per_src)
    specs, pools = attack_plan(args, 2 + len(sub_srcs) + 2, stream_token)
    attack_addrs = sum(len(v) for v in pools.values())
    setup: dict[str, object] = {
        "gateway_flags": ["<tmp>/gateway.toml" if a == conf else a for a in server_args],
        "gateway_config": {**limits, "max_connections": max_conns,
                           "auth": "HS256 JWT ([auth] jwt_secret): subscribers ?token= subscribe:[topic]; publisher "
                                   "Bearer publish:[topic]; bigpost sends none"},
        "subscriber_addrs": {"n": len(sub_srcs), "first": sub_srcs[0], "last": sub_srcs[-1], "per_addr": per_src,
                             "why": "per_addr <= min(max_conns_per_ip, conn_burst): subscribers fit the per-IP "
                                    "connection cap and connect within the rate bucket's burst"},
        "attacker_addrs": {k: {"n": len(v), "first": v[0], "last": v[-1]} for k, v in pools.items()},
        "attacker_procs": len(specs), "attacker_nice": args.attack_nice, "streams_token": args.stream_token,
        "trickle_s": args.trickle,
    }
    log(f"setup {setup}")
    env = FloodEnv(args, server_args, f"{args.topic}&token={sub_token}", per_src, pub_token.encode())
    make = ticker_body(args.topic.encode())
    attackers: list[Attacker] = []
    cycles: list[dict[str, object]] = []
    try:
        await env.open()
        assert env.admin and env.clients
        subs = env.clients.ok
        st_start = await env.admin.stats()

        # calm: measured again if other processes disturbed it, like every run.py window
        async def calm_once() -> dict[str, object]:
            assert env.srv and env.admin and env.clients and env.pub
            drop_stuck(env.pub)
            return await measured(env, args, args.calm, make, subs, args.quiet_wait)

        calm = await with_retries(env, calm_once)
        log(f"calm: p99 {calm['latency'].get('p99_ms')} ms lost {calm['lost_events']}")  # type: ignore[union-attr]
        for _ in range(args.cycles):
            cycles.append(await flood_cycle(env, args, specs, make, subs, attackers))
        assert env.admin is not None
        st_end = await env.admin.stats()
    finally:
        for a in attackers:
            await a.stop()
        await env.close()
        shutil.rmtree(tmp, ignore_errors=True)

    # -- results
    c0 = cycles[0]
    flood, after = c0["flood"], c0["after"]
    attack: dict[str, dict[str, object]] = c0["attack"]  # type: ignore[assignment]
    windows = {"calm": window_summary(calm), "flood": window_summary(flood), "after": window_summary(after)}  # type: ignore[arg-type]
    p99 = {k: w["latency"].get("p99_ms") for k, w in windows.items()}  # type: ignore[union-attr]
    all_windows = [calm] + [c[x] for c in cycles for x in ("flood", "after")]
    lost = sum(int(w["lost_events"]) + int(w["extra_events"]) for w in all_windows)  # type: ignore[call-overload, index]
    dropped = sum(int(w["conns_lost"]) for w in all_windows)  # type: ignore[call-overload, index]
    gaps = sum(int(w["seq_gaps"]) + int(w["seq_dups"]) for w in all_windows)  # type: ignore[call-overload, index]
    ratio = (float(p99["flood"]) / float(p99["calm"])) if p99["calm"] and p99["flood"] is not None else None  # type: ignore[arg-type]
    rss_before, rss_after = float(c0["rss_before"]), float(c0["rss_after"])  # type: ignore[arg-type]
    rss_change = (rss_after - rss_before) / rss_before
    targets = {
        "p99_flood_le_2x_calm": {"calm_p99_ms": p99["calm"], "flood_p99_ms": p99["flood"],
                                 "ratio": round(ratio, 2) if ratio is not None else None, "limit": 2.0,
                                 "pass": ratio is not None and ratio <= 2.0},
        "zero_lost": {"lost_or_extra_events": lost, "subscribers_dropped": dropped, "seq_gaps_dups": gaps,
                      "pass": lost == 0 and dropped == 0 and gaps == 0},
        "rss_after_within_10pct": {"before_mib": rss_before, "after_mib": rss_after,
                                   "after_measured_s_after_flood": c0["rss_after_t"],
                                   "change_pct": round(rss_change * 100, 1), "limit_pct": 10.0,
                                   "pass": abs(rss_change) <= 0.10},
    }
    # What the edge limits promise, checked against what was seen.
    checks = []
    bound_open = subs + args.pub_conns + attack_addrs * args.max_conns_per_ip
    ht = seconds(args.head_timeout)
    for i, c in enumerate(cycles):
        if int(c["conns_max"]) > bound_open:  # type: ignore[call-overload]
            checks.append(f"cycle {i}: gateway held {c['conns_max']} connections, more than subscribers + publisher + "
                          f"{attack_addrs} attacker addresses x max_conns_per_ip = {bound_open}")
        ca: dict[str, dict[str, object]] = c["attack"]  # type: ignore[assignment]
        for k in ("idle", "slowhead"):
            held: dict[str, object] = ca.get(k, {}).get("accepted_held_s", {})  # type: ignore[assignment]
            if held.get("n") and float(held["max"]) > ht + 1.5:  # type: ignore[arg-type]
                checks.append(f"cycle {i}: {k}: the gateway cut a connection {held['max']} s after it connected "
                              f"(p50 {held['p50']} s), head_timeout is {ht} s: the rest is time in the accept queue, "
                              f"or the head timeout fired late")
        s = ca.get("streams")
        if s:
            cap = len(pools["streams"]) * (args.conn_burst + args.conn_rate * float(c["attack_elapsed_s"]))  # type: ignore[arg-type]
            if int(s["accepted"]) > cap:  # type: ignore[call-overload]
                checks.append(f"cycle {i}: streams: {s['accepted']} accepted, conn_rate/conn_burst allow at most {round(cap)}")
        b = ca.get("bigpost")
        if b and int(b["accepted"]):  # type: ignore[call-overload]
            checks.append(f"cycle {i}: bigpost: {b['accepted']} unauthenticated publishes accepted")
        if b and set(b["refused"]) - {"http_401", "http_429", "http_503", "reset"}:  # type: ignore[arg-type]
            checks.append(f"cycle {i}: bigpost refused with {b['refused']}")
    for k, w in [("calm", windows["calm"])] + [(f"{x} (cycle {i})", window_summary(c[x]))  # type: ignore[arg-type]
                                               for i, c in enumerate(cycles) for x in ("flood", "after")]:
        if int(w["publish_unanswered_msgs"]) or int(w["publish_failed_msgs"]):  # type: ignore[call-overload]
            checks.append(f"{k}: {w['publish_unanswered_msgs']} published messages never answered (60 s), "
                          f"{w['publish_failed_msgs']} failed; POST RTT {w['post_rtt_ms']}")
    for i, c in enumerate(cycles):
        nf: dict[str, dict[str, object]] = c["flood"].get("newcomers") or {}  # type: ignore[attr-defined]
        nc: dict[str, dict[str, object]] = calm.get("newcomers") or {}  # type: ignore[assignment]
        if int(c["accept_queue_max"]) >= 4000:  # type: ignore[call-overload]
            checks.append(f"cycle {i}: the gateway's accept queue filled ({c['accept_queue_max']} of 4096): connections "
                          f"wait in the kernel (and the handshake ACKs of more are dropped: ListenOverflows "
                          f"+{c['tcp_ext_delta'].get('ListenOverflows')} machine-wide) before the per-IP limits can "  # type: ignore[attr-defined]
                          f"see them; new subscribers waited {nf.get('time_to_head_ms')} ms for their 200 "
                          f"(calm: {nc.get('time_to_head_ms')})")
    for k, w in windows.items():
        foreign = float(w["cpu"]["foreign_pct"])  # type: ignore[index, arg-type]
        if foreign > args.max_foreign:
            checks.append(f"{k} window disturbed: processes not ours used {foreign} % CPU "
                          f"({w['cpu']['others_pct']})")  # type: ignore[index]
    result: dict[str, object] = {
        "server_code": args.server_code, "allocator": args.allocator,
        "subs": subs, "rate": args.rate, "calm_s": args.calm, "flood_s": args.flood, "after_s": args.after,
        "procs": args.procs, "cycles_run": len(cycles), "setup": setup,
        "attack": attack, "attack_unfinished_workers": c0["attack_unfinished_workers"],
        "latency_ms": {k: w["latency"] for k, w in windows.items()},
        "newcomers": {k: w["newcomers"] for k, w in windows.items()},
        "events": {k: {x: w[x] for x in ("published_msgs", "expected_events", "received_events", "lost_events",
                                         "per_conn_min", "per_conn_max", "conns_lost", "seq_gaps", "seq_dups")}
                   for k, w in windows.items()},
        "server_rss_mib": {"before_flood": rss_before, "peak_during_flood": c0["rss_peak"], "after": rss_after,
                           "after_measured_s_after_flood": c0["rss_after_t"],
                           "calm_window": calm["server_rss_mib"], "flood_window": flood["server_rss_mib"],  # type: ignore[index]
                           "after_window": after["server_rss_mib"]},  # type: ignore[index]
        "attacker_conns_gone_s_after_flood": c0["gone_s"],
        "publisher_conns_stuck": sum(int(c["publisher_conns_stuck"]) for c in cycles),  # type: ignore[call-overload]
        "gateway_connections_open_max_during_flood": c0["conns_max"],
        "gateway_connections_open_bound": bound_open,
        "gateway_accept_queue_max_during_flood": c0["accept_queue_max"],
        "tcp_ext_delta_flood": c0["tcp_ext_delta"],
        "curve": c0["curve"], "gauges": c0["gauges"],
        "gateway_stats": {**c0["gateway_stats"], "whole_run": stats_span(st_start, st_end)},  # type: ignore[dict-item]
        "metrics_delta": c0["metrics_delta"],
        "windows": windows,
        "calm_attempts": calm.get("attempts"), "before_flood": c0["before_flood"],
        "foreign_cpu_pct": {k: w["cpu"]["foreign_pct"] for k, w in windows.items()},  # type: ignore[index]
        "targets": targets, "checks": checks,
        "verdict": "pass" if all(t["pass"] for t in targets.values()) else  # type: ignore[index]
        "fail: " + ", ".join(k for k, t in targets.items() if not t["pass"]),  # type: ignore[index]
        "server_log_problems": env.problems[:20],
    }
    if len(cycles) > 1:
        # Later floods on the same gateway: does RSS climb again (a leak) or stay (memory reused)?
        result["later_cycles"] = [{
            "flood_p99_ms": c["flood"]["latency"].get("p99_ms"), "after_p99_ms": c["after"]["latency"].get("p99_ms"),  # type: ignore[index]
            "lost_events": c["flood"]["lost_events"] + c["after"]["lost_events"],  # type: ignore[index]
            "conns_lost": c["flood"]["conns_lost"] + c["after"]["conns_lost"],  # type: ignore[index]
            "rss_mib": {"before": c["rss_before"], "peak": c["rss_peak"], "after": c["rss_after"]},
            "attack": {k: {x: v[x] for x in ("attempts", "accepted", "refused", "unresolved_at_end")}
                       for k, v in c["attack"].items()},  # type: ignore[attr-defined]
            "accept_queue_max": c["accept_queue_max"], "tcp_ext_delta": c["tcp_ext_delta"],
            "newcomers_flood": c["flood"].get("newcomers"),  # type: ignore[attr-defined]
            "foreign_cpu_pct": {x: c[x]["cpu"]["foreign_pct"] for x in ("flood", "after")},  # type: ignore[index]
            "gauges_after": c["gauges"]["after"],  # type: ignore[index]
            "gateway_stats_flood": c["gateway_stats"]["flood"],  # type: ignore[index]
        } for c in cycles[1:]]
    for k, t in targets.items():
        log(f"target {k}: {'PASS' if t['pass'] else 'FAIL'} {t}")
    for c in checks:
        log(f"check: {c}")
    emit(KIND, result)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/flood.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subs", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=100, help="msg/s published to the subscribers' topic")
    ap.add_argument("--calm", type=float, default=10, help="seconds of the calm window")
    ap.add_argument("--flood", type=float, default=20, help="seconds of the flood window")
    ap.add_argument("--after", type=float, default=10, help="seconds of the window after the flood")
    ap.add_argument("--topic", default="ticker")
    ap.add_argument("--procs", type=int, default=1, help="subscriber processes")
    ap.add_argument("--count", choices=("scan", "seq"), default="seq", help="subscriber counting (see run.py fanout)")
    ap.add_argument("--sample", type=int, default=500, help="most subscribers parsing latency")
    ap.add_argument("--min-sample", type=int, default=20)
    ap.add_argument("--parse-budget", type=int, default=100_000)
    ap.add_argument("--per-src", type=int, default=0,
                    help="subscribers per source address (0: min(max_conns_per_ip, conn_burst) - 4)")
    ap.add_argument("--server-arg", action="append", help="extra argument for `ssegw serve` (repeatable)")
    g = ap.add_argument_group("gateway edge limits")
    g.add_argument("--max-conns-per-ip", type=int, default=64)
    g.add_argument("--conn-rate", type=float, default=20)
    g.add_argument("--conn-burst", type=int, default=64)
    g.add_argument("--head-timeout", default="5s")
    g.add_argument("--max-connections", type=int, default=0, help="0: subscribers + 5000")
    g = ap.add_argument_group("attackers")
    g.add_argument("--attack-procs", type=int, choices=(1, 2), default=2,
                   help="2: idle+slowhead in one process, streams+bigpost in the other")
    g.add_argument("--attack-addrs", type=int, default=30, help="source addresses per attacker kind")
    g.add_argument("--idle-conc", type=int, default=2400, help="idle connections in flight (0 = kind off)")
    g.add_argument("--slowhead-conc", type=int, default=2400)
    g.add_argument("--streams-conc", type=int, default=200)
    g.add_argument("--bigpost-conc", type=int, default=200)
    g.add_argument("--trickle", type=float, default=1.0, help="slowhead: seconds between trickled bytes")
    g.add_argument("--ramp", type=float, default=0.5, help="attack workers start spread over this many s")
    g.add_argument("--stream-token", choices=("valid", "none"), default="valid",
                   help="streams: a valid subscribe token for topic flood (stream starts succeed), or none (401)")
    ap.add_argument("--code", default="HEAD",
                    help="run the gateway from a `git archive` snapshot of this commit (scale.py's use_code; the "
                         "working tree may carry other people's unfinished changes), or `worktree`")
    ap.add_argument("--allocator", choices=sorted(ALLOCATORS), default="pymalloc",
                    help="the gateway's allocator: Python's own, or jemalloc as systemd/ssegw.service runs it "
                         "(LD_PRELOAD=libjemalloc.so.2 PYTHONMALLOC=malloc)")
    ap.add_argument("--cycles", type=int, default=1,
                   help="flood + after windows run this many times on the same gateway (targets use the first)")
    g.add_argument("--attack-nice", type=int, default=10,
                   help="nice of the attacker processes (they share core 1 with the measuring subscribers)")
    run.add_window_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import uvloop

    if argv[:1] == ["_attack"]:
        p = argparse.ArgumentParser()
        p.add_argument("--nice", type=int, default=0)
        p.add_argument("--max-life", type=float, default=900)
        uvloop.run(attack_main(p.parse_args(argv[1:])))
        return 0
    args = build_parser().parse_args(argv)
    pin_self()
    args.server_code = use_code(args.code)
    GATEWAY_ENV.update(ALLOCATORS[args.allocator])
    uvloop.run(cmd_flood(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
