"""Scale-out benchmarks: ``python bench/scale.py {workers,rediscost,capacity} [options]``.

- ``workers``: for each worker count (default 1, 2, 4) a fresh ``redis-server`` and a
  gateway ``serve --workers N --redis ...``; 10,000 subscribers on one topic; the publish
  rate is raised (100, 200, 400, ... msg/s, then bisected between the last good and the
  first failing rate) until a step fails ``run.verdict`` -- the same pass rule as
  ``run.py maxrate`` (every event to every stream, p99 <= 2 s, ...).
- ``rediscost``: one worker, the same load (10,000 subscribers, 100 and 1,000 msg/s) with
  the embedded memory broker and with the Redis broker; ``--brokers ... cluster`` (or
  ``--cluster`` = ``--brokers redis cluster``) adds a three-node Redis Cluster of our own.
- ``capacity``: 60,000 idle subscribed streams over 4 workers, heartbeats every 5 s,
  counted on every connection (``bench/hbclient.py``); RSS of the supervisor and every
  worker; ``/admin/stats`` across the workers.

Everything else is ``bench/run.py``'s: the subscriber processes (``loadgen.Clients``), the
publisher (in this process), measured windows (``run.window`` via ``Env.window``), the
verdict, re-measuring windows that other processes disturbed (``run.with_retries``), the
quiet-machine wait.  What is added here: a gateway under a supervisor (RSS and CPU of every
worker), ``/admin/stats`` summed over the workers, a Redis of our own, the heartbeat client.
Each command prints one JSON line and appends it to ``bench/results/scale_<cmd>.jsonl``.
Only processes started here are signalled, by PID (Redis, the supervisor, and -- only if
they outlive it -- its workers).  See bench/README.md, "Scale-out".
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402
from common import (  # noqa: E402
    BENCH,
    PYTHON,
    RESULTS,
    ROOT,
    CpuSampler,
    Server,
    emit,
    log,
    proc_cpu,
    proc_rss,
)
from loadgen import Admin, Clients, Publisher, ticker_body  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from redis_cluster_harness import RedisCluster  # noqa: E402
from redis_harness import RedisServer, free_port  # noqa: E402

# -- which gateway code runs ---------------------------------------------------------------


def use_code(ref: str) -> dict[str, object]:
    """Run the gateway from a snapshot of commit ``ref`` (``git archive``, read-only for the
    repository) instead of the working tree, which may change during a long run.  The
    gateway (supervisor and workers) then imports ``ssegw`` from the snapshot:
    PYTHONSAFEPATH=1 keeps the working directory off ``sys.path`` and PYTHONPATH puts the
    snapshot before the editable install.  ``ref`` "worktree" = the working tree as it is."""
    os.environ["PYTHONFAULTHANDLER"] = "1"  # a worker that hangs on stop can be made to show its stack
    if ref == "worktree":
        return {"from": "worktree"}
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True,
                            check=True, timeout=10).stdout.strip()
    dest = Path(tempfile.gettempdir()) / f"ssegw-bench-code-{commit}"
    if not (dest / "ssegw" / "__init__.py").exists():
        tmp = Path(tempfile.mkdtemp(prefix=f"ssegw-bench-code-{commit}-"))
        archive = subprocess.run(["git", "archive", commit, "ssegw"], cwd=ROOT, capture_output=True, check=True,
                                 timeout=60).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True, timeout=60)
        try:
            tmp.rename(dest)
        except OSError:  # another run made it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    h = hashlib.sha256()
    for f in sorted((dest / "ssegw").rglob("*.py")):
        h.update(str(f.relative_to(dest)).encode() + b"\0" + f.read_bytes())
    os.environ["PYTHONSAFEPATH"] = "1"
    os.environ["PYTHONPATH"] = str(dest)
    where = subprocess.run([PYTHON, "-c", "import ssegw; print(ssegw.__file__)"], cwd=ROOT, capture_output=True,
                           text=True, check=True, timeout=30).stdout.strip()
    if not where.startswith(str(dest)):
        raise RuntimeError(f"the snapshot is not the ssegw the gateway would import: {where}")
    log(f"gateway code: commit {commit} from {dest}")
    return {"from": "git archive", "commit": commit, "ssegw_sha256": h.hexdigest()[:12], "path": str(dest)}


SERVER_CODE: dict[str, object] = {"from": "worktree"}


def emit_scale(kind: str, row: dict[str, object]) -> None:
    """``common.emit`` (whose ``code`` describes the working tree) plus ``server_code``: the
    code the gateway actually ran."""
    emit(kind, {"server_code": SERVER_CODE, **row})


# -- CPU of every worker and of Redis --------------------------------------------------------


class ScaleCpuSampler(CpuSampler):
    """``CpuSampler`` that also samples the processes in :attr:`extra` (the workers of a
    supervisor, redis-server), so that they count as ours and not as ``foreign_pct``."""

    extra: dict[str, int] = {}

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__({**pids, **self.extra})


# run.window() builds its sampler by name: make it ours.
run.CpuSampler = ScaleCpuSampler  # type: ignore[misc]


def dump_tasks() -> None:
    """SIGUSR1: every asyncio task's await chain on stderr (to see what a stuck run awaits)."""
    for t in asyncio.all_tasks():
        sys.stderr.write(f"--- task {t.get_name()}\n")
        coro: object = t.get_coro()
        for _ in range(100):  # bounded walk down cr_await
            if coro is None:
                break
            f = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if f is not None:
                sys.stderr.write(f"    {f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}\n")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    sys.stderr.flush()


