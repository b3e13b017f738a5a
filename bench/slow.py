"""Slow-consumer and reconnect-storm benchmarks: ``python bench/slow.py {stalled,storm} [options]``.

Reuses bench/run.py (``Env``, ``window``: gateway on core 0 via taskset, bench/client.py
subscribers on core 1, paced publisher, /healthz prober, CPU sampling, quiet-machine wait)
and bench/common.py (``Server``, /proc RSS, ``emit``).  Prints one JSON line per command and
appends it to ``bench/results/slow.jsonl``.  Every loop is bounded; only processes started
here are stopped, by PID.  See bench/README.md, section "slow.py".

- ``stalled``: stalled readers (read the response head, then never read again; SO_RCVBUF
  4096) next to normal subscribers on one topic; the same window again without the stalled
  readers; p99 ratio, loss, server RSS curve, ``slow_closed`` / ``held``.
- ``storm``: N subscribers on one topic, one event every 10 ms; every client socket is closed
  at once and reconnected with ``Last-Event-ID``; time until all resumed, missing sequence
  numbers across the reconnect, ``paced``, max ``/healthz`` round trip.
  The subscribers run in a child process (``slow.py _storm_clients``, core 1) so that the
  coordinator's /healthz probe is not delayed by the subscribers' own loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from client import IP_BIND_ADDRESS_NO_PORT, PAT, _last_seq  # noqa: E402
from common import PYTHON, RESULTS, CpuSampler, Server, emit, log, stats_delta, wait_quiet  # noqa: E402
from loadgen import Admin, Prober, Publisher, ticker_body  # noqa: E402
from run import CLIENT_CORE, SERVER_CORE, Env, pin_self, wait_streams, window  # noqa: E402

KIND = "slow"


def sized_body(topic: bytes, size: int):  # type: ignore[no-untyped-def]
    """Batch maker: events whose data is ``size`` bytes, ``{"t": time.time(), ...}`` first
    (the sampled subscribers read the publish time from it)."""
    def make(k: int, first: int) -> tuple[bytes, None]:
        t = time.time()
        parts = []
        for i in range(k):
            d = b'{"t":%.6f,"n":%d,"pad":"' % (t, first + i)
            d += b"x" * max(0, size - len(d) - 2) + b'"}'
            parts.append(b'{"topic":"%s","data":%s}' % (topic, d))
        return b"[" + b",".join(parts) + b"]", None

    return make


# -- stalled ----------------------------------------------------------------------------


async def open_stalled(port: int, n: int, topic: str, src: str, rcvbuf: int) -> tuple[list[socket.socket], int]:
    """``n`` streams that read the response head and then never read again."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(200)
    req = (f"GET /events?topic={topic} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
           f"Accept: text/event-stream\r\n\r\n").encode()

    async def one() -> socket.socket | None:
        async with sem:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((src, 0))
                s.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", port)), 30)
                await loop.sock_sendall(s, req)
                head = b""
                deadline = time.monotonic() + 30
                while b"\r\n\r\n" not in head and time.monotonic() < deadline:
                    chunk = await asyncio.wait_for(loop.sock_recv(s, 1), 30)  # 1 byte: read the head only
                    if not chunk:
                        raise OSError("closed during head")
                    head += chunk
                if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
                    raise OSError(head[:40].decode("latin-1"))
                return s
            except (OSError, TimeoutError):
                s.close()
                return None

    res = await asyncio.gather(*(one() for _ in range(n)))
    socks = [s for s in res if s is not None]
    return socks, n - len(socks)


def tcp_kernel_mib() -> float:
    """Memory of all TCP socket buffers on the machine (/proc/net/sockstat ``TCP: ... mem`` pages)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return round(int(parts[parts.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    return -1.0


NETSTAT_KEYS = ("TCPAbortOnTimeout", "TCPAbortOnMemory", "TCPMemoryPressures", "TCPAbortOnData", "TCPAbortOnClose",
                "TCPWinProbe", "TCPToZeroWindowAdv", "TCPRcvQDrop", "TCPZeroWindowDrop")


def tcp_ext() -> dict[str, int]:
    """Machine-wide TcpExt counters (/proc/net/netstat) that tell who ended a stalled connection."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for a, b in zip(lines[::2], lines[1::2], strict=False):
        if a.startswith("TcpExt:"):
            d = dict(zip(a.split()[1:], (int(x) for x in b.split()[1:]), strict=False))
            return {k: d.get(k, 0) for k in NETSTAT_KEYS}
    return {}


