"""Paired publish-ingest comparison on one core: ``python bench/paired.py A B [options]``.

On this shared machine the speed of one core moves by +-20 % over minutes, more than most
changes worth measuring.  Runs of A and then B minutes apart compare the machine's moods as
much as the code.  Here two gateways run side by side, both pinned to core 0, and wrk
(core 1) loads one at a time in short slices, A then B then B then A ..., so that every
pair of slices sees nearly the same machine.  The result is the ratio B/A per pair (median
and spread), beside each gateway's messages/s.

A and B are each ``DIR`` (a checkout or a ``git archive`` export whose ``ssegw`` is imported)
or ``DIR@PYTHON`` (the same, run by another interpreter, e.g. another venv's ``bin/python``).
Both gateways get ingest.py's settings (history 1,000 per topic, 1 h; nobody subscribed) and
the same wrk script (``bench/wrk/publish_batch.lua``, ``--batch`` messages per POST to 10,000
topics; ``--batch 1`` uses ``publish_single.lua``).  Both gateways' histories grow through
the run alike.  Only processes started here are stopped, by PID.  Prints one JSON line and
appends it to ``bench/results/paired.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import PYTHON, ROOT, Server, emit, log  # noqa: E402
from ingest import wrk_cmd  # noqa: E402

RPS = re.compile(r"Requests/sec:\s+([0-9.]+)")


def start(spec: str, tag: str) -> tuple[Server, dict[str, str]]:
    code, _, python = spec.partition("@")
    python = python or PYTHON
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYTHONSAFEPATH")}
    os.environ["PYTHONPATH"] = os.path.abspath(code)
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        srv = Server(core="0")
        srv.cmd[srv.cmd.index(PYTHON)] = python
        srv.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    r = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True,
                       timeout=30)
    log(f"{tag}: {spec} (Python {r.stdout.strip()}) on :{srv.port}")
    return srv, {"spec": spec, "code": os.path.abspath(code), "python": python, "python_version": r.stdout.strip()}


def slice_rps(port: int, seconds: int, batch: int, conns: int) -> float:
    script = "publish_single.lua" if batch == 1 else "publish_batch.lua"
    env = {**os.environ, "BATCH": str(batch), "TOPICS": "10000"}
    out = subprocess.run(wrk_cmd(script, port, seconds, 1, conns), cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=seconds + 30)
    m = RPS.search(out.stdout)
    if m is None or "Non-2xx" in out.stdout or "Socket errors" in out.stdout:
        raise SystemExit(f"wrk against :{port} failed:\n{out.stdout}\n{out.stderr}")
    return float(m.group(1)) * batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", metavar="A", help="DIR or DIR@PYTHON")
    ap.add_argument("b", metavar="B", help="DIR or DIR@PYTHON")
    ap.add_argument("--pairs", type=int, default=10, help="A/B slice pairs (order alternates)")
    ap.add_argument("--slice", type=int, default=2, help="seconds per slice (wrk's -d)")
    ap.add_argument("--batch", type=int, default=100, help="messages per POST (1: single publishes)")
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=2, help="seconds of load on each gateway first")
    args = ap.parse_args()
    os.sched_setaffinity(0, {1})
    srvs: list[Server] = []
    try:
        a, info_a = start(args.a, "A")
        srvs.append(a)
        b, info_b = start(args.b, "B")
        srvs.append(b)
        for s in (a, b):
            slice_rps(s.port, args.warmup, args.batch, args.conns)
        ra: list[float] = []
        rb: list[float] = []
        for i in range(args.pairs):
            order = [(a, ra), (b, rb)] if i % 2 == 0 else [(b, rb), (a, ra)]
            for s, out in order:
                out.append(slice_rps(s.port, args.slice, args.batch, args.conns))
            log(f"pair {i + 1}: A {ra[-1]:,.0f} B {rb[-1]:,.0f} msg/s, B/A {rb[-1] / ra[-1]:.3f}")
    finally:
        for s in srvs:
            s.stop()
    ratios = sorted(y / x for x, y in zip(ra, rb, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    result = {
        "a": info_a, "b": info_b,
        "batch": args.batch, "conns": args.conns, "slice_s": args.slice, "pairs": args.pairs,
        "a_msg_s": {"median": round(statistics.median(ra)), "min": round(min(ra)), "max": round(max(ra))},
        "b_msg_s": {"median": round(statistics.median(rb)), "min": round(min(rb)), "max": round(max(rb))},
        "b_over_a": {"median": round(statistics.median(ratios), 3), "q1": round(q[0], 3), "q3": round(q[2], 3),
                     "min": round(ratios[0], 3), "max": round(ratios[-1], 3),
                     "b_faster_in": f"{sum(r > 1 for r in ratios)} of {len(ratios)} pairs"},
        "conditions": "both gateways on core 0 side by side, wrk and this coordinator on core 1; slices alternate",
    }
    log(f"B/A median {result['b_over_a']['median']} (q1 {q[0]:.3f}, q3 {q[2]:.3f}); A median "
        f"{result['a_msg_s']['median']:,} B median {result['b_msg_s']['median']:,} msg/s")
    emit("paired", result)


if __name__ == "__main__":
    main()
