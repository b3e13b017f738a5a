"""Send-buffer sizing for far clients: one TCP stream's throughput over a real link, and the
kernel send memory one stalled reader holds, for fixed SO_SNDBUF sizes, kernel autotuning, and
autotuning + TCP_NOTSENT_LOWAT.  Plain sockets; no gateway involved.

The sending socket is made the way the gateway makes its streams: accepted from a listener,
then the option set, then non-blocking writes of 64 KiB until EAGAIN and a wait for
writability (the gateway's transport does the same through epoll).

Links (network namespaces of our own, joined by ``tests/netlink.py``; all removed at the end):

- ``rtt100``: TUN pair + user-space packet delay line, 50 ms each way (RTT 100 ms), no rate
  limit (the delay line's CPU is the ceiling);
- ``tbf50``: veth with ``tc tbf`` 50 Mbit/s on the sender's side, no added delay;
- ``tbf50rtt100``: both: a 50 Mbit/s bottleneck 100 ms away (a far client on a good line).

Stalled reader (``--stall-seconds``, default 5): the reader sets SO_RCVBUF 4096 before
connecting and never reads; the sender writes non-blocking until EAGAIN, again on each
writability, for that long.  Reported: bytes write() accepted, and for the sender's socket
``ss -tmi`` skmem ``w`` (wmem_queued: every byte the kernel holds for sending, sent-unacked and
unsent) and ``tb`` (the send buffer size), plus ``notsent`` (SIOCOUTQNSD).  Paths: ``lo``
(loopback inside a namespace, MTU 64 KiB, as in the benches) and ``veth`` (MTU 1500).
``warm``: on ``tbf50rtt100``, the reader reads at full speed for 3 s (so autotuning grows the
buffers as it would for a real far client), then stops reading; counted from the stop.

Run (root; ~6 minutes; every process pinned: this one and the sockets to core 0, the delay
line to core 1)::

    taskset -c 0 .venv/bin/python bench/sndbuf.py
    taskset -c 0 .venv/bin/python bench/sndbuf.py --links tbf50rtt100 --seconds 6 --configs sndbuf=128K auto lowat=64K

Prints a table and appends one JSON line to ``bench/results/sndbuf.jsonl``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import select
import socket
import struct
import sys
import termios
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import netlink  # noqa: E402

TCP_NOTSENT_LOWAT = 25
SIOCOUTQNSD = 0x894B
CHUNK = 64 * 1024
DEFAULT_CONFIGS = [
    "sndbuf=128K",
    "sndbuf=256K",
    "sndbuf=512K",
    "sndbuf=1M",
    "auto",
    "lowat=16K",
    "lowat=64K",
    "lowat=128K",
]
LINKS = {
    "rtt100": {"delay_ms": 50.0},
    "tbf50": {"rate_mbit": 50.0},
    "tbf50rtt100": {"delay_ms": 50.0, "rate_mbit": 50.0},
    "tbf200rtt100": {"delay_ms": 50.0, "rate_mbit": 200.0},  # not in the default run
}
DEFAULT_LINKS = ["rtt100", "tbf50", "tbf50rtt100"]


def size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KM]?)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20}[m.group(2)]


def apply(sock: socket.socket, config: str) -> None:
    """``sndbuf=N``: fixed SO_SNDBUF (the kernel doubles it, autotuning off); ``auto``: nothing;
    ``lowat=N``: autotuning plus TCP_NOTSENT_LOWAT."""
    kind, _, value = config.partition("=")
    if kind == "sndbuf":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size(value))
    elif kind == "lowat":
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, size(value))
    elif kind != "auto":
        raise ValueError(config)


def ss_info(ns: netlink.Netns, port: int) -> dict[str, float]:
    """skmem and a few tcp_info fields of the sender's socket (local port ``port``)."""
    text = ns.ss("state", "established", f"( sport = :{port} )")
    out: dict[str, float] = {}
    m = re.search(r"skmem:\(([^)]*)\)", text)
    if m:
        for part in m.group(1).split(","):
            k = re.match(r"[a-z]+", part).group(0)  # type: ignore[union-attr]
            out[k] = float(part[len(k) :])
    for key in ("cwnd", "rtt", "notsent", "unacked"):
        m = re.search(rf"\b{key}:([\d.]+)", text)
        if m:
            out[key] = float(m.group(1))
    return out


