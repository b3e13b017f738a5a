"""Subscribers behind real links: per class of client (its own namespace and link: a ``tc tbf``
rate shared by the class, and/or a 100 ms RTT through the packet delay line of
``tests/netlink.py``), what a publisher's steady rate plus bursts does to delivery.

Set-up.  The gateway runs in a namespace of its own (``ip netns exec``, pinned with
``taskset -c --server-core``), ``--max-buffer 256KiB --slow-consumer drop --history-size
--history`` and the usual bench flags.  Each class ``NAME:COUNT:MBIT:DELAY_MS[:stall]`` gets a
namespace and one link to the gateway's (MBIT 0 = no rate limit; the class's streams share the
link, so each gets about MBIT/COUNT; DELAY_MS each way).  Its streams live in one child process
(``reallink.py _clients``, pinned to ``--client-core``) that reads as fast as it can and, like an
EventSource, reconnects with ``Last-Event-ID`` after the gateway ends a stream; ``stall``
streams set SO_RCVBUF 4096 and never read.  The publisher (this process, inside the gateway's
namespace over loopback) posts ``--rate`` events/s of ``--size`` bytes every 50 ms, plus
``--burst`` events at once every ``--burst-every`` s, for ``--duration`` s; each event's data is
``{"t": publish time, "k": sequence, "p": padding}``.  Then up to ``--settle`` s for the
clients to catch up.

Printed per class: streams, events delivered (unique), ``lost`` (sequence numbers missing
before the newest one a stream got, without an ``ssegw.reset`` that covers them -- a contract
violation), ``skipped`` (covered by a reset), ``behind`` (not yet received at the end),
``dup``/``order`` (repeats, reordering), ``dropped`` (streams the gateway ended), resets, and
latency p50/p99 (receive time - publish time, every event, replays included).  For the
gateway: RSS base/max/last, the kernel send memory of its sockets (``ss`` skmem ``w``) max,
``/admin/stats`` ``slow_closed``.  Appends one JSON line to ``bench/results/reallink.jsonl``.

    # "before": the old code in /work/wt-old
    taskset -c 1 .venv/bin/python bench/reallink.py --code /work/wt-old
    taskset -c 1 .venv/bin/python bench/reallink.py --duration 8 --settle 5   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import netlink  # noqa: E402

DEFAULT_CLASSES = ["near:20:0:0", "far:2:100:50", "slow:10:2:0", "stalled:10:0:0:stall"]
EVENT = re.compile(rb'"t":([0-9.]+),"k":(\d+)')


# -- the client process ---------------------------------------------------------------------------


class Stream(asyncio.Protocol):
    """One subscriber: de-chunks, splits events, records sequence numbers and latency."""

    def __init__(self, app: Clients, idx: int) -> None:
        self.app, self.idx = app, idx
        self.transport: asyncio.Transport | None = None
        self.head = True
        self.raw = bytearray()
        self.text = bytearray()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.app.stall:
            transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.raw += data
        if self.head:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.raw[9:12]
            if status != b"200":
                self.app.bad_status += 1
                self.transport.close()  # type: ignore[union-attr]
                return
            del self.raw[: end + 4]
            self.head = False
        self._dechunk()
        self._events()

    def _dechunk(self) -> None:
        raw = self.raw
        pos = 0
        while True:
            i = raw.find(b"\r\n", pos)
            if i < 0:
                break
            size = int(raw[pos:i].split(b";")[0], 16)
            if size == 0 or len(raw) < i + 4 + size:
                break
            self.text += raw[i + 2 : i + 2 + size]
            pos = i + 4 + size
        del raw[:pos]

    def _events(self) -> None:
        text = self.text
        end = text.rfind(b"\n\n")
        if end < 0:
            return
        now = time.time()
        st = self.app.state[self.idx]
        for block in bytes(text[:end]).split(b"\n\n"):
            if b"event: ssegw.reset" in block:
                st["resets"] += 1
                st["reset_pending"] = True
                continue
            m = EVENT.search(block)
            if m is None:
                continue
            i = block.find(b"id: ")
            if i >= 0:
                st["last_id"] = block[i + 4 : block.index(b"\n", i) if b"\n" in block[i:] else len(block)].decode()
            self.app.event(st, float(m.group(1)), int(m.group(2)), now)
        del text[: end + 2]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(True)


class Clients:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stall = args.stall
        self.bad_status = 0
        self.failed_connects = 0
        self.lat: list[float] = []
        self.state = [
            {
                "seen": set(),
                "max": -1,
                "dup": 0,
                "order": 0,
                "gaps": [],
                "resets": 0,
                "reset_pending": False,
                "drops": 0,
                "last_id": None,
                "events": 0,
            }
            for _ in range(args.count)
        ]
        self.final = -1
        self.done = asyncio.Event()

    def event(self, st: dict, t: float, k: int, now: float) -> None:
        st["events"] += 1
        if k in st["seen"]:
            st["dup"] += 1
            return
        if k < st["max"]:
            st["order"] += 1
        elif k > st["max"] + 1 and st["max"] >= 0:
            # a gap: allowed only right after a reset (history no longer covered it)
            st["gaps"].append((st["max"] + 1, k - 1, st["reset_pending"]))
        st["reset_pending"] = False
        st["seen"].add(k)
        st["max"] = max(st["max"], k)
        if len(self.lat) < 2_000_000:
            self.lat.append(now - t)

    async def run_one(self, idx: int) -> None:
        loop = asyncio.get_running_loop()
        a = self.args
        st = self.state[idx]
        for _ in range(a.max_sessions):
            hdr = f"Last-Event-ID: {st['last_id']}\r\n" if st["last_id"] else ""
            req = (
                f"GET /events?topic={a.topic} HTTP/1.1\r\nHost: {a.host}\r\nAccept: text/event-stream\r\n{hdr}\r\n"
            ).encode()
            sock = socket.socket()
            if a.stall:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (a.host, a.port)), 10)
                _, proto = await loop.create_connection(lambda: Stream(self, idx), sock=sock)
            except (TimeoutError, OSError):
                sock.close()
                self.failed_connects += 1
                await asyncio.sleep(0.5)
                continue
            proto.transport.write(req)  # type: ignore[union-attr]
            done = asyncio.ensure_future(self.done.wait())
            await asyncio.wait([proto.closed, done], return_when=asyncio.FIRST_COMPLETED)
            if self.done.is_set():
                done.cancel()
                if a.stall and not proto.closed.done():
                    # did the gateway end it?  Read what is queued: its FIN follows (3 s at most)
                    proto.transport.resume_reading()  # type: ignore[union-attr]
                    try:
                        await asyncio.wait_for(asyncio.shield(proto.closed), 3)
                    except TimeoutError:
                        pass
                    if proto.closed.done():
                        st["drops"] += 1
                proto.transport.close()  # type: ignore[union-attr]
                return
            done.cancel()
            st["drops"] += 1
            if a.stall:
                return
            await asyncio.sleep(0.05)

    async def commands(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line or line.startswith(b"quit"):
                break
            if line.startswith(b"final "):
                self.final = int(line.split()[1])
        self.done.set()

    async def main(self) -> dict:
        tasks = [asyncio.ensure_future(self.run_one(i)) for i in range(self.args.count)]
        print(json.dumps({"type": "ready"}), flush=True)
        try:
            await asyncio.wait_for(self.commands(), self.args.max_life)
        except TimeoutError:
            self.done.set()
        await asyncio.wait(tasks, timeout=5)
        return self.report()

    def report(self) -> dict:
        lost = skipped = behind = dup = order = resets = drops = events = 0
        for st in self.state:
            for lo, hi, covered in st["gaps"]:
                if covered:
                    skipped += hi - lo + 1
                else:
                    lost += hi - lo + 1
            if self.final >= 0 and not self.stall:
                behind += max(0, self.final - st["max"])
            dup += st["dup"]
            order += st["order"]
            resets += st["resets"]
            drops += st["drops"]
            events += len(st["seen"])
        lat = sorted(self.lat)

        def q(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None

        return {
            "type": "report",
            "streams": len(self.state),
            "delivered": events,
            "lost": lost,
            "skipped": skipped,
            "behind": behind,
            "dup": dup,
            "order": order,
            "dropped": drops,
            "resets": resets,
            "bad_status": self.bad_status,
            "failed_connects": self.failed_connects,
            "p50_ms": q(0.5),
            "p99_ms": q(0.99),
            "max_ms": q(1.0),
        }


def clients_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="reallink.py _clients")
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topic", default="feed")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--stall", action="store_true")
    ap.add_argument("--max-sessions", type=int, default=50)
    ap.add_argument("--max-life", type=float, default=300)
    args = ap.parse_args(argv)
    out = asyncio.run(Clients(args).main())
    print(json.dumps(out), flush=True)
    return 0


# -- the coordinator -----------------------------------------------------------------------------


class Class:
    def __init__(self, spec: str) -> None:
        parts = spec.split(":")
        if len(parts) not in (4, 5) or (len(parts) == 5 and parts[4] != "stall"):
            raise argparse.ArgumentTypeError(f"class {spec!r}: NAME:COUNT:MBIT:DELAY_MS[:stall]")
        self.spec = spec
        self.name, self.count, self.mbit, self.delay = parts[0], int(parts[1]), float(parts[2]), float(parts[3])
        self.stall = len(parts) == 5
        self.proc: subprocess.Popen[str] | None = None
        self.report: dict = {}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Gateway:
    """``ssegw serve`` in ``ns``; ``code``: the checkout to run (its ``ssegw`` package)."""

    def __init__(self, ns: netlink.Netns, code: str, core: str, extra: list[str], log: Path) -> None:
        self.ns = ns
        env = dict(os.environ, PYTHONSAFEPATH="1", PYTHONPATH=code)
        for k in list(env):
            if k.startswith("SSEGW_"):
                del env[k]
        cmd = [
            "taskset",
            "-c",
            core,
            *ns.prefix,
            sys.executable,
            "-m",
            "ssegw",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--admin-host",
            "127.0.0.1",
            "--admin-port",
            "0",
            *extra,
        ]
        self.log = open(log, "w")  # noqa: SIM115 - kept open for the process's life
        self.proc = subprocess.Popen(
            cmd, cwd="/", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.port = self.admin_port = 0
        deadline = time.monotonic() + 20
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.write(line)
            m = re.search(r"serving on http://[^:]+:(\d+) \(admin http://[^:]+:(\d+)\)", line)
            if m:
                self.port, self.admin_port = int(m.group(1)), int(m.group(2))
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.stop()
        raise RuntimeError(f"gateway did not start; see {log}")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.write(line)

    def request(
        self, method: str, path: str, body: bytes = b"", admin: bool = False, timeout: float = 10
    ) -> tuple[int, bytes]:
        with netlink.entered(self.ns.name):
            s = socket.create_connection(("127.0.0.1", self.admin_port if admin else self.port), timeout=timeout)
        with s:
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            s.sendall(head + body)
            buf = bytearray()
            for _ in range(100_000):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        head_b, _, rest = bytes(buf).partition(b"\r\n\r\n")
        return int(head_b.split(b" ")[1]), rest

    def stats(self) -> dict:
        status, body = self.request("GET", "/admin/stats", admin=True)
        return json.loads(body)["workers"][0] if status == 200 else {}

    def kernel_send_bytes(self) -> int:
        text = self.ns.ss(f"( sport = :{self.port} )")  # every state: orphans (FIN-WAIT) hold data too
        return sum(int(m.group(1)) for m in re.finditer(r"skmem:\([^)]*?\bw(\d+)", text))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def publish_loop(g: Gateway, args: argparse.Namespace, stop_at: float, out: dict) -> None:
    """Steady ``rate`` every 50 ms plus a burst every ``burst_every`` s until ``stop_at``."""
    pad = "x" * max(0, args.size - 40)
    seq = 0
    errors = 0
    latencies: list[float] = []
    t0 = time.monotonic()
    next_burst = t0 + args.burst_every
    per_tick = args.rate * 0.05
    owed = 0.0
    for tick in range(int((stop_at - t0) / 0.05) + 2):
        now = time.monotonic()
        if now >= stop_at:
            break
        owed += per_tick
        n = int(owed)
        owed -= n
        if args.burst and now >= next_burst:
            n += args.burst
            next_burst += args.burst_every
        while n > 0:
            k = min(n, 500)
            t = time.time()
            body = json.dumps(
                [{"topic": args.topic, "data": {"t": t, "k": seq + i, "p": pad}} for i in range(k)],
                separators=(",", ":"),
            ).encode()
            a = time.monotonic()
            try:
                status, _ = g.request("POST", "/publish", body)
            except OSError:
                status = 0
            latencies.append(time.monotonic() - a)
            if status == 200:
                seq += k
            else:
                errors += 1
            n -= k
        time.sleep(max(0.0, t0 + (tick + 1) * 0.05 - time.monotonic()))
    latencies.sort()
    out.update(
        published=seq,
        publish_errors=errors,
        publish_rtt_p99_ms=round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 1) if latencies else None,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--code", default=str(ROOT), help="checkout whose ssegw runs (default: this one)")
    ap.add_argument(
        "--classes",
        nargs="*",
        type=Class,
        default=None,
        help=f"NAME:COUNT:MBIT:DELAY_MS[:stall] (default: {' '.join(DEFAULT_CLASSES)})",
    )
    ap.add_argument("--rate", type=float, default=200, help="steady events/s")
    ap.add_argument("--size", type=int, default=512, help="bytes of data per event")
    ap.add_argument("--burst", type=int, default=4000, help="events per burst (0 = none)")
    ap.add_argument("--burst-every", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--settle", type=float, default=10.0, help="max s for clients to catch up after publishing")
    ap.add_argument("--history", type=int, default=5000, help="--history-size of the gateway")
    ap.add_argument("--max-buffer", default="256KiB")
    ap.add_argument("--gateway-args", default="", help="more gateway flags (one string)")
    ap.add_argument("--server-core", default="0")
    ap.add_argument("--client-core", default="1")
    ap.add_argument("--topic", default="feed")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "reallink.jsonl"))
    args = ap.parse_args()
    classes: list[Class] = args.classes or [Class(s) for s in DEFAULT_CLASSES]
    if sum(c.count for c in classes) > 5000 or args.duration > 600 or args.settle > 120:
        ap.error("bounded: at most 5000 streams, --duration 600, --settle 120")
    why = netlink.available()
    if why:
        print(f"skipped: {why}", file=sys.stderr)
        return 2
    os.environ["NETLINK_DELAY_CPUS"] = args.client_core
    results = Path(args.out).parent
    results.mkdir(parents=True, exist_ok=True)
    code_rev = subprocess.run(
        ["git", "-C", args.code, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "-C", args.code, "status", "--porcelain", "ssegw"], capture_output=True, text=True
        ).stdout.strip()
    )
    row: dict = {
        "ts": time.time(),
        "loadavg_before": open("/proc/loadavg").read().split()[:3],
        "label": args.label,
        "code": args.code,
        "rev": code_rev,
        "dirty": dirty,
        "argv": sys.argv[1:],
        "classes": [c.spec for c in classes],
    }
    extra = [
        "--max-buffer",
        args.max_buffer,
        "--slow-consumer",
        "drop",
        "--history-size",
        str(args.history),
        "--flush-interval",
        "15ms",
        "--heartbeat-interval",
        "15s",
        "--drain-timeout",
        "1s",
        *args.gateway_args.split(),
    ]
    with netlink.Net() as net:
        gns = net.ns("gw")
        links = []
        for c in classes:
            ns = net.ns(c.name[:8])
            links.append((c, ns, net.link(gns, ns, delay_ms=c.delay, rate_mbit=c.mbit or None)))
        g = Gateway(gns, args.code, args.server_core, extra, results / "reallink-gateway.log")
        try:
            for c, ns, lk in links:
                cmd = [
                    "taskset",
                    "-c",
                    args.client_core,
                    *ns.prefix,
                    sys.executable,
                    os.path.abspath(__file__),
                    "_clients",
                    "--host",
                    lk.a_ip,
                    "--port",
                    str(g.port),
                    "--topic",
                    args.topic,
                    "--count",
                    str(c.count),
                    "--max-life",
                    str(args.duration + args.settle + 60),
                ]
                c.proc = subprocess.Popen(
                    cmd + (["--stall"] if c.stall else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
                assert c.proc.stdout is not None
                c.proc.stdout.readline()
            want = sum(c.count for c in classes)
            for _ in range(100):
                st = g.stats()
                if st.get("streams_open", st.get("streams", want)) >= want:
                    break
                time.sleep(0.1)
            time.sleep(0.5)
            base = rss_kib(g.proc.pid)
            rss_max, kern_max = base, 0
            pub: dict = {}
            stop_at = time.monotonic() + args.duration
            th = threading.Thread(target=publish_loop, args=(g, args, stop_at, pub), daemon=True)
            th.start()
            for _ in range(int(args.duration * 2) + 2):
                if not th.is_alive():
                    break
                time.sleep(0.5)
                rss_max = max(rss_max, rss_kib(g.proc.pid))
                kern_max = max(kern_max, g.kernel_send_bytes())
            th.join(args.settle + 30)
            final = pub.get("published", 0) - 1
            for c in classes:
                assert c.proc is not None and c.proc.stdin is not None
                c.proc.stdin.write(f"final {final}\n")
                c.proc.stdin.flush()
            settle_end = time.monotonic() + args.settle
            # settle: wait for catch-up (the clients print once told to quit); sample meanwhile
            while time.monotonic() < settle_end:
                time.sleep(0.5)
                rss_max = max(rss_max, rss_kib(g.proc.pid))
                kern_max = max(kern_max, g.kernel_send_bytes())
            stats = g.stats()
            rss_last = rss_kib(g.proc.pid)
            for c in classes:
                assert c.proc is not None and c.proc.stdin is not None and c.proc.stdout is not None
                c.proc.stdin.write("quit\n")
                c.proc.stdin.flush()
            for c in classes:
                assert c.proc is not None and c.proc.stdout is not None
                try:
                    out, _ = c.proc.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    out, _ = c.proc.communicate(timeout=5)
                lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
                c.report = next((x for x in lines if x.get("type") == "report"), {"error": "no report"})
        finally:
            for c in classes:
                if c.proc is not None and c.proc.poll() is None:
                    c.proc.kill()
                    c.proc.wait(5)
            g.stop()
    row.update(pub)
    row["gateway"] = {
        "rss_base_mib": round(base / 1024, 1),
        "rss_max_mib": round(rss_max / 1024, 1),
        "rss_last_mib": round(rss_last / 1024, 1),
        "kernel_send_max_mib": round(kern_max / 2**20, 1),
        "slow_closed": stats.get("slow_closed"),
        "streams_end": stats.get("streams_open"),
    }
    row["per_class"] = {c.name: c.report for c in classes}
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print_table(row, classes)
    return 0


def print_table(row: dict, classes: list[Class]) -> None:
    print(
        f"code {row['code']} ({row['rev']}{', dirty' if row['dirty'] else ''}); published {row.get('published')} "
        f"events ({row.get('publish_errors')} failed requests); gateway {row['gateway']}"
    )
    cols = [
        "streams",
        "delivered",
        "lost",
        "skipped",
        "behind",
        "dup",
        "order",
        "dropped",
        "resets",
        "p50_ms",
        "p99_ms",
    ]
    print("| class | link | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for c in classes:
        link = (f"{c.mbit:g} Mbit/s shared" if c.mbit else "no limit") + (
            f", RTT {2 * c.delay:g} ms" if c.delay else ""
        )
        link += ", never reads" if c.stall else ""
        print(f"| {c.name} | {link} | " + " | ".join(str(c.report.get(k, "-")) for k in cols) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_clients":
        sys.exit(clients_main(sys.argv[2:]))
    sys.exit(main())
