"""Command line: ``ssegw serve``, ``ssegw check-config``, ``ssegw print-systemd`` and ``ssegw print-proxy``.

This is the one place that wires things together: it turns argv, the environment and the
config file into a :class:`~ssegw.config.Config`, chooses the broker and starts a worker --
in this process (``workers = 1``), or under a :class:`~ssegw.supervisor.Supervisor`.

One worker, SIGHUP (:class:`Generations`): the reload happens inside the process.  The process
binds its public and admin listeners once and keeps them; each *generation* is a new
:class:`~ssegw.server.worker.Worker`, built from the re-read configuration, serving duplicates
of those two sockets on the same event loop.  The new generation accepts first; then the old one
stops accepting, answers what it took in the last moment (``HANDOFF_S``), and drains (its streams
get a jittered ``retry:`` and close over ``drain_timeout``) while the new one takes every new
connection from the same accept queue: nothing is refused, reset or answered 503, since the
listening socket itself never closes.  The embedded broker is shared by the generations (each
gets its own ``start``/``close`` through a :class:`_Lease`), so history, ids and live events
carry across the reload: a client of the old generation resumes on the new one with
``Last-Event-ID`` and misses nothing, and neither generation misses an event published on the
other.  With Redis each generation has its own broker, as a worker process would.  Counters
of a generation that stopped are kept in a retired total, as the supervisor does for its
workers.  Limits: the listeners' addresses and ``workers`` are fixed for the process's life
(changing them needs a restart; a reload says so), and the code is not reloaded -- an upgrade
is a restart.  (Why not a child process per generation, as the supervisor does: with the
embedded broker the new process would start with empty history, under a new epoch, so every
resuming client would get ``ssegw.reset``, and events published to one process during the
overlap would never reach the other's subscribers.)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import __version__, logs
from .broker.base import Broker
from .broker.memory import MemoryBroker
from .config import Config, ConfigError, add_arguments, load, load_file, render
from .notify import Notifier, keep_alive, report_status
from .packaged import FILES, PROXIES, print_proxy, print_systemd

if TYPE_CHECKING:
    from .core.history import Event
    from .server.worker import Worker

log = logging.getLogger("ssegw")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssegw", description="Server-Sent Events gateway")
    parser.add_argument("--version", action="version", version=f"ssegw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    add_arguments(serve)
    check = sub.add_parser("check-config", help="validate a config file and print the effective config")
    check.add_argument("file", help="TOML config file")
    units = sub.add_parser("print-systemd", help="print the systemd unit, sysctl drop-in or example config")
    units.add_argument("what", choices=list(FILES), help="unit: ssegw.service, sysctl: 99-ssegw.conf, "
                       "config: ssegw.toml.example (README \"Running under systemd\")")
    proxies = sub.add_parser("print-proxy", help="print a tested nginx, HAProxy or Caddy front-end recipe")
    proxies.add_argument("which", choices=list(PROXIES), help="nginx: HTTP/2 + TLS, X-Forwarded-For; "
                         "haproxy: HTTP/2 + TLS, PROXY protocol v2; haproxy-xff: the same with "
                         "X-Forwarded-For; caddy: automatic HTTPS (README \"Deploying behind a proxy\")")
    return parser


def _history_settings(current: Callable[[], Config]) -> Callable[[str], tuple[int, int]]:
    """topic -> (history_size, history_ttl_ms) under the configuration ``current()`` returns."""

    def settings(topic: str) -> tuple[int, int]:
        _, size, ttl = current().topic_settings(topic)
        return size, int(ttl * 1000)

    return settings


def _keyed_settings(current: Callable[[], Config]) -> Callable[[str], tuple[int, bool]]:
    """topic -> (max_keys, compact a resume whenever that is shorter: slow_consumer conflate)."""

    def keyed(topic: str) -> tuple[int, bool]:
        cfg = current()
        return cfg.topic_max_keys(topic), cfg.topic_settings(topic)[0] == "conflate"

    return keyed


def make_broker(cfg: Config) -> Broker:
    settings = _history_settings(lambda: cfg)
    if cfg.redis:
        from .broker.redis import RedisBroker

        max_ttl = max([cfg.history_ttl] + [r.history_ttl for r in cfg.topics if r.history_ttl is not None])
        return RedisBroker(cfg.redis, settings, int(max_ttl * 1000),
                           wait_replicas=cfg.redis_wait_replicas, wait_timeout=cfg.redis_wait_timeout,
                           keyed=_keyed_settings(lambda: cfg))
    return MemoryBroker(settings, _wall_ms, _keyed_settings(lambda: cfg))


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def serve(cfg: Config, argv: list[str], reload_config: Callable[[], Config] | None = None) -> int:
    """Run one worker (``workers = 1``), a worker under a supervisor (the supervisor set
    ``SSEGW__LISTEN_FD``), or a supervisor of N workers.

    Args:
        reload_config: reads the configuration again (SIGHUP); raises ConfigError.  Default:
            the same ``cfg`` again.
    """
    from .supervisor import ENV_CONTROL, ENV_FD

    fd = os.environ.pop(ENV_FD, None)
    control = os.environ.pop(ENV_CONTROL, None)
    if fd is not None:
        return _run_worker(cfg, socket.socket(fileno=int(fd)), control)
    _log_allocator()
    reload = reload_config or (lambda: cfg)
    if cfg.workers != 1:
        if not cfg.redis:
            raise ConfigError(
                "workers",
                f"workers: {cfg.workers} workers need a broker that spans processes (set redis); "
                "the embedded broker serves one process (workers = 1)",
            )
        return _run_supervisor(cfg, argv, reload)
    return _run_single(cfg, reload)


def _log_allocator() -> None:
    from .server import allocator

    what, warning = allocator.describe()
    log.info("memory allocator: %s", what)
    if warning:
        log.warning("%s", warning)


def _event_loop_run(main: object) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux
        asyncio.run(main)  # type: ignore[arg-type]
        return
    uvloop.run(main)  # type: ignore[arg-type]


def _startup(cfg: Config) -> Callable[[Worker], None]:
    def startup(w: Worker) -> None:
        if cfg.demo:
            from .demo import Ticker

            Ticker(w).start()

    return startup


def _new_worker(cfg: Config, broker: Broker) -> Worker:
    from .server.worker import Worker

    try:
        return Worker(cfg, broker, extra_startup=_startup(cfg))
    except ValueError as e:  # the authenticator refuses an inconsistent [auth] table
        raise ConfigError("auth", f"auth: {e}") from None


def _run_worker(cfg: Config, sock: socket.socket | None, control: str | None) -> int:
    """A worker under a supervisor (``sock`` is its slot socket), or a bare one."""
    if sock is not None and cfg.max_connections > 0:
        # max_connections is per host: each of the supervisor's workers enforces its share
        # (the kernel spreads connections evenly over SO_REUSEPORT sockets).
        n = cfg.workers or (os.cpu_count() or 1)
        cfg = dataclasses.replace(cfg, max_connections=-(-cfg.max_connections // n))
    broker = make_broker(cfg)
    worker = _new_worker(cfg, broker)

    async def run() -> None:
        if sock is not None:
            worker.parent_pid = os.getppid()
            sock.setblocking(False)
        await worker.start(public_socks=[sock] if sock is not None else None, control_path=control)
        worker.install_signals()
        pub, adm = worker.bound_ports()
        if control is None:
            log.info("ssegw %s serving on http://%s:%d (admin http://%s:%d), broker %s%s", __version__,
                     cfg.host, pub, cfg.admin_host, adm, broker.kind,
                     ", demo on /" if cfg.demo else "")
        else:
            log.info("worker %d serving on port %d, broker %s", os.getpid(), pub, broker.kind)  # type: ignore[attr-defined]
        await worker.wait_stopped()
        log.info("stopped")

    _event_loop_run(run())
    return 0


def _run_single(cfg: Config, reload_config: Callable[[], Config]) -> int:
    async def run() -> None:
        gens = Generations(cfg, reload_config, Notifier())
        await gens.start()
        await gens.wait()
        log.info("stopped")

    _event_loop_run(run())
    return 0


def _run_supervisor(cfg: Config, argv: list[str], reload_config: Callable[[], Config]) -> int:
    from .server.sockets import bind_socket
    from .server.worker import Worker
    from .supervisor import Supervisor

    bound: list[int] = []

    def listen() -> socket.socket:
        s = bind_socket(cfg.host, bound[0] if bound else cfg.port, reuse_port=True, backlog=cfg.backlog)
        if not bound:
            bound.append(s.getsockname()[1])
        return s

    async def run() -> None:
        sup = Supervisor(cfg, argv, listen, Notifier(), reload_config)
        # The supervisor's own admin listener: the usual admin routes, answered by asking
        # the workers (Supervisor implements the same admin source as a worker).
        admin = Worker(cfg, MemoryBroker(lambda t: (0, 0), lambda: 0))
        admin.admin_source = sup
        await admin.start(public_socks=[])
        await sup.start()
        asyncio.get_running_loop().create_task(sup.refresh_ready())
        _, adm = admin.bound_ports()
        log.info("ssegw %s serving on http://%s:%d (admin http://%s:%d), broker redis, %d workers", __version__,
                 cfg.host, bound[0], cfg.admin_host, adm, sup.n)
        await sup.wait()
        admin._stop_now()
        await admin.wait_stopped()
        log.info("stopped")

    _event_loop_run(run())
    return 0


# -- one worker: generations in this process ---------------------------------------------------

#: How long a new generation may take to become ready (its broker reachable) on reload.
RELOAD_READY_TIMEOUT = 30.0
#: How often the systemd STATUS= line is refreshed.
STATUS_S = 5.0
#: Settings bound to the listeners, which live as long as the process.
_FIXED = ("host", "port", "admin_host", "admin_port", "workers")
#: On reload, how long the old generation, no longer accepting, keeps serving before it
#: drains: a client it accepted in the last moment has sent its request by then.
HANDOFF_S = 0.5


class _Lease:
    """One generation's handle on the shared embedded broker: its own ``start``/``close``
    (adding and removing its delivery callback), everything else the shared broker's."""

    def __init__(self, broker: MemoryBroker, sinks: list[Callable[[list[Event]], None]]) -> None:
        self._broker = broker
        self._sinks = sinks
        self._deliver: Callable[[list[Event]], None] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    async def start(self, deliver: Callable[[list[Event]], None],
                    on_gap: Callable[[list[str] | None], None] | None = None) -> None:
        self._deliver = deliver
        self._sinks.append(deliver)

    async def close(self) -> None:
        if self._deliver in self._sinks:
            self._sinks.remove(self._deliver)  # type: ignore[arg-type]
        self._deliver = None


