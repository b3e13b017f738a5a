"""Upstream-route benchmarks: ``python bench/upstream.py {shared,proxy,clientcost} [options]``.

- ``shared``: N subscribers (default 10,000) on one topic, R events/s, twice with the same
  gateway flags: published directly (``POST /publish``, as ``bench/run.py fanout``) and fed by a
  shared route from an upstream SSE server run here.  Reports both windows (delivered events/s,
  latency percentiles) and how many connections the upstream saw (must be exactly 1).
- ``proxy``: N streams (default 2,000) read from the upstream directly, then through a proxy
  route: the latency the gateway adds (p50/p99 difference) and the gateway's RSS per proxied
  stream (RSS with the streams open minus RSS before, over N).
- ``clientcost``: N idle upstream streams held open in one process, by this gateway's upstream
  client (h11 on asyncio streams) and by aiohttp's client: RSS and CPU per stream and per event.

The gateway is pinned to core 0, subscribers (bench/client.py) and this coordinator (the
upstream server, the publisher) to core 1.  Every loop is bounded; only processes started here
are stopped, by PID.  One JSON line per command, appended to bench/results/upstream.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS, Server, emit, log, proc_rss  # noqa: E402
from loadgen import Admin, Clients, Publisher, ticker_body  # noqa: E402
from run import CLIENT_CORE, pin_self, wait_delivered, wait_streams, window  # noqa: E402

_PAD = b"x" * 40


class UpstreamServer:
    """An SSE server in this process: every GET becomes a chunked stream that :meth:`broadcast`
    writes to.  Counts the connections it ever saw."""

    def __init__(self) -> None:
        self.writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self.seq = 0

    async def start(self) -> UpstreamServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.writers.add(writer)
        try:
            while await reader.read(4096):
                pass
        except ConnectionError:
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def events(self, k: int) -> bytes:
        t = time.time()
        out = []
        for _ in range(k):
            self.seq += 1
            out.append(b'id: up-%d\ndata: {"t":%.6f,"sym":"ACME","n":%d,"pad":"%s"}\n\n' % (self.seq, t, self.seq, _PAD))
        body = b"".join(out)
        return b"%x\r\n%b\r\n" % (len(body), body)

    def broadcast(self, k: int) -> None:
        chunk = self.events(k)
        for w in self.writers:
            w.write(chunk)

    def close(self) -> None:
        for w in list(self.writers):
            w.transport.abort()
        if self.server is not None:
            self.server.close()


class UpstreamPublisher:
    """``Publisher.run``'s interface, publishing by writing events to the upstream's streams."""

    def __init__(self, up: UpstreamServer, tick: float = 0.01) -> None:
        self.up = up
        self.tick = tick

    async def run(self, rate: float, duration: float, make: object) -> dict[str, object]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        wall_start = time.time()
        end = start + duration
        sent = 0
        next_tick = start
        total = int(rate * duration)
        while loop.time() < end:
            due = min(int(rate * (loop.time() - start)) + 1, total) - sent
            if due > 0:
                self.up.broadcast(due)
                sent += due
            next_tick += self.tick
            await asyncio.sleep(max(0.0, next_tick - loop.time()))
        if total > sent:
            self.up.broadcast(total - sent)
            sent = total
        elapsed = loop.time() - start
        return {"target_rate": rate, "duration_s": round(elapsed, 3), "wall_start": wall_start,
                "target_msgs": total, "sent_msgs": sent, "ok_msgs": sent, "failed_msgs": 0, "unanswered_msgs": 0,
                "requests": 0, "achieved_rate": round(sent / elapsed, 1), "statuses": {}}


def _config(text: str) -> str:
    f = tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="ssegw-bench-", delete=False)
    f.write(text)
    f.close()
    return f.name


def _summary(res: dict[str, object]) -> dict[str, object]:
    lat: dict[str, object] = res["latency"]  # type: ignore[assignment]
    return {"delivered_per_s": res["delivered_per_s"], "delivered_per_s_in_window": res["delivered_per_s_in_window"],
            "expected_per_s": res["expected_per_s"], "lost_events": res["lost_events"],
            "conns_lost": res["conns_lost"], "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"),
            "p999_ms": lat.get("p999_ms"), "server_cpu": res["cpu"]}  # type: ignore[index]


async def _fanout(args: argparse.Namespace, up: UpstreamServer | None) -> dict[str, object]:
    extra = list(args.server_arg or [])
    cfg = None
    if up is not None:
        cfg = _config(f'[[routes]]\ntopics = "{args.topic}"\nupstream = "http://127.0.0.1:{up.port}/s/{{topic}}"\n'
                      'linger = "5s"\n')
        extra += ["--config", cfg]
    tag = "upstream-shared" if up is not None else "upstream-direct"
    srv = Server("0", extra, RESULTS / f"server-{tag}-{time.strftime('%Y%m%d-%H%M%S')}.log").start()
    admin = Admin(srv.admin_port)
    clients = None
    pub: Publisher | None = None
    try:
        k = max(20, min(args.sample, int(100_000 // args.rate)))
        clients = await Clients.start(srv.port, args.subs, args.procs, args.topic, k, CLIENT_CORE, count="seq")
        await wait_streams(admin, clients.ok)
        await clients.cmd("mark")
        if up is not None:
            deadline = time.monotonic() + 10
            while not up.writers and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            up.broadcast(1)
            publisher: object = UpstreamPublisher(up)
        else:
            pub = Publisher(srv.port, 4)
            await pub.connect()
            await pub.post(ticker_body(args.topic.encode())(1, 0)[0])
            publisher = pub
        snap = await wait_delivered(clients, 1, timeout=60)
        log(f"{tag} warm-up: min {snap['min']} over {snap['open']} streams")
        res = await window(srv, admin, clients, publisher, args.rate, args.duration,  # type: ignore[arg-type]
                           ticker_body(args.topic.encode()), clients.ok, quiet_wait=args.quiet_wait)
        out = _summary(res)
        if up is not None:
            out["upstream_connections"] = up.connections
        return out
    finally:
        if pub is not None:
            pub.close()
        if clients is not None:
            await clients.quit()
        admin.close()
        srv.stop()
        if cfg:
            os.unlink(cfg)


async def cmd_shared(args: argparse.Namespace) -> None:
    up = await UpstreamServer().start()
    try:
        direct = await _fanout(args, None)
        shared = await _fanout(args, up)
    finally:
        up.close()
    ratio_rate = shared["delivered_per_s"] / max(1, direct["delivered_per_s"])  # type: ignore[operator]
    p99d, p99s = direct["p99_ms"], shared["p99_ms"]
    emit("upstream", {"cmd": "shared", "subs": args.subs, "rate": args.rate, "duration": args.duration,
                      "direct": direct, "shared": shared, "rate_ratio": round(ratio_rate, 3),
                      "p99_ratio": round(p99s / p99d, 3) if p99d and p99s else None,  # type: ignore[operator]
                      "verdict": "ok" if shared.get("upstream_connections") == 1 and 0.9 <= ratio_rate
                      and p99d and p99s and p99s <= 1.1 * p99d else "outside 10 %"})  # type: ignore[operator]


async def _proxied_window(args: argparse.Namespace, up: UpstreamServer, port: int, path: str,
                          tag: str) -> tuple[dict[str, object], Clients]:
    up.seq = 0  # the seq counters of bench/client.py count from the first id
    clients = await Clients.start(port, args.streams, args.procs, "p{i}", min(args.streams, 500), CLIENT_CORE,
                                  count="seq", path=path)
    deadline = time.monotonic() + 60
    while len(up.writers) < clients.ok and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await clients.cmd("mark")
    pub = UpstreamPublisher(up)
    pr = await pub.run(args.rate, args.duration, None)
    fin = await wait_delivered(clients, int(pr["ok_msgs"]))  # type: ignore[call-overload]
    final = await clients.snap("lat")
    from common import merge_summaries

    lat = merge_summaries([p.get("lat") for p in final["parts"]])  # type: ignore[misc, union-attr, attr-defined]
    log(f"{tag}: {final['sum']} events, p50 {lat.get('p50_ms')} p99 {lat.get('p99_ms')} ms")
    return {"streams": clients.ok, "events": final["sum"], "expected": int(pr["ok_msgs"]) * clients.ok,  # type: ignore[call-overload]
            "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"), "t": fin["t"]}, clients


async def cmd_proxy(args: argparse.Namespace) -> None:
    up = await UpstreamServer().start()
    cfg = _config(f'[[routes]]\nmode = "proxy"\npath = "/p/"\nupstream = "http://127.0.0.1:{up.port}/s/{{path}}"\n')
    srv = Server("0", [*(args.server_arg or []), "--config", cfg],
                 RESULTS / f"server-upstream-proxy-{time.strftime('%Y%m%d-%H%M%S')}.log").start()
    admin = Admin(srv.admin_port)
    try:
        direct, c1 = await _proxied_window(args, up, up.port, "/s/{topic}", "direct")
        await c1.quit()
        await asyncio.sleep(1.0)
        rss0 = srv.rss()
        proxied, c2 = await _proxied_window(args, up, srv.port, "/p/{topic}", "proxied")
        rss1 = srv.rss()
        st = await admin.stats()
        await c2.quit()
    finally:
        admin.close()
        srv.stop()
        up.close()
        os.unlink(cfg)
    emit("upstream", {"cmd": "proxy", "streams": args.streams, "rate": args.rate, "duration": args.duration,
                      "direct": direct, "proxied": proxied,
                      "added_p50_ms": round(float(proxied["p50_ms"]) - float(direct["p50_ms"]), 2),  # type: ignore[arg-type]
                      "added_p99_ms": round(float(proxied["p99_ms"]) - float(direct["p99_ms"]), 2),  # type: ignore[arg-type]
                      "gateway_rss_mib": [round(rss0 / 2**20, 1), round(rss1 / 2**20, 1)],
                      "rss_per_stream_kib": round((rss1 - rss0) / max(1, int(proxied["streams"])) / 1024, 1),  # type: ignore[call-overload]
                      "gateway_proxied_streams": st.get("upstream_proxied")})


async def _hold(kind: str, port: int, n: int, events: int, up: UpstreamServer) -> dict[str, object]:
    """Open ``n`` streams to the upstream with one client kind; RSS and CPU per stream/event."""
    from ssegw.config import RouteRule
    from ssegw.core.sseparse import SSEParser
    from ssegw.server.upstream_client import Target, UpstreamFailure, UpstreamStream

    got = 0
    rss0 = proc_rss(os.getpid())
    t0 = resource.getrusage(resource.RUSAGE_SELF)
    tasks: list[asyncio.Task[None]] = []
    if kind == "h11":
        t = Target(RouteRule("proxy", f"http://127.0.0.1:{port}/s/{{path}}", path="/p/"))

        async def one(i: int) -> None:
            nonlocal got
            s = UpstreamStream(SSEParser(1 << 20, 1 << 20), 600, 16384)
            try:
                await s.open(t, f"/s/{i}", [], None)

                def sink(evs: list) -> None:  # type: ignore[type-arg]
                    nonlocal got
                    got += len(evs)

                await s.events(sink)
            except UpstreamFailure:
                pass
            finally:
                s.close()

        tasks = [asyncio.get_running_loop().create_task(one(i)) for i in range(n)]
    else:
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

        async def one(i: int) -> None:
            nonlocal got
            async with session.get(f"http://127.0.0.1:{port}/s/{i}", headers={"Accept": "text/event-stream"},
                                   timeout=aiohttp.ClientTimeout(total=None, sock_read=600)) as r:
                async for line in r.content:  # aiohttp's own line reader, as an SSE client would use it
                    if line.startswith(b"id:"):
                        got += 1

        tasks = [asyncio.get_running_loop().create_task(one(i)) for i in range(n)]
    deadline = time.monotonic() + 60
    while len(up.writers) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    rss1 = proc_rss(os.getpid())
    t1 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(events // 10):
        up.broadcast(10)
        await asyncio.sleep(0.005)
    deadline = time.monotonic() + 60
    while got < n * (events // 10 * 10) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    t2 = resource.getrusage(resource.RUSAGE_SELF)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if kind != "h11":
        await session.close()
    cpu_open = (t1.ru_utime + t1.ru_stime) - (t0.ru_utime + t0.ru_stime)
    cpu_ev = (t2.ru_utime + t2.ru_stime) - (t1.ru_utime + t1.ru_stime)
    return {"client": kind, "streams": n, "events_read": got,
            "rss_per_stream_kib": round((rss1 - rss0) / n / 1024, 2),
            "open_cpu_us_per_stream": round(cpu_open / n * 1e6, 1),
            "cpu_us_per_event": round(cpu_ev / max(1, got) * 1e6, 2)}


async def cmd_clientcost(args: argparse.Namespace) -> None:
    """Both clients and the upstream share this process (pinned to core 1): upstream costs are
    the same for both and are included in both figures.  Both clients' modules are imported
    before anything is measured, so that no figure carries an import."""
    import aiohttp  # noqa: F401

    import ssegw.server.upstream_client  # noqa: F401

    out = []
    for kind in args.kinds:
        up = await UpstreamServer().start()
        try:
            out.append(await _hold(kind, up.port, args.streams, args.events, up))
        finally:
            up.close()
        await asyncio.sleep(1.0)
        log(str(out[-1]))
    emit("upstream", {"cmd": "clientcost", "results": out})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/upstream.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("shared")
    p.add_argument("--subs", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=100)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--sample", type=int, default=500)
    p.add_argument("--topic", default="ticker")
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--quiet-wait", type=float, default=60.0)
    p.add_argument("--server-arg", action="append")
    p = sub.add_parser("proxy")
    p.add_argument("--streams", type=int, default=2_000)
    p.add_argument("--rate", type=float, default=10)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--server-arg", action="append")
    p = sub.add_parser("clientcost")
    p.add_argument("--streams", type=int, default=1_000)
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--kinds", nargs="+", default=["h11", "aiohttp"])
    args = ap.parse_args(argv)
    pin_self()
    import uvloop

    Path(RESULTS).mkdir(parents=True, exist_ok=True)
    fn = {"shared": cmd_shared, "proxy": cmd_proxy, "clientcost": cmd_clientcost}[args.cmd]
    uvloop.run(asyncio.wait_for(fn(args), 1800))  # bounded, whatever happens
    return 0


if __name__ == "__main__":
    sys.exit(main())
