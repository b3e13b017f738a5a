"""Real links for the tests and benches: network namespaces joined by a veth pair with a
``tc tbf`` rate limit, or by a TUN pair with a user-space packet delay line (netem is not
available on this machine).

Why packets and not a TCP relay: a relay that accepts the gateway's connection terminates TCP,
so the gateway's socket sees the relay's loopback RTT (~50 us), its window and its ACKs; the
delay then sits between the relay and the client, where no gateway setting can see it.  The
effects this module is for (a send buffer capping throughput at SNDBUF/RTT, a stalled client
holding kernel memory) live in the *gateway's* TCP socket, so the delay has to be on the
packets that socket sends and the ACKs it receives.  The delay line reads whole IP packets
from a TUN device in one namespace, holds each ``delay_ms`` and writes it into the TUN device
of the other namespace (both directions): the TCP end points see a real 2 x ``delay_ms`` RTT.
``tbf`` on the sending side's TUN (or veth) device is the bottleneck link's queue and rate.

Everything made here has a unique name (``rl`` + 6 hex digits), lives in namespaces made here,
uses 10.x addresses only inside them, and is removed by ``destroy()``: the delay process is
stopped by its PID (its TUN devices vanish with it), then the namespaces are deleted (their
veths and qdiscs with them).  The delay process also exits on its own after ``max_seconds``
or when its parent dies.  Needs root, iproute2 and /dev/net/tun (``available()``).

Run as a script, this file is the delay line itself:
``python netlink.py delay --a NS:IF --b NS:IF --delay-ms 50 --max-seconds 600``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
#: Packets queued in one direction of the delay line beyond this are dropped (a router's queue
#: is finite too); at 50 ms it is ~10 Gbit/s worth, so it never binds at the rates used here.
MAX_QUEUED_BYTES = 64 << 20

_libc = ctypes.CDLL(None, use_errno=True)


def available() -> str | None:
    """None when namespaces, tbf and TUN can be used here, else why not (for ``pytest.skip``)."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, capture_output=True, text=True, timeout=15)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the body with this *thread* in network namespace ``ns``.  A socket keeps the
    namespace it was created in, so sockets made here can be used from anywhere afterwards."""
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        _setns(f"/run/netns/{ns}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - cannot happen as root
                raise OSError(ctypes.get_errno(), "setns back failed")
    finally:
        os.close(own)


def tbf(ns: str, dev: str, rate_mbit: float, queue_ms: float = 50.0, mtu: int = 1500) -> None:
    """A ``rate_mbit`` bottleneck on ``dev``'s egress with ``queue_ms`` of queue (tail drop).

    burst: at least 4 ms at the rate (the kernel's timer granularity) and 2 MTUs."""
    rate_bps = rate_mbit * 1e6 / 8
    burst = int(max(2 * mtu + 200, rate_bps * 0.004, 3000))
    run(
        "tc",
        "-n",
        ns,
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        f"{rate_mbit:g}mbit",
        "burst",
        str(burst),
        "latency",
        f"{queue_ms:g}ms",
    )


class Netns:
    """A network namespace of our own, with ``lo`` up."""

    def __init__(self, name: str) -> None:
        self.name = name

    def create(self) -> Netns:
        run("ip", "netns", "add", self.name)
        run("ip", "-n", self.name, "link", "set", "lo", "up")
        return self

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def new_socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        with entered(self.name):
            return socket.socket(family, kind)

    def connect(self, host: str, port: int, timeout: float = 10.0, rcvbuf: int | None = None) -> socket.socket:
        s = self.new_socket()
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(timeout)
        try:
            s.connect((host, port))
        except OSError:
            s.close()
            raise
        return s

    def ss(self, *filt: str) -> str:
        return run("ss", "-N", self.name, "-tmiHn", *filt, check=False).stdout

    def destroy(self) -> None:
        run("ip", "netns", "del", self.name, check=False)


class Link:
    """A point-to-point link from namespace ``a`` (server side, ``a_ip``) to ``b`` (``b_ip``).

    Args:
        delay_ms: one-way delay in each direction (RTT = 2 x delay_ms); 0 = a plain veth.
        rate_mbit: tbf on a's egress (a -> b, the direction the events flow); None = no limit.
        rate_up_mbit: tbf on b's egress; None = no limit.
        mtu: of both ends (1500, as on the Internet).
    """

    def __init__(
        self,
        a: Netns,
        b: Netns,
        tag: str,
        index: int,
        *,
        delay_ms: float = 0.0,
        rate_mbit: float | None = None,
        rate_up_mbit: float | None = None,
        mtu: int = 1500,
        queue_ms: float = 50.0,
        max_seconds: float = 600.0,
    ) -> None:
        self.a, self.b = a, b
        self.a_if, self.b_if = f"rl{tag}a{index}", f"rl{tag}b{index}"
        octet = int(tag[:2], 16) % 200 + 20
        self.a_ip, self.b_ip = f"10.{octet}.{index}.1", f"10.{octet}.{index}.2"
        self.delay_ms, self.rate_mbit, self.rate_up_mbit = delay_ms, rate_mbit, rate_up_mbit
        self.mtu, self.queue_ms, self.max_seconds = mtu, queue_ms, max_seconds
        self.delay_proc: subprocess.Popen[str] | None = None

    def create(self) -> Link:
        if self.delay_ms > 0:
            self._start_delay()
            for ns, dev, me, peer in (
                (self.a, self.a_if, self.a_ip, self.b_ip),
                (self.b, self.b_if, self.b_ip, self.a_ip),
            ):
                run("ip", "-n", ns.name, "addr", "add", me, "peer", f"{peer}/32", "dev", dev)
        else:
            run(
                "ip",
                "link",
                "add",
                self.a_if,
                "netns",
                self.a.name,
                "type",
                "veth",
                "peer",
                "name",
                self.b_if,
                "netns",
                self.b.name,
            )
            run("ip", "-n", self.a.name, "addr", "add", f"{self.a_ip}/30", "dev", self.a_if)
            run("ip", "-n", self.b.name, "addr", "add", f"{self.b_ip}/30", "dev", self.b_if)
        for ns, dev in ((self.a, self.a_if), (self.b, self.b_if)):
            run("ip", "-n", ns.name, "link", "set", dev, "mtu", str(self.mtu), "up")
        if self.rate_mbit:
            tbf(self.a.name, self.a_if, self.rate_mbit, self.queue_ms, self.mtu)
        if self.rate_up_mbit:
            tbf(self.b.name, self.b_if, self.rate_up_mbit, self.queue_ms, self.mtu)
        return self

    def _start_delay(self) -> None:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "delay",
            "--a",
            f"{self.a.name}:{self.a_if}",
            "--b",
            f"{self.b.name}:{self.b_if}",
            "--delay-ms",
            str(self.delay_ms),
            "--max-seconds",
            str(self.max_seconds),
        ]
        cpus = os.environ.get("NETLINK_DELAY_CPUS")  # e.g. "1": pin the delay line (benches)
        if cpus:
            cmd = ["taskset", "-c", cpus, *cmd]
        self.delay_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.delay_proc.stdout is not None
        line = self.delay_proc.stdout.readline()
        if not line.startswith("ready"):
            err = self.delay_proc.stderr.read() if self.delay_proc.stderr else ""
            self.delay_proc.wait(5)
            raise RuntimeError(f"delay line did not start: {line!r} {err}")

    def destroy(self) -> str:
        """Stop the delay line (by PID) and delete the veth; returns the delay line's report."""
        report = ""
        if self.delay_proc is not None:
            if self.delay_proc.poll() is None:
                self.delay_proc.terminate()
            try:
                out, err = self.delay_proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                self.delay_proc.kill()
                out, err = self.delay_proc.communicate(timeout=5)
            report = (out + err).strip()
            self.delay_proc = None
        else:
            run("ip", "-n", self.a.name, "link", "del", self.a_if, check=False)
        return report


