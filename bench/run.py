"""ssegw benchmarks: ``python bench/run.py {rss,fanout,maxrate,directed} [options]``.

Each command starts its own gateway (``python -m ssegw serve`` pinned to core 0 with
taskset), subscriber processes (bench/client.py, pinned to core 1) and, in this process
(also pinned to core 1), the publisher; prints one JSON result line and appends it to
``bench/results/<command>.jsonl``.  Every load loop is bounded in time and stops by itself;
only processes started here are signalled, by PID.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    RESULTS,
    CpuSampler,
    Server,
    emit,
    log,
    merge_summaries,
    prom_hist_delta,
    stats_delta,
    wait_quiet,
)
from loadgen import Admin, Clients, Prober, Publisher, ticker_body  # noqa: E402

SERVER_CORE = "0"
# Server-side histograms read from /metrics around each window, where the build has them.
SERVER_HISTS = ("ssegw_flush_duration_seconds", "ssegw_flush_delay_seconds", "ssegw_flush_batch_events")
CLIENT_CORE = "1"


def pin_self() -> None:
    try:
        os.sched_setaffinity(0, {int(CLIENT_CORE)})
    except (OSError, ValueError) as e:  # fewer cores: run unpinned and say so
        log(f"cannot pin the coordinator to core {CLIENT_CORE}: {e}")


def server_for(args: argparse.Namespace, tag: str) -> Server:
    extra = args.server_arg or []
    return Server(SERVER_CORE, extra, RESULTS / f"server-{tag}-{time.strftime('%Y%m%d-%H%M%S')}.log").start()


async def wait_streams(admin: Admin, n: int, timeout: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        st = await admin.stats()
        if int(st["streams_open"]) >= n or time.monotonic() > deadline:  # type: ignore[call-overload]
            return st
        await asyncio.sleep(0.2)


async def wait_delivered(clients: Clients, expected_min: int, timeout: float = 60, idle: float = 5.0) -> dict[str, object]:
    """Poll until every connection has ``expected_min`` events since the mark, or no progress
    for ``idle`` s, or ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_sum = -1
    last_change = time.monotonic()
    while True:
        snap = await clients.snap()
        if int(snap["min"]) >= expected_min:  # type: ignore[call-overload]
            return snap
        now = time.monotonic()
        if snap["sum"] != last_sum:
            last_sum = int(snap["sum"])  # type: ignore[call-overload]
            last_change = now
        if now - last_change > idle or now > deadline:
            return snap
        await asyncio.sleep(0.1)


async def settle_rss(srv: Server, window: float = 3.0, tol: float = 0.002, timeout: float = 60) -> int:
    """RSS once it has moved less than ``tol`` (relative) over ``window`` seconds."""
    samples: list[tuple[float, int]] = []
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        samples.append((time.monotonic(), srv.rss()))
        recent = [r for t, r in samples if t >= samples[-1][0] - window]
        if samples[-1][0] - samples[0][0] >= window and max(recent) - min(recent) <= tol * max(recent):
            return samples[-1][1]
        await asyncio.sleep(0.5)
    return samples[-1][1]


# -- rss --------------------------------------------------------------------------------