class Generations:
    """Single-process mode: the live worker generations of this process, and what the admin
    routes report for them (the same four methods as ``handlers.LocalAdmin``).  See the module
    docstring for the reload strategy.

    Args:
        cfg: the effective configuration (``workers = 1``).
        reload_config: reads the configuration again on SIGHUP (raises ConfigError).
        notifier: where systemd notifications go.
    """

    def __init__(self, cfg: Config, reload_config: Callable[[], Config], notifier: Notifier) -> None:
        self.cfg = cfg
        self.reload_config = reload_config
        self.notifier = notifier
        self.live: list[Worker] = []  # started and not yet stopped, oldest first
        self.current: Worker | None = None  # the generation that accepts
        self.gen = 0
        self.draining = False
        self.reloading = False
        self.retired: dict[tuple[str, str], float] = {}  # counters of stopped generations
        self.shared: MemoryBroker | None = None  # the embedded broker, if any
        self.sinks: list[Callable[[list[Event]], None]] = []
        self._shared_started = False
        self._reapers: set[asyncio.Task[None]] = set()
        self.pub: socket.socket | None = None
        self.adm: socket.socket | None = None
        self.done: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        from .server.sockets import bind_socket

        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        cfg = self.cfg
        self.pub = bind_socket(cfg.host, cfg.port, backlog=cfg.backlog)
        self.adm = bind_socket(cfg.admin_host, cfg.admin_port)
        # Pinging from the start: the first generation may wait for its broker a while.
        self._tasks.append(loop.create_task(keep_alive(self.notifier, lambda: True)))
        w = self.current = await self._start_generation(cfg)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        pub, adm = w.bound_ports()
        log.info("ssegw %s serving on http://%s:%d (admin http://%s:%d), broker %s%s", __version__,
                 cfg.host, pub, cfg.admin_host, adm, w.broker.kind, ", demo on /" if cfg.demo else "")
        self.notifier.ready(self._status_text())
        if self.notifier.enabled:
            self._tasks.append(loop.create_task(report_status(self.notifier, self._status_text, STATUS_S)))

    async def wait(self) -> None:
        assert self.done is not None
        await self.done
        for t in self._tasks:
            t.cancel()
        for s in (self.pub, self.adm):
            if s is not None:
                s.close()

    def _broker(self, cfg: Config) -> Broker:
        if cfg.redis:
            return make_broker(cfg)
        if self.shared is None:
            # History settings follow the current configuration, reloads included.
            self.shared = MemoryBroker(_history_settings(lambda: self.cfg), _wall_ms,
                                       _keyed_settings(lambda: self.cfg))
        return _Lease(self.shared, self.sinks)  # type: ignore[return-value]

    def _deliver(self, events: list[Event]) -> None:
        for deliver in list(self.sinks):
            deliver(events)

    async def _start_generation(self, cfg: Config) -> Worker:
        """A new generation, accepting when this returns.  Raises ConfigError, OSError."""
        assert self.pub is not None and self.adm is not None
        broker = self._broker(cfg)
        if isinstance(broker, _Lease) and not self._shared_started:
            assert self.shared is not None
            await self.shared.start(self._deliver)
            self._shared_started = True
        w = _new_worker(cfg, broker)
        w.admin_source = self  # every generation answers for all of them
        await w.start(public_socks=[self.pub.dup()], admin_socks=[self.adm.dup()])
        self.gen += 1
        self.live.append(w)
        task = asyncio.get_running_loop().create_task(self._reap(w, self.gen))
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)
        return w

    async def _reap(self, w: Worker, gen: int) -> None:
        await w.wait_stopped()
        from .server.handlers import snapshot
        from .supervisor import counters_of

        # Its final counters join the retired total in the step it leaves self.live.
        for k, v in counters_of(snapshot(w)).items():
            self.retired[k] = self.retired.get(k, 0) + v
        self.live.remove(w)
        log.info("generation %d stopped", gen)
        if w is self.current and not self.draining:
            # It stopped without a stop signal: the process ends with it, as it always did.
            log.error("generation %d stopped by itself; exiting", gen)
            self.stop()
        if self.draining and not self.live and self.done is not None and not self.done.done():
            self.done.set_result(None)

    # -- signals --------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM/SIGINT: drain every generation; a second signal closes everything now."""
        if self.draining:
            log.warning("second stop signal: closing everything now")
            for w in list(self.live):
                w.drain()  # already draining: it stops at once
            return
        self.draining = True
        self.notifier.stopping(self._status_text())
        for w in list(self.live):
            if not w.draining:  # an old generation of a reload is draining already
                w.drain()
        if self.pub is not None:
            # The generations closed their duplicates; this was the last reference, so from
            # now on new connections are refused, as with any stopped listener.
            self.pub.close()
            self.pub = None
        if not self.live and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def _sighup(self) -> None:
        if self.draining or self.reloading:
            log.warning("SIGHUP ignored: %s", "draining" if self.draining else "a reload is in progress")
            return
        self.reloading = True
        self._tasks.append(asyncio.get_running_loop().create_task(self.reload()))

    async def reload(self) -> None:
        """Start a generation from the re-read configuration; once it is ready, drain the
        previous one.  On any failure the previous generation keeps serving."""
        self.reloading = True
        self.notifier.reloading()
        outcome = "reload failed"
        try:
            outcome = await self._reload()
        except Exception as e:  # a bug of ours must not take the serving generation down
            log.exception("reload failed")
            outcome = f"reload failed: {e}"
        finally:
            self.reloading = False
            self.notifier.ready(f"{outcome}; {self._status_text()}")

    async def _reload(self) -> str:
        try:
            cfg = self.reload_config()
        except ConfigError as e:
            log.error("reload: %s; generation %d keeps serving", e, self.gen)
            return f"reload failed: {e}"
        for key in _FIXED:
            if getattr(cfg, key) != getattr(self.cfg, key):
                log.warning("reload: %s changed; it takes effect on restart", key)
        cfg = dataclasses.replace(cfg, **{k: getattr(self.cfg, k) for k in _FIXED})
        old = self.current
        assert old is not None
        log.info("reload: starting generation %d", self.gen + 1)
        try:
            new = await self._start_generation(cfg)
        except (ConfigError, OSError) as e:
            log.error("reload: generation %d did not start (%s); generation %d keeps serving",
                      self.gen + 1, e, self.gen)
            return f"reload failed: {e}"
        from .server.handlers import LocalAdmin

        deadline = time.monotonic() + RELOAD_READY_TIMEOUT
        while not self.draining and not LocalAdmin(new).ready()[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.draining:
            if not new.draining:  # a stop came while it started: it drains with the rest
                new.drain()
            return "reload interrupted by a stop"
        if not LocalAdmin(new).ready()[0]:
            log.error("reload: generation %d did not become ready (%s); generation %d keeps serving",
                      self.gen, LocalAdmin(new).ready()[1], self.gen - 1)
            new.drain()  # it accepted meanwhile: those connections are answered, then closed
            return f"reload failed: generation {self.gen} did not become ready"
        self.current, self.cfg = new, cfg
        log.info("reload: generation %d serving; draining generation %d", self.gen, self.gen - 1)
        # Hand over first: the old generation stops accepting (public and admin) and what it
        # accepted last gets HANDOFF_S to ask, so it is answered as usual -- not 503
        # "draining", and not closed unanswered when the old generation stops.
        old.stop_accepting(admin=True)  # its duplicates: the process keeps the listeners
        await asyncio.sleep(HANDOFF_S)
        if not old.draining:
            old.drain()
        return f"reloaded: generation {self.gen}"

    # -- the admin source -----------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        from .server.handlers import LocalAdmin

        if self.draining or self.current is None:
            return False, "draining"
        return LocalAdmin(self.current).ready()

    async def snapshots(self) -> list[dict[str, object]]:
        from .server.handlers import snapshot
        from .supervisor import as_snapshot

        snaps = []
        for w in self.live:
            s = snapshot(w)
            if w is not self.current:
                s["workers"] = s["broker_up"] = 0  # a draining generation: what it serves counts, it does not
            snaps.append(s)
        if self.retired:
            snaps.append(as_snapshot(self.retired))
        return snaps

    async def stats(self) -> list[dict[str, object]]:
        from .server.handlers import stats

        return [stats(w) for w in sorted(self.live, key=lambda w: w is not self.current)]

    async def subscribers(self, topic: str) -> int:
        w = self.current
        assert w is not None
        if isinstance(w.broker, _Lease):
            # One broker for every generation: all of this process's subscribers are local.
            return await w.broker.subscribers(topic, sum(g.table.subscribers(topic) for g in self.live))
        return await w.broker.subscribers(topic, w.table.subscribers(topic))

    async def keys(self, topic: str) -> int:
        w = self.current
        assert w is not None
        return await w.broker.keys(topic)

    # -- systemd status ---------------------------------------------------------------------

    def _status_text(self) -> str:
        conns = sum(w.connections_open for w in self.live)
        state = "draining" if self.draining else f"reloading (generation {self.gen})" if self.reloading \
            else "serving"
        return f"{state}: 1 worker, {conns} connections"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "print-systemd":
        sys.stdout.write(print_systemd(args.what))
        return 0
    if args.command == "print-proxy":
        sys.stdout.write(print_proxy(args.which))
        return 0
    # Text until the configuration is read (it may warn about unknown SSEGW_* variables),
    # then its log_format and log_level -- again on every reload.
    logs.setup("text", "info")
    try:
        if args.command == "check-config":
            cfg = load_file(args.file)
            sys.stdout.write(render(cfg))
            return 0
        cfg = load(args)
        logs.setup(cfg.log_format, cfg.log_level)

        def reload_config() -> Config:
            new = load(args)
            logs.setup(new.log_format, new.log_level)
            return new

        return serve(cfg, list(argv if argv is not None else sys.argv[1:])[1:], reload_config)
    except ConfigError as e:
        print(f"ssegw: config error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"ssegw: cannot start: {e}", file=sys.stderr)
        return 1
