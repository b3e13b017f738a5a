"""A real three-node Redis Cluster for tests, on loopback.

Each node is a :class:`RedisServer` with ``cluster-enabled yes``.  A cluster node also binds
its port + 10000 (the cluster bus), so node ports are picked below 22768: both stay under
the ephemeral range (32768+).  The slots are split with ``redis-cli --cluster create`` (three
masters, no replicas), and :meth:`start` waits until every node reports ``cluster_state:ok``.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from redis_harness import RedisServer


def _free_pair(taken: set[int]) -> int:
    """A port P with P and P + 10000 both free, P < 22768."""
    for _ in range(500):
        port = random.randrange(12000, 22700)
        if port in taken or port + 10000 in taken:
            continue
        ok = True
        for p in (port, port + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free port pair")


class RedisCluster:
    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        if shutil.which("redis-cli") is None or shutil.which("redis-server") is None:
            pytest.skip("redis-server / redis-cli are not installed (apt-get install -y redis-server)")
        taken: set[int] = set()
        self.nodes: list[RedisServer] = []
        for i in range(nodes):
            port = _free_pair(taken)
            taken |= {port, port + 10000}
            self.nodes.append(RedisServer(workdir / f"node{i}", port=port,
                                          extra=("--cluster-enabled", "yes", "--cluster-config-file",
                                                 str(workdir / f"node{i}" / "nodes.conf"),
                                                 "--cluster-node-timeout", "2000")))

    @property
    def url(self) -> str:
        """Any node's URL: a cluster client discovers the others from it."""
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> RedisCluster:
        for n in self.nodes:
            n.start()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        out = subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0",
                              "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
        self.wait_ok(timeout)
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in self.nodes):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