class Net:
    """Namespaces ``server`` and ``clients..`` plus the links between them; a context manager that
    removes everything it made.  ``tag`` makes the names unique (default: random)."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or uuid.uuid4().hex[:6]
        self.spaces: list[Netns] = []
        self.links: list[Link] = []

    def ns(self, role: str) -> Netns:
        """A new namespace ``ssegwrl-<role>-<tag>``."""
        n = Netns(f"ssegwrl-{role}-{self.tag}")
        self.spaces.append(n)
        return n.create()

    def link(self, a: Netns, b: Netns, **kw: object) -> Link:
        """A new link (``Link``'s keyword arguments); interfaces ``rl<tag>a<i>``/``rl<tag>b<i>``."""
        lk = Link(a, b, self.tag, len(self.links) + 1, **kw)  # type: ignore[arg-type]
        self.links.append(lk)
        try:
            return lk.create()
        except Exception:
            lk.destroy()
            raise

    def destroy(self) -> list[str]:
        reports = [lk.destroy() for lk in self.links]
        for n in self.spaces:
            n.destroy()
        self.links, self.spaces = [], []
        return reports

    def __enter__(self) -> Net:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


# -- the delay line (run as a script) ---------------------------------------------------------


def _open_tun(spec: str) -> int:
    ns, _, dev = spec.partition(":")
    with entered(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def delay_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="netlink.py delay")
    ap.add_argument("--a", required=True, help="NS:IF of one end")
    ap.add_argument("--b", required=True, help="NS:IF of the other end")
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--max-seconds", type=float, default=600.0)
    args = ap.parse_args(argv)
    fa, fb = _open_tun(args.a), _open_tun(args.b)
    delay = args.delay_ms / 1000
    parent = os.getppid()
    ep = select.epoll()
    ep.register(fa, select.EPOLLIN)
    ep.register(fb, select.EPOLLIN)
    # per direction: queue of (due, packet), queued bytes, packets forwarded, packets dropped
    out_of = {fa: fb, fb: fa}
    queues: dict[int, deque[tuple[float, bytes]]] = {fa: deque(), fb: deque()}
    queued = {fa: 0, fb: 0}
    fwd = {fa: 0, fb: 0}
    drop = {fa: 0, fb: 0}
    stop = time.monotonic() + args.max_seconds
    print("ready", flush=True)
    halted = []
    signal.signal(signal.SIGTERM, lambda *_: halted.append(1))
    next_parent_check = 0.0
    while not halted:
        now = time.monotonic()
        if now >= stop:
            break
        if now >= next_parent_check:
            next_parent_check = now + 1.0
            if os.getppid() != parent:
                break
        for src, q in queues.items():
            dst = out_of[src]
            while q and q[0][0] <= now:
                _, pkt = q.popleft()
                queued[src] -= len(pkt)
                try:
                    os.write(dst, pkt)
                    fwd[src] += 1
                except OSError:  # device down or its queue full: the packet is lost, as on a wire
                    drop[src] += 1
        heads = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(heads) - now) if heads else 0.2
        try:
            events = ep.poll(min(timeout, 0.2))
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd, _ in events:
            q = queues[fd]
            for _ in range(512):  # bounded per wake-up so the other direction is served
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if queued[fd] + len(pkt) > MAX_QUEUED_BYTES:
                    drop[fd] += 1
                    continue
                q.append((now + delay, pkt))
                queued[fd] += len(pkt)
    print(f"delay line: a->b {fwd[fa]} packets ({drop[fa]} dropped), b->a {fwd[fb]} ({drop[fb]} dropped)", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "delay":
        sys.exit(delay_main(sys.argv[2:]))
    sys.exit("usage: netlink.py delay --a NS:IF --b NS:IF --delay-ms MS [--max-seconds S]")