async def rss_curve(srv: Server, out: list[float], stop: asyncio.Event, max_s: float,
                    kout: list[float] | None = None, admin: Admin | None = None,
                    sout: list[int] | None = None) -> None:
    t_end = time.monotonic() + max_s
    while not stop.is_set() and time.monotonic() < t_end:
        try:
            out.append(round(srv.rss() / 2**20, 1))
            if kout is not None:
                kout.append(tcp_kernel_mib())
            if admin is not None and sout is not None:
                sout.append(int((await admin.stats())["streams_open"]))  # type: ignore[call-overload]
        except (OSError, RuntimeError):
            return
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


async def stalled_run(args: argparse.Namespace, stalled: int) -> dict[str, object]:
    env = Env(args, f"slow-stalled{stalled}", args.normal, args.topic, args.sample)
    socks: list[socket.socket] = []
    try:
        await env.open()
        assert env.srv and env.admin and env.clients and env.pub
        failed = 0
        if stalled:
            t0 = time.monotonic()
            socks, failed = await open_stalled(env.srv.port, stalled, args.topic, "127.0.0.200", args.rcvbuf)
            st = await wait_streams(env.admin, env.clients.ok + len(socks), timeout=60)
            log(f"{len(socks)} stalled readers open ({failed} failed) in {time.monotonic() - t0:.1f} s; "
                f"streams_open={st['streams_open']}")
        curve: list[float] = []
        kcurve: list[float] = []
        scurve: list[int] = []
        net0 = tcp_ext()
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(rss_curve(env.srv, curve, stop, args.duration + 200, kcurve,
                                                                env.admin, scurve))
        res = await window(env.srv, env.admin, env.clients, env.pub, args.rate, args.duration,
                           sized_body(args.topic.encode(), args.size), env.clients.ok, quiet_wait=args.quiet_wait)
        stop.set()
        await task
        st = await env.admin.stats()
        lat: dict[str, object] = res["latency"]  # type: ignore[assignment]
        srv: dict[str, object] = res["server"]  # type: ignore[assignment]
        out = {
            "stalled_requested": stalled, "stalled_open": len(socks), "stalled_failed": failed,
            "normal": env.clients.ok, "published": res["publisher"]["ok_msgs"],  # type: ignore[index]
            "achieved_rate": res["publisher"]["achieved_rate"],  # type: ignore[index]
            "normal_expected": res["expected_events"], "normal_delivered": res["received_events"],
            "normal_lost": res["lost_events"], "normal_conns_lost": res["conns_lost"],
            "seq_gaps": res["seq_gaps"], "seq_dups": res["seq_dups"],
            "latency": lat, "latency_sampled_conns": res["latency_sampled_conns"], "drain_s": res["drain_s"],
            "rss_mib_curve": curve, "rss_mib": {"min": min(curve), "max": max(curve), "last": curve[-1],
                                                "first": curve[0]} if curve else {},
            "kernel_tcp_mem_mib_curve": kcurve, "streams_open_curve": scurve,
            "tcp_ext_delta": {k: v - net0.get(k, 0) for k, v in tcp_ext().items()},
            "slow_closed": st.get("slow_closed"), "held_window": srv.get("held"), "held_total": st.get("held"),
            "streams_open_after": st.get("streams_open"),
            "server_loop_probe": res["server_loop_probe"], "cpu": res["cpu"], "server": srv,
            "server_hist": res["server_hist"],
        }
        log(f"stalled={stalled}: p99 {lat.get('p99_ms')} ms, lost {res['lost_events']}, "
            f"rss {out['rss_mib']}, slow_closed {st.get('slow_closed')}")
        return out
    finally:
        for s in socks:
            s.close()
        await env.close()
        if env.problems:
            log(f"server log problems: {env.problems[:5]}")


