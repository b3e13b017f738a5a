"""Shared pieces of the benchmark: the server process, /proc sampling, latency histograms.

Nothing here is on a hot path except :func:`hist_from_sorted` (run once per snapshot).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
#: The interpreter the gateway (and the Python load generators) run on: ``$SSEGW_BENCH_PYTHON``
#: when set (another venv, e.g. one made by the distribution's ``python3``: tuning.md
#: "Publish ingest"), else this checkout's ``.venv``, else the one running the bench.
PYTHON = (os.environ.get("SSEGW_BENCH_PYTHON")
          or (str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists()
              else sys.executable))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SERVING = re.compile(r"serving on http://[^:]+:(\d+) \(admin http://[^:]+:(\d+)\)")

# Latency histogram: geometric buckets of 1 % from 10 us up to ~110 s.  Bucket k holds
# values in [EDGES[k-1], EDGES[k]); bucket 0 everything below 10 us (clock noise included).
LAT_BASE = 10e-6
LAT_RATIO = 1.01
EDGES = [LAT_BASE * LAT_RATIO**k for k in range(1620)]


def log(msg: str) -> None:
    sys.stderr.write(time.strftime("%H:%M:%S ") + msg + "\n")
    sys.stderr.flush()


# -- /proc -----------------------------------------------------------------------------


def proc_cpu2(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by ``pid``; NaNs if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return math.nan, math.nan
    fields = raw[raw.rfind(b")") + 2:].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid``; NaN if it is gone."""
    u, s = proc_cpu2(pid)
    return u + s


def proc_rss(pid: int) -> int:
    """VmRSS of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def core_times() -> dict[str, tuple[int, ...]]:
    """{"cpu0": (busy, total, user+nice, system, irq+softirq), ...} in clock ticks (/proc/stat)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                v = [int(x) for x in parts[1:9]] + [0] * max(0, 9 - len(parts))
                idle = v[3] + v[4]
                total = sum(v[:8])
                out[parts[0]] = (total - idle, total, v[0] + v[1], v[2], v[5] + v[6])
    return out


def all_cpu() -> dict[int, tuple[str, float]]:
    """{pid: (command name, CPU seconds)} of every process on the machine."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        r = raw.rfind(b")")
        name = raw[raw.find(b"(") + 1:r].decode("latin-1")
        fields = raw[r + 2:].split()
        out[int(d)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


class CpuSampler:
    """CPU use of named processes and of each core between :meth:`start` and :meth:`stop`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = 0.0
        self.c0: dict[str, tuple[float, float]] = {}
        self.k0: dict[str, tuple[int, int]] = {}

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.c0 = {n: proc_cpu2(p) for n, p in self.pids.items()}
        self.k0 = core_times()
        self.a0 = all_cpu()

    def stop(self) -> dict[str, object]:
        dt = time.monotonic() - self.t0
        procs = {}
        sys_pct = {}
        for n, p in self.pids.items():
            u, s = proc_cpu2(p)
            procs[n] = round((u + s - sum(self.c0[n])) / dt * 100, 1)
            sys_pct[n] = round((s - self.c0[n][1]) / dt * 100, 1)
        k1 = core_times()
        cores = {}
        detail = {}
        irq = 0.0
        for c, v1 in k1.items():
            v0 = self.k0.get(c, (0,) * len(v1))
            span = max(1, v1[1] - v0[1])
            cores[c] = round((v1[0] - v0[0]) / span * 100, 1)
            detail[c] = {"user": round((v1[2] - v0[2]) / span * 100, 1), "system": round((v1[3] - v0[3]) / span * 100, 1),
                         "irq_softirq": round((v1[4] - v0[4]) / span * 100, 1)}
            irq += (v1[4] - v0[4]) / span * 100
        ours = sum(v for v in procs.values() if v == v)
        # CPU used by processes that are not ours (other work on the machine) during the
        # window.  Softirq time (where loopback TCP receive processing is accounted, not to
        # any process) is ours too and is left out.
        foreign = round(max(0.0, sum(cores.values()) - ours - irq), 1)
        # Who else ran: the biggest consumers that are not ours (processes that started and
        # ended inside the window are not seen).
        mine = set(self.pids.values())
        others: dict[str, float] = {}
        for pid, (name, t1) in all_cpu().items():
            if pid in mine:
                continue
            t0 = self.a0.get(pid, (name, 0.0))[1]
            if t1 - t0 > 0:
                others[name] = others.get(name, 0.0) + (t1 - t0) / dt * 100
        top = dict(sorted(((k, round(v, 1)) for k, v in others.items() if v >= 1), key=lambda kv: -kv[1])[:6])
        return {"window_s": round(dt, 2), "proc_pct": procs, "proc_sys_pct": sys_pct, "core_busy_pct": cores,
                "core_detail_pct": detail, "foreign_pct": foreign, "others_pct": top}


