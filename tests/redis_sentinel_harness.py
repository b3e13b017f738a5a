"""A real Redis Sentinel setup for tests, on loopback: one primary, one replica and three
sentinels (``redis-server sentinel.conf --sentinel``) monitoring them as ``SERVICE``.

Quorum 2, ``down-after-milliseconds`` ``DOWN_AFTER_MS`` (1000) and ``failover-timeout``
``FAILOVER_TIMEOUT_MS`` (3000), so an automatic failover after a ``kill -9`` of the primary
takes about 2-4 s.  Every port is picked below the ephemeral range (``redis_harness.free_port``),
so a node can be restarted on its own port.  The data nodes are :class:`RedisServer` (append-only,
fsynced on every write); the replica is started with ``--replicaof``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from harness import wait_until
from redis_harness import RedisServer, start_replica

#: The name the sentinels monitor the primary under.
SERVICE = "ssegw-test"
#: How long a sentinel waits for a silent primary before calling it down (ms).
DOWN_AFTER_MS = 1000
#: Sentinel's ``failover-timeout`` (ms): small, so that a failed attempt is retried soon.
FAILOVER_TIMEOUT_MS = 3000


class SentinelNode(RedisServer):
    """One ``redis-server --sentinel`` process with its own (rewritable) config file; ``ping``,
    ``command`` and ``stop`` as for a data node."""

    def __init__(self, workdir: Path, primary_port: int, port: int | None = None) -> None:
        super().__init__(workdir, port=port, persist=False)
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", "daemonize no", f"dir {self.dir}",
            f"logfile {self.dir / 'sentinel.log'}",
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2",
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {SERVICE} 1", "",
        ]))

    def start(self, timeout: float = 10.0) -> SentinelNode:
        self.proc = subprocess.Popen(["redis-server", str(self.conf), "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = self.proc
        if wait_until(lambda: self.ping() or proc.poll() is not None, timeout, 0.05) and self.ping():
            return self
        log = self.dir / "sentinel.log"
        raise RuntimeError(f"sentinel did not start on {self.port}: {log.read_text()[-2000:] if log.exists() else ''}")

    def master_addr(self) -> tuple[str, int] | None:
        """``SENTINEL GET-MASTER-ADDR-BY-NAME`` as this sentinel answers it now."""
        try:
            raw = self.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE).decode()
        except OSError:
            return None
        parts = [p for p in raw.split("\r\n") if p and not p.startswith(("*", "$"))]
        return (parts[0], int(parts[1])) if len(parts) == 2 else None


class SentinelSetup:
    """The primary (``nodes[0]`` at start), its replica (``nodes[1]``) and three sentinels."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
        self.dir = workdir
        self.nodes: list[RedisServer] = []
        self.sentinels: list[SentinelNode] = []

    @property
    def url(self) -> str:
        """The gateway's ``redis`` setting: every sentinel, the service name."""
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{SERVICE}"

    def start(self, timeout: float = 20.0) -> SentinelSetup:
        try:
            primary = RedisServer(self.dir / "node0").start()
            self.nodes = [primary, start_replica(primary, self.dir / "node1")]
            taken = {n.port for n in self.nodes}
            for i in range(3):
                s = SentinelNode(self.dir / f"sentinel{i}", primary.port)
                while s.port in taken:
                    s = SentinelNode(self.dir / f"sentinel{i}", primary.port)
                taken.add(s.port)
                self.sentinels.append(s.start())
            # Ready when every sentinel knows the replica and the two other sentinels (they
            # find each other through the primary's __sentinel__:hello channel, every 2 s).
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if all(self._sees_all(s) for s in self.sentinels):
                    return self
                time.sleep(0.1)
            raise RuntimeError("the sentinels did not discover each other and the replica in time")
        except BaseException:
            self.stop()
            raise

    def _sees_all(self, s: SentinelNode) -> bool:
        raw = s.command("SENTINEL", "MASTER", SERVICE).decode(errors="replace").split("\r\n")
        fields = [x for x in raw if x and not x.startswith(("*", "$"))]
        info = dict(zip(fields[::2], fields[1::2], strict=False))
        return info.get("num-slaves") == "1" and info.get("num-other-sentinels") == "2"

    def primary_port(self) -> int | None:
        """The primary's port if a majority of the sentinels name the same one, else None."""
        named = [a for a in (s.master_addr() for s in self.sentinels) if a is not None]
        for a in named:
            if named.count(a) >= 2:
                return a[1]
        return None

    def node_at(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def role(self, n: RedisServer) -> str:
        return n.info("replication").get("role", "") if n.ping() else ""

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for n in self.nodes:
            n.stop()