# -- the gateway under a supervisor ------------------------------------------------------------


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _is_ssegw(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ssegw" in f.read()
    except OSError:
        return False


class MultiServer(Server):
    """``ssegw serve`` with ``--workers N`` (a supervisor and N workers) or one process.

    ``rss()`` is the sum over the supervisor and its workers; ``stop()`` SIGTERMs the
    supervisor (it drains the workers) and SIGKILLs, by PID, any worker still alive after it."""

    def __init__(self, core: str, extra: list[str], log_path: Path, workers: int) -> None:
        super().__init__(core, extra, log_path)
        self.nworkers = workers
        self.known_workers: list[int] = []
        self.stuck_workers: list[int] = []

    def workers(self) -> list[int]:
        if self.nworkers <= 1:
            return []
        kids = children(self.pid)
        for k in kids:
            if k not in self.known_workers:
                self.known_workers.append(k)
        return kids

    def rss_parts(self) -> dict[str, int]:
        out = {"supervisor" if self.nworkers > 1 else "server": proc_rss(self.pid)}
        for i, w in enumerate(self.workers()):
            try:
                out[f"worker{i}"] = proc_rss(w)
            except (OSError, RuntimeError):
                pass
        return out

    def rss(self) -> int:
        return sum(self.rss_parts().values())

    def stop(self) -> int | None:
        self.workers()
        p = self.proc
        if self.nworkers > 1 and p is not None and p.poll() is None:
            # A worker drains for at most drain_timeout (10 s) + 2 s, then stops by itself;
            # the supervisor SIGKILLs one still running 5 s after drain_timeout.  One still
            # alive after 13 s is stuck: SIGABRT makes faulthandler (PYTHONFAULTHANDLER=1,
            # see use_code) write its Python stack into the log before the supervisor's kill.
            p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 13
            while any(_is_ssegw(w) for w in self.known_workers) and time.monotonic() < deadline:
                time.sleep(0.2)
            for w in self.known_workers:
                if _is_ssegw(w):
                    log(f"worker {w} still running 13 s after SIGTERM: SIGABRT for its stack (see the server log)")
                    self.stuck_workers.append(w)
                    try:
                        os.kill(w, signal.SIGABRT)
                    except ProcessLookupError:
                        pass
            time.sleep(0.5)
        code = super().stop()
        deadline = time.monotonic() + 10
        for w in self.known_workers:
            while _is_ssegw(w) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _is_ssegw(w):
                log(f"worker {w} outlived its supervisor: SIGKILL")
                try:
                    os.kill(w, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return code


class AggAdmin(Admin):
    """``/admin/stats`` of a supervisor summed over its workers (``Admin.stats`` reads
    ``workers[0]`` only).  The supervisor leaves out a worker that did not answer its control
    socket within 3 s: such an answer is asked again (up to 10 times, 0.5 s apart)."""

    def __init__(self, port: int, workers: int) -> None:
        super().__init__(port)
        self.n = workers
        self.last_per_worker: list[dict[str, object]] = []
        self.prev_per_worker: list[dict[str, object]] = []

    def per_worker_delta(self) -> list[dict[str, object]]:
        """Per-worker counters between the last two ``stats()`` calls (``run.window`` makes
        exactly two: before and after the window), gauges as of the last one."""
        prev = {w["pid"]: w for w in self.prev_per_worker}
        out = []
        for w in self.last_per_worker:
            p = prev.get(w["pid"], {})
            d = dict(w)
            for k in ("events_delivered", "heartbeats", "events_published", "publish_requests"):
                d[k] = int(w.get(k) or 0) - int(p.get(k) or 0)  # type: ignore[call-overload]
            out.append(d)
        return out

    async def worker_stats(self) -> list[dict[str, object]]:
        ws: list[dict[str, object]] = []
        for _ in range(10):
            _, body = await self.get("/admin/stats", timeout=60)
            ws = json.loads(body)["workers"]
            if len(ws) >= self.n:
                break
            await asyncio.sleep(0.5)
        return ws

    async def stats(self) -> dict[str, object]:
        ws = await self.worker_stats()
        agg: dict[str, object] = {"workers_answered": len(ws)}
        for w in ws:
            for k, v in w.items():
                if isinstance(v, bool) or k in ("pid", "uptime_s", "broker"):
                    continue
                if isinstance(v, int | float):
                    agg[k] = agg.get(k, 0) + v  # type: ignore[operator]
                elif isinstance(v, dict):
                    d: dict[str, object] = agg.setdefault(k, {})  # type: ignore[assignment]
                    for kk, vv in v.items():
                        if isinstance(vv, int | float):
                            d[kk] = d.get(kk, 0) + vv  # type: ignore[operator]
        self.prev_per_worker = self.last_per_worker
        self.last_per_worker = [{"pid": w.get("pid"), "streams_open": w.get("streams_open"),
                                 "events_delivered": w.get("events_delivered"), "heartbeats": w.get("heartbeats"),
                                 "events_published": w.get("events_published"),
                                 "publish_requests": w.get("publish_requests"),
                                 "broker_up": (w.get("broker") or {}).get("up"),  # type: ignore[union-attr, attr-defined]
                                 "broker_reconnects": (w.get("broker") or {}).get("reconnects"),  # type: ignore[union-attr, attr-defined]
                                 "broker_gap_fills": (w.get("broker") or {}).get("gap_fills")}  # type: ignore[union-attr, attr-defined]
                                for w in ws]
        agg["per_worker"] = self.last_per_worker
        return agg


def server_cores(args: argparse.Namespace, workers: int) -> str:
    if args.server_core:
        return str(args.server_core)
    return "0" if workers <= 1 else "0,1"


def start_redis(args: argparse.Namespace, tag: str) -> RedisServer:
    """A redis-server of our own (``--save '' --appendonly no``) on a free port < 32768,
    all its threads pinned to ``--redis-core``."""
    d = Path(tempfile.mkdtemp(prefix=f"ssegw-bench-redis-{tag}-"))
    rs = RedisServer(d, port=free_port(20000, 32000), persist=False).start()
    assert rs.proc is not None
    cores = {int(c) for c in str(args.redis_core).split(",")}
    for tid in os.listdir(f"/proc/{rs.proc.pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:
            pass
    log(f"redis-server pid {rs.proc.pid} on :{rs.port} (core {args.redis_core})")
    return rs


class BenchCluster(RedisCluster):
    """``tests/redis_cluster_harness.RedisCluster`` (three primaries, no replicas, node ports
    < 22768 and their bus ports + 10000) with persistence off, like :func:`start_redis`."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.dir = workdir
        for n in self.nodes:
            n.persist = False  # --appendonly no (the harness default is appendfsync always)


def pin_redis(pid: int, args: argparse.Namespace) -> None:
    cores = {int(c) for c in str(args.redis_core).split(",")}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:
            pass


def start_cluster(args: argparse.Namespace, tag: str) -> BenchCluster:
    """A three-node Redis Cluster of our own, every thread of every node on ``--redis-core``."""
    d = Path(tempfile.mkdtemp(prefix=f"ssegw-bench-cluster-{tag}-"))
    rc = BenchCluster(d).start()
    for n in rc.nodes:
        assert n.proc is not None
        pin_redis(n.proc.pid, args)
    log(f"redis cluster pids {[n.proc.pid for n in rc.nodes if n.proc]} on "
        f"{[n.port for n in rc.nodes]} (core {args.redis_core})")
    return rc


Redis = RedisServer | BenchCluster


def redis_pids(r: Redis | None) -> dict[str, int]:
    """The redis-server processes to sample: ``redis``, or ``redis0``… for a cluster's nodes."""
    if isinstance(r, BenchCluster):
        return {f"redis{i}": n.proc.pid for i, n in enumerate(r.nodes) if n.proc is not None}
    if r is not None and r.proc is not None:
        return {"redis": r.proc.pid}
    return {}


def stop_redis(rs: Redis) -> None:
    rs.stop()  # SIGTERM to our redis-server(s), by PID; SIGKILL after 5 s
    shutil.rmtree(rs.dir, ignore_errors=True)


def redis_info(rs: RedisServer) -> dict[str, str]:
    raw = rs.command("INFO", "all").decode("latin-1", "replace")
    out = {}
    for line in raw.splitlines():
        if ":" in line and not line.startswith(("$", "#")):
            k, v = line.split(":", 1)
            out[k] = v.strip()
    return out


def redis_summary(rs: Redis | None) -> dict[str, object] | None:
    if isinstance(rs, BenchCluster):
        nodes = [redis_summary(n) for n in rs.nodes]
        tot: dict[str, object] = {"nodes": nodes}
        for k in ("rss_mib", "used_memory_mib", "connected_clients", "pubsub_channels", "pubsubshard_channels",
                  "total_commands_processed", "used_cpu_user_s", "used_cpu_sys_s"):
            try:
                tot[k] = round(sum(n[k] for n in nodes if n), 2)  # type: ignore[misc]
            except (KeyError, TypeError):
                pass
        return tot
    if rs is None or rs.proc is None:
        return None
    try:
        info = redis_info(rs)
        return {"pid": rs.proc.pid, "rss_mib": round(proc_rss(rs.proc.pid) / 2**20, 1),
                "used_memory_mib": round(int(info.get("used_memory", 0)) / 2**20, 1),
                "connected_clients": int(info.get("connected_clients", 0)),
                "pubsub_channels": int(info.get("pubsub_channels", 0)),
                "pubsubshard_channels": int(info.get("pubsubshard_channels", 0)),
                "total_commands_processed": int(info.get("total_commands_processed", 0)),
                "used_cpu_user_s": float(info.get("used_cpu_user", 0)),
                "used_cpu_sys_s": float(info.get("used_cpu_sys", 0))}
    except (OSError, RuntimeError, ValueError) as e:
        return {"error": str(e)}


class ScaleEnv(run.Env):
    """``run.Env`` with the gateway of :class:`MultiServer`, optionally on a Redis of ours."""

    def __init__(self, args: argparse.Namespace, tag: str, conns: int, topic: str, sample: int, workers: int,
                 redis: Redis | None) -> None:
        super().__init__(args, tag, conns, topic, sample)
        self.workers = workers
        self.redis = redis
        self.server_core = server_cores(args, workers)
        self.rss_parts_mib: dict[str, float] = {}

    def server_args(self) -> list[str]:
        extra = ["--workers", str(self.workers), *(self.args.server_arg or [])]
        if self.redis is not None:
            extra += ["--redis", self.redis.url]
        return extra

    async def start_server(self) -> None:
        log_path = RESULTS / f"server-scale-{self.tag}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        self.srv = srv = MultiServer(self.server_core, self.server_args(), log_path, self.workers).start()
        self.admin = admin = AggAdmin(srv.admin_port, self.workers)
        deadline = time.monotonic() + 30
        while True:  # every worker up and ready (connected to Redis)
            ws = await admin.worker_stats()
            ready = [w for w in ws if (w.get("broker") or {}).get("up", True)]  # type: ignore[union-attr, attr-defined]
            if len(ready) >= self.workers:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(ready)} of {self.workers} workers ready: {ws}")
            await asyncio.sleep(0.2)
        extra = {f"worker{i}": pid for i, pid in enumerate(srv.workers())}  # type: ignore[attr-defined]
        extra.update(redis_pids(self.redis))
        ScaleCpuSampler.extra = extra

    async def open(self) -> ScaleEnv:
        args = self.args
        await self.start_server()
        assert self.srv is not None and self.admin is not None
        self.clients = clients = await Clients.start(self.srv.port, self.conns, args.procs, self.topic, self.sample,
                                                     args.client_core, count=getattr(args, "count", "seq"))
        st = await run.wait_streams(self.admin, clients.ok)  # type: ignore[arg-type]
        log(f"server streams_open={st['streams_open']} per worker "
            f"{[w['streams_open'] for w in st['per_worker']]} rss={self.srv.rss() / 2**20:.1f} MiB")  # type: ignore[union-attr, attr-defined]
        self.pub = Publisher(self.srv.port, args.pub_conns)
        await self.pub.connect()
        await self._warm_fanout()
        return self

    async def close(self) -> None:
        srv = self.srv
        await super().close()
        if isinstance(srv, MultiServer) and srv.stuck_workers:
            self.problems.append(f"workers {srv.stuck_workers} did not exit within 13 s of SIGTERM "
                                 f"(stacks in {srv.log_path})")
        ScaleCpuSampler.extra = {}


def annotate(env: ScaleEnv, res: dict[str, object]) -> dict[str, object]:
    """What ``run.window`` cannot know: per-worker split, RSS per process, Redis."""
    assert env.admin is not None and env.srv is not None
    res["per_worker"] = env.admin.per_worker_delta()  # type: ignore[attr-defined]
    res["server_rss_parts_mib"] = {k: round(v / 2**20, 1) for k, v in env.srv.rss_parts().items()}  # type: ignore[attr-defined]
    res["server_loop_probe_measures"] = "supervisor (not the workers)" if env.workers > 1 else "the worker"
    res["redis"] = redis_summary(env.redis)
    return res


def brief(res: dict[str, object]) -> dict[str, object]:
    """One step of a run, the figures that matter."""
    cpu: dict[str, object] = res["cpu"]  # type: ignore[assignment]
    lat: dict[str, object] = res["latency"]  # type: ignore[assignment]
    pr: dict[str, object] = res["publisher"]  # type: ignore[assignment]
    return {"rate": res["rate"], "achieved_rate": pr["achieved_rate"], "expected_per_s": res["expected_per_s"],
            "delivered_per_s": res["delivered_per_s"], "delivered_per_s_in_window": res["delivered_per_s_in_window"],
            "lost": res["lost_events"], "conns_lost": res["conns_lost"], "p50_ms": lat.get("p50_ms"),
            "p99_ms": lat.get("p99_ms"), "max_ms": lat.get("max_ms"), "latency_sampled_conns": res["latency_sampled_conns"],
            "post_rtt": pr["post_rtt"], "cpu_core_busy": cpu["core_busy_pct"], "cpu_proc": cpu["proc_pct"],
            "foreign_pct": cpu["foreign_pct"], "server_rss_mib": res["server_rss_mib"],
            "server_rss_parts_mib": res.get("server_rss_parts_mib"),
            "delivered_per_worker": [w.get("events_delivered") for w in res.get("per_worker", [])],  # type: ignore[union-attr, attr-defined]
            "server_writes_per_s": round(int(res["server"]["writes"]) / float(pr["duration_s"])),  # type: ignore[index, call-overload, arg-type]
            "server_flushes_per_s": round(int(res["server"]["flushes"]) / float(pr["duration_s"]), 1),  # type: ignore[index, call-overload, arg-type]
            "events_per_write": round(int(res["server"]["events_delivered"])  # type: ignore[index, call-overload]
                                      / max(1, int(res["server"]["writes"])), 1),  # type: ignore[index, call-overload]
            "slow_closed": res["server"]["slow_closed"], "held": res["server"]["held"],  # type: ignore[index]
            "verdict": res["verdict"]}


async def measure(env: ScaleEnv, rate: float, k: int) -> dict[str, object]:
    """One window at ``rate`` with latency parsed on ``k`` connections, re-measured if disturbed."""
    args = env.args

    async def once() -> dict[str, object]:
        assert env.clients is not None
        await env.clients.cmd(f"sample {k}")
        log(f"{env.tag}: {rate:g} msg/s, latency on {k} connections")
        return annotate(env, await env.window(rate, ticker_body(env.topic.encode())))

    res = await run.with_retries(env, once)
    res["latency_sampled_conns"] = k
    why = run.verdict(res, args.max_p99_ms)
    res["verdict"] = why or "ok"
    log(f"{env.tag} {rate:g} msg/s: delivered {res['delivered_per_s']}/s lost {res['lost_events']} "
        f"p50/p99 {res['latency'].get('p50_ms')}/{res['latency'].get('p99_ms')} ms "  # type: ignore[union-attr, attr-defined]
        f"cpu {res['cpu']['proc_pct']} -> {why or 'ok'}")  # type: ignore[index]
    return res


def sample_for(args: argparse.Namespace, rate: float) -> int:
    return int(max(args.min_sample, min(args.sample, args.parse_budget // rate)))


def conditions(args: argparse.Namespace, workers: int) -> dict[str, object]:
    return {"server_cores": server_cores(args, workers), "client_core": args.client_core,
            "coordinator_core": args.client_core, "redis_core": args.redis_core, "procs": args.procs,
            "server_args": ["--workers", str(workers), *(args.server_arg or [])], "nproc": os.cpu_count()}


# -- workers -------------------------------------------------------------------------------


async def cmd_workers(args: argparse.Namespace) -> None:
    runs = []
    for n in args.workers:
        rs = start_redis(args, f"w{n}")
        env = ScaleEnv(args, f"workers{n}", args.subs, args.topic, args.sample, n, rs)
        steps: list[dict[str, object]] = []
        best: dict[str, object] | None = None
        try:
            await env.open()
            assert env.clients is not None
            good, bad = 0, 0
            rate = args.start
            for _ in range(args.max_steps):
                res = await measure(env, rate, sample_for(args, rate))
                steps.append(res)
                if res["verdict"] == "ok":
                    good = rate
                    best = res
                else:
                    bad = rate
                    if int(res["conns_lost"]):  # type: ignore[call-overload]
                        await env.close()
                        await env.open()
                # Double until the first failure, then bisect between good and bad.
                if not bad:
                    rate = rate * 2
                else:
                    if not good or bad - good <= max(args.resolution, good * 0.1):
                        break
                    rate = int((good + bad) / 2)
                if rate > args.max_rate:
                    break
                await asyncio.sleep(1.0)
            subs = env.clients.ok if env.clients is not None else 0
        finally:
            await env.close()
            stop_redis(rs)
        row = {"workers": n, "subs": subs, "conditions": conditions(args, n),
               "best_rate_msgs_per_s": best["rate"] if best else None,
               "best_delivered_per_s": best["delivered_per_s"] if best else None,
               "steps": [brief(s) for s in steps], "best": best, "server_log_problems": env.problems[:20]}
        log(f"workers={n}: best {row['best_rate_msgs_per_s']} msg/s = {row['best_delivered_per_s']} ev/s")
        runs.append(row)
        emit_scale("scale_workers", row)
    if len(runs) > 1:
        print(json.dumps({"summary": [{"workers": r["workers"], "best_rate_msgs_per_s": r["best_rate_msgs_per_s"],
                                       "best_delivered_per_s": r["best_delivered_per_s"],
                                       "p99_at_start_rate_ms": r["steps"][0]["p99_ms"] if r["steps"] else None}
                                      for r in runs]}), file=sys.stderr)


# -- rediscost -----------------------------------------------------------------------------


def _ratio(a: object, b: object) -> float | None:
    try:
        return round(float(b) / float(a), 3)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def redis_cpu(step: dict[str, object]) -> float | None:
    """CPU of redis-server in a step: the one server, or the sum over a cluster's nodes."""
    cpu: dict[str, float] = step["cpu_proc"]  # type: ignore[assignment]
    vals = [v for k, v in cpu.items() if k == "redis" or (k.startswith("redis") and k[5:].isdigit())]
    return round(sum(vals), 1) if vals else None


async def cmd_rediscost(args: argparse.Namespace) -> None:
    if args.cluster:
        args.brokers = ["redis", "cluster"]
    if "cluster" in args.brokers and args.count == "seq":
        # A cluster's ids are vectors (EPOCH-S0.S1.S2): client.py's seq counter reads one
        # integer after the "-".  Count every id line instead, for every broker of the run.
        log("a cluster in --brokers: subscribers count with --count scan (every broker of this run)")
        args.count = "scan"
    out: dict[str, list[dict[str, object]]] = {}
    full: dict[str, list[dict[str, object]]] = {}
    problems: dict[str, list[str]] = {}
    for broker in args.brokers:
        rs: Redis | None = (start_redis(args, "cost") if broker == "redis"
                            else start_cluster(args, "cost") if broker == "cluster" else None)
        env = ScaleEnv(args, f"cost-{broker}", args.subs, args.topic, args.sample, 1, rs)
        try:
            await env.open()
            for rate in args.rates:
                res = await measure(env, rate, sample_for(args, rate))
                out.setdefault(broker, []).append(brief(res))
                full.setdefault(broker, []).append(res)
                await asyncio.sleep(1.0)
        finally:
            await env.close()
            if rs is not None:
                stop_redis(rs)
        problems[broker] = env.problems[:20]
    ratios = []
    for m, r in zip(out.get("memory", []), out.get("redis", []), strict=False):
        ratios.append({"rate": m["rate"], "p50_redis_over_memory": _ratio(m["p50_ms"], r["p50_ms"]),
                       "p99_redis_over_memory": _ratio(m["p99_ms"], r["p99_ms"]),
                       "delivered_redis_over_memory": _ratio(m["delivered_per_s"], r["delivered_per_s"]),
                       "server_cpu_redis_over_memory": _ratio(m["cpu_proc"]["server"], r["cpu_proc"]["server"]),  # type: ignore[index]
                       "server_rss_max_redis_over_memory": _ratio(m["server_rss_mib"]["max"], r["server_rss_mib"]["max"]),  # type: ignore[index]
                       "redis_cpu_pct": r["cpu_proc"].get("redis")})  # type: ignore[union-attr, attr-defined]
    cratios = []
    for r, c in zip(out.get("redis", []), out.get("cluster", []), strict=False):
        cratios.append({"rate": r["rate"], "p50_cluster_over_redis": _ratio(r["p50_ms"], c["p50_ms"]),
                        "p99_cluster_over_redis": _ratio(r["p99_ms"], c["p99_ms"]),
                        "delivered_cluster_over_redis": _ratio(r["delivered_per_s"], c["delivered_per_s"]),
                        "lost": {"redis": r["lost"], "cluster": c["lost"]},
                        "server_cpu_cluster_over_redis": _ratio(r["cpu_proc"]["server"], c["cpu_proc"]["server"]),  # type: ignore[index]
                        "server_rss_max_cluster_over_redis": _ratio(r["server_rss_mib"]["max"], c["server_rss_mib"]["max"]),  # type: ignore[index]
                        "post_rtt": {"redis": r["post_rtt"], "cluster": c["post_rtt"]},
                        "redis_cpu_pct": redis_cpu(r), "cluster_cpu_pct": redis_cpu(c),
                        "foreign_pct": {"redis": r["foreign_pct"], "cluster": c["foreign_pct"]}})
    emit_scale("scale_rediscost", {"subs": args.subs, "conditions": {**conditions(args, 1), "count": args.count},
                             "duration_s": args.duration,
                             "runs": out, "ratios": ratios, "ratios_cluster_over_redis": cratios, "full": full,
                             "server_log_problems": problems})


# -- capacity ------------------------------------------------------------------------------


class HbClients(Clients):
    """``loadgen.Clients`` running ``bench/hbclient.py`` (``snap`` counts heartbeats)."""

    @classmethod
    async def start_hb(cls, port: int, conns: int, procs: int, topic: str, core: str, max_life: float,
                       per_src: int = 10_000, into: HbClients | None = None) -> HbClients:
        """``into``: fill this object (its ``pids`` are readable while the processes connect)."""
        self = into if into is not None else cls()
        base = 0
        src_i = 2
        for p in range(procs):
            n = conns // procs + (1 if p < conns % procs else 0)
            nsrc = max(1, math.ceil(n / per_src))
            srcs = ",".join(f"127.0.{(src_i + k) // 250}.{2 + (src_i + k) % 250}" for k in range(nsrc))
            src_i += nsrc
            cmd = ["taskset", "-c", core, PYTHON, str(BENCH / "hbclient.py"), "--port", str(port), "--conns", str(n),
                   "--topic", topic, "--offset", str(base), "--src", srcs, "--max-life", str(max_life)]
            self.procs.append(await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=64 * 1024 * 1024))
            base += n
        for proc in self.procs:
            line = await asyncio.wait_for(proc.stdout.readline(), 900)  # type: ignore[union-attr]
            if not line:
                raise RuntimeError("subscriber process died while connecting")
            self.ready.append(json.loads(line))
        log(f"subscribers ready: {self.ready}")
        return self


def kernel_mem() -> dict[str, int]:
    """Host-wide kernel figures: ``/proc/net/sockstat`` (TCP sockets in use and allocated,
    TCP ``mem`` in 4 KiB pages = queued data), ``/proc/meminfo`` (slab, where the socket
    objects live; available memory).  On loopback both ends of every stream are counted."""
    out: dict[str, int] = {}
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith(("TCP:", "sockets:")):
                kv = line.split()[1:]
                pre = "tcp_" if line.startswith("TCP") else "sockets_"
                out.update({pre + k: int(v) for k, v in zip(kv[::2], kv[1::2], strict=False)})
    out["tcp_mem_bytes"] = out.get("tcp_mem", 0) * 4096
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in ("Slab", "SUnreclaim", "SReclaimable", "MemAvailable"):
                out[k.lower() + "_bytes"] = int(v.split()[0]) * 1024
    return out


def kernel_delta(before: dict[str, int], after: dict[str, int], conns: int) -> dict[str, object]:
    """What ``conns`` streams (2 × ``conns`` sockets on loopback) added to :func:`kernel_mem`."""
    d = {k: after[k] - before.get(k, 0) for k in after}
    per = {k: round(v / max(1, conns)) for k, v in d.items() if k.endswith("_bytes")}
    return {"delta": d, "per_stream_bytes": per,
            "slab_per_socket_bytes": round(d.get("slab_bytes", 0) / max(1, 2 * conns)),
            "tcp_sockets_added": d.get("tcp_inuse", 0)}


async def opening_timeline(admin: AggAdmin, srv: MultiServer, clients: Clients, t0: float,
                           stop: asyncio.Event, every: float, out: list[dict[str, object]]) -> None:
    """Every ``every`` s until ``stop``: streams open (``/admin/stats`` over the workers), gateway
    RSS, TCP sockets in use, and the clients' RSS; appended to ``out``."""
    while not stop.is_set():
        try:
            st = await admin.stats()
            crss = 0
            for pid in clients.pids:
                try:
                    crss += proc_rss(pid)
                except (OSError, RuntimeError):
                    pass
            out.append({"t_s": round(time.monotonic() - t0, 2), "streams_open": int(st["streams_open"]),  # type: ignore[call-overload]
                        "rss_mib": round(srv.rss() / 2**20, 1), "tcp_inuse": kernel_mem().get("tcp_inuse"),
                        "clients_rss_mib": round(crss / 2**20, 1)})
        except (OSError, ValueError, KeyError, TimeoutError) as e:
            log(f"timeline sample failed: {e}")
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


def accept_rates(tl: list[dict[str, object]]) -> dict[str, object]:
    """Streams/s while opening, from the timeline: the mean between 5 % and 95 % of the final
    count, and the best interval."""
    if len(tl) < 2:
        return {}
    n = int(tl[-1]["streams_open"])  # type: ignore[call-overload]
    lo = next((p for p in tl if int(p["streams_open"]) >= 0.05 * n), tl[0])  # type: ignore[call-overload]
    hi = next((p for p in tl if int(p["streams_open"]) >= 0.95 * n), tl[-1])  # type: ignore[call-overload]
    dt = float(hi["t_s"]) - float(lo["t_s"])  # type: ignore[arg-type]
    steps = [(int(b["streams_open"]) - int(a["streams_open"])) / (float(b["t_s"]) - float(a["t_s"]))  # type: ignore[call-overload, arg-type]
             for a, b in zip(tl, tl[1:], strict=False) if float(b["t_s"]) > float(a["t_s"])]  # type: ignore[arg-type]
    return {"mean_5_95_per_s": round((int(hi["streams_open"]) - int(lo["streams_open"])) / dt) if dt > 0 else None,  # type: ignore[call-overload]
            "best_interval_per_s": round(max(steps)) if steps else None}


def host_limits() -> dict[str, object]:
    """The limits a capacity run depends on, as they were."""
    import resource

    out: dict[str, object] = {"nofile": resource.getrlimit(resource.RLIMIT_NOFILE)}
    for k in ("net/ipv4/ip_local_port_range", "net/core/somaxconn", "net/ipv4/tcp_max_syn_backlog",
              "fs/file-max", "fs/nr_open", "net/ipv4/tcp_mem"):
        try:
            with open(f"/proc/sys/{k}") as f:
                out[k.replace("/", ".")] = f.read().split()
        except OSError:
            pass
    return out


async def publish_to_all(clients: HbClients, port: int, topic: str, n: int, conns: int) -> dict[str, object]:
    """Switch every stream to counting events, publish ``n`` events (one POST each, 0.5 s
    apart) to ``topic`` and wait until every stream has them (or 60 s, or 5 s without
    progress)."""
    await clients.cmd(f"sample {conns}")
    await clients.cmd("mark")
    pub = Publisher(port, 1)
    await pub.connect()
    statuses = []
    t0 = time.monotonic()
    try:
        for k in range(n):
            status, _ = await pub.post(ticker_body(topic.encode())(1, k)[0])
            statuses.append(status)
            await asyncio.sleep(0.5)
        t_posted = time.monotonic()
        snap = await run.wait_delivered(clients, n, timeout=60)
    finally:
        pub.close()
    log(f"published {n} events ({statuses}) in {t_posted - t0:.1f} s; every stream had them "
        f"{time.monotonic() - t_posted:.1f} s later: min {snap['min']} max {snap['max']} per stream")
    return {"published": n, "post_status": statuses, "per_conn_min": snap["min"], "per_conn_max": snap["max"],
            "sum": snap["sum"], "expected_sum": n * clients.ok, "open": snap["open"],
            "post_s": round(t_posted - t0, 1), "delivered_after_last_post_s": round(time.monotonic() - t_posted, 1)}


async def cmd_capacity(args: argparse.Namespace) -> None:
    if args.conns / args.procs > 19_000:
        raise SystemExit(f"{args.conns} connections over {args.procs} processes exceed the 20,000 open files per process")
    # Listening ports below the ephemeral range (the clients' ports are 32768-60999).
    args.server_arg = [*(args.server_arg or []), "--heartbeat-interval", args.heartbeat,
                       "--max-connections", str(args.max_connections or 19_000 * args.workers),
                       "--port", str(free_port()), "--admin-port", str(free_port())]
    rs = start_redis(args, "cap")
    env = ScaleEnv(args, f"capacity{args.workers}", args.conns, args.topic, 0, args.workers, rs)
    clients: HbClients | None = None
    row: dict[str, object] = {"conns_requested": args.conns, "workers": args.workers, "topic": args.topic,
                              "heartbeat": args.heartbeat, "hold_s": args.hold, "conditions": conditions(args, args.workers),
                              "command": "bench/scale.py " + " ".join(sys.argv[1:]), "machine": {"cpus": os.cpu_count()},
                              "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "server_code": SERVER_CODE,
                              "limits": host_limits()}
    timeline: list[dict[str, object]] = []
    try:
        await env.start_server()
        srv, admin = env.srv, env.admin
        assert isinstance(srv, MultiServer) and isinstance(admin, AggAdmin)
        await admin.stats()
        base = await run.settle_rss(srv)  # type: ignore[arg-type]
        row["rss_base_mib"] = round(base / 2**20, 1)
        row["rss_base_parts_mib"] = {k: round(v / 2**20, 1) for k, v in srv.rss_parts().items()}
        redis_base = redis_summary(rs)
        kmem0 = kernel_mem()
        wpids = srv.workers()
        wcpu0 = sum(proc_cpu(w) for w in wpids)
        t0 = time.monotonic()
        clients = HbClients()
        stop_tl = asyncio.Event()
        tl_task = asyncio.create_task(opening_timeline(admin, srv, clients, t0, stop_tl, args.sample_every,
                                                       timeline))
        try:
            await HbClients.start_hb(srv.port, args.conns, args.procs, args.topic, args.client_core,
                                     max_life=args.hold + 1200, into=clients)
            ok = clients.ok
            st = await run.wait_streams(admin, ok, timeout=600)  # type: ignore[arg-type]
            row["open_s"] = round(time.monotonic() - t0, 1)
            await asyncio.sleep(min(2.0, 2 * args.sample_every))  # one more sample at the full count
        finally:
            stop_tl.set()
            await tl_task
        row["accept_rate"] = {"overall_per_s": round(ok / max(1e-9, float(row["open_s"]))),  # type: ignore[arg-type]
                              **accept_rates(timeline)}
        row["open_cpu_s"] = {"workers": round(sum(proc_cpu(w) for w in wpids) - wcpu0, 1),
                             "clients": round(sum(proc_cpu(c) for c in clients.pids), 1)}
        row["connected"] = ok
        row["connect_failed"] = args.conns - ok
        row["connect_errors"] = [r.get("errors") for r in clients.ready]
        row["streams_open_admin"] = st["streams_open"]
        row["streams_per_worker"] = [w["streams_open"] for w in st["per_worker"]]  # type: ignore[union-attr, attr-defined]
        idle = await run.settle_rss(srv, timeout=120)  # type: ignore[arg-type]
        parts = srv.rss_parts()
        row["rss_idle_mib"] = round(idle / 2**20, 1)
        row["rss_idle_parts_mib"] = {k: round(v / 2**20, 1) for k, v in parts.items()}
        row["rss_per_conn_bytes"] = round((idle - base) / max(1, ok))
        row["rss_total_per_conn_bytes"] = round(idle / max(1, ok))
        kmem1 = kernel_mem()
        row["kernel_before"] = kmem0
        row["kernel_open"] = kmem1
        row["kernel"] = kernel_delta(kmem0, kmem1, ok)
        crss = sum(proc_rss(c) for c in clients.pids)
        row["clients_rss_mib"] = round(crss / 2**20, 1)
        row["clients_rss_per_conn_bytes"] = round(crss / max(1, ok))
        # Heartbeats: every connection must receive them while idle.
        pids = {"server": srv.pid, "coordinator": os.getpid(), **{f"client{i}": p for i, p in enumerate(clients.pids)}}
        cpu = ScaleCpuSampler(pids)
        # No wait for a quiet machine here: the held streams' own heartbeats keep the cores
        # busy.  Other processes' CPU during the hold is in cpu_hold.foreign_pct.
        st0 = await admin.stats()
        await clients.cmd("mark")
        cpu.start()
        await asyncio.sleep(args.hold)
        cpu_res = cpu.stop()
        snap = await clients.snap()
        st1 = await admin.stats()
        hb_s = float(args.heartbeat.rstrip("s"))
        expect_min = max(1, int(args.hold / hb_s) - 1)
        row["heartbeats"] = {"per_conn_min": snap["min"], "per_conn_max": snap["max"], "sum": snap["sum"],
                             "expected_per_conn": round(args.hold / hb_s, 1), "required_min": expect_min,
                             "server_sent": int(st1["heartbeats"]) - int(st0["heartbeats"]),  # type: ignore[call-overload]
                             "per_worker_sent": [int(b["heartbeats"]) - int(a["heartbeats"])  # type: ignore[call-overload]
                                                 for a, b in zip(st0["per_worker"], st1["per_worker"], strict=False)]}  # type: ignore[call-overload]
        row["conns_open_end"] = snap["open"]
        row["conns_lost"] = snap["lost"]
        row["cpu_hold"] = cpu_res
        row["rss_end_mib"] = round(srv.rss() / 2**20, 1)
        try:
            _, body = await admin.get(f"/admin/topics/{args.topic.format(i=0)}")
            row["admin_topic_subscribers"] = json.loads(body).get("subscribers")
        except (OSError, ValueError, TimeoutError) as e:
            row["admin_topic_subscribers"] = str(e)
        row["redis_before"] = redis_base
        row["redis"] = redis_summary(rs)
        if args.events and "{i}" not in args.topic:
            row["events"] = await publish_to_all(clients, srv.port, args.topic, args.events, args.conns)
        why = []
        if ok < args.conns:
            why.append(f"{args.conns - ok} connections failed")
        if int(st["streams_open"]) < ok:  # type: ignore[call-overload]
            why.append(f"/admin/stats shows {st['streams_open']} streams for {ok} connections")
        if int(snap["min"]) < expect_min:  # type: ignore[call-overload]
            why.append(f"a connection got {snap['min']} heartbeats in {args.hold} s (< {expect_min})")
        if int(snap["lost"]) or int(snap["open"]) < ok:  # type: ignore[call-overload]
            why.append(f"{snap['lost']} connections closed")
        ev: dict[str, object] = row.get("events") or {}  # type: ignore[assignment]
        if ev and int(ev["per_conn_min"]) < args.events:  # type: ignore[call-overload]
            why.append(f"a connection got {ev['per_conn_min']} of the {args.events} events published")
        row["verdict"] = why or "ok"
        log(f"capacity: {ok} streams {row['streams_per_worker']}, RSS {row['rss_idle_mib']} MiB "
            f"({row['rss_per_conn_bytes']} B/conn), heartbeats {row['heartbeats']} -> {row['verdict']}")
    finally:
        if clients is not None:
            await clients.quit()
        await env.close()
        stop_redis(rs)
    row["server_log_problems"] = env.problems[:20]
    row["timeline"] = timeline
    emit_scale("scale_capacity", row)
    out = RESULTS / f"capacity-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(row, indent=1) + "\n")
    import plots

    log(f"wrote {out / 'capacity.json'} and {[str(p) for p in plots.draw_capacity(out, row)]}")


# -- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser, procs: int = 1) -> None:
        p.add_argument("--procs", type=int, default=procs,
                       help="subscriber processes (each < 20,000 connections: the open-files cap)")
        p.add_argument("--server-arg", action="append", help="extra argument for `ssegw serve` (repeatable)")
        p.add_argument("--server-core", default="",
                       help="taskset cores of the gateway (default: 0 for one worker, 0,1 for more)")
        p.add_argument("--client-core", default="1", help="taskset cores of the subscribers and this process")
        p.add_argument("--redis-core", default="1", help="cores of redis-server (all its threads)")
        run.add_window_args(p)
        p.add_argument("--code", default="HEAD",
                       help="run the gateway from a `git archive` snapshot of this commit (default HEAD), "
                            "or 'worktree' for the working tree as it is")

    def load(p: argparse.ArgumentParser, duration: float) -> None:
        p.add_argument("--subs", type=int, default=10_000)
        p.add_argument("--topic", default="ticker")
        p.add_argument("--duration", type=float, default=duration, help="seconds of publishing per window")
        p.add_argument("--sample", type=int, default=500, help="most connections parsing latency")
        p.add_argument("--min-sample", type=int, default=20, help="fewest connections parsing latency")
        p.add_argument("--parse-budget", type=int, default=100_000,
                       help="events/s the client may parse for latency (sample = budget / rate)")

    p = sub.add_parser("workers", help="1/2/4 workers through Redis: highest sustained fan-out rate")
    common(p)
    load(p, 10)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--start", type=int, default=100, help="first rate (msg/s); doubled until a step fails")
    p.add_argument("--max-rate", type=int, default=51_200)
    p.add_argument("--max-steps", type=int, default=9, help="most steps per worker count")
    p.add_argument("--resolution", type=int, default=100,
                   help="stop bisecting when the failing and passing rates are this close (or 10 %%)")

    p = sub.add_parser("rediscost", help="one worker: memory broker vs Redis broker, same load")
    common(p)
    load(p, 20)
    p.add_argument("--rates", type=float, nargs="+", default=[100, 1000])
    p.add_argument("--brokers", nargs="+", choices=("memory", "redis", "cluster"), default=["memory", "redis"],
                   help="cluster = a three-node Redis Cluster of our own (persistence off, on --redis-core)")
    p.add_argument("--cluster", action="store_true", help="shorthand for --brokers redis cluster")
    p.add_argument("--count", choices=("seq", "scan"), default="seq",
                   help="how client.py counts events (seq: newest id per read; scan: every id line); "
                        "scan whenever a cluster is measured (its ids are vectors)")

    p = sub.add_parser("capacity", help="idle subscribed streams over several workers, heartbeats counted")
    common(p, procs=4)
    p.add_argument("--conns", type=int, default=60_000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--topic", default="idle", help="topic of every stream; {i} = the connection's index "
                                                   "(e.g. user.{i}: one topic per stream)")
    p.add_argument("--heartbeat", default="5s", help="--heartbeat-interval of the gateway (seconds, 'Ns')")
    p.add_argument("--hold", type=float, default=30, help="seconds the streams are held and heartbeats counted")
    p.add_argument("--max-connections", type=int, default=0,
                   help="--max-connections of the gateway, split over the workers (default 19,000 per worker)")
    p.add_argument("--events", type=int, default=3,
                   help="after the hold, publish this many events to the (single) topic and check every stream got them")
    p.add_argument("--sample-every", type=float, default=1.0,
                   help="seconds between samples of streams open and RSS while opening (the plots' points)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        os.sched_setaffinity(0, {int(c) for c in str(args.client_core).split(",")})
    except (OSError, ValueError) as e:
        log(f"cannot pin the coordinator to {args.client_core}: {e}")
    global SERVER_CODE
    SERVER_CODE = use_code(args.code)
    import uvloop

    fn = {"workers": cmd_workers, "rediscost": cmd_rediscost, "capacity": cmd_capacity}[args.cmd]

    async def main_task() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_tasks)
        await fn(args)

    uvloop.run(main_task())
    return 0


if __name__ == "__main__":
    sys.exit(main())