async def cmd_rss(args: argparse.Namespace) -> None:
    out = []
    for n in args.conns:
        srv = server_for(args, f"rss{n}")
        admin = Admin(srv.admin_port)
        clients: Clients | None = None
        try:
            await admin.stats()  # first admin request: its allocations belong to the baseline
            base = await settle_rss(srv)
            t0 = time.monotonic()
            clients = await Clients.start(srv.port, n, args.procs, args.topic, 0, CLIENT_CORE)
            st = await wait_streams(admin, clients.ok)
            open_s = time.monotonic() - t0
            after = await settle_rss(srv)
            # One event to every stream: the first write on each transport.
            pub = Publisher(srv.port, 1)
            await pub.connect()
            await clients.cmd("mark")
            status, _ = await pub.post(ticker_body(args.topic.encode())(1, 0)[0])
            await wait_delivered(clients, 1, timeout=60)
            after_event = await settle_rss(srv)
            pub.close()
            ok = clients.ok
            row = {
                "conns": n, "streams_open": st["streams_open"], "slots_in_use": st["slots_in_use"],
                "failed": n - ok, "open_s": round(open_s, 2),
                "rss_base_mib": round(base / 2**20, 2), "rss_idle_mib": round(after / 2**20, 2),
                "rss_per_conn_bytes": round((after - base) / max(1, ok)),
                "rss_after_one_event_mib": round(after_event / 2**20, 2),
                "rss_per_conn_after_event_bytes": round((after_event - base) / max(1, ok)),
                "publish_status": status,
            }
            log(f"rss {row}")
            out.append(row)
        finally:
            if clients is not None:
                await clients.quit()
            admin.close()
            srv.stop()
            problems = srv.problems()
            if problems:
                out.append({"conns": n, "server_problems": problems[:20]})
    rows = [r for r in out if "rss_idle_mib" in r]
    extra: dict[str, object] = {}
    if len(rows) >= 2:
        # Slope between the smallest and the largest N: what one more idle stream costs,
        # without the part of the baseline heap that absorbs the first ones.
        lo, hi = rows[0], rows[-1]
        extra["marginal_bytes_per_conn"] = round((float(hi["rss_idle_mib"]) - float(lo["rss_idle_mib"])) * 2**20  # type: ignore[arg-type]
                                                 / (int(hi["conns"]) - int(lo["conns"])))  # type: ignore[call-overload]
    emit("rss", {"topic": args.topic, "procs": args.procs, "results": out, **extra})


# -- one measured publishing window -------------------------------------------------------


async def window(srv: Server, admin: Admin, clients: Clients, pub: Publisher, rate: float, duration: float,
                 make, subs: int, directed_counts: list[int] | None = None,  # type: ignore[no-untyped-def]
                 quiet_wait: float = 0) -> dict[str, object]:
    quiet = await wait_quiet(quiet_wait) if quiet_wait > 0 else None
    await clients.cmd("mark")
    st0 = await admin.stats()
    m0 = (await admin.get("/metrics"))[1].decode()
    pids = {"server": srv.pid, "coordinator": os.getpid()}
    for i, pid in enumerate(clients.pids):
        pids[f"client{i}"] = pid
    cpu = CpuSampler(pids)
    prober = Prober(admin, rss=srv.rss)
    rss_before = srv.rss()
    cpu.start()
    prober.start()
    pr = await pub.run(rate, duration, make)
    snap_end = await clients.snap()
    cpu_res = cpu.stop()
    probe = await prober.stop()
    ok = int(pr["ok_msgs"])  # type: ignore[call-overload]
    t_start = float(pr["wall_start"])  # type: ignore[arg-type]
    if directed_counts is None:
        expected = ok * subs
        fin = await wait_delivered(clients, ok)
    else:
        expected = ok  # one subscriber per topic
        fin = await _wait_sum(clients, ok)
    t_done = float(fin["t"])  # type: ignore[arg-type]
    final = await clients.snap("lat", *(("counts",) if directed_counts is not None else ()))
    st1 = await admin.stats()
    m1 = (await admin.get("/metrics"))[1].decode()
    rss_after = srv.rss()
    received = int(final["sum"])  # type: ignore[call-overload]
    res: dict[str, object] = {
        "rate": rate, "publisher": pr, "subs": subs,
        "expected_events": expected, "received_events": received,
        "lost_events": max(0, expected - received), "extra_events": max(0, received - expected),
        "per_conn_min": final["min"], "per_conn_max": final["max"],
        "conns_open": final["open"], "conns_lost": final["lost"],
        "seq_gaps": final["gaps"], "seq_dups": final["dups"],
        "expected_per_s": round(expected / float(pr["duration_s"])),  # type: ignore[arg-type]
        "delivered_per_s": round(received / max(1e-9, t_done - t_start)),
        # Events counted by the subscribers when publishing had ended (their own clock).
        "delivered_per_s_in_window": round(int(snap_end["sum"]) / max(1e-9, float(snap_end["t"]) - t_start)),  # type: ignore[call-overload, arg-type]
        "backlog_at_end_events": expected - int(snap_end["sum"]),  # type: ignore[call-overload]
        "drain_s": round(t_done - float(snap_end["t"]), 2),  # type: ignore[arg-type]
        "latency": merge_summaries([p.get("lat") for p in final["parts"]]),  # type: ignore[misc, union-attr, attr-defined]
        "latency_sampled_conns": sum(int(r["sampled"]) for r in clients.ready),  # type: ignore[call-overload]
        "count_mode": clients.count,
        "server_rss_mib": {"before": round(rss_before / 2**20, 1), "max": probe.pop("server_rss_max_mib", None),
                           "after": round(rss_after / 2**20, 1)},
        "cpu": cpu_res, "before_window": quiet, "server_loop_probe": probe, "server": stats_delta(st0, st1),
        "server_hist": prom_hist_delta(m0, m1, SERVER_HISTS),
    }
    if directed_counts is not None:
        counts: dict[int, int] = final["counts"]  # type: ignore[assignment]
        lost = extra = 0
        for i, sent in enumerate(directed_counts):
            got = counts.get(i, 0)
            lost += max(0, sent - got)
            extra += max(0, got - sent)
        res["lost_events"] = lost
        res["extra_events"] = extra
    return res