async def wait_quiet(max_wait: float, busy_below: float = 20.0, sample: float = 2.0) -> dict[str, object]:
    """Wait (at most ``max_wait`` s) until every core is less than ``busy_below`` % busy over
    ``sample`` s, so that a run does not start on top of someone else's CPU load."""
    t0 = time.monotonic()
    while True:
        k0 = core_times()
        await asyncio.sleep(sample)
        k1 = core_times()
        busy = {c: round((k1[c][0] - k0[c][0]) / max(1, k1[c][1] - k0[c][1]) * 100, 1) for c in k1}
        waited = time.monotonic() - t0
        if max(busy.values()) < busy_below or waited >= max_wait:
            if max(busy.values()) >= busy_below:
                log(f"machine still busy after {waited:.0f} s: {busy}; starting anyway")
            return {"waited_s": round(waited, 1), "core_busy_pct_before": busy}


# -- latency ---------------------------------------------------------------------------


def hist_from_sorted(vals: list[float]) -> dict[int, int]:
    """Sparse bucket counts of sorted ``vals`` (one bisect per bucket edge, not per value)."""
    out: dict[int, int] = {}
    n = len(vals)
    lo = 0
    for k, edge in enumerate(EDGES):
        if lo >= n:
            return out
        hi = bisect.bisect_left(vals, edge, lo)
        if hi > lo:
            out[k] = hi - lo
            lo = hi
    if lo < n:
        out[len(EDGES)] = n - lo
    return out


def exact_summary(vals: list[float]) -> dict[str, object]:
    """p50/p90/p99/p99.9/max in ms of sorted ``vals``."""
    n = len(vals)
    if not n:
        return {"n": 0}

    def q(p: float) -> float:
        return round(vals[min(n - 1, int(p * n))] * 1000, 2)

    return {"n": n, "p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99), "p999_ms": q(0.999),
            "max_ms": round(vals[-1] * 1000, 2), "mean_ms": round(sum(vals) / n * 1000, 2)}


def merge_summaries(parts: list[dict[str, object]]) -> dict[str, object]:
    """Combine the latency reports of several client processes.

    One process: its exact figures.  Several: percentiles from the merged 1 % histogram
    (upper bucket edge), max and mean exact."""
    parts = [p for p in parts if p and p.get("n")]
    if not parts:
        return {"n": 0}
    if len(parts) == 1:
        return {k: v for k, v in parts[0].items() if k != "hist"}
    hist: dict[int, int] = {}
    for p in parts:
        for k, c in p["hist"].items():  # type: ignore[union-attr]
            hist[int(k)] = hist.get(int(k), 0) + c
    n = sum(hist.values())
    keys = sorted(hist)

    def q(p: float) -> float:
        target = p * n
        cum = 0
        for k in keys:
            cum += hist[k]
            if cum > target:
                return round(EDGES[min(k, len(EDGES) - 1)] * 1000, 2)
        return round(EDGES[-1] * 1000, 2)

    return {"n": n, "p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99), "p999_ms": q(0.999),
            "max_ms": max(p["max_ms"] for p in parts),  # type: ignore[type-var]
            "mean_ms": round(sum(p["mean_ms"] * p["n"] for p in parts) / n, 2),  # type: ignore[operator]
            "merged_from": len(parts)}


# -- the server ------------------------------------------------------------------------


#: The gateway's memory allocator (``--allocator`` of flood.py and ingest.py): the environment
#: the gateway runs with.  "jemalloc" is what systemd/ssegw.service sets.
ALLOCATORS: dict[str, dict[str, str]] = {
    "pymalloc": {},
    "jemalloc": {"LD_PRELOAD": "libjemalloc.so.2", "PYTHONMALLOC": "malloc"},
}
#: The environment every Server adds (set from --allocator).
GATEWAY_ENV: dict[str, str] = {}


