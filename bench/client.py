"""Subscriber load process: many SSE streams on one uvloop, driven over stdin/stdout.

Started by ``bench/run.py`` (pinned with taskset).  It opens ``--conns`` streams, prints one
``{"type": "ready", ...}`` line, then answers commands read from stdin, one JSON line each:

- ``mark``                 start a measurement window: per-connection counts are taken
                           relative to now and the latency samples are cleared;
- ``snap [lat] [counts]``  events received since the mark (sum, min and max per connection),
                           open/lost connections; ``lat`` adds the latency summary of the
                           sampled connections, ``counts`` the per-connection counts;
- ``sample K``             parse latency on K connections (spread evenly) from now on; only
                           exact when no events are in flight (between windows);
- ``quit``                 close every stream and exit.

It exits by itself after ``--max-life`` seconds whatever happens (bounded load).

Hot path.  A stream's ``data_received`` only counts ``b"\\nid: "`` with ``bytes.count`` (C
speed) and keeps the last 4 bytes to catch a marker split between two reads.  Only the
``--sample`` sampled connections parse event data: a regex pulls the publish time (``"t"``,
``time.time()`` of the publisher) out of every event and the latency ``now - t`` is stored;
all events of one read share one receive time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sys
import time
from array import array

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import exact_summary, hist_from_sorted  # noqa: E402

PAT = b"\nid: "
TS = re.compile(rb'\ndata: \{"t":([0-9.]+)')
IDTS = re.compile(rb'\nid: [0-9a-z]+-([0-9]+)\ndata: \{"t":([0-9.]+)')
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

HEAD, STREAM, DONE = 0, 1, 2


class App:
    def __init__(self) -> None:
        self.lat = array("d")
        self.lost = 0
        self.quitting = False
        self.bad_status: dict[str, int] = {}
        self.gaps = 0
        self.dups = 0
        self.plain: type[Sub] = Sub
        self.sampled: type[Sub] = SampledSub


class Sub(asyncio.Protocol):
    """One stream that counts events."""

    __slots__ = ("app", "tr", "n", "tail", "state", "req", "head", "ready", "base", "rest")

    def __init__(self, app: App, req: bytes, ready: asyncio.Future[bool]) -> None:
        self.app = app
        self.req = req
        self.ready: asyncio.Future[bool] | None = ready
        self.tr: asyncio.Transport | None = None
        self.n = 0
        self.base = 0
        self.tail = b""
        self.head = b""
        self.rest = b""
        self.state = HEAD

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]
        transport.write(self.req)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.state == STREAM:
            self.n += data.count(PAT) + (self.tail + data[:4]).count(PAT)
            self.tail = data[-4:] if len(data) >= 4 else (self.tail + data)[-4:]
            return
        self._head(data)

    def _head(self, data: bytes) -> None:
        buf = self.head + data
        i = buf.find(b"\r\n\r\n")
        if i < 0:
            self.head = buf
            return
        self.head = b""
        line = buf[: buf.find(b"\r\n")]
        ok = b" 200 " in line + b" "
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(ok)
        self.ready = None
        if not ok:
            key = line.decode("latin-1")[:40]
            self.app.bad_status[key] = self.app.bad_status.get(key, 0) + 1
            self.state = DONE
            assert self.tr is not None
            self.tr.close()
            return
        self.state = STREAM
        rest = buf[i + 2:]  # keep "\r\n" so a first event right after the head is seen
        if rest:
            self.data_received(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(False)
        if self.state == STREAM and not self.app.quitting:
            self.app.lost += 1
        self.state = DONE


class SampledSub(Sub):
    """A stream that also parses the publish time of every event it receives."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if self.state != STREAM:
            self._head(data)
            return
        now = time.time()
        buf = self.rest + data
        cut = buf.rfind(b"\n")
        if cut < 0:
            self.rest = buf
            return
        self.rest = buf[cut:]  # keeps the "\n" so a split "\nid: " / "\ndata:" is still whole
        part = buf[:cut]
        self.n += part.count(PAT)
        ts = TS.findall(part)
        if ts:
            self.app.lat.extend([now - float(t) for t in ts])


class SeqSub(Sub):
    """``--count seq`` (one topic, so event sequence numbers are consecutive): ``n`` is the
    sequence of the newest complete ``id:`` line, found with one ``rfind`` from the end of
    each read -- O(1) per read instead of a scan of every byte.  Events since the mark are
    ``n - base``.  Gaps or duplicates would not show here; the sampled connections
    (:class:`SeqSampledSub`) check that every sequence follows the previous one."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if self.state != STREAM:
            self._head(data)
            return
        seq = _last_seq(data)
        if seq < 0:  # no complete id line in this read: one may straddle the previous read
            seq = _last_seq(self.tail + data[:64])
        if seq > self.n:
            self.n = seq
        self.tail = data[-48:]


def _last_seq(data: bytes) -> int:
    i = data.rfind(PAT)
    while i >= 0:
        j = data.find(b"\n", i + 5, i + 64)
        if j >= 0:
            k = data.rfind(b"-", i + 5, j)
            return int(data[k + 1:j])
        i = data.rfind(PAT, 0, i)
    return -1


class SeqSampledSub(Sub):
    """``--count seq`` sampled connection: parses every event's sequence and publish time;
    counts gaps (missing sequences) and duplicates."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if self.state != STREAM:
            self._head(data)
            return
        now = time.time()
        buf = self.rest + data
        cut = buf.rfind(b"\n\n") + 1  # parse whole events only: id and data lines together
        if cut <= 0:
            self.rest = buf
            return
        self.rest = buf[cut:]  # starts with the "\n" before the next "id: "
        found = IDTS.findall(buf, 0, cut)
        if not found:
            return
        app = self.app
        last = self.n
        lat = []
        for seq_b, t in found:
            seq = int(seq_b)
            if last and seq != last + 1:
                if seq <= last:
                    app.dups += 1
                    continue
                app.gaps += seq - last - 1
            last = seq
            lat.append(now - float(t))
        self.n = last
        app.lat.extend(lat)