def outq(sock: socket.socket) -> tuple[int, int]:
    """(bytes not yet acked or sent, bytes not yet sent) in the socket's send queue."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    total = struct.unpack("i", buf)[0]
    buf = fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, struct.pack("i", 0))
    return total, struct.unpack("i", buf)[0]


def pump_writes(sock: socket.socket, until: float, stop: threading.Event | None = None) -> int:
    """Write 64 KiB chunks non-blocking until EAGAIN, wait for writability, repeat until
    ``until``; returns the bytes write() accepted."""
    sock.setblocking(False)
    data = memoryview(b"x" * CHUNK)
    sent = 0
    for _ in range(50_000_000):  # bounded: ends at ``until`` long before this
        now = time.monotonic()
        if now >= until or (stop is not None and stop.is_set()):
            break
        try:
            sent += sock.send(data)
            continue
        except BlockingIOError:
            pass
        except OSError:
            break
        select.select([], [sock], [], min(0.05, max(0.0, until - now)))
    return sent


class Reader(threading.Thread):
    """Reads as fast as it can until ``stop_at`` (the socket stays open, unread, after that);
    ``samples`` holds (t, total bytes) after every read."""

    def __init__(self, sock: socket.socket, stop_at: float) -> None:
        super().__init__(daemon=True)
        self.sock, self.stop_at = sock, stop_at
        self.total = 0
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        self.sock.settimeout(0.2)
        buf = bytearray(1 << 20)
        for _ in range(10_000_000):
            now = time.monotonic()
            if now >= self.stop_at:
                break
            try:
                n = self.sock.recv_into(buf)
            except TimeoutError:
                continue
            except OSError:
                break
            if not n:
                break
            self.total += n
            self.samples.append((time.monotonic(), self.total))

    def rate_mbit(self, t0: float, t1: float) -> float:
        def at(t: float) -> int:
            best = 0
            for ts, total in self.samples:
                if ts > t:
                    break
                best = total
            return best

        return (at(t1) - at(t0)) * 8 / (t1 - t0) / 1e6


def pair(
    server: netlink.Netns, client: netlink.Netns, host: str, rcvbuf: int | None = None
) -> tuple[socket.socket, socket.socket, socket.socket]:
    ls = server.new_socket()
    ls.bind((host, 0))
    ls.listen(4)
    c = client.connect(host, ls.getsockname()[1], rcvbuf=rcvbuf)
    ls.settimeout(10)
    s, _ = ls.accept()
    return ls, s, c


def throughput(
    server: netlink.Netns, client: netlink.Netns, host: str, config: str, seconds: float, warmup: float
) -> dict[str, object]:
    ls, s, c = pair(server, client, host)
    try:
        apply(s, config)
        t0 = time.monotonic()
        reader = Reader(c, t0 + seconds + 1.0)
        reader.start()
        stop = threading.Event()
        peak = {"w": 0.0, "tb": 0.0}

        def sample() -> None:
            for _ in range(int(seconds) + 2):
                if stop.wait(1.0):
                    break
                info = ss_info(server, s.getsockname()[1])
                for k in peak:
                    peak[k] = max(peak[k], info.get(k, 0.0))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        sent = pump_writes(s, t0 + seconds)
        info = ss_info(server, s.getsockname()[1])
        stop.set()
        sampler.join(5)
        reader.join(seconds + 5)
        return {
            "config": config,
            "mbit": round(reader.rate_mbit(t0 + warmup, t0 + seconds), 2),
            "mbit_first_s": round(reader.rate_mbit(t0, t0 + 1.0), 2),
            "sent": sent,
            "tb_end": info.get("tb"),
            "w_peak": peak["w"],
            "tb_peak": peak["tb"],
            "cwnd_end": info.get("cwnd"),
            "rtt_end_ms": info.get("rtt"),
        }
    finally:
        for x in (c, s, ls):
            x.close()


def stalled(
    server: netlink.Netns, client: netlink.Netns, host: str, config: str, seconds: float, warm: float = 0.0
) -> dict[str, object]:
    """``warm`` = 0: the reader never reads (SO_RCVBUF 4096); else it reads for ``warm`` s first."""
    ls, s, c = pair(server, client, host, rcvbuf=None if warm else 4096)
    try:
        apply(s, config)
        if warm:
            reader = Reader(c, time.monotonic() + warm)
            reader.start()
            pump_writes(s, time.monotonic() + warm)
            reader.join(5)
        t0 = time.monotonic()
        sent = pump_writes(s, t0 + seconds)
        info = ss_info(server, s.getsockname()[1])
        unacked_or_unsent, unsent = outq(s)
        return {
            "config": config,
            "accepted": sent,
            "w": info.get("w"),
            "tb": info.get("tb"),
            "notsent": unsent,
            "outq": unacked_or_unsent,
        }
    finally:
        for x in (c, s, ls):
            x.close()


def kib(n: object) -> str:
    return "-" if n is None else f"{float(n) / 1024:,.0f}"  # type: ignore[arg-type]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--links", nargs="*", default=DEFAULT_LINKS, choices=list(LINKS))
    ap.add_argument(
        "--configs", nargs="*", default=DEFAULT_CONFIGS, help="sndbuf=SIZE | auto | lowat=SIZE (SIZE: bytes, nK, nM)"
    )
    ap.add_argument("--seconds", type=float, default=8.0, help="per throughput run")
    ap.add_argument("--warmup", type=float, default=2.0, help="not counted in the rate")
    ap.add_argument("--stall-seconds", type=float, default=5.0)
    ap.add_argument("--stall-paths", nargs="*", default=["lo", "veth", "warm"], choices=["lo", "veth", "warm"])
    ap.add_argument("--delay-cpus", default="1", help="taskset CPUs for the delay line ('' = none)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sndbuf.jsonl"))
    args = ap.parse_args()
    for cfg in args.configs:
        kind, _, value = cfg.partition("=")
        if kind not in ("sndbuf", "lowat", "auto") or (kind != "auto" and not re.fullmatch(r"\d+[KM]?", value)):
            ap.error(f"bad config {cfg!r}")
    why = netlink.available()
    if why:
        print(f"skipped: {why}", file=sys.stderr)
        return 2
    if args.delay_cpus:
        os.environ["NETLINK_DELAY_CPUS"] = args.delay_cpus
    started = time.time()
    result: dict[str, object] = {
        "ts": started,
        "cpus": os.sched_getaffinity(0).__repr__(),
        "delay_cpus": args.delay_cpus,
        "tcp_wmem": open("/proc/sys/net/ipv4/tcp_wmem").read().split(),
        "cc": open("/proc/sys/net/ipv4/tcp_congestion_control").read().strip(),
        "seconds": args.seconds,
        "warmup": args.warmup,
        "throughput": {},
        "stalled": {},
    }
    with netlink.Net() as net:
        srv, cli = net.ns("snd"), net.ns("rcv")
        links = {
            name: net.link(srv, cli, **LINKS[name])
            for name in sorted(
                set(args.links)
                | ({"tbf50"} if "veth" in args.stall_paths else set())
                | ({"tbf50rtt100"} if "warm" in args.stall_paths else set())
            )
        }
        for name in args.links:
            rows = []
            for cfg in args.configs:
                row = throughput(srv, cli, links[name].a_ip, cfg, args.seconds, args.warmup)
                rows.append(row)
                print(f"  {name:12} {cfg:12} {row['mbit']:8.2f} Mbit/s", file=sys.stderr, flush=True)
            result["throughput"][name] = rows  # type: ignore[index]
        paths = {
            "lo": (srv, srv, "127.0.0.1", 0.0),
            "veth": (srv, cli, links.get("tbf50") and links["tbf50"].a_ip, 0.0),
            "warm": (srv, cli, links.get("tbf50rtt100") and links["tbf50rtt100"].a_ip, 3.0),
        }
        for path in args.stall_paths:
            a, b, host, warm = paths[path]
            rows = []
            for cfg in args.configs:
                row = stalled(a, b, host, cfg, args.stall_seconds, warm)  # type: ignore[arg-type]
                rows.append(row)
                print(
                    f"  stalled {path:5} {cfg:12} accepted {kib(row['accepted'])} KiB w {kib(row['w'])} KiB",
                    file=sys.stderr,
                    flush=True,
                )
            result["stalled"][path] = rows  # type: ignore[index]
        result["delay_lines"] = net.destroy()
    result["elapsed_s"] = round(time.time() - started, 1)
    print_table(result, args.configs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    return 0


def print_table(result: dict, configs: list[str]) -> None:
    tp, st = result["throughput"], result["stalled"]
    head = ["config"] + [f"{n} Mbit/s" for n in tp] + [f"stall {p} accepted/w/tb KiB" for p in st]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for i, cfg in enumerate(configs):
        cells = [cfg] + [f"{tp[n][i]['mbit']:.1f}" for n in tp]
        cells += [f"{kib(st[p][i]['accepted'])} / {kib(st[p][i]['w'])} / {kib(st[p][i]['tb'])}" for p in st]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
