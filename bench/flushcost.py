"""flushcost: the gateway's own CPU per flush, in process -- no sockets, no event loop.

What one "flush" is here: publish E events to each topic (``Fanout.publish``), then run the
sweep to the end in slices of ``--quota`` subscribers (the worker's ``SLICE_WRITES``) and
write every slice -- ``sweep_step`` + ``Flow.carry_out`` on the new code, ``sweep_step``
(which writes itself) on the old.  Transports are sinks: ``write`` is the C builtin ``len``
(``--sink null``: it keeps nothing) or a counter (``--sink count``), so what is timed is the
fan-out's work, not the kernel's.  Event frames are encoded (``encode_frame``, one id each)
before the clock starts: that is the broker's work, done once per event.

Three cases, timed round-robin (a, b, c, a, b, c, ...) so that a disturbance on the core hits
all three alike:
    a  every connection on topic ``a``
    b  every connection on the same two topics ``a``, ``b`` (one topic set)
    c  connection i on ``a`` and ``t<i % 100>`` (100 topic sets); events go to all 101 topics
    d  (only with ``--cases``) connection i on ``a`` and its own ``u<i>`` (N topic sets, the
       "common topic + a private one" shape); events go to all N + 1 topics
In b and c every connection gets 2E events per flush, published interleaved across topics
(a1 b1 a2 b2 ...), so a connection's merged buffer really is a merge.

Before timing, one flush per case is checked byte for byte: every connection got exactly
one write, equal to chunk(its topics' frames in publish order).  Every timed flush must then
do N writes with nothing held, dropped or aborted; otherwise the run stops with an error
(a benchmark that measures a different path is worse than none).

Which code: the measurement runs in a child process with ``PYTHONSAFEPATH=1
PYTHONPATH=<dir> cwd=<dir>`` (``--code-dir``; default the repo this file is in for ``new``,
``/work/wt-old`` for ``old``); the child checks that ``import ssegw`` came from there and that
its API is the one asked for (``ssegw.core.conn`` exists only in the new code).

Pinning is the caller's: run under ``taskset -c 1`` (the child inherits it); the affinity,
load average and the cores' busy time during the run are printed with the results.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
DEFAULT_DIRS = {"new": str(HERE.parent.parent), "old": "/work/wt-old"}
SETS_C = 100  # distinct second topics in case c


# -- sinks -----------------------------------------------------------------------------


class NullSink:
    """``write`` is the builtin ``len``: a C call that keeps nothing (cheapest possible)."""

    __slots__ = ()
    write = staticmethod(len)


class CountSink:
    __slots__ = ("writes", "nbytes")

    def __init__(self) -> None:
        self.writes = 0
        self.nbytes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.nbytes += len(data)


class RecSink:
    """Keeps every write (only for the check flush)."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)


# -- drivers: one per API ----------------------------------------------------------------


