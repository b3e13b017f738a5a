"""What keyed state costs a publish in Redis: ``python bench/keyedcost.py [--before REV]``.

Loads one Redis Function library after another into a throw-away ``redis-server`` (core 1, no
persistence) and times ``ssegw_publish`` with batches of 100 ~70-byte messages over 10 topics and
500 keys (``history_size`` 1000, ``history_ttl`` 1 h, so every publish also trims history):

- the library of ``--before`` (default ``590c5bd^``, the last one without keyed state);
- the current library with ``max_keys`` 10,000 (the default);
- the current library with ``max_keys`` 0 (keyed state off).

Reported per message: the time inside Redis (``INFO commandstats``, ``usec_per_call`` of FCALL
over 100) and the client's wall time per message (one connection, round trips included); the
best of 3 rounds of 300 calls, each library measured 3 times in turn.  Prints one JSON line and
appends it to ``bench/results/keyedcost.jsonl``.  Only the redis-server started here is stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import redis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, emit, log  # noqa: E402
from snapshot import start_redis  # noqa: E402

BODY = b'event: tick\ndata: {"price":189.3,"pad":"xxxxxxxxxxxxxxxxxxxx"}\n'
PRE = "{ssegw:0}"


def measure(r: redis.Redis, lib: str, max_keys: int | None) -> tuple[float, float]:
    """(redis µs per message, client µs per message) for one library."""
    r.flushall()
    r.config_resetstat()
    r.function_load(lib, replace=True)
    keys = [f"{PRE}:seq", f"{PRE}:epoch", f"{PRE}:clock", ""] + [f"{PRE}:h:t{j % 10}" for j in range(100)]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(300):
            args: list[object] = [100, 7_200_000]
            for j in range(100):
                args += [f"{PRE}:c:t{j % 10}", f"k{(i * 100 + j) % 500}", 1, BODY, 1000, 3_600_000]
            if max_keys is not None:
                args += [max_keys] * 100
            r.fcall("ssegw_publish", len(keys), *keys, *args)
        best = min(best, (time.perf_counter() - t0) / 30_000)
    stat = r.info("commandstats").get("cmdstat_fcall", {})
    return float(stat.get("usec_per_call", 0.0)) / 100, best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="590c5bd^", help="git revision of the library without keyed state")
    args = ap.parse_args()
    old = subprocess.run(["git", "show", f"{args.before}:ssegw/broker/redis_lib.lua"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    new = (ROOT / "ssegw" / "broker" / "redis_lib.lua").read_text()
    runs = {"before": (old, None), "max_keys_10000": (new, 10_000), "max_keys_0": (new, 0)}
    proc, url = start_redis()
    try:
        r = redis.Redis.from_url(url)
        got: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        for _ in range(3):
            for name, (lib, mk) in runs.items():
                got[name].append(measure(r, lib, mk))
                log(f"{name}: {got[name][-1][0]:.2f} µs in redis, {got[name][-1][1]:.2f} µs at the client")
        r.close()
    finally:
        proc.terminate()
        proc.wait(10)
    emit("keyedcost", {"before": args.before, **{
        name: {"redis_us_per_msg": round(min(v[0] for v in vals), 2),
               "client_us_per_msg": round(min(v[1] for v in vals), 2)} for name, vals in got.items()}})


if __name__ == "__main__":
    main()
