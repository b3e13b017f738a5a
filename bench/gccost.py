"""What the worker's periodic full collection costs with history held: ``python bench/gccost.py``.

The worker runs a full (generation-2) collection every ``FULL_GC_S`` to ``FULL_GC_MAX_S``
(server/worker.py, ``full_collect``): it unfreezes every object and traverses them all, and the
loop stands still meanwhile.  Events held in history are objects the collector traverses, so
the pause grows with the history a worker keeps (``history_size`` x topics, within
``history_ttl``).

In one process (no sockets): an embedded broker (``history_size`` 1000, ``history_ttl`` 1 h)
takes ~120-byte messages over ``--topics`` topics in batches of 100 through ``publish_now``,
the publish path's own code, until each size of ``--events`` is held; the young generations are
aged as the tick does (``age_young``), then ``full_collect`` is timed ``--reps`` times (the
median is reported, with ms per million events held).  Pin it to a core
(``taskset -c 1``).  Prints one JSON line and appends it to ``bench/results/gccost.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, emit, log  # noqa: E402

sys.path.insert(0, str(ROOT))

from ssegw.broker.memory import MemoryBroker  # noqa: E402
from ssegw.core.publish import parse_publish  # noqa: E402
from ssegw.server.worker import age_young, full_collect  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, nargs="+", default=[0, 1_000_000, 3_000_000],
                    help="events held when the collection is timed (ascending)")
    ap.add_argument("--topics", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    sizes = sorted(args.events)
    broker = MemoryBroker(lambda t: (1000, 3_600_000), lambda: int(time.time() * 1000))
    pad = "x" * 100
    held = 0
    points = []
    for target in sizes:
        while held < target:
            n = min(100, target - held)
            body = [{"topic": f"m.{(held + j) % args.topics}", "data": {"p": held + j, "s": pad}} for j in range(n)]
            broker.publish_now(parse_publish(body, 1000, orjson.dumps))
            held += n
            if held % 10_000 == 0:
                age_young()
        age_young()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            full_collect()
            times.append((time.perf_counter() - t0) * 1000)
        ms = statistics.median(times)
        log(f"{held:,} events held: full collection {ms:.1f} ms (of {', '.join(f'{t:.1f}' for t in times)})")
        points.append({"events_held": held, "full_collect_ms": round(ms, 1), "runs_ms": [round(t, 1) for t in times]})
    per_million = None
    if len(points) >= 2 and points[-1]["events_held"] > points[0]["events_held"]:
        a, b = points[0], points[-1]
        per_million = round((b["full_collect_ms"] - a["full_collect_ms"])  # type: ignore[operator]
                            / ((b["events_held"] - a["events_held"]) / 1e6), 1)  # type: ignore[operator]
    emit("gccost", {"topics": args.topics, "history_size": 1000, "points": points, "ms_per_million_events": per_million})


if __name__ == "__main__":
    main()