class Trouble:
    """Drops and aborts seen (each one means the timed path is not the fast path)."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def drop(self, conn: object, reason: str) -> None:
        self.events.append(f"drop {reason}")


def new_driver(quota: int, max_buffer: int):  # noqa: ANN201 - returns a small closure set
    from ssegw.core import conn as cm
    from ssegw.core.fanout import Fanout
    from ssegw.core.table import Table
    from ssegw.server.flow import Flow

    trouble = Trouble()

    class BConn(cm.Conn):
        __slots__ = ()

        def abort(self) -> None:
            trouble.events.append("abort")
            cm.advance(self, cm.CLOSE)

    def build(topic_sets: list[tuple[str, ...]]):  # noqa: ANN202
        table = Table()
        fan = Fanout(table, max_buffer, 5_000)
        flow = Flow(fan, trouble.drop, 30_000)
        conns = []
        for topics in topic_sets:
            c = BConn()
            c.init_conn()
            c.transport = NullSink()
            table.add(c)
            for ev in (cm.REQUEST, cm.REQUEST_DONE, cm.ACCEPT_STREAM):
                cm.advance(c, ev)
            table.subscribe(c, topics)
            cm.advance(c, cm.STREAM_OPEN)
            conns.append(c)

        def flush(events: list, now_ms: int) -> None:
            publish = fan.publish
            for ev in events:
                publish(ev)
            step, carry_out = fan.sweep_step, flow.carry_out
            while True:
                done, plan = step(now_ms, quota)
                carry_out(plan, now_ms)
                if done:
                    return

        return conns, fan, flush

    return build, trouble


def old_driver(quota: int, max_buffer: int):  # noqa: ANN201
    from ssegw.core import table as tm
    from ssegw.core.fanout import Fanout

    trouble = Trouble()

    class BConn(tm.Conn):
        __slots__ = ()

        def abort(self) -> None:
            trouble.events.append("abort")
            self.state = tm.CLOSED

    def build(topic_sets: list[tuple[str, ...]]):  # noqa: ANN202
        table = tm.Table()
        fan = Fanout(table, max_buffer, trouble.drop)
        conns = []
        for topics in topic_sets:
            c = BConn()
            c.init_conn()
            c.transport = NullSink()
            table.add(c)
            table.subscribe(c, topics)
            c.state = tm.STREAM
            conns.append(c)

        def flush(events: list, now_ms: int) -> None:
            publish = fan.publish
            for ev in events:
                publish(ev)
            step = fan.sweep_step
            while True:
                done, _ = step(now_ms, quota)
                if done:
                    return

        return conns, fan, flush

    return build, trouble


# -- events ----------------------------------------------------------------------------


class Frames:
    """Per-topic bodies encoded once; a fresh Event (own id, own ``n``) per publish."""

    def __init__(self, size: int) -> None:
        from ssegw.core.history import Event
        from ssegw.core.ids import format_id
        from ssegw.core.sse import data_lines, encode_body, encode_frame

        self.Event, self.format_id, self.encode_frame = Event, format_id, encode_frame
        self.epoch = "k3x9"
        self.seq = 10_000_000  # 8-digit ids throughout the run: every frame the same size
        self.bodies: dict[str, bytes] = {}
        self.size = size
        self._data_lines, self._encode_body = data_lines, encode_body

    def body(self, topic: str) -> bytes:
        b = self.bodies.get(topic)
        if b is None:
            head = len(self.encode_frame(self.format_id(self.epoch, self.seq), b""))
            text = '{"t":1795934159.683316,"topic":"' + topic + '","px":101.25,"pad":"'
            fixed = len(self._encode_body("tick", self._data_lines(text + '"}')))
            text += "x" * max(0, self.size - head - fixed) + '"}'
            b = self.bodies[topic] = self._encode_body("tick", self._data_lines(text))
        return b

    def batch(self, topics: list[str], per_topic: int, now_ms: int) -> list:
        """``per_topic`` events for each topic, interleaved: t0 t1 ... t0 t1 ..."""
        out = []
        Event, fid, enc, epoch = self.Event, self.format_id, self.encode_frame, self.epoch
        bodies = [self.body(t) for t in topics]
        for _ in range(per_topic):
            for t, body in zip(topics, bodies, strict=True):
                self.seq += 1
                out.append(Event(t, self.seq, now_ms, enc(fid(epoch, self.seq), body), None))
        return out


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(payload), payload)


# -- cases -----------------------------------------------------------------------------


def case_topics(name: str, n: int) -> tuple[list[tuple[str, ...]], list[str]]:
    """(topic set of each connection, topics published to)."""
    if name == "a":
        return [("a",)] * n, ["a"]
    if name == "b":
        return [("a", "b")] * n, ["a", "b"]
    if name == "c":
        others = [f"t{k}" for k in range(SETS_C)]
        return [("a", others[i % SETS_C]) for i in range(n)], ["a", *others]
    own = [f"u{i}" for i in range(n)]
    return [("a", t) for t in own], ["a", *own]


class Case:
    def __init__(self, name: str, build, n: int) -> None:  # noqa: ANN001
        self.name = name
        self.sets, self.published = case_topics(name, n)
        self.conns, self.fan, self.flush = build(self.sets)
        self.wall: list[int] = []
        self.cpu: list[int] = []


def check_flush(case: Case, frames: Frames, per_topic: int, now_ms: int) -> None:
    """One flush with recording sinks: one write per connection, exactly the bytes due."""
    sinks = [RecSink() for _ in case.conns]
    for c, s in zip(case.conns, sinks, strict=True):
        c.transport = s
    evs = frames.batch(case.published, per_topic, now_ms)
    case.flush(evs, now_ms)
    by_topic: dict[str, list[tuple[int, bytes]]] = {}
    for i, e in enumerate(evs):
        by_topic.setdefault(e.topic, []).append((i, e.frame))
    expect: dict[tuple[str, ...], bytes] = {}
    for topics, s in zip(case.sets, sinks, strict=True):
        want = expect.get(topics)
        if want is None:
            mine = sorted(x for t in topics for x in by_topic.get(t, ()))  # publish order
            want = expect[topics] = chunk(b"".join(f for _, f in mine))
        if s.data != [want]:
            got = [len(d) for d in s.data]
            raise SystemExit(
                f"case {case.name}: a connection on {topics} got writes of {got} bytes, "
                f"expected one write of {len(want)} bytes"
            )


def pctl(sorted_vals: list[int], p: float) -> float:
    """Nearest-rank percentile."""
    k = max(0, math.ceil(p / 100 * len(sorted_vals)) - 1)
    return sorted_vals[k]


# -- machine ---------------------------------------------------------------------------


def cpu_times() -> dict[str, tuple[int, int]]:
    """Per core: (busy, total) jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals]
                idle = v[3] + v[4]
                out[name] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def wait_quiet(cores: list[int], limit_s: float, max_pct: float = 20.0) -> float:
    """Wait (at most ``limit_s``) until every core in ``cores`` was under ``max_pct`` busy
    for one second.  Returns the busiest of them over the last second."""
    deadline = time.monotonic() + limit_s
    while True:
        a = cpu_times()
        time.sleep(1.0)
        b = cpu_times()
        busy = max(100 * (b[f"cpu{k}"][0] - a[f"cpu{k}"][0]) / max(1, b[f"cpu{k}"][1] - a[f"cpu{k}"][1]) for k in cores)
        if busy < max_pct or time.monotonic() >= deadline:
            return round(busy, 1)