class Server:
    """``python -m ssegw serve`` pinned to a core, its ports read from its log line."""

    def __init__(self, core: str = "0", extra: list[str] | None = None, log_path: Path | None = None) -> None:
        self.cmd = ["taskset", "-c", core, PYTHON, "-m", "ssegw", "serve", "--port", "0", "--admin-port", "0",
                    "--heartbeat-interval", "15s", "--flush-interval", "15ms", "--max-connections", "200000",
                    "--history-size", "1000", *(extra or [])]
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.port = self.admin_port = 0
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSEGW_")}
        env.update(GATEWAY_ENV)
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            m = SERVING.search(line)
            if m:
                self.port, self.admin_port = int(m.group(1)), int(m.group(2))
                self._reader = threading.Thread(target=self._drain, daemon=True)
                self._reader.start()
                log(f"server pid {self.pid} on :{self.port} admin :{self.admin_port}")
                return self
        self.stop()
        raise RuntimeError("server did not start:\n" + "".join(self.lines))

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def stats(self) -> dict[str, object]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/admin/stats", timeout=30) as r:
            return json.loads(r.read())["workers"][0]  # type: ignore[no-any-return]

    def rss(self) -> int:
        return proc_rss(self.pid)

    def problems(self) -> list[str]:
        """Log lines at WARNING or above (after the start line)."""
        return [ln.rstrip() for ln in self.lines if " WARNING " in ln or " ERROR " in ln or " CRITICAL " in ln
                or "Traceback" in ln]

    def stop(self) -> int | None:
        """SIGTERM (drain), then SIGKILL after 20 s; only our own process, by PID."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text("".join(self.lines))
        return p.returncode


def stats_delta(before: dict[str, object], after: dict[str, object]) -> dict[str, object]:
    keys = ("events_published", "events_delivered", "flushes", "writes", "bytes_written", "held",
            "publish_requests", "heartbeats", "protocol_errors", "head_timeouts")
    out: dict[str, object] = {k: after.get(k, 0) - before.get(k, 0) for k in keys}  # type: ignore[operator]
    out["streams_open"] = after.get("streams_open")
    out["slow_closed"] = after.get("slow_closed")
    out["responses"] = after.get("responses")
    return out


def code_version() -> dict[str, object]:
    """Which server code was measured: HEAD plus a hash of the ssegw/ sources as they are on
    disk (the tree may carry uncommitted changes)."""
    h = hashlib.sha256()
    for f in sorted((ROOT / "ssegw").rglob("*.py")):
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--", "ssegw"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", ""
    return {"head": head, "ssegw_dirty": bool(dirty), "ssegw_sha256": h.hexdigest()[:12]}


def prom_hists(text: str, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Cumulative bucket counts, _sum and _count of Prometheus histograms in ``text``."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        for name in names:
            if not line.startswith(name):
                continue
            rest = line[len(name):]
            h = out.setdefault(name, {})
            if rest.startswith('_bucket{le="'):
                le = rest[len('_bucket{le="'):rest.index('"}')]
                h[le] = float(rest.split()[-1])
            elif rest.startswith("_sum "):
                h["_sum"] = float(rest.split()[-1])
            elif rest.startswith("_count "):
                h["_count"] = float(rest.split()[-1])
    return out


def prom_hist_delta(before: str, after: str, names: tuple[str, ...]) -> dict[str, object]:
    """Per-window summary of server histograms in seconds: count, mean, and the bucket
    bounds (le) that p50 / p99 / the largest observation fall under."""
    b, a = prom_hists(before, names), prom_hists(after, names)
    out: dict[str, object] = {}
    for name, ha in a.items():
        hb = b.get(name, {})
        n = ha.get("_count", 0) - hb.get("_count", 0)
        if n <= 0:
            continue
        les = sorted((k for k in ha if not k.startswith("_")), key=lambda k: math.inf if k == "+Inf" else float(k))
        cum = [(le, ha[le] - hb.get(le, 0)) for le in les]

        def q(p: float, cum: list[tuple[str, float]] = cum, n: float = n) -> str:
            for le, c in cum:
                if c >= p * n:
                    return le
            return "+Inf"

        top = next((le for le, c in cum if c >= n), "+Inf")
        mean = (ha.get("_sum", 0) - hb.get("_sum", 0)) / n
        if name.endswith("_seconds"):
            out[name] = {"n": int(n), "mean_ms": round(mean * 1000, 1), "p50_le_s": q(0.5), "p99_le_s": q(0.99),
                         "max_le_s": top}
        else:
            out[name] = {"n": int(n), "mean": round(mean, 1), "p50_le": q(0.5), "p99_le": q(0.99), "max_le": top}
    return out


def emit(kind: str, result: dict[str, object]) -> None:
    """Print the result as one JSON line and append it to bench/results/<kind>.jsonl."""
    result = {"bench": kind, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": code_version(), **result}
    line = json.dumps(result, separators=(",", ":"))
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"{kind}.jsonl", "a") as f:
        f.write(line + "\n")
    print(line, flush=True)
