"""Command line: ``ssegw serve`` and ``ssegw check-config``.

This is the one place that wires things together: it turns argv, the environment and the
config file into a :class:`~ssegw.config.Config`, chooses the broker and starts a worker.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from . import __version__
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


def make_broker(cfg: Config) -> object:
    def settings(topic: str) -> tuple[int, int]:
        _, size, ttl = cfg.topic_settings(topic)
        return size, int(ttl * 1000)

    if cfg.redis:
        from .broker.redis import RedisBroker

        max_ttl = max([cfg.history_ttl] + [r.history_ttl for r in cfg.topics if r.history_ttl is not None])
        return RedisBroker(cfg.redis, settings, int(max_ttl * 1000))
    from .broker.memory import MemoryBroker

    return MemoryBroker(settings, lambda: time.time_ns() // 1_000_000)


def serve(cfg: Config) -> int:
    if cfg.workers != 1 and not cfg.redis:
        raise ConfigError(
            "workers",
            f"workers: {cfg.workers} workers need a broker that spans processes (set redis); "
            "the embedded broker serves one process (workers = 1)",
        )
    broker = make_broker(cfg)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux
        uvloop = None
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
        await worker.start()
        worker.install_signals()
        pub, adm = worker.bound_ports()
        log.info("ssegw %s serving on http://%s:%d (admin http://%s:%d), broker %s%s", __version__,
                 cfg.host, pub, cfg.admin_host, adm, broker.kind, ", demo on /" if cfg.demo else "")  # type: ignore[attr-defined]
        await worker.wait_stopped()
        log.info("stopped")

    if uvloop is not None:
        uvloop.run(run())
    else:
        asyncio.run(run())
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
        return serve(cfg)
    except ConfigError as e:
        print(f"ssegw: config error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"ssegw: cannot start: {e}", file=sys.stderr)
        return 1