def code_id(code_dir: str) -> dict[str, str]:
    """Commit of the measured ssegw (+dirty when ssegw/ has changes) and a hash of its sources."""

    def git(*a: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", code_dir, *a], capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "?"
    if git("status", "--porcelain", "--", "ssegw/"):
        commit += "+dirty"
    h = hashlib.sha256()
    for p in sorted(Path(code_dir, "ssegw").rglob("*.py")):
        h.update(str(p.relative_to(code_dir)).encode() + b"\0" + p.read_bytes())
    return {"commit": commit, "sources_sha256": h.hexdigest()[:12]}


# -- the measurement (child process) ---------------------------------------------------


def measure(args: argparse.Namespace) -> dict:
    import ssegw

    code_dir = os.path.realpath(args.code_dir)
    pkg = os.path.realpath(os.path.dirname(ssegw.__file__))
    if os.path.dirname(pkg) != code_dir:
        raise SystemExit(f"imported ssegw from {pkg}, not from {code_dir}")
    try:
        import ssegw.core.conn  # noqa: F401 - only the new code has it

        api = "new"
    except ImportError:
        api = "old"
    if api != args.impl:
        raise SystemExit(f"--impl {args.impl} but the ssegw in {code_dir} has the {api} API")
    quota, quota_from = args.quota, "--quota"
    if quota is None:
        try:
            from ssegw.server.worker import SLICE_WRITES as quota

            quota_from = "worker SLICE_WRITES"
        except ImportError:
            quota, quota_from = 1000, "fallback: no SLICE_WRITES in ssegw.server.worker"
    driver = new_driver if api == "new" else old_driver
    build, trouble = driver(quota, args.max_buffer)
    frames = Frames(args.event_bytes)
    info = {
        "impl": api,
        "code_dir": code_dir,
        **code_id(code_dir),
        "python": sys.version.split()[0],
        "conns": args.conns,
        "quota": quota,
        "quota_from": quota_from,
        "sink": args.sink,
        "event_bytes": None,
        "affinity": sorted(os.sched_getaffinity(0)),
        "loadavg_before": os.getloadavg(),
    }
    info["event_bytes"] = len(frames.batch(["a"], 1, 0)[0].frame)
    t_start = time.monotonic()
    cores0 = cpu_times()
    proc0 = time.process_time()
    rows = []
    now_ms = 1_000_000
    info["quiet_before_pct"] = []
    for per_topic in args.events:
        cases = [Case(name, build, args.conns) for name in args.cases]
        if args.quiet_wait > 0:
            info["quiet_before_pct"].append(wait_quiet(info["affinity"], args.quiet_wait))
        for case in cases:
            check_flush(case, frames, per_topic, now_ms)
            for c in case.conns:
                c.transport = NullSink() if args.sink == "null" else CountSink()
        budget = time.monotonic() + args.max_seconds
        reps = 0
        for rep in range(args.warmup + args.reps):
            if reps and time.monotonic() > budget:  # at least one timed flush
                break
            for case in cases:
                now_ms += 15
                evs = frames.batch(case.published, per_topic, now_ms)
                st = case.fan.stats
                w0, h0 = st.writes, st.held
                if args.collect:
                    gc.collect()
                t0 = time.perf_counter_ns()
                c0 = time.thread_time_ns()
                case.flush(evs, now_ms)
                c1 = time.thread_time_ns()
                t1 = time.perf_counter_ns()
                if st.writes - w0 != args.conns or st.held != h0 or trouble.events:
                    raise SystemExit(
                        f"case {case.name}: {st.writes - w0} writes, {st.held - h0} held, "
                        f"{trouble.events[:3]}: not the fast path"
                    )
                if rep >= args.warmup:
                    case.wall.append(t1 - t0)
                    case.cpu.append(c1 - c0)
            if rep >= args.warmup:
                reps += 1
        base = None
        for case in cases:
            w = sorted(case.wall)
            med, p90 = pctl(w, 50) / 1e6, pctl(w, 90) / 1e6
            cmed = pctl(sorted(case.cpu), 50) / 1e6
            if case.name == "a":
                base = (med, p90, cmed)
            rows.append(
                {
                    "events_per_topic": per_topic,
                    "case": case.name,
                    "topic_sets": len(set(case.sets)),
                    "events_per_conn": per_topic * len(case.sets[0]),
                    "reps": len(w),
                    "median_ms": round(med, 3),
                    "p90_ms": round(p90, 3),
                    "min_ms": round(w[0] / 1e6, 3),
                    "cpu_median_ms": round(cmed, 3),
                    "ratio_median": round(med / base[0], 2) if base else None,
                    "ratio_p90": round(p90 / base[1], 2) if base else None,
                    "ratio_cpu_median": round(cmed / base[2], 2) if base else None,
                }
            )
        del cases
        gc.collect()
    cores1 = cpu_times()
    wall = time.monotonic() - t_start
    info["seconds"] = round(wall, 1)
    info["self_cpu_pct"] = round(100 * (time.process_time() - proc0) / wall, 1)
    info["core_busy_pct"] = {
        k: round(100 * (cores1[k][0] - cores0[k][0]) / max(1, cores1[k][1] - cores0[k][1]), 1) for k in cores1
    }
    info["loadavg_after"] = os.getloadavg()
    return {"info": info, "rows": rows}


def report(res: dict) -> None:
    i = res["info"]
    print(f"flushcost  impl={i['impl']}  ssegw {i['commit']} (sources {i['sources_sha256']}) from {i['code_dir']}")
    print(
        f"  python {i['python']}, {i['conns']} conns, quota {i['quota']}/slice ({i['quota_from']}), sink {i['sink']}, "
        f"event frame {i['event_bytes']} B, affinity cpu{','.join(map(str, i['affinity']))}"
    )
    la0 = " ".join(f"{x:.2f}" for x in i["loadavg_before"])
    la1 = " ".join(f"{x:.2f}" for x in i["loadavg_after"])
    busy = ", ".join(f"{k} {v}%" for k, v in i["core_busy_pct"].items())
    quiet = ", ".join(f"{q}%" for q in i["quiet_before_pct"]) or "not waited for"
    print(f"  load avg {la0} -> {la1}; busiest pinned core before each block: {quiet}")
    print(f"  during the run: {busy}; this process {i['self_cpu_pct']}% of {i['seconds']} s")
    print()
    print("  E/topic case  sets  ev/conn   reps  median ms   p90 ms   min ms  cpu med ms  x(a) med  x(a) p90  x(a) cpu")
    for r in res["rows"]:
        print(
            f"  {r['events_per_topic']:7d} {r['case']:>4}  {r['topic_sets']:4d}  {r['events_per_conn']:7d}"
            f"  {r['reps']:5d}  {r['median_ms']:9.3f}  {r['p90_ms']:7.3f}  {r['min_ms']:7.3f}"
            f"  {r['cpu_median_ms']:10.3f}  {r['ratio_median']:8.2f}  {r['ratio_p90']:8.2f}"
            f"  {r['ratio_cpu_median']:8.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--impl", choices=("new", "old"), default="new")
    ap.add_argument(
        "--code-dir",
        help=f"checkout whose ssegw/ is measured (default: new {DEFAULT_DIRS['new']}, old {DEFAULT_DIRS['old']})",
    )
    ap.add_argument("--conns", type=int, default=10_000)
    ap.add_argument("--events", type=int, nargs="+", default=[1, 10], help="events per topic per flush")
    ap.add_argument("--event-bytes", type=int, default=200, help="size of one SSE frame (id+event+data)")
    ap.add_argument("--reps", type=int, default=200, help="timed flushes per case")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="stop timing an --events value after this long (fewer reps, reported)",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each --events block, wait up to this long for the pinned cores to be < 20%% busy",
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="kill the measuring child after this")
    ap.add_argument("--cases", nargs="+", choices=("a", "b", "c", "d"), default=["a", "b", "c"])
    ap.add_argument("--quota", type=int, help="subscribers per sweep slice (default: the worker's SLICE_WRITES)")
    ap.add_argument("--max-buffer", type=int, default=256 * 1024)
    ap.add_argument("--sink", choices=("null", "count"), default="null")
    ap.add_argument(
        "--no-collect", dest="collect", action="store_false", help="do not gc.collect() before each timed flush"
    )
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if "a" not in args.cases:
        ap.error("--cases must include a (the baseline of the ratios)")
    args.cases = sorted(set(args.cases))
    args.code_dir = os.path.realpath(args.code_dir or DEFAULT_DIRS[args.impl])

    if args.child:
        json.dump(measure(args), sys.stdout)
        return
    env = dict(os.environ, PYTHONPATH=args.code_dir, PYTHONSAFEPATH="1")
    cmd = [sys.executable, str(HERE), *sys.argv[1:], "--child", "--code-dir", args.code_dir]
    try:
        p = subprocess.run(cmd, cwd=args.code_dir, env=env, stdout=subprocess.PIPE, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"the measurement took more than --timeout {args.timeout} s") from None
    if p.returncode:
        raise SystemExit(p.returncode)
    res = json.loads(p.stdout)
    report(res)
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