async def open_one(loop: asyncio.AbstractEventLoop, app: App, host: str, port: int, src: str, req: bytes,
                   sampled: bool, sem: asyncio.Semaphore) -> Sub | None:
    async with sem:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((src, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, port))
        except OSError as e:
            sock.close()
            key = f"connect: {e.strerror or e}"
            app.bad_status[key] = app.bad_status.get(key, 0) + 1
            return None
        ready: asyncio.Future[bool] = loop.create_future()
        cls = app.sampled if sampled else app.plain
        _, proto = await loop.create_connection(lambda: cls(app, req, ready), sock=sock)
        try:
            ok = await asyncio.wait_for(ready, 30)
        except TimeoutError:
            ok = False
        return proto if ok else None  # type: ignore[return-value]


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    loop.call_later(args.max_life, lambda: os._exit(3))  # hard bound, whatever happens
    app = App()
    if args.count == "seq":
        app.plain, app.sampled = SeqSub, SeqSampledSub
    srcs = args.src.split(",")
    sem = asyncio.Semaphore(args.concurrency)
    n = args.conns
    step = max(1, n // args.sample) if args.sample else 0
    tasks = []
    t0 = time.monotonic()
    for i in range(n):
        topic = args.topic.format(i=args.offset + i)
        req = (f"GET {args.path.format(topic=topic)} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
               f"Accept: text/event-stream\r\n\r\n").encode()
        sampled = bool(step) and i % step == 0 and i // step < args.sample
        tasks.append(loop.create_task(open_one(loop, app, args.host, args.port, srcs[i % len(srcs)], req,
                                               sampled, sem)))
    results = await asyncio.gather(*tasks)
    conns: list[Sub] = [c for c in results if c is not None]
    topics = [args.offset + i for i, c in enumerate(results) if c is not None]
    sampled_n = sum(1 for c in conns if type(c) is app.sampled)
    out({"type": "ready", "ok": len(conns), "failed": n - len(conns), "sampled": sampled_n,
         "connect_s": round(time.monotonic() - t0, 2), "errors": app.bad_status, "pid": os.getpid()})

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = line.decode().split()
        if not cmd:
            continue
        if cmd[0] == "mark":
            for c in conns:
                c.base = c.n
            app.lat = array("d")
            app.gaps = app.dups = 0
            out({"type": "mark", "t": time.time()})
        elif cmd[0] == "snap":
            deltas = [c.n - c.base for c in conns]
            snap: dict[str, object] = {
                "type": "snap", "t": time.time(), "sum": sum(deltas),
                "min": min(deltas) if deltas else 0, "max": max(deltas) if deltas else 0,
                "open": sum(1 for c in conns if c.state == STREAM), "lost": app.lost,
                "lat_n": len(app.lat), "gaps": app.gaps, "dups": app.dups,
            }
            if "lat" in cmd:
                vals = sorted(app.lat)
                summ = exact_summary(vals)
                summ["hist"] = hist_from_sorted(vals)
                snap["lat"] = summ
            if "counts" in cmd:
                snap["counts"] = dict(zip(topics, deltas, strict=True))
            out(snap)
        elif cmd[0] == "sample":
            set_sample(conns, int(cmd[1]), app)
            out({"type": "sample", "sampled": sum(1 for c in conns if type(c) is app.sampled)})
        elif cmd[0] == "quit":
            break
    app.quitting = True
    for c in conns:
        if c.tr is not None:
            c.tr.abort()
    await asyncio.sleep(0.2)
    out({"type": "bye"})


def set_sample(conns: list[Sub], k: int, app: App) -> None:
    """Switch the class of each connection (same layout) so that ``k`` of them parse."""
    step = max(1, len(conns) // k) if k else 0
    for i, c in enumerate(conns):
        want = app.sampled if step and i % step == 0 and i // step < k else app.plain
        if type(c) is not want:
            c.tail = b""
            c.rest = b""
            c.__class__ = want
            # uvloop keeps the bound data_received it took at connection_made: hand the
            # transport the protocol again so that it takes the new class's method.
            c.tr.set_protocol(c)


def out(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--conns", type=int, required=True)
    ap.add_argument("--topic", default="ticker", help="topic name; {i} is the connection's global index")
    ap.add_argument("--path", default="/events?topic={topic}",
                    help="request target; {topic} is the topic name (bench/upstream.py: a proxy route's path)")
    ap.add_argument("--offset", type=int, default=0, help="global index of this process's first connection")
    ap.add_argument("--sample", type=int, default=0, help="connections that parse latency (spread evenly)")
    ap.add_argument("--src", default="127.0.0.2", help="comma-separated source addresses")
    ap.add_argument("--count", choices=("scan", "seq"), default="scan",
                    help="scan: bytes.count of every byte (exact, any topics); seq: newest sequence per read "
                         "(one topic only; the sampled connections check continuity)")
    ap.add_argument("--concurrency", type=int, default=256, help="connects in flight at once")
    ap.add_argument("--max-life", type=float, default=1800, help="exit after this many seconds regardless")
    return ap.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(parse_args()))
