"""A real ``redis-server`` for tests: started on a free port below the ephemeral range (so it
can be killed and restarted on the same port), with append-only persistence fsynced on every
write so that a SIGKILL loses nothing Redis acknowledged."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port(lo: int = 20000, hi: int = 32000) -> int:
    for _ in range(200):
        port = random.randrange(lo, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, persist: bool = True,
                 extra: tuple[str, ...] = ()) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.persist = persist
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")]
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        args += list(self.extra)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on {self.port}: {(self.dir / 'redis.log').read_text()[-2000:]}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One raw RESP command; returns the raw reply bytes (tests parse what they need)."""
        payload = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(payload)
            time.sleep(0.05)
            return s.recv(1 << 20)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` as a dict of its ``name:value`` lines."""
        raw = self.command("INFO", section).decode(errors="replace")
        out: dict[str, str] = {}
        for line in raw.splitlines():
            name, sep, value = line.partition(":")
            if sep and not line.startswith(("$", "#")):
                out[name] = value.strip()
        return out

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def start_replica(primary: RedisServer, workdir: Path, timeout: float = 10.0) -> RedisServer:
    """A ``redis-server`` replicating ``primary`` (no persistence), returned once the primary
    counts it as an online replica.  The primary's full sync starts at once (its default
    ``repl-diskless-sync-delay`` waits 5 s for more replicas to share the transfer)."""
    primary.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")
    r = RedisServer(workdir, persist=False, extra=("--replicaof", "127.0.0.1", str(primary.port))).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (r.info("replication").get("master_link_status") == "up"
                and "state=online" in primary.info("replication").get("slave0", "")):
            return r
        time.sleep(0.05)
    r.stop()
    raise RuntimeError(f"replica on {r.port} never came online behind {primary.port}")