async def cmd_stalled(args: argparse.Namespace) -> None:
    with_s = await stalled_run(args, args.stalled)
    without = await stalled_run(args, 0)
    p_with = float(with_s["latency"].get("p99_ms") or 0)  # type: ignore[union-attr]
    p_without = float(without["latency"].get("p99_ms") or 0)  # type: ignore[union-attr]
    ratio = round(p_with / p_without, 2) if p_without else None
    verdict = []
    if with_s["normal_lost"] or with_s["normal_conns_lost"]:
        verdict.append(f"normal subscribers lost {with_s['normal_lost']} events / {with_s['normal_conns_lost']} conns")
    if ratio is None or ratio > 1.5:
        verdict.append(f"p99 ratio {ratio} > 1.5")
    emit(KIND, {"cmd": "stalled", "args": {k: v for k, v in vars(args).items() if k != "fn"},
                "p99_ratio_with_over_without": ratio, "verdict": verdict or "ok",
                "with_stalled": with_s, "without_stalled": without})


# -- storm: subscriber process -------------------------------------------------------------

HEAD, FIRST, STREAM, DONE = 0, 1, 2, 3


class StormApp:
    def __init__(self) -> None:
        self.lost = 0
        self.dropping = False
        self.quitting = False
        self.resumed = 0
        self.t_drop = 0.0
        self.resume_t: list[float] = []
        self.errors: dict[str, int] = {}


class StormSub(asyncio.Protocol):
    """One stream across sessions: counts ``\\nid: `` markers (bytes.count), keeps the newest
    sequence (one rfind per read) and the first sequence of each session."""

    def __init__(self, app: StormApp, idx: int) -> None:
        self.app, self.idx = app, idx
        self.tr: asyncio.Transport | None = None
        self.state = HEAD
        self.buf = b""
        self.tail = b""
        self.count = 0            # events received, all sessions
        self.last = 0             # newest sequence
        self.last_id = ""         # newest full id (for Last-Event-ID)
        self.first = [0, 0]       # first sequence of session 0 and 1
        self.session = 0
        self.req = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]
        transport.write(self.req)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.state == STREAM:
            self._count(data)
            return
        buf = self.buf + data
        if self.state == HEAD:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.buf = buf
                return
            if b" 200 " not in buf[:buf.find(b"\r\n")] + b" ":
                k = buf[:buf.find(b"\r\n")].decode("latin-1")[:40]
                self.app.errors[k] = self.app.errors.get(k, 0) + 1
                self.state = DONE
                self.tr.close()  # type: ignore[union-attr]
                return
            buf = buf[i + 2:]
            self.state = FIRST
        # FIRST: wait for the first complete id line of this session
        i = buf.find(PAT)
        j = buf.find(b"\n", i + 5) if i >= 0 else -1
        if j < 0:
            self.buf = buf[-4096:]
            return
        line = buf[i + 5:j]
        self.first[self.session] = int(line[line.rfind(b"-") + 1:])
        self.buf = b""
        self.tail = b""
        self.state = STREAM
        if self.session == 1:
            app = self.app
            app.resumed += 1
            app.resume_t.append(time.monotonic() - app.t_drop)
        self._count(buf)

    def _count(self, data: bytes) -> None:
        self.count += data.count(PAT) + (self.tail + data[:4]).count(PAT)
        seq = _last_seq(data)
        src = data
        if seq < 0:
            src = self.tail[-60:] + data
            seq = _last_seq(src)
        if seq > self.last:
            self.last = seq
            i = src.rfind(PAT)
            j = src.find(b"\n", i + 5)
            while j < 0 and i > 0:  # newest id line incomplete: the one before
                i = src.rfind(PAT, 0, i)
                j = src.find(b"\n", i + 5)
            self.last_id = src[i + 5:j].decode()
        self.tail = (self.tail + data)[-64:]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == DONE:  # closed by us (the storm) or already counted
            return
        if self.state in (STREAM, FIRST) and not self.app.dropping and not self.app.quitting:
            self.app.lost += 1
        self.state = DONE


