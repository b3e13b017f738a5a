"""Publish-ingest benchmark: ``python bench/ingest.py [single] [batch] [direct] [options]``.

How many publishes per second the gateway takes in, with nobody subscribed (except one probe
subscriber in ``direct``):

``single``  ``wrk -t1 -c32 --latency -s bench/wrk/publish_single.lua``: one ~120-byte message
            per ``POST /publish``, topics spread over 10,000 (``m.0`` .. ``m.9999``).
``batch``   the same with ``bench/wrk/publish_batch.lua``: BATCH messages per POST (``--batch``,
            default 100; several values = one run each); messages/s = requests/s x BATCH.
``direct``  no HTTP: ``FCALL ssegw_publish`` straight into Redis (README "Publishing straight
            into Redis") from a redis-py (hiredis) process, ``--per-call`` messages per FCALL,
            ``--pipeline`` FCALLs per round trip.  Always against a Redis of ours, with a gateway
            connected to it (it loads the function library) and one subscriber on the gateway
            counting the probe events (the first message of every FCALL goes to the probe topic).

``--broker redis`` runs single/batch against a gateway pointed at a Redis of ours
(``redis-server --save '' --appendonly no`` on a free port below 32768).  ``--code DIR`` runs
the gateway from another checkout (or a ``git archive`` export) instead of this working tree.

Pinning: the gateway on core 0 (``taskset -c 0``); wrk, Redis, the direct publisher and this
coordinator on core 1 (so Redis competes with wrk / the publisher for that core).  Each run
gets a fresh gateway (and a fresh Redis): wait for a quiet machine (``--quiet-wait``), warm up
``--warmup`` s (a separate wrk run / the publisher's first seconds), then measure for
``--duration`` s while sampling CPU of every process and core.  Everything stops by itself;
only processes started here are signalled, by PID.  Prints one JSON line and appends it to
``bench/results/ingest.jsonl``; exits 1 if any run had a non-2xx answer, a socket error or an
error reply from Redis.  See bench/README.md, "``ingest`` -- publish ingest".
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    ALLOCATORS,
    BENCH,
    GATEWAY_ENV,
    PYTHON,
    RESULTS,
    ROOT,
    CpuSampler,
    Server,
    code_version,
    emit,
    log,
    stats_delta,
    wait_quiet,
)

SERVER_CORE = "0"
CLIENT_CORE = "1"
WRK_DIR = BENCH / "wrk"
# Settings of the messages the direct publisher writes: the gateway's defaults (history_size
# 1000, history_ttl 1 h); clock retention = longest history_ttl + 1 h (README).
HISTORY_SIZE = 1000
HISTORY_TTL_MS = 3_600_000
CLOCK_RETENTION_MS = HISTORY_TTL_MS + 3_600_000
SHARD = "{ssegw:0}"  # a standalone Redis is one shard
PROBE_TOPIC = "ingest.probe"


# -- environment ---------------------------------------------------------------------------


def python_info() -> dict[str, object]:
    """The interpreter the gateway runs on (``PYTHON``), not necessarily this one."""
    code = ("import json,sys,sysconfig,platform;a=sysconfig.get_config_var('CONFIG_ARGS') or '';"
            "print(json.dumps({'version':sys.version,'executable':sys.executable,"
            "'implementation':platform.python_implementation(),"
            "'enable_optimizations':'--enable-optimizations' in a,'with_lto':'--with-lto' in a,"
            "'enable_shared':'--enable-shared' in a,'config_args':a,"
            "'cflags':sysconfig.get_config_var('CFLAGS')}))")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def gateway_code(code: str | None) -> dict[str, object]:
    """Which ssegw the gateway runs: this checkout (``code_version()``, also the result's
    ``code``) or ``--code DIR`` (a checkout or ``git archive`` export: the package imported
    from there, its git HEAD if it is a checkout, a hash of its ssegw/**/*.py)."""
    if not code:
        return {"dir": str(ROOT), **code_version()}
    env = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONPATH": code}
    r = subprocess.run([PYTHON, "-c", "import ssegw; print(ssegw.__file__)"], env=env, cwd="/", capture_output=True,
                       text=True, timeout=30)
    imported = r.stdout.strip()
    if not imported.startswith(str(Path(code).resolve())):
        raise SystemExit(f"--code {code}: ssegw would be imported from {imported or r.stderr.strip()!r}")
    h = hashlib.sha256()
    base = Path(code).resolve()
    for f in sorted((base / "ssegw").rglob("*.py")):
        h.update(str(f.relative_to(base)).encode() + b"\0" + f.read_bytes())
    head = subprocess.run(["git", "-C", str(base), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"dir": str(base), "imported": imported, "head": head.stdout.strip() or None,
            "ssegw_sha256": h.hexdigest()[:12]}


def tool_version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except OSError as e:
        return f"unavailable: {e}"
    return (r.stdout or r.stderr).splitlines()[0].strip() if (r.stdout or r.stderr) else ""


def pin_self() -> None:
    try:
        os.sched_setaffinity(0, {int(CLIENT_CORE)})
    except (OSError, ValueError) as e:
        log(f"cannot pin the coordinator to core {CLIENT_CORE}: {e}")


def stop_pid(proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None, grace: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after ``grace`` s: only our own child, by PID."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


# -- Redis ---------------------------------------------------------------------------------


class RedisServer:
    """``redis-server`` of our own, pinned to the client core, no persistence, on a free port
    below 32768 (outside the ephemeral range, so no client socket can be holding it)."""

    def __init__(self, core: str, log_path: Path) -> None:
        self.core = core
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.dir = tempfile.mkdtemp(prefix="ingest-redis-")
        self.cmd: list[str] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        rng = random.Random()
        for _ in range(20):
            port = rng.randrange(20000, 32768)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            self.cmd = ["taskset", "-c", self.core, exe, "--port", str(port), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "no", "--dir", self.dir, "--logfile", ""]
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
            self.port = port
            if self._wait_ping(10.0):
                log(f"redis pid {self.pid} on :{port}")
                return self
            stop_pid(self.proc)
            self.proc = None
        raise RuntimeError(f"could not start redis-server (log: {self.log_path})")

    def _wait_ping(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def stop(self) -> None:
        stop_pid(self.proc)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the gateway ---------------------------------------------------------------------------


def start_gateway(args: argparse.Namespace, tag: str, redis_url: str | None) -> Server:
    extra = ["--max-connections", "100000"]  # after Server's own 200000: the last one counts
    if redis_url:
        extra += ["--redis", redis_url]
    extra += args.server_arg or []
    srv = Server(SERVER_CORE, extra, RESULTS / f"server-ingest-{tag}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    if args.code:
        srv.cmd = ["env", "PYTHONSAFEPATH=1", f"PYTHONPATH={args.code}", *srv.cmd]
    srv.start()
    if not wait_ready(srv.admin_port, 20.0):
        srv.stop()
        raise RuntimeError(f"gateway not ready (/readyz) within 20 s:\n{''.join(srv.lines[-20:])}")
    return srv


def wait_ready(admin_port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=5) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False


def responses_delta(before: dict[str, object], after: dict[str, object]) -> dict[str, int]:
    """Error responses by status (the gateway counts those only) during the window."""
    b = before.get("responses") or {}
    a = after.get("responses") or {}
    out = {k: int(a[k]) - int(b.get(k, 0)) for k in a}  # type: ignore[union-attr,index,call-overload]
    return {k: v for k, v in out.items() if v}


def gateway_problems(srv: Server) -> list[str]:
    """The gateway's WARNING/ERROR lines, less the open-files notice every start prints when
    RLIMIT_NOFILE is below max_connections (not a fault of the run)."""
    return [ln for ln in srv.problems() if "open-files limit" not in ln][:20]


# -- wrk -----------------------------------------------------------------------------------

_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_LAT = re.compile(r"^\s*Latency\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)", re.M)
_DIST = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.M)
_SOCK = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_WRKJSON = re.compile(r"^WRKJSON (\{.*\})\s*$", re.M)


def _ms(v: str, unit: str) -> float:
    return round(float(v) * _UNIT_S[unit] * 1000, 3)


def parse_wrk(out: str) -> dict[str, object]:
    """wrk's text report (with ``--latency``) plus the scripts' ``WRKJSON`` line (p99.9, max)."""
    res: dict[str, object] = {}
    m = _RPS.search(out)
    res["requests_per_s"] = float(m.group(1)) if m else None
    m = _TOTAL.search(out)
    if m:
        res["requests"] = int(m.group(1))
        res["wrk_duration_s"] = round(float(m.group(2)) * _UNIT_S[m.group(3)], 3)
    lat: dict[str, object] = {}
    m = _LAT.search(out)
    if m:
        lat["avg_ms"] = _ms(m.group(1), m.group(2))
        lat["stdev_ms"] = _ms(m.group(3), m.group(4))
        lat["max_ms"] = _ms(m.group(5), m.group(6))
    for pct, v, unit in _DIST.findall(out):
        lat[f"p{pct}_ms"] = _ms(v, unit)
    m = _WRKJSON.search(out)
    if m:
        j = json.loads(m.group(1))
        lat["p999_ms"] = round(j["lat_p999_us"] / 1000, 3)
        res["wrk_done"] = j
    res["latency"] = lat
    m = _SOCK.search(out)
    res["socket_errors"] = ({"connect": int(m.group(1)), "read": int(m.group(2)), "write": int(m.group(3)),
                             "timeout": int(m.group(4))} if m else {"connect": 0, "read": 0, "write": 0, "timeout": 0})
    m = _NON2XX.search(out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    return res


def wrk_cmd(script: str, port: int, duration: int, threads: int, conns: int) -> list[str]:
    wrk = shutil.which("wrk") or "/usr/bin/wrk"
    return ["taskset", "-c", CLIENT_CORE, wrk, f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency",
            "-s", str((WRK_DIR / script).relative_to(ROOT)), f"http://127.0.0.1:{port}/publish"]


def run_wrk(cmd: list[str], env_extra: dict[str, str], timeout: float, on_start=None,  # type: ignore[no-untyped-def]
            on_exit=None) -> tuple[dict[str, object], str]:
    """Run wrk (from the repository root); returns (parsed report, stderr).  ``on_start(proc)``
    right after it started, ``on_exit()`` once it has exited but before it is reaped (its
    /proc entry, CPU times included, is still there)."""
    env = {**os.environ, **env_extra}
    with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr, text=True)
        if on_start is not None:
            on_start(proc)
        deadline = time.monotonic() + timeout
        late = False
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() > deadline:
                late = True
                proc.kill()
                break
            time.sleep(0.02)
        if on_exit is not None:
            on_exit()
        proc.wait()
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read(), ferr.read()
    if late:
        err += f"\nwrk did not finish within {timeout:.0f} s: killed"
    if proc.returncode != 0:
        err += f"\nwrk exited {proc.returncode}"
    res = parse_wrk(out)
    res["raw"] = out.strip().splitlines()[:25]
    return res, err


def cmdline(env_extra: dict[str, str], cmd: list[str]) -> str:
    return " ".join([*(f"{k}={v}" for k, v in env_extra.items()), *map(shlex.quote, cmd)])


def wrk_run(args: argparse.Namespace, mode: str, broker: str, batch: int) -> dict[str, object]:
    script = "publish_single.lua" if mode == "single" else "publish_batch.lua"
    env_extra = {"TOPICS": str(args.topics)}
    if mode == "batch":
        env_extra["BATCH"] = str(batch)
    redis = RedisServer(CLIENT_CORE, RESULTS / f"redis-ingest-{time.strftime('%Y%m%d-%H%M%S')}.log") \
        if broker == "redis" else None
    srv: Server | None = None
    run: dict[str, object] = {"mode": mode, "broker": broker}
    if mode == "batch":
        run["batch"] = batch
    try:
        if redis is not None:
            redis.start()
        srv = start_gateway(args, f"{mode}{batch if mode == 'batch' else ''}-{broker}", redis.url if redis else None)
        run["quiet"] = asyncio.run(wait_quiet(args.quiet_wait)) if args.quiet_wait > 0 else None
        # Warm-up: a wrk run of its own, same everything but the duration.
        if args.warmup > 0:
            wcmd = wrk_cmd(script, srv.port, args.warmup, args.threads, args.conns)
            wres, werr = run_wrk(wcmd, env_extra, args.warmup + 30)
            run["warmup"] = {"cmd": cmdline(env_extra, wcmd), "requests_per_s": wres["requests_per_s"],
                             "non_2xx": wres["non_2xx"], "socket_errors": wres["socket_errors"],
                             "stderr": werr.strip().splitlines()[:5]}
        cmd = wrk_cmd(script, srv.port, args.duration, args.threads, args.conns)
        run["wrk_cmd"] = cmdline(env_extra, cmd)
        run["wrk_conns"] = args.conns
        st0 = srv.stats()
        pids = {"gateway": srv.pid}
        if redis is not None:
            pids["redis"] = redis.pid
        sampler: list[CpuSampler] = []
        cpus: list[dict[str, object]] = []

        def started(proc: subprocess.Popen[str]) -> None:
            s = CpuSampler({**pids, "wrk": proc.pid, "coordinator": os.getpid()})
            s.start()
            sampler.append(s)

        log(f"{mode} ({broker}{f', batch {batch}' if mode == 'batch' else ''}): {run['wrk_cmd']}")
        res, err = run_wrk(cmd, env_extra, args.duration + 60, started, lambda: cpus.append(sampler[0].stop()))
        cpu = cpus[0]
        st1 = srv.stats()
        run.update({k: v for k, v in res.items() if k != "raw"})
        rps = res["requests_per_s"]
        n, bad = int(res.get("requests") or 0), int(res["non_2xx"])  # type: ignore[call-overload]
        # Messages accepted: only 2xx answers count (a refused batch published nothing).
        run["messages_per_s"] = (round(rps * (batch if mode == "batch" else 1) * (n - bad) / n, 1)  # type: ignore[operator]
                                 if rps is not None and n else None)
        run["conn_busy"] = conn_busy(res, args.conns)
        run["gateway_cpu_pct"] = cpu["proc_pct"]["gateway"]  # type: ignore[index]
        run["cpu"] = cpu
        run["server"] = {**stats_delta(st0, st1), "error_responses": responses_delta(st0, st1)}
        if redis is not None:
            run["redis"] = redis_info(redis)
        run["wrk_stderr"] = err.strip().splitlines()[:10]
        run["wrk_report"] = res["raw"]
    finally:
        if srv is not None:
            srv.stop()
            run["server_log_problems"] = gateway_problems(srv)
            run["gateway_cmd"] = " ".join(map(shlex.quote, srv.cmd))
        if redis is not None:
            redis.stop()
    run["verdict"] = wrk_verdict(run)
    return run


def conn_busy(res: dict[str, object], conns: int) -> dict[str, float] | None:
    """Share of the connection-time wrk spent waiting for answers (Little's law): every
    connection always has one request out, so answered requests x mean latency should fill
    conns x duration, less the requests still out at the end (at most one per connection,
    each at most the largest latency seen or the window).  ``at_least`` counts answered
    requests only, ``at_most`` adds that tail; ``at_most`` well under 1 means connections sat
    idle with a request out that was never answered: a stall."""
    done = res.get("wrk_done")
    if not isinstance(done, dict) or not done.get("requests") or not conns:
        return None
    span = done["duration_us"] * conns
    answered = done["requests"] * done["lat_mean_us"]
    tail = conns * min(done["lat_max_us"], done["duration_us"])
    return {"at_least": round(answered / span, 3), "at_most": round(min(1.0, (answered + tail) / span), 3)}


def wrk_verdict(run: dict[str, object]) -> str:
    why = []
    if run.get("requests_per_s") is None:
        why.append("no wrk report")
    busy = run.get("conn_busy")
    if isinstance(busy, dict) and busy["at_most"] < 0.9:
        # A request the gateway never answers is counted by wrk neither as an error nor as
        # a timeout: it only shows as connections idle, waiting (see conn_busy).
        why.append(f"stall: connections waited for answers that did not come (conn_busy {busy})")
    if run.get("non_2xx"):
        why.append(f"{run['non_2xx']} non-2xx answers")
    sock = run.get("socket_errors") or {}
    if any(sock.values()):  # type: ignore[union-attr]
        why.append(f"socket errors {sock}")
    if any(ln.startswith("status ") for ln in run.get("wrk_stderr") or []):  # type: ignore[union-attr]
        why.append("answers other than 200 (wrk stderr)")
    errs = (run.get("server") or {}).get("error_responses")  # type: ignore[union-attr]
    if errs:
        why.append(f"gateway error responses {errs}")
    wu = run.get("warmup") or {}
    if wu.get("non_2xx") or any((wu.get("socket_errors") or {}).values()):  # type: ignore[union-attr]
        why.append("errors during warm-up")
    return "fail: " + "; ".join(why) if why else "ok"


def redis_info(redis: RedisServer) -> dict[str, object]:
    try:
        r = redis.client()
        info = r.info()
        stats = r.info("commandstats").get("cmdstat_fcall", {})
        r.close()
    except Exception as e:  # noqa: BLE001 - a report, not a check
        return {"error": str(e)}
    return {"version": info.get("redis_version"), "used_memory_mib": round(int(info["used_memory"]) / 2**20, 1),
            "fcall_calls": stats.get("calls"), "fcall_usec_per_call": stats.get("usec_per_call"),
            "fcall_failed_calls": stats.get("failed_calls"), "fcall_rejected_calls": stats.get("rejected_calls")}


# -- direct: FCALL ssegw_publish from redis-py --------------------------------------------


class ProbeSubscriber(threading.Thread):
    """One ``GET /events?topic=PROBE`` stream, counting events (``\\nid: `` markers)."""

    def __init__(self, port: int, topic: str) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(f"GET /events?topic={topic} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        self.sock.settimeout(0.5)
        self.count = 0
        self.status = 0
        self.stop_flag = threading.Event()
        self.error = ""

    def run(self) -> None:
        tail = b""
        head = b""
        try:
            while not self.stop_flag.is_set():
                try:
                    data = self.sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    self.error = "stream closed by the gateway"
                    return
                if not self.status:
                    head += data
                    i = head.find(b"\r\n\r\n")
                    if i < 0:
                        continue
                    self.status = int(head[9:12])
                    data = head[i + 2:]  # keep the CRLF: the first chunk-size line ends in \n
                self.count += (tail + data).count(b"\nid: ")
                tail = data[-4:]
        except OSError as e:
            self.error = str(e)
        finally:
            self.sock.close()

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(5)


def direct_publisher(args: argparse.Namespace) -> int:
    """The ``_direct`` child (pinned to the client core by its caller's taskset): warm up, say
    ``MEASURE``, publish for ``--duration`` s, print one JSON line."""
    import redis
    import redis.utils

    r = redis.Redis(host="127.0.0.1", port=args.redis_port, socket_timeout=30)
    libs = r.function_list(library="ssegw")
    if not libs:
        print(json.dumps({"error": "function library ssegw is not loaded"}), flush=True)
        return 2
    rng = random.Random(1)
    data = "x" * 100
    head = [f"{SHARD}:seq", f"{SHARD}:epoch", f"{SHARD}:clock"]
    # 50 pre-built calls (like the wrk scripts' 50 bodies): the first message of each goes to
    # the probe topic, the others to random m.<i>.  Body = the gateway's encoding of
    # {"p":j,"s":"x"*100} as data (one data: line, no id:).
    templates = []
    for _ in range(50):
        topics = [PROBE_TOPIC] + [f"m.{rng.randrange(args.topics)}" for _ in range(args.per_call - 1)]
        keys = [f"{SHARD}:h:{t}" for t in topics]
        argv: list[object] = [args.per_call, CLOCK_RETENTION_MS]
        for j, t in enumerate(topics):
            argv += [f"{SHARD}:c:{t}", "", "0", f'data: {{"p":{j},"s":"{data}"}}\n', HISTORY_SIZE, HISTORY_TTL_MS]
        templates.append((keys, argv))
    nkeys = 4 + args.per_call
    pipe = r.pipeline(transaction=False)
    pid = os.getpid()
    seq = 0
    totals = {"calls": 0, "messages": 0, "errors": 0, "probe_sent": 0}
    err_samples: list[str] = []

    def burst() -> tuple[int, int, int]:
        nonlocal seq
        for _ in range(args.pipeline):
            keys, argv = templates[seq % 50]
            seq += 1
            pipe.execute_command("FCALL", "ssegw_publish", nkeys, *head, f"{SHARD}:req:ingest-{pid}-{seq}", *keys, *argv)
        calls = msgs = errs = 0
        for x in pipe.execute(raise_on_error=False):
            if isinstance(x, Exception):
                errs += 1
                if len(err_samples) < 5:
                    err_samples.append(str(x)[:300])
            else:
                calls += 1
                msgs += len(x) - 1
        return calls, msgs, errs

    def phase(seconds: float, rtts: list[float] | None) -> dict[str, float]:
        c = m = e = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            t = time.perf_counter()
            if t >= end:
                break
            dc, dm, de = burst()
            if rtts is not None:
                rtts.append(time.perf_counter() - t)
            c += dc
            m += dm
            e += de
        totals["calls"] += c
        totals["messages"] += m
        totals["errors"] += e
        totals["probe_sent"] += c  # one probe message per call that Redis accepted
        return {"calls": c, "messages": m, "errors": e, "elapsed": time.perf_counter() - t0}

    phase(args.warmup, None)
    print("MEASURE", flush=True)
    rtts: list[float] = []
    w = phase(args.duration, rtts)
    rtts.sort()
    n = len(rtts)

    def q(p: float) -> float | None:
        return round(rtts[min(n - 1, int(p * n))] * 1000, 3) if n else None

    print(json.dumps({
        "messages": w["messages"], "calls": w["calls"], "errors": w["errors"], "elapsed_s": round(w["elapsed"], 3),
        "messages_per_s": round(w["messages"] / w["elapsed"], 1), "calls_per_s": round(w["calls"] / w["elapsed"], 1),
        "pipeline_rtt_ms": {"n": n, "p50": q(0.5), "p99": q(0.99), "max": q(1.0)},
        "totals_with_warmup": totals, "error_samples": err_samples,
        "redis_py": redis.__version__, "hiredis": bool(redis.utils.HIREDIS_AVAILABLE),
    }), flush=True)
    r.close()
    return 0


def direct_run(args: argparse.Namespace) -> dict[str, object]:
    redis = RedisServer(CLIENT_CORE, RESULTS / f"redis-ingest-{time.strftime('%Y%m%d-%H%M%S')}.log")
    srv: Server | None = None
    sub: ProbeSubscriber | None = None
    pub: subprocess.Popen[str] | None = None
    run: dict[str, object] = {"mode": "direct", "broker": "redis", "per_call": args.per_call,
                              "pipeline": args.pipeline, "probe_topic": PROBE_TOPIC}
    try:
        redis.start()
        srv = start_gateway(args, "direct-redis", redis.url)
        sub = ProbeSubscriber(srv.port, PROBE_TOPIC)
        sub.start()
        # The gateway subscribes to the probe's channel on its first local subscriber: wait
        # for Redis to see that subscription, or the first probe events would be missed.
        rc = redis.client()
        chan = f"{SHARD}:c:{PROBE_TOPIC}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            got = rc.execute_command("PUBSUB", "SHARDNUMSUB", chan)
            if int(got[1]) >= 1:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"the gateway did not subscribe to {chan} within 15 s (stream status {sub.status})")
        rc.close()
        run["quiet"] = asyncio.run(wait_quiet(args.quiet_wait)) if args.quiet_wait > 0 else None
        cmd = ["taskset", "-c", CLIENT_CORE, PYTHON, str(Path(__file__).resolve().relative_to(ROOT)), "_direct",
               "--redis-port", str(redis.port), "--duration", str(args.duration), "--warmup", str(args.warmup),
               "--per-call", str(args.per_call), "--pipeline", str(args.pipeline), "--topics", str(args.topics)]
        run["publisher_cmd"] = " ".join(map(shlex.quote, cmd))
        log(f"direct: {run['publisher_cmd']}")
        pub = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        assert pub.stdout is not None
        watchdog = threading.Timer(args.warmup + args.duration + 60, lambda: stop_pid(pub, 2.0))
        watchdog.start()
        try:
            line = pub.stdout.readline()
            if line.strip() != "MEASURE":
                rest = line + pub.stdout.read()
                raise RuntimeError(f"direct publisher failed: {rest.strip()[:500]} {pub.stderr.read()[:1000]}")  # type: ignore[union-attr]
            st0 = srv.stats()
            probe0 = sub.count
            sampler = CpuSampler({"gateway": srv.pid, "redis": redis.pid, "publisher": pub.pid,
                                  "coordinator": os.getpid()})
            sampler.start()
            line = pub.stdout.readline()
            cpu = sampler.stop()
            st1 = srv.stats()
            probe1 = sub.count
            pub.wait(30)
        finally:
            watchdog.cancel()
        try:
            res = json.loads(line)
        except ValueError:
            raise RuntimeError(f"direct publisher: no result: {line[:300]!r} {pub.stderr.read()[:1000]}") from None  # type: ignore[union-attr]
        run.update(res)
        run["gateway_cpu_pct"] = cpu["proc_pct"]["gateway"]  # type: ignore[index]
        run["cpu"] = cpu
        # Every probe event (one per accepted FCALL, warm-up included) must reach the
        # subscriber: wait for the gateway to deliver the rest (at most 10 s).
        sent = int(res["totals_with_warmup"]["probe_sent"])
        deadline = time.monotonic() + 10
        while sub.count < sent and time.monotonic() < deadline and sub.is_alive():
            time.sleep(0.05)
        run["probe"] = {"sent": sent, "received": sub.count, "missing": sent - sub.count,
                        "received_in_window": probe1 - probe0, "stream_status": sub.status,
                        "stream_error": sub.error}
        run["server"] = {**stats_delta(st0, st1), "error_responses": responses_delta(st0, st1)}
        run["redis"] = redis_info(redis)
    finally:
        if pub is not None:
            stop_pid(pub, 2.0)
        if sub is not None:
            sub.stop()
        if srv is not None:
            srv.stop()
            run["server_log_problems"] = gateway_problems(srv)
            run["gateway_cmd"] = " ".join(map(shlex.quote, srv.cmd))
        redis.stop()
    why = []
    if run.get("errors"):
        why.append(f"{run['errors']} error replies from Redis: {run.get('error_samples')}")
    probe = run.get("probe") or {}
    if probe.get("missing"):  # type: ignore[union-attr]
        why.append(f"{probe['missing']} probe events did not reach the subscriber")  # type: ignore[index]
    if probe.get("stream_status") != 200:  # type: ignore[union-attr]
        why.append(f"probe stream answered {probe.get('stream_status')}")  # type: ignore[union-attr]
    run["verdict"] = "fail: " + "; ".join(why) if why else "ok"
    return run


# -- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/ingest.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modes", nargs="*", metavar="MODE",
                    help="single, batch and/or direct, run in this order (default: single batch)")
    ap.add_argument("--broker", choices=("memory", "redis"), default="memory",
                    help="single/batch: the gateway's broker (redis: a redis-server of ours on core 1)")
    ap.add_argument("--duration", type=int, default=15, help="measured seconds per run (whole seconds: wrk's -d)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up seconds before each measurement")
    ap.add_argument("--batch", type=int, nargs="+", default=[100], help="messages per POST in batch mode")
    ap.add_argument("--conns", type=int, default=32, help="wrk connections (-c)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (-t)")
    ap.add_argument("--topics", type=int, default=10_000, help="topics the messages are spread over")
    ap.add_argument("--per-call", type=int, default=100, help="direct: messages per FCALL")
    ap.add_argument("--pipeline", type=int, default=10, help="direct: FCALLs per pipeline round trip")
    ap.add_argument("--server-arg", action="append", help="extra argument for `ssegw serve` (repeatable)")
    ap.add_argument("--code", metavar="DIR",
                    help="run the gateway from the ssegw package in DIR (a checkout or a `git archive` export; "
                         "PYTHONSAFEPATH=1 PYTHONPATH=DIR) instead of this working tree")
    ap.add_argument("--allocator", choices=sorted(ALLOCATORS), default="pymalloc",
                    help="the gateway's allocator: Python's own, or jemalloc as systemd/ssegw.service runs it")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each run, wait up to this many s for every core to be < 20%% busy (0 = don't)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_direct"]:
        p = argparse.ArgumentParser(prog="bench/ingest.py _direct")
        for name, typ in (("--redis-port", int), ("--duration", float), ("--warmup", float), ("--per-call", int),
                          ("--pipeline", int), ("--topics", int)):
            p.add_argument(name, type=typ, required=True)
        return direct_publisher(p.parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    modes = args.modes or ["single", "batch"]
    bad = [m for m in modes if m not in ("single", "batch", "direct")]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}: use single, batch, direct")
    if args.duration < 1 or args.warmup < 0:
        raise SystemExit("--duration must be >= 1 and --warmup >= 0")
    if args.per_call < 1 or args.pipeline < 1:
        raise SystemExit("--per-call and --pipeline must be >= 1")
    pin_self()
    GATEWAY_ENV.update(ALLOCATORS[args.allocator])
    redis_used = args.broker == "redis" or "direct" in modes
    conditions: dict[str, object] = {
        "gateway_core": int(SERVER_CORE), "client_core": int(CLIENT_CORE),
        "pinning": ("gateway on core 0; wrk, the direct publisher, this coordinator"
                    + (" and redis-server all on core 1 (redis competes with wrk / the publisher for it)"
                       if redis_used else " on core 1")),
        "duration_s": args.duration, "warmup_s": args.warmup, "wrk_threads": args.threads, "wrk_conns": args.conns,
        "topics": args.topics, "server_args": args.server_arg or [], "allocator": args.allocator,
        "gateway_code": gateway_code(args.code), "python": python_info(), "wrk": tool_version(["wrk", "--version"]),
        "redis_server": tool_version(["redis-server", "--version"]) if redis_used else None,
        "nproc": os.cpu_count(), "loadavg_before": os.getloadavg(),
    }
    runs: list[dict[str, object]] = []
    for mode in modes:
        try:
            if mode == "direct":
                runs.append(direct_run(args))
            elif mode == "single":
                runs.append(wrk_run(args, "single", args.broker, 1))
            else:
                for b in args.batch:
                    runs.append(wrk_run(args, "batch", args.broker, b))
        except Exception as e:  # noqa: BLE001 - one broken run is reported, the others still go
            log(f"{mode}: {type(e).__name__}: {e}")
            runs.append({"mode": mode, "broker": "redis" if mode == "direct" else args.broker,
                         "verdict": f"fail: {type(e).__name__}: {str(e)[:1000]}"})
        last = runs[-1]
        log(f"{mode}: {last.get('messages_per_s')} msg/s, {last.get('requests_per_s')} req/s, "
            f"gateway cpu {last.get('gateway_cpu_pct')} %, verdict {last['verdict']}")
    conditions["loadavg_after"] = os.getloadavg()
    summary = [{k: r.get(k) for k in ("mode", "broker", "batch", "requests_per_s", "messages_per_s",
                                      "gateway_cpu_pct", "verdict") if k in r} for r in runs]
    ok = all(r["verdict"] == "ok" for r in runs)
    extra: dict[str, object] = {}
    if args.code:  # ``code`` says what was measured: the gateway's code, not this working tree
        extra["code"] = {**conditions["gateway_code"], "worktree": code_version()}  # type: ignore[dict-item]
    emit("ingest", {**extra, "modes": modes, "ok": ok, "summary": summary, "conditions": conditions, "runs": runs})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
