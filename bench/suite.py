"""The suites behind ``python -m bench standard`` and ``python -m bench smoke``.

A suite is a list of (group, scenario instance) pairs run one after the other with
engine.run_user (each with its own fresh server and subscribers), plus a headless Locust run
of bench/locustfile.py against a fresh ssegw.  Everything lands in one directory:
``standard.json`` / ``smoke.json`` (every scenario's full result), the PNG plots and
``report.md`` (plots.py, report.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import engine  # noqa: E402
import run  # noqa: E402
import scenarios as sc  # noqa: E402
from common import BENCH, PYTHON, RESULTS, Server, code_version, log  # noqa: E402

BASELINES = ("sse-starlette", "aiohttp-sse")
ALL = ("ssegw", *BASELINES)


def standard_plan(targets: tuple[str, ...]) -> list[tuple[str, engine.SSEUser]]:
    """~10 minutes on two quiet cores, ~13 on a busy shared machine (windows measured again);
    no run above 3,000 connections."""
    plan: list[tuple[str, engine.SSEUser]] = []
    for t in targets:
        plan.append(("rates", sc.RateSweepUser(target=t, users=1000, rates=(10, 30, 100, 300, 1000), duration=6.0)))
        for n in (500, 1000, 2000, 3000):
            plan.append(("subs", sc.TickerUser(target=t, users=n, rate=50, duration=5.0)))
        plan.append(("directed", sc.DirectedUser(target=t, users=1000, rate=500, duration=6.0)))
        plan.append(("storm", sc.StormUser(target=t, users=1000, storm=1500, rate=30, duration=10.0)))
    if "ssegw" in targets:
        for ms in (5, 15, 50, 100):
            plan.append(("flush", sc.TickerUser(users=1000, rate=200, duration=6.0,
                                                server_args=("--flush-interval", f"{ms}ms"))))
    for _, user in plan:
        user.quiet_wait = 5.0  # then measured anyway, and once more if others took > 20 % CPU
    return plan


def smoke_plan(targets: tuple[str, ...], inject_gap: bool) -> list[tuple[str, engine.SSEUser]]:
    """Every scenario class at a tiny size: about 30 seconds."""
    plan: list[tuple[str, engine.SSEUser]] = [
        ("rates", sc.RateSweepUser(users=40, rates=(20, 100), duration=1.5, inject_gap=inject_gap)),
        ("directed", sc.DirectedUser(users=40, rate=100, duration=1.5)),
        ("storm", sc.StormUser(users=40, storm=60, rate=50, duration=3.0)),
        ("flush", sc.TickerUser(users=40, rate=50, duration=1.5, server_args=("--flush-interval", "50ms"))),
    ]
    for t in targets:
        if t != "ssegw":
            plan.append(("subs", sc.TickerUser(target=t, users=30, rate=20, duration=1.5)))
    for _, user in plan:
        user.quiet_wait = 0
        user.attempts = 1
    return plan


# -- Locust ------------------------------------------------------------------------------


def run_locust(out: Path, users: int, seconds: int, extra: list[str] | None = None) -> dict[str, object]:
    """bench/locustfile.py headless against a fresh ssegw (core 0); Locust on core 1."""
    srv = Server(run.SERVER_CORE, [], out / "server-locust.log").start()
    prefix = out / "locust"
    if prefix.is_relative_to(BENCH.parent):  # the command line in the report: no machine paths
        prefix = prefix.relative_to(BENCH.parent)
    args = ["-f", "bench/locustfile.py", "--headless", "-u", str(users), "-r", str(users), "-t", f"{seconds}s",
            "--host", f"http://127.0.0.1:{srv.port}", "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
            "--exit-code-on-error", "1", *(extra or [])]
    cmd = ["taskset", "-c", run.CLIENT_CORE, PYTHON, "-m", "locust", *args]
    log("locust " + " ".join(args))
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=BENCH.parent, capture_output=True, text=True, timeout=seconds + 60)
        code, tail = p.returncode, (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        code, tail = -1, "locust did not stop in time"
    finally:
        srv.stop()
    res: dict[str, object] = {"users": users, "seconds": seconds, "exit_code": code, "args": args,
                              "elapsed_s": round(time.monotonic() - t0, 1), "stats": read_csv(BENCH.parent / f"{prefix}_stats.csv"),
                              "failures": read_csv(BENCH.parent / f"{prefix}_failures.csv")}
    sse = [r for r in res["stats"] if r.get("Type") == "SSE"]  # type: ignore[attr-defined]
    events = sum(int(r["Request Count"]) for r in sse)
    bad = sum(int(r["Failure Count"]) for r in sse)
    why = []
    if code != 0:
        why.append(f"locust exit code {code}")
    if not events:
        why.append("no SSE event received")
    if bad:
        why.append(f"{bad} SSE failures (gap, duplicate or reset)")
    res["sse_events"], res["sse_failures"] = events, bad
    res["verdict"] = why or "ok"
    if why:
        res["output_tail"] = tail
    return res


def read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


# -- the suites --------------------------------------------------------------------------


def machine() -> dict[str, object]:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
            "load_avg": os.getloadavg()}


async def run_plan(plan: list[tuple[str, engine.SSEUser]]) -> list[dict[str, object]]:
    outs = []
    for group, user in plan:
        out = await engine.run_user(user)
        out["group"] = group
        outs.append(out)
        log(f"{group} {out['scenario']} on {out['target']}: {'ok' if out['ok'] else engine.problems(out) or out.get('error')}"
            f" ({out['elapsed_s']} s)")
    return outs


def main(args: argparse.Namespace) -> int:
    import plots
    import report

    if args.cmd == "report":
        d = Path(args.dir)
        doc = json.loads(next(d.glob("*.json")).read_text())
        report.write(d, doc, plots.draw(d, doc))
        return 0
    import uvloop

    t0 = time.monotonic()
    targets = tuple(args.targets)
    stamp = time.strftime("%Y-%m-%d")
    out = Path(args.out) if args.out else RESULTS / (stamp if args.cmd == "standard" else f"smoke-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    if args.cmd == "standard":
        plan = standard_plan(targets)
    else:
        plan = smoke_plan(targets, args.inject_gap)
    from scale import use_code  # a git-archive snapshot of --code for every server of the run

    doc: dict[str, object] = {"suite": args.cmd, "command": "python -m bench " + " ".join(sys.argv[1:]),
                              "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": code_version(),
                              "server_code": use_code(args.code), "machine": machine()}
    doc["runs"] = uvloop.run(run_plan(plan))
    if not args.no_locust:
        extra = ["--ssegw-inject-gap"] if getattr(args, "inject_gap", False) else []
        doc["locust"] = (run_locust(out, 200, 20) if args.cmd == "standard" else run_locust(out, 24, 6, extra))
    doc["elapsed_s"] = round(time.monotonic() - t0, 1)
    failed = [f"{r['group']} {r['scenario']} on {r['target']}: {engine.problems(r) or r.get('error')}"
              for r in doc["runs"] if not r["ok"]]  # type: ignore[attr-defined]
    if "locust" in doc and doc["locust"]["verdict"] != "ok":  # type: ignore[index]
        failed.append(f"locust: {doc['locust']['verdict']}")  # type: ignore[index]
    doc["failed"] = failed
    (out / f"{args.cmd}.json").write_text(json.dumps(doc, indent=1))
    pngs = plots.draw(out, doc)
    report.write(out, doc, pngs)
    log(f"{args.cmd}: {len(doc['runs'])} scenarios in {doc['elapsed_s']} s; results in {out}")  # type: ignore[arg-type]
    for f in failed:
        log("FAILED " + f)
    # A smoke run fails on lost or repeated events; the standard suite reports baselines
    # that cannot keep up (that is a finding, not an error) but fails when ssegw does.
    if args.cmd == "smoke":
        return 1 if failed else 0
    return 1 if any(" on ssegw" in f or f.startswith("locust") for f in failed) else 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    for name, helptext in (("standard", "the standard suite: ssegw and the baselines, JSON + PNG + report.md"),
                           ("smoke", "every scenario at a tiny size (CI); exit 1 on any lost or repeated event")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--out", help="result directory (default bench/results/<date>/, smoke-<date>/ for smoke)")
        p.add_argument("--targets", nargs="+", choices=ALL, default=list(ALL), help="servers to measure")
        p.add_argument("--no-locust", action="store_true", help="leave out the Locust run")
        p.add_argument("--code", default="HEAD" if name == "standard" else "worktree",
                       help="the ssegw measured: a commit (run from a git-archive snapshot, so that uncommitted "
                            "changes in the working tree are not measured) or 'worktree'")
        if name == "smoke":
            p.add_argument("--inject-gap", action="store_true",
                           help="self-check: make the ticker scenario and Locust's publisher skip one event "
                                "(the smoke run must then fail)")
    p = sub.add_parser("report", help="redraw the plots and report.md of a finished run")
    p.add_argument("dir")
