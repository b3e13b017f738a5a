"""What ``WAIT`` costs a publish: ``python bench/waitcost.py [options]``.

One gateway worker on a primary ``redis-server`` with one replica (``replicaof``, both
without persistence, on loopback), published to by the paced batch publisher of
``loadgen.py`` (4 keep-alive connections, a POST every 10 ms carrying the messages due, so
about 1 message per POST at 100 msg/s and 10 at 1,000 msg/s), no subscribers.  For each
mode -- ``wait`` (``redis_wait_replicas`` auto, which resolves to 1 here: FCALL + WAIT in one
pipeline) and ``nowait`` (``--redis-wait-replicas 0``: the FCALL alone) -- and each rate:
``/publish`` round trip p50/p99/max, msg/s answered 200, and the WAIT calls the primary
counted (so a ``wait`` row that did not WAIT cannot pass for one).

Loopback replication lag is near zero: this measures what the extra round trip through the
replica's acknowledgement costs, not a real network's lag.  The gateway runs on
``--server-core``; both redis-servers, the publisher and this process on ``--client-core``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, Server, emit, log  # noqa: E402
from loadgen import Publisher, ticker_body  # noqa: E402
from scale import use_code  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from redis_harness import RedisServer, start_replica  # noqa: E402


def pin(pid: int, cores: str) -> None:
    want = {int(c) for c in cores.split(",")}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), want)
        except OSError:
            pass  # a thread that just ended


def wait_calls(rs: RedisServer) -> int:
    stat = rs.info("commandstats").get("cmdstat_wait", "calls=0")
    return int(stat.split(",")[0].removeprefix("calls="))


def ready(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


async def run_mode(args: argparse.Namespace, mode: str, primary: RedisServer) -> list[dict[str, object]]:
    extra = ["--redis", primary.url, "--redis-wait-replicas", "auto" if mode == "wait" else "0",
             "--redis-wait-timeout", args.wait_timeout]
    srv = Server(core=args.server_core, extra=extra).start()
    rows = []
    try:
        deadline = time.monotonic() + 15
        while not ready(srv.admin_port):
            if time.monotonic() > deadline:
                raise RuntimeError("gateway never became ready:\n" + "".join(srv.lines[-20:]))
            await asyncio.sleep(0.05)
        pub = Publisher(srv.port, nconns=4)
        await pub.connect()
        make = ticker_body(b"waitcost")
        await pub.run(args.rates[0], args.warmup, make)  # connections, ROLE, caches
        for rate in args.rates:
            for rep in range(args.repeat):
                w0 = wait_calls(primary)
                res = await pub.run(rate, args.duration, make)
                waits = wait_calls(primary) - w0
                row = {"mode": mode, "rate": rate, "rep": rep, "waits": waits,
                       "achieved_rate": res["achieved_rate"], "post_rtt": res["post_rtt"],
                       "requests": res["requests"], "statuses": res["statuses"]}
                log(f"{mode} {rate:g} msg/s: {row}")
                rows.append(row)
        pub.close()
        problems = srv.problems()
        if problems:
            log("server problems: " + " | ".join(problems[:5]))
    finally:
        srv.stop()
    return rows


async def main_async(args: argparse.Namespace) -> None:
    pin(os.getpid(), args.client_core)
    code = use_code(args.code)
    work = Path(tempfile.mkdtemp(prefix="ssegw-bench-waitcost-"))
    primary = RedisServer(work / "primary", persist=False).start()
    replica = None
    try:
        replica = start_replica(primary, work / "replica")
        for rs in (primary, replica):
            assert rs.proc is not None
            pin(rs.proc.pid, args.client_core)
        log(f"primary :{primary.port}, replica :{replica.port} (core {args.client_core}); "
            f"gateway on core {args.server_core}")
        rows = []
        for mode in args.modes:
            rows += await run_mode(args, mode, primary)
        lag = replica.info("replication").get("master_repl_offset"), primary.info("replication").get("master_repl_offset")
        emit("waitcost", {"gateway_code": code, "conditions": {"server_core": args.server_core, "client_core": args.client_core,
                                         "duration_s": args.duration, "wait_timeout": args.wait_timeout,
                                         "publisher_conns": 4, "tick_ms": 10, "subscribers": 0,
                                         "replica_offset_vs_primary": lag},
                          "rows": rows})
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/waitcost.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[100, 1000])
    ap.add_argument("--modes", nargs="+", choices=("wait", "nowait"), default=["nowait", "wait"])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of publishing per row")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--wait-timeout", default="1s", help="--redis-wait-timeout of the gateway")
    ap.add_argument("--code", default="HEAD",
                    help="gateway code: a commit (run from a `git archive` snapshot) or 'worktree'")
    ap.add_argument("--server-core", default="0", help="taskset core of the gateway")
    ap.add_argument("--client-core", default="1", help="core of both redis-servers, the publisher and this process")
    return ap


def main(argv: list[str] | None = None) -> int:
    asyncio.run(main_async(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