async def storm_connect(loop: asyncio.AbstractEventLoop, sub: StormSub, port: int, src: str,
                        sem: asyncio.Semaphore) -> bool:
    async with sem:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((src, 0))
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 60)
        except (OSError, TimeoutError) as e:
            sock.close()
            k = f"connect: {e}"[:60]
            sub.app.errors[k] = sub.app.errors.get(k, 0) + 1
            return False
        sub.state, sub.buf, sub.tail = HEAD, b"", b""
        await loop.create_connection(lambda: sub, sock=sock)
        return True


def storm_req(port: int, topic: str, last_id: str) -> bytes:
    extra = f"Last-Event-ID: {last_id}\r\n" if last_id else ""
    return (f"GET /events?topic={topic} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
            f"{extra}\r\n").encode()


async def storm_clients_main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    loop.call_later(args.max_life, lambda: os._exit(3))  # hard bound
    app = StormApp()
    subs = [StormSub(app, i) for i in range(args.conns)]
    per = 5000
    src0 = [f"127.0.1.{2 + k}" for k in range((args.conns + per - 1) // per)]
    src1 = [f"127.0.2.{2 + k}" for k in range((args.conns + per - 1) // per)]
    sem = asyncio.Semaphore(args.concurrency)
    for s in subs:
        s.req = storm_req(args.port, args.topic, "")
    t0 = time.monotonic()
    ok = await asyncio.gather(*(storm_connect(loop, s, args.port, src0[s.idx // per], sem) for s in subs))
    out({"type": "ready", "ok": sum(ok), "connect_s": round(time.monotonic() - t0, 2), "errors": app.errors,
         "pid": os.getpid()})
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks: list[asyncio.Task[bool]] = []
    last0: list[int] = []
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = line.decode().split()
        if not cmd:
            continue
        if cmd[0] == "status":
            live = [s for s in subs if s.state == STREAM]
            out({"type": "status", "t": time.time(), "streaming": len(live), "resumed": app.resumed,
                 "min_last": min((s.last for s in subs), default=0), "max_last": max((s.last for s in subs), default=0),
                 "lost": app.lost})
        elif cmd[0] == "drop":
            # Close every socket at once, then reconnect all with Last-Event-ID.
            app.dropping = True
            last0 = [s.last for s in subs]
            no_id = sum(1 for s in subs if not s.last_id)
            for s in subs:
                s.state = DONE  # before abort: the old transport's connection_lost is ignored
                if s.tr is not None:
                    s.tr.abort()
            app.t_drop = time.monotonic()
            await asyncio.sleep(0)  # let connection_lost run
            app.dropping = False
            for s in subs:
                s.session = 1
                s.req = storm_req(args.port, args.topic, s.last_id)
            tasks = [loop.create_task(storm_connect(loop, s, args.port, src1[s.idx // per], sem)) for s in subs]
            out({"type": "dropped", "t": time.time(), "without_id": no_id})
        elif cmd[0] == "snap":
            gaps_reconnect = dups_reconnect = missing_stream = 0
            conns_gap = 0
            for s, l0 in zip(subs, last0, strict=False):
                d = s.first[1] - l0 - 1 if s.first[1] else 0
                if d > 0:
                    gaps_reconnect += d
                    conns_gap += 1
                elif d < 0:
                    dups_reconnect += -d
            total_missing = 0
            for s in subs:
                span = s.last - s.first[0] + 1 if s.first[0] else 0
                total_missing += span - s.count  # events missing over the whole life (negative: repeats)
            missing_stream = total_missing - gaps_reconnect + dups_reconnect
            rt = sorted(app.resume_t)
            out({"type": "snap", "t": time.time(), "resumed": app.resumed,
                 "not_resumed": sum(1 for s in subs if s.session == 1 and not s.first[1]),
                 "reconnect_ok": sum(1 for t in tasks if t.done() and not t.cancelled() and t.result()),
                 "resume_s": summarize_s(rt), "missing_at_reconnect": gaps_reconnect, "conns_with_gap": conns_gap,
                 "repeated_at_reconnect": dups_reconnect, "missing_within_streams": missing_stream,
                 "missing_total": total_missing + dups_reconnect,
                 "events_received": sum(s.count for s in subs),
                 "min_last": min(s.last for s in subs), "max_last": max(s.last for s in subs),
                 "lost": app.lost, "errors": app.errors})
        elif cmd[0] == "quit":
            break
    app.quitting = True
    for s in subs:
        if s.tr is not None:
            s.tr.abort()
    await asyncio.sleep(0.2)
    out({"type": "bye"})


def summarize_s(v: list[float]) -> dict[str, object]:
    if not v:
        return {"n": 0}
    n = len(v)
    return {"n": n, "p50": round(v[n // 2], 3), "p99": round(v[min(n - 1, int(n * 0.99))], 3), "max": round(v[-1], 3)}


def out(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# -- storm: coordinator ----------------------------------------------------------------------


class StormClients:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, args: argparse.Namespace, port: int) -> tuple[StormClients, dict[str, object]]:
        cmd = ["taskset", "-c", CLIENT_CORE, PYTHON, os.path.abspath(__file__), "_storm_clients", "--port", str(port),
               "--conns", str(args.clients), "--topic", args.topic, "--concurrency", str(args.concurrency),
               "--max-life", str(args.max_life)]
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, limit=16 * 1024 * 1024)
        self = cls(proc)
        ready = await self.read(600)
        return self, ready

    async def read(self, timeout: float = 60) -> dict[str, object]:
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)  # type: ignore[union-attr]
        if not raw:
            raise RuntimeError("storm client process died")
        return json.loads(raw)  # type: ignore[no-any-return]

    async def cmd(self, line: str, timeout: float = 60) -> dict[str, object]:
        self.proc.stdin.write(line.encode() + b"\n")  # type: ignore[union-attr]
        return await self.read(timeout)

    async def quit(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.stdin.write(b"quit\n")  # type: ignore[union-attr]
                self.proc.stdin.close()  # type: ignore[union-attr]
            except (BrokenPipeError, ConnectionResetError):
                pass
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()  # our own child, by PID
            await self.proc.wait()


async def cmd_storm(args: argparse.Namespace) -> None:
    srv = Server(SERVER_CORE, args.server_arg or [],
                 RESULTS / f"server-slow-storm-{time.strftime('%Y%m%d-%H%M%S')}.log").start()
    admin = Admin(srv.admin_port)
    clients: StormClients | None = None
    pub = Publisher(srv.port, 2)
    result: dict[str, object] = {"cmd": "storm", "args": {k: v for k, v in vars(args).items() if k != "fn"}}
    try:
        clients, ready = await StormClients.start(args, srv.port)
        log(f"storm clients ready: {ready}")
        st = await wait_streams(admin, int(ready["ok"]), timeout=120)  # type: ignore[call-overload]
        result["connected"] = ready
        quiet = await wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else None
        await pub.connect()
        st0 = await admin.stats()
        pids = {"server": srv.pid, "coordinator": os.getpid(), "clients": clients.proc.pid}
        cpu = CpuSampler(pids)
        cpu.start()
        loop = asyncio.get_running_loop()
        total = args.before + args.after_max
        pub_task = loop.create_task(pub.run(1 / args.interval, total, ticker_body(args.topic.encode())))
        await asyncio.sleep(args.before)
        pre = await clients.cmd("status")
        log(f"before drop: {pre}")
        # The storm: probe /healthz from here (its own core-1 loop, not the subscribers').
        prober = Prober(admin, period=0.05, rss=srv.rss)
        prober.start()
        t_drop = time.monotonic()
        dropped = await clients.cmd("drop")
        all_resumed_s = None
        deadline = t_drop + args.after_max - 2
        while time.monotonic() < deadline:
            s = await clients.cmd("status")
            if int(s["resumed"]) >= int(ready["ok"]):  # type: ignore[call-overload]
                all_resumed_s = round(time.monotonic() - t_drop, 3)
                break
            await asyncio.sleep(0.05)
        probe = await prober.stop()
        st_storm = await admin.stats()
        log(f"all resumed after {all_resumed_s} s (coordinator clock); probe {probe}")
        pr = await pub_task  # keeps publishing after the storm (--after-max), so gaps later would show too
        # Wait until every client has the last published sequence (bounded).
        end = time.monotonic() + 30
        last_pub = 0
        while time.monotonic() < end:
            s = await clients.cmd("status")
            last_pub = int(s["max_last"])  # type: ignore[call-overload]
            if int(s["min_last"]) >= last_pub:  # type: ignore[call-overload]
                break
            await asyncio.sleep(0.2)
        cpu_res = cpu.stop()
        snap = await clients.cmd("snap", timeout=120)
        st1 = await admin.stats()
        missing = int(snap["missing_total"])  # type: ignore[call-overload]
        verdict = []
        if all_resumed_s is None:
            verdict.append(f"{int(ready['ok']) - int(snap['resumed'])} clients not resumed")  # type: ignore[call-overload]
        if missing:
            verdict.append(f"{missing} events missing")
        result.update({
            "clients": ready["ok"], "streams_open_before": st["streams_open"], "before_window": quiet,
            "publisher": pr, "status_before_drop": pre, "dropped": dropped,
            "all_resumed_s": all_resumed_s, "resume_s_per_client": snap["resume_s"],
            "missing_total": missing, "clients_snapshot": snap,
            "paced_during_storm": int(st_storm.get("paced", 0)) - int(st0.get("paced", 0)),  # type: ignore[call-overload]
            "paced_total": st1.get("paced"),
            "healthz_during_storm": probe, "cpu": cpu_res, "server": stats_delta(st0, st1),
            "server_stats_keys": {k: st1.get(k) for k in ("events_replayed", "resets", "slow_closed", "streams_open",
                                                           "responses")},
            "verdict": verdict or "ok",
        })
    finally:
        pub.close()
        if clients is not None:
            await clients.quit()
        admin.close()
        srv.stop()
        result["server_log_problems"] = srv.problems()[:20]
    emit(KIND, result)


# -- cli --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("stalled", help="stalled readers next to normal subscribers on one topic")
    p.add_argument("--stalled", type=int, default=1000)
    p.add_argument("--normal", type=int, default=5000)
    p.add_argument("--rate", type=float, default=100)
    p.add_argument("--size", type=int, default=200, help="event data bytes")
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--sample", type=int, default=200, help="normal subscribers that parse latency")
    p.add_argument("--rcvbuf", type=int, default=4096, help="SO_RCVBUF of the stalled readers")
    p.add_argument("--topic", default="ticker")
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--pub-conns", type=int, default=4)
    p.add_argument("--count", default="seq")
    p.add_argument("--quiet-wait", type=float, default=30)
    p.add_argument("--server-arg", action="append", help="extra gateway argument (repeatable)")

    p = sub.add_parser("storm", help="drop every client at once and resume with Last-Event-ID")
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--interval", type=float, default=0.01, help="one event every this many seconds")
    p.add_argument("--before", type=float, default=8, help="publishing seconds before the drop")
    p.add_argument("--after-max", type=float, default=40, help="publishing seconds after the drop (at most)")
    p.add_argument("--concurrency", type=int, default=10_000, help="reconnects in flight at once")
    p.add_argument("--topic", default="ticker")
    p.add_argument("--quiet-wait", type=float, default=30)
    p.add_argument("--max-life", type=float, default=900)
    p.add_argument("--server-arg", action="append", help="extra gateway argument (repeatable)")

    p = sub.add_parser("_storm_clients", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, required=True)
    p.add_argument("--topic", default="ticker")
    p.add_argument("--concurrency", type=int, default=10_000)
    p.add_argument("--max-life", type=float, default=900)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import uvloop

    if args.cmd == "_storm_clients":
        uvloop.run(storm_clients_main(args))
        return 0
    pin_self()
    fn = {"stalled": cmd_stalled, "storm": cmd_storm}[args.cmd]
    uvloop.run(fn(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