async def _wait_sum(clients: Clients, expected: int, timeout: float = 60, idle: float = 5.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    last = -1
    last_change = time.monotonic()
    while True:
        snap = await clients.snap()
        s = int(snap["sum"])  # type: ignore[call-overload]
        if s >= expected:
            return snap
        now = time.monotonic()
        if s != last:
            last, last_change = s, now
        if now - last_change > idle or now > deadline:
            return snap
        await asyncio.sleep(0.1)


def verdict(res: dict[str, object], max_p99_ms: float) -> list[str]:
    why = []
    if res["lost_events"]:
        why.append(f"lost {res['lost_events']} events")
    if res["seq_gaps"] or res["seq_dups"]:
        why.append(f"sampled streams saw {res['seq_gaps']} missing and {res['seq_dups']} repeated sequences")
    if res["conns_lost"]:
        why.append(f"{res['conns_lost']} connections closed")
    pr: dict[str, object] = res["publisher"]  # type: ignore[assignment]
    if int(pr["failed_msgs"]) or int(pr["unanswered_msgs"]):  # type: ignore[call-overload]
        why.append(f"publish failures {pr['statuses']}")
    if float(pr["achieved_rate"]) < 0.95 * float(pr["target_rate"]):  # type: ignore[arg-type]
        why.append(f"publisher reached {pr['achieved_rate']} of {pr['target_rate']} msg/s")
    if int(res["delivered_per_s_in_window"]) < 0.9 * int(res["expected_per_s"]):  # type: ignore[call-overload]
        why.append(f"not sustained: delivered {res['delivered_per_s_in_window']}/s during the window "
                   f"of {res['expected_per_s']}/s published")
    if float(res["drain_s"]) > max_p99_ms / 1000:  # type: ignore[arg-type]
        why.append(f"backlog took {res['drain_s']} s to drain after publishing stopped")
    lat: dict[str, object] = res["latency"]  # type: ignore[assignment]
    if lat.get("n") and float(lat["p99_ms"]) > max_p99_ms:  # type: ignore[arg-type]
        why.append(f"latency p99 {lat['p99_ms']} ms > {max_p99_ms} ms")
    return why


class Env:
    """One gateway, its subscribers and a publisher, warmed up; rebuilt on demand."""

    def __init__(self, args: argparse.Namespace, tag: str, conns: int, topic: str, sample: int,
                 directed: bool = False) -> None:
        self.args, self.tag, self.conns, self.topic, self.sample, self.directed = args, tag, conns, topic, sample, directed
        self.srv: Server | None = None
        self.admin: Admin | None = None
        self.clients: Clients | None = None
        self.pub: Publisher | None = None
        self.problems: list[str] = []

    async def open(self) -> Env:
        args = self.args
        self.srv = srv = server_for(args, self.tag)
        self.admin = admin = Admin(srv.admin_port)
        self.clients = clients = await Clients.start(srv.port, self.conns, args.procs, self.topic, self.sample,
                                                     CLIENT_CORE, count=getattr(args, "count", "scan"))
        st = await wait_streams(admin, clients.ok)
        log(f"server streams_open={st['streams_open']} rss={srv.rss() / 2**20:.1f} MiB")
        self.pub = Publisher(srv.port, args.pub_conns)
        await self.pub.connect()
        await (self._warm_directed() if self.directed else self._warm_fanout())
        return self

    async def _warm_fanout(self) -> None:
        assert self.clients is not None and self.pub is not None
        await self.clients.cmd("mark")
        status, body = await self.pub.post(ticker_body(self.topic.encode())(1, 0)[0])
        snap = await wait_delivered(self.clients, 1, timeout=60)
        log(f"warm-up publish {status}: min {snap['min']} max {snap['max']} over {snap['open']} streams")
        if status != 200 or int(snap["min"]) < 1:  # type: ignore[call-overload]
            raise RuntimeError(f"warm-up event did not reach every subscriber: {status} {body[:200]!r} {snap}")

    async def _warm_directed(self) -> None:
        """One event to every topic, in batches of 1000."""
        assert self.clients is not None and self.pub is not None
        await self.clients.cmd("mark")
        for lo in range(0, self.conns, 1000):
            body = b"[" + b",".join(b'{"topic":"%s","data":{"t":%.6f,"w":1}}' % (self.topic.format(i=i).encode(),
                                                                                 time.time())
                                    for i in range(lo, min(self.conns, lo + 1000))) + b"]"
            status, _ = await self.pub.post(body)
            if status != 200:
                raise RuntimeError(f"warm-up publish answered {status}")
        snap = await wait_delivered(self.clients, 1, timeout=60)
        log(f"warm-up: min {snap['min']} max {snap['max']} over {snap['open']} streams")
        if int(snap["min"]) < 1:  # type: ignore[call-overload]
            raise RuntimeError(f"warm-up events did not reach every subscriber: {snap}")

    async def close(self) -> None:
        if self.pub is not None:
            self.pub.close()
        if self.clients is not None:
            await self.clients.quit()
        if self.admin is not None:
            self.admin.close()
        if self.srv is not None:
            self.srv.stop()
            self.problems += self.srv.problems()
        self.srv = self.admin = self.clients = self.pub = None  # type: ignore[assignment]

    async def window(self, rate: float, make, directed_counts: list[int] | None = None) -> dict[str, object]:  # type: ignore[no-untyped-def]
        assert self.srv and self.admin and self.clients and self.pub
        return await window(self.srv, self.admin, self.clients, self.pub, rate, self.args.duration, make,
                            self.clients.ok, directed_counts=directed_counts, quiet_wait=self.args.quiet_wait)


async def with_retries(env: Env, once) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Measure ``once()`` up to ``--attempts`` times while processes that are not ours took
    more than ``--max-foreign`` % CPU during the window; keep the least disturbed attempt.
    An attempt that lost streams leaves the setup unusable: it is rebuilt before the next."""
    args = env.args
    tries: list[dict[str, object]] = []
    for i in range(args.attempts):
        res = await once()
        tries.append(res)
        foreign = float(res["cpu"]["foreign_pct"])  # type: ignore[index]
        if foreign <= args.max_foreign or i + 1 == args.attempts:
            break
        log(f"processes not ours used {foreign}% CPU during the window: measuring again")
        if int(res["conns_lost"]):  # type: ignore[call-overload]
            await env.close()
            await env.open()
    best = min(tries, key=lambda r: float(r["cpu"]["foreign_pct"]))  # type: ignore[index]
    best["attempts"] = [{"foreign_pct": r["cpu"]["foreign_pct"], "delivered_per_s": r["delivered_per_s"],  # type: ignore[index]
                         "lost_events": r["lost_events"], "conns_lost": r["conns_lost"],
                         "p99_ms": r["latency"].get("p99_ms")}  # type: ignore[union-attr]
                        for r in tries]
    return best


# -- fanout -----------------------------------------------------------------------------


async def cmd_fanout(args: argparse.Namespace) -> None:
    # Parsing costs the client ~1 us per event: keep it within --parse-budget events/s.
    k = max(args.min_sample, min(args.sample, int(args.parse_budget // args.rate)))
    env = Env(args, f"fanout{args.rate:g}", args.subs, args.topic, k)
    try:
        await env.open()
        res = await with_retries(env, lambda: env.window(args.rate, ticker_body(args.topic.encode())))
    finally:
        await env.close()
    res["server_log_problems"] = env.problems[:20]
    res["verdict"] = verdict(res, args.max_p99_ms) or "ok"
    emit("fanout", {"subs_requested": args.subs, "procs": args.procs, **res})


# -- maxrate ----------------------------------------------------------------------------


async def cmd_maxrate(args: argparse.Namespace) -> None:
    env = Env(args, "maxrate", args.subs, args.topic, args.sample)
    steps = []
    best = None
    subs = 0
    try:
        await env.open()
        assert env.clients is not None
        subs = env.clients.ok
        rate = args.start
        refined = False
        while rate <= args.max_rate:
            # Parse latency on fewer connections as the rate grows so that the client's own
            # parsing stays within --parse-budget events/s (counting covers every connection).
            k = max(args.min_sample, min(args.sample, args.parse_budget // rate))

            async def once(rate: int = rate, k: int = k) -> dict[str, object]:
                assert env.clients is not None
                await env.clients.cmd(f"sample {k}")
                log(f"maxrate step {rate} msg/s, latency on {k} connections")
                return await env.window(rate, ticker_body(args.topic.encode()))

            res = await with_retries(env, once)
            res["latency_sampled_conns"] = k
            why = verdict(res, args.max_p99_ms)
            res["verdict"] = why or "ok"
            steps.append(res)
            log(f"step {rate}: delivered {res['delivered_per_s']}/s lost {res['lost_events']} "
                f"p99 {res['latency'].get('p99_ms')} ms cpu {res['cpu']} -> {why or 'ok'}")  # type: ignore[union-attr]
            if why:
                if refined or best is None or not args.refine:
                    break
                if int(res["conns_lost"]):  # type: ignore[call-overload]
                    await env.close()
                    await env.open()
                # One step between the last good rate and the failed one (x1.5 the good one).
                refined = True
                rate = int(best["rate"] * 1.5)  # type: ignore[call-overload]
            else:
                best = res
                if refined:
                    break
                rate *= 2
            await asyncio.sleep(1.0)
    finally:
        await env.close()
    summary = [{"rate": s["rate"], "achieved_rate": s["publisher"]["achieved_rate"],  # type: ignore[index]
                "expected_per_s": s["expected_per_s"], "delivered_per_s": s["delivered_per_s"],
                "delivered_per_s_in_window": s["delivered_per_s_in_window"],
                "lost": s["lost_events"], "conns_lost": s["conns_lost"],
                "p50_ms": s["latency"].get("p50_ms"), "p99_ms": s["latency"].get("p99_ms"),  # type: ignore[union-attr]
                "max_ms": s["latency"].get("max_ms"), "latency_sampled_conns": s["latency_sampled_conns"],  # type: ignore[union-attr]
                "cpu_core_busy": s["cpu"]["core_busy_pct"], "cpu_proc": s["cpu"]["proc_pct"],  # type: ignore[index]
                "foreign_pct": s["cpu"]["foreign_pct"], "server_loop_probe": s["server_loop_probe"],  # type: ignore[index]
                "server_rss_mib": s["server_rss_mib"], "slow_closed": s["server"]["slow_closed"],  # type: ignore[index]
                "verdict": s["verdict"]} for s in steps]
    emit("maxrate", {
        "subs": subs, "procs": args.procs, "step_duration_s": args.duration,
        "best_rate_msgs_per_s": best["rate"] if best else None,
        "best_delivered_per_s": best["delivered_per_s"] if best else None,
        "steps": summary, "best": best, "server_log_problems": env.problems[:20],
    })


# -- directed ---------------------------------------------------------------------------


async def cmd_directed(args: argparse.Namespace) -> None:
    fmt = args.topic_prefix + ".{i}"
    env = Env(args, "directed", args.topics, fmt, args.topics, directed=True)
    counts = [0] * args.topics
    rng = random.Random(args.seed)

    async def once() -> dict[str, object]:
        for i in range(len(counts)):
            counts[i] = 0
        return await env.window(args.rate, _tallying(args.topics, fmt, counts, rng), directed_counts=counts)

    try:
        await env.open()
        res = await with_retries(env, once)
    finally:
        await env.close()
    res["server_log_problems"] = env.problems[:20]
    res["verdict"] = verdict(res, args.max_p99_ms) or "ok"
    emit("directed", {"topics": args.topics, "procs": args.procs, **res})


def _tallying(ntopics: int, fmt: str, counts: list[int], rng: random.Random):  # type: ignore[no-untyped-def]
    names = [fmt.format(i=i).encode() for i in range(ntopics)]
    tmpl = (b'{"topic":"%s","data":{"t":%.6f,"sym":"ACME","px":100.00,"qty":100,"n":%d,"pad":"'
            + b"x" * 40 + b'"}}')

    def make(k: int, first: int) -> tuple[bytes, None]:
        idx = [rng.randrange(ntopics) for _ in range(k)]
        for i in idx:
            counts[i] += 1
        t = time.time()
        return b"[" + b",".join([tmpl % (names[i], t, first + j) for j, i in enumerate(idx)]) + b"]", None

    return make


# -- command line -----------------------------------------------------------------------


def add_window_args(p: argparse.ArgumentParser) -> None:
    """Publisher, pass/fail and quiet-machine options shared by every measuring command."""
    p.add_argument("--pub-conns", type=int, default=4, help="publisher keep-alive connections")
    p.add_argument("--max-p99-ms", type=float, default=2000.0, help="latency p99 above this fails a run")
    p.add_argument("--attempts", type=int, default=3,
                   help="measure a window again (up to this many times) if other processes disturbed it")
    p.add_argument("--max-foreign", type=float, default=20.0,
                   help="CPU %% of processes not ours during a window above which it is measured again")
    p.add_argument("--quiet-wait", type=float, default=120.0,
                   help="before a measurement, wait up to this many s for both cores to be idle (0 = don't)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--procs", type=int, default=1, help="subscriber processes (all on core 1)")
        p.add_argument("--server-arg", action="append", help="extra argument for `ssegw serve` (repeatable)")
        add_window_args(p)

    p = sub.add_parser("rss", help="server RSS per idle subscribed connection")
    common(p)
    p.add_argument("--conns", type=int, nargs="+", default=[1000, 15000])
    p.add_argument("--topic", default="idle")

    p = sub.add_parser("fanout", help="N subscribers on one topic, R msg/s")
    common(p)
    p.add_argument("--subs", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=100)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--sample", type=int, default=500, help="most connections parsing every event's latency")
    p.add_argument("--min-sample", type=int, default=20, help="fewest connections parsing latency")
    p.add_argument("--parse-budget", type=int, default=100_000,
                   help="events/s the client may parse for latency (sample = budget / rate, ~1 us each)")
    p.add_argument("--topic", default="ticker")
    p.add_argument("--count", choices=("scan", "seq"), default="seq",
                   help="scan: bytes.count over every byte (exact per connection); seq: newest event sequence "
                        "per read, O(1) per read, sampled connections check continuity (lighter client)")

    p = sub.add_parser("maxrate", help="highest sustained fan-out rate with every event delivered")
    common(p)
    p.add_argument("--subs", type=int, default=10_000)
    p.add_argument("--start", type=int, default=100, help="first publish rate (msg/s); doubled each step")
    p.add_argument("--max-rate", type=int, default=102_400)
    p.add_argument("--duration", type=float, default=10, help="seconds per step")
    p.add_argument("--sample", type=int, default=500, help="most connections parsing latency")
    p.add_argument("--no-refine", dest="refine", action="store_false",
                   help="do not try x1.5 the last good rate after the first failing step")
    p.add_argument("--min-sample", type=int, default=20, help="fewest connections parsing latency")
    p.add_argument("--parse-budget", type=int, default=100_000,
                   help="events/s the client may parse for latency (sample = budget / rate, ~1 us each)")
    p.add_argument("--topic", default="ticker")
    p.add_argument("--count", choices=("scan", "seq"), default="seq",
                   help="scan: bytes.count over every byte (exact per connection); seq: newest event sequence "
                        "per read, O(1) per read, sampled connections check continuity (lighter client)")

    p = sub.add_parser("directed", help="one topic per subscriber, random directed messages")
    common(p)
    p.add_argument("--topics", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=2000)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--topic-prefix", default="user")
    p.add_argument("--seed", type=int, default=1)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pin_self()
    import uvloop

    fn = {"rss": cmd_rss, "fanout": cmd_fanout, "maxrate": cmd_maxrate, "directed": cmd_directed}[args.cmd]
    uvloop.run(fn(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
