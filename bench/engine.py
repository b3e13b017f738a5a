"""The high-scale engine: load scenarios written as user classes, run on bench/client.py.

A scenario is a class, as in Locust::

    from engine import SSEUser

    class QuoteUser(SSEUser):
        topics = "quotes"       # every user on one topic ("user.{i}": one topic per user)
        rate = 500              # messages/s the publisher sends to those topics
        users = 2000            # default for -u
        duration = 10           # default for -t (seconds of publishing per window)

and runs headless from one command, bounded in time:
``python -m bench run QuoteUser -f myscenarios.py -u 2000 -t 10s``.

Under the class sits the measuring machinery of bench/run.py, reused as it is: a gateway
(``common.Server``, core 0), ``--procs`` subscriber processes of bench/client.py (core 1,
sources 127.0.0.2, 127.0.0.3, ... with ``per_src`` connections per address), the paced
batch publisher, ``run.window`` (mark -> publish -> drain -> exact counts, latency, CPU,
/healthz probe), ``run.with_retries`` (re-measure a disturbed window) and ``run.verdict``.
The counting is client.py's: ``seq`` (one shared topic: exact totals, gaps and duplicates on
the sampled connections) or ``scan`` (per-user topics: exact per connection, checked against
what the publisher sent to each topic).

``target`` picks the server: ``ssegw`` or one of the baselines in bench/baselines/
(``sse-starlette``, ``aiohttp-sse``), started the same way, so that one run measures them all.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402
from common import BENCH, EDGES, PYTHON, RESULTS, Server, log  # noqa: E402
from loadgen import Clients, ticker_body  # noqa: E402

# Which server a scenario runs against: ssegw, or a baseline script in bench/baselines/.
TARGETS: dict[str, str | None] = {"ssegw": None, "sse-starlette": "starlette_app.py", "aiohttp-sse": "aiohttp_app.py"}


def server_for(args: argparse.Namespace, tag: str) -> Server:
    """``run.server_for`` for the engine: the gateway, or a baseline on the same core.  Also
    records the server's RSS before any client connects (``rss_start``)."""
    target = getattr(args, "target", "ssegw")
    srv = Server(run.SERVER_CORE, list(args.server_arg or []),
                 RESULTS / f"server-{target}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    app = TARGETS[target]
    if app is not None:
        srv.cmd = ["taskset", "-c", run.SERVER_CORE, PYTHON, str(BENCH / "baselines" / app), "--port", "0"]
    srv.start()
    srv.stats()  # one request first: its one-off allocations belong to the baseline RSS
    srv.rss_start = srv.rss()  # type: ignore[attr-defined]
    return srv


class SpreadClients(Clients):
    """``loadgen.Clients`` with the scenario's connections per source address."""

    per_src = 10_000

    @classmethod
    async def start(cls, *args, **kwargs) -> Clients:  # type: ignore[no-untyped-def, override]
        kwargs.setdefault("per_src", cls.per_src)
        return await super().start(*args, **kwargs)


async def wait_delivered(clients: Clients, expected_min: int, timeout: float = 20, idle: float = 5.0) -> dict[str, object]:
    """``run.wait_delivered`` with a 20 s bound on the drain (instead of 60 s): a server that
    needs longer has failed the window anyway (the verdict allows 2 s), and a slow baseline
    would otherwise stretch the standard suite by minutes.  What has not arrived by then
    counts as lost."""
    return await _wait_delivered(clients, expected_min, timeout, idle)


# Env.open() and run.window() reach these through the run module's names.
_wait_delivered = run.wait_delivered
run.server_for = server_for
run.Clients = SpreadClients  # type: ignore[misc]
run.wait_delivered = wait_delivered


class SSEUser:
    """A scenario: ``users`` subscribers of ``topics`` and a publisher sending ``rate`` msg/s.

    Override :meth:`run` for a scenario with more than one measured window (see
    scenarios.py).  Attributes are defaults; the command line overrides ``users``,
    ``duration``, ``rate``, ``procs`` and ``target``."""

    topics = "ticker"           # a topic; "{i}" in it is the user's index (one topic per user)
    rate = 100.0                # messages/s published to the users' topics
    users = 1000                # subscriber connections
    duration = 10.0             # seconds of publishing per measured window
    procs = 1                   # subscriber processes
    per_src = 10_000            # connections per source address (127.0.0.2, .3, ...)
    sample = 500                # most connections parsing every event's latency
    parse_budget = 100_000      # events/s the sampled connections may parse (~1 us each)
    server_args: tuple[str, ...] = ()
    max_p99_ms = 2000.0
    target = "ssegw"
    inject_gap = False          # self-check: one message of the window goes to another topic

    def __init__(self, **overrides: object) -> None:
        for k, v in overrides.items():
            if v is not None:
                if not hasattr(type(self), k):
                    raise TypeError(f"{type(self).__name__} has no attribute {k!r}")
                setattr(self, k, v)
        self.quiet_wait = 10.0
        self.attempts = 2

    @property
    def directed(self) -> bool:
        return "{i}" in self.topics

    @property
    def count(self) -> str:
        return "scan" if self.directed else "seq"

    def sample_for(self, rate: float) -> int:
        """Connections that parse latency: all of them for per-user topics, else as many as
        the parse budget allows at ``rate`` (at least 20)."""
        if self.directed:
            return self.users
        return max(20, min(self.sample, int(self.parse_budget // max(1.0, rate))))

    def messages(self, counts: list[int] | None) -> Callable[[int, int], tuple[bytes, None]]:
        """The publisher's batch maker: ticker events, or per-user events to random users
        (tallied in ``counts`` so that each connection's count can be checked)."""
        if counts is not None:
            return run._tallying(self.users, self.topics, counts, random.Random(1))
        make = ticker_body(self.topics.encode())
        if not self.inject_gap:
            return make
        injected = [False]

        def with_gap(k: int, first: int) -> tuple[bytes, None]:
            body, _ = make(k, first)
            if not injected[0] and first > 0:
                injected[0] = True
                # The first message of this batch goes to a topic nobody reads: the publisher
                # counts it as published, the subscribers see a missing sequence number.
                body = body.replace(b'"topic":"%s"' % self.topics.encode(), b'"topic":"gap.injected"', 1)
            return body, None

        return with_gap

    def namespace(self) -> argparse.Namespace:
        """The option set that bench/run.py's ``Env`` and ``window`` read."""
        return argparse.Namespace(server_arg=list(self.server_args), procs=self.procs, count=self.count,
                                  pub_conns=4, duration=self.duration, quiet_wait=self.quiet_wait,
                                  attempts=self.attempts, max_foreign=20.0, target=self.target)

    async def window(self, env: run.Env, rate: float) -> dict[str, object]:
        """One measured window at ``rate`` msg/s (re-measured while the machine is busy)."""
        counts = [0] * self.users if self.directed else None

        async def once() -> dict[str, object]:
            assert env.clients is not None
            if counts is not None:
                counts[:] = [0] * len(counts)
            else:
                await env.clients.cmd(f"sample {self.sample_for(rate)}")
            return await env.window(rate, self.messages(counts), directed_counts=counts)

        res = await run.with_retries(env, once)
        res["verdict"] = run.verdict(res, self.max_p99_ms) or "ok"
        return res

    async def run(self, env: run.Env) -> dict[str, object]:
        """The scenario's measurement; the default is one window at ``rate``."""
        return await self.window(env, self.rate)


def serialized(clients: Clients) -> None:
    """Let several coroutines talk to the subscriber processes (a window and a timeline
    sampler): one command and its answers at a time."""
    lock = asyncio.Lock()
    cmd = clients.cmd

    async def locked(line: str, timeout: float = 300) -> list[dict[str, object]]:
        async with lock:
            return await cmd(line, timeout)

    clients.cmd = locked  # type: ignore[method-assign]


async def run_user(user: SSEUser) -> dict[str, object]:
    """Start the server and the subscribers for ``user``, run it, stop everything."""
    name = type(user).__name__
    log(f"scenario {name} on {user.target}: {user.users} users of {user.topics!r}, {user.rate:g} msg/s, "
        f"{user.duration:g} s")
    env = run.Env(user.namespace(), f"{name}", user.users, user.topics, user.sample_for(user.rate),
                  directed=user.directed)
    out: dict[str, object] = {"scenario": name, "target": user.target, "users": user.users, "topics": user.topics,
                              "rate": user.rate, "duration": user.duration, "procs": user.procs, "per_src": user.per_src,
                              "server_args": list(user.server_args)}
    t0 = time.monotonic()
    SpreadClients.per_src = user.per_src
    try:
        await env.open()
        assert env.srv is not None and env.clients is not None
        serialized(env.clients)
        out["server_rss_open_mib"] = {"start": round(env.srv.rss_start / 2**20, 2),  # type: ignore[attr-defined]
                                      "with_users": round(env.srv.rss() / 2**20, 2),
                                      "conns": env.clients.ok}
        out["result"] = await user.run(env)
    except (RuntimeError, OSError, TimeoutError) as e:  # a server that could not take the load
        log(f"scenario {name} on {user.target} failed: {e!r}")
        out["error"] = repr(e)[:500]
    finally:
        await env.close()
    out["server_log_problems"] = env.problems[:20]
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    out["ok"] = "error" not in out and not problems(out)
    return out


def problems(out: dict[str, object]) -> list[str]:
    """Every verdict other than "ok" found in a scenario's result (windows, steps)."""
    found: list[str] = []

    def walk(x: object) -> None:
        if isinstance(x, dict):
            v = x.get("verdict")
            if v is not None and v != "ok":
                found.extend(v if isinstance(v, list) else [str(v)])
            for y in x.values():
                walk(y)
        elif isinstance(x, list):
            for y in x:
                walk(y)

    walk(out.get("result"))
    return found


# -- timeline ----------------------------------------------------------------------------


def hist_p99(hist: dict[int, int]) -> float | None:
    """p99 in ms of a sparse 1 % histogram (the bucket's upper edge)."""
    n = sum(hist.values())
    if not n:
        return None
    cum = 0
    for k in sorted(hist):
        cum += hist[k]
        if cum > 0.99 * n:
            return round(EDGES[min(k, len(EDGES) - 1)] * 1000, 2)
    return None


class Timeline:
    """Every ``period`` s while a window runs: the server's open streams, the events/s the
    subscribers counted and the p99 of the events received in that interval."""

    def __init__(self, env: run.Env, period: float = 0.5) -> None:
        self.env, self.period = env, period
        self.rows: list[dict[str, object]] = []
        self.stop = asyncio.Event()

    async def run(self) -> list[dict[str, object]]:
        env = self.env
        assert env.admin is not None and env.clients is not None
        t0 = time.monotonic()
        last_t, last_sum, last_hist = t0, -1, {}
        while not self.stop.is_set():
            st = await env.admin.stats()
            snap = await env.clients.snap("lat")
            now = time.monotonic()
            hist: dict[int, int] = {}
            for part in snap["parts"]:  # type: ignore[attr-defined]
                for k, c in (part.get("lat") or {}).get("hist", {}).items():
                    hist[int(k)] = hist.get(int(k), 0) + c
            total = int(snap["sum"])  # type: ignore[call-overload]
            if last_sum < 0 or total < last_sum or any(hist.get(k, 0) < c for k, c in last_hist.items()):
                # The first sample, or a mark reset the counters since the last one: no rate yet.
                rate, interval = None, {}
            else:
                rate = round((total - last_sum) / max(1e-6, now - last_t))
                interval = {k: c - last_hist.get(k, 0) for k, c in hist.items() if c > last_hist.get(k, 0)}
            self.rows.append({"t_s": round(now - t0, 2), "streams_open": st.get("streams_open"),
                              "events_per_s": rate, "p99_ms": hist_p99(interval)})
            last_t, last_sum, last_hist = now, total, hist
            try:
                await asyncio.wait_for(self.stop.wait(), self.period)
            except TimeoutError:
                pass
        return self.rows


# -- command line ------------------------------------------------------------------------


def parse_duration(s: str) -> float:
    """``20``, ``20s``, ``2m``, ``1m30s`` -> seconds (Locust's ``-t`` syntax)."""
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", s.strip())
    if not m or not s.strip():
        raise argparse.ArgumentTypeError(f"not a duration: {s!r}")
    h, mi, sec = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + sec


def load_classes(path: Path) -> dict[str, type[SSEUser]]:
    """The SSEUser subclasses defined in the file ``path``."""
    spec = importlib.util.spec_from_file_location(f"scenarios_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {k: v for k, v in vars(mod).items()
            if isinstance(v, type) and issubclass(v, SSEUser) and v is not SSEUser and v.__module__ == mod.__name__}


def add_run_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run one scenario class headless (e.g. TickerUser)")
    p.add_argument("scenario", help="class name, e.g. TickerUser")
    p.add_argument("-f", "--file", type=Path, default=BENCH / "scenarios.py", help="file defining the class")
    p.add_argument("-u", "--users", type=int, help="subscriber connections")
    p.add_argument("-t", "--run-time", type=parse_duration, dest="duration", help="publishing time per window")
    p.add_argument("--rate", type=float, help="messages/s")
    p.add_argument("--procs", type=int, help="subscriber processes")
    p.add_argument("--per-src", type=int, help="connections per source address")
    p.add_argument("--target", choices=sorted(TARGETS), help="server to measure")
    p.add_argument("--server-arg", action="append", dest="server_args", help="extra `ssegw serve` argument")
    p.add_argument("--quiet-wait", type=float, default=10.0, help="wait up to this many s for an idle machine")


async def cmd_run(args: argparse.Namespace) -> int:
    classes = load_classes(args.file)
    if args.scenario not in classes:
        raise SystemExit(f"no scenario {args.scenario!r} in {args.file}; there are: {', '.join(sorted(classes))}")
    user = classes[args.scenario](users=args.users, duration=args.duration, rate=args.rate, procs=args.procs,
                                  per_src=args.per_src, target=args.target,
                                  server_args=tuple(args.server_args) if args.server_args else None)
    user.quiet_wait = args.quiet_wait
    out = await run_user(user)
    from common import emit
    emit("engine", out)
    return 0 if out["ok"] else 1
