"""Command line: ``ssegw serve`` and ``ssegw check-config``.

This is the one place that wires things together: it turns argv, the environment and the
config file into a :class:`~ssegw.config.Config`, chooses the broker and starts a worker.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import socket
import sys
import time

from . import __version__
from .broker.base import Broker
from .config import Config, ConfigError, add_arguments, load, load_file, render

log = logging.getLogger("ssegw")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssegw", description="Server-Sent Events gateway")
    parser.add_argument("--version", action="version", version=f"ssegw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    add_arguments(serve)
    check = sub.add_parser("check-config", help="validate a config file and print the effective config")
    check.add_argument("file", help="TOML config file")
    return parser


def make_broker(cfg: Config) -> Broker:
    def settings(topic: str) -> tuple[int, int]:
        _, size, ttl = cfg.topic_settings(topic)
        return size, int(ttl * 1000)

    if cfg.redis:
        from .broker.redis import RedisBroker

        max_ttl = max([cfg.history_ttl] + [r.history_ttl for r in cfg.topics if r.history_ttl is not None])
        return RedisBroker(cfg.redis, settings, int(max_ttl * 1000),
                           wait_replicas=cfg.redis_wait_replicas, wait_timeout=cfg.redis_wait_timeout)
    from .broker.memory import MemoryBroker

    return MemoryBroker(settings, lambda: time.time_ns() // 1_000_000)


def serve(cfg: Config, argv: list[str]) -> int:
    """Run one worker (``workers = 1``), a worker under a supervisor (the supervisor set
    ``SSEGW__LISTEN_FD``), or a supervisor of N workers."""
    from .supervisor import ENV_CONTROL, ENV_FD

    fd = os.environ.pop(ENV_FD, None)
    control = os.environ.pop(ENV_CONTROL, None)
    if fd is not None:
        return _run_worker(cfg, socket.socket(fileno=int(fd)), control)
    if cfg.workers != 1:
        if not cfg.redis:
            raise ConfigError(
                "workers",
                f"workers: {cfg.workers} workers need a broker that spans processes (set redis); "
                "the embedded broker serves one process (workers = 1)",
            )
        return _run_supervisor(cfg, argv)
    return _run_worker(cfg, None, None)


def _event_loop_run(main: object) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux
        asyncio.run(main)  # type: ignore[arg-type]
        return
    uvloop.run(main)  # type: ignore[arg-type]


def _run_worker(cfg: Config, sock: socket.socket | None, control: str | None) -> int:
    if sock is not None and cfg.max_connections > 0:
        # max_connections is per host: each of the supervisor's workers enforces its share
        # (the kernel spreads connections evenly over SO_REUSEPORT sockets).
        n = cfg.workers or (os.cpu_count() or 1)
        cfg = dataclasses.replace(cfg, max_connections=-(-cfg.max_connections // n))
    broker = make_broker(cfg)
    from .server.worker import Worker

    def startup(w: Worker) -> None:
        if cfg.demo:
            from .demo import Ticker

            Ticker(w).start()

    try:
        worker = Worker(cfg, broker, extra_startup=startup)
    except ValueError as e:  # the authenticator refuses an inconsistent [auth] table
        raise ConfigError("auth", f"auth: {e}") from None

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


def _run_supervisor(cfg: Config, argv: list[str]) -> int:
    from .broker.memory import MemoryBroker
    from .server.sockets import bind_socket
    from .server.worker import Worker
    from .supervisor import Supervisor

    bound: list[int] = []

    def listen() -> socket.socket:
        s = bind_socket(cfg.host, bound[0] if bound else cfg.port, reuse_port=True)
        if not bound:
            bound.append(s.getsockname()[1])
        return s

    async def run() -> None:
        sup = Supervisor(cfg, argv, listen)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        if args.command == "check-config":
            cfg = load_file(args.file)
            sys.stdout.write(render(cfg))
            return 0
        cfg = load(args)
        logging.getLogger().setLevel(cfg.log_level.upper())
        return serve(cfg, list(argv if argv is not None else sys.argv[1:])[1:])
    except ConfigError as e:
        print(f"ssegw: config error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"ssegw: cannot start: {e}", file=sys.stderr)
        return 1
