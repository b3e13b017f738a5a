"""A real three-node Redis Cluster for tests, on loopback.

Each node is a :class:`RedisServer` with ``cluster-enabled yes``.  A cluster node also binds
its port + 10000 (the cluster bus), so node ports are picked below 22768: both stay under
the ephemeral range (32768+).  The slots are split with ``redis-cli --cluster create`` (three
masters, no replicas), and :meth:`start` waits until every node reports ``cluster_state:ok``.

With ``replicas=1`` the cluster also gets one replica per primary (``nodes[3 + i]`` replicates
``nodes[i]``, placed with ``CLUSTER MEET`` + ``CLUSTER REPLICATE`` so that which node is which
is known, not left to ``redis-cli``); :meth:`start` then also waits until every replica is in
sync.  ``cluster-node-timeout`` is 2000 ms, so an automatic failover takes 3-4 s.
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


#: ``cluster-node-timeout`` of every test node (ms): small, so that failovers are fast.
NODE_TIMEOUT_MS = 2000


class RedisCluster:
    def __init__(self, workdir: Path, nodes: int = 3, replicas: int = 0) -> None:
        if shutil.which("redis-cli") is None or shutil.which("redis-server") is None:
            pytest.skip("redis-server / redis-cli are not installed (apt-get install -y redis-server)")
        taken: set[int] = set()
        self.nprimaries = nodes
        self.nodes: list[RedisServer] = []
        for i in range(nodes * (1 + replicas)):
            port = _free_pair(taken)
            taken |= {port, port + 10000}
            self.nodes.append(RedisServer(workdir / f"node{i}", port=port,
                                          extra=("--cluster-enabled", "yes", "--cluster-config-file",
                                                 str(workdir / f"node{i}" / "nodes.conf"),
                                                 "--cluster-node-timeout", str(NODE_TIMEOUT_MS))))

    @property
    def url(self) -> str:
        """Any node's URL: a cluster client discovers the others from it."""
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> RedisCluster:
        for n in self.nodes:
            n.start()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes[:self.nprimaries]]
        out = subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0",
                              "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
        if len(self.nodes) > self.nprimaries:
            self._add_replicas(timeout)
        self.wait_ok(timeout)
        return self

    def _add_replicas(self, timeout: float) -> None:
        first = self.nodes[0]
        for i, r in enumerate(self.nodes[self.nprimaries:]):
            r.command("CLUSTER", "MEET", "127.0.0.1", str(first.port))
            primary = self.nodes[i % self.nprimaries]
            deadline = time.monotonic() + timeout
            # REPLICATE needs the primary to be known to the replica (gossip after MEET).
            while True:
                reply = r.command("CLUSTER", "REPLICATE", self.node_id(primary))
                if reply.startswith(b"+OK"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"CLUSTER REPLICATE failed: {reply!r}")
                time.sleep(0.1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.in_sync(r) for r in self.nodes[self.nprimaries:]) and all(
                    self.known_nodes(n) == len(self.nodes) for n in self.nodes):
                return
            time.sleep(0.1)
        raise RuntimeError("the replicas did not get in sync")

    def node_id(self, n: RedisServer) -> str:
        return n.command("CLUSTER", "MYID").split(b"\r\n")[1].decode()

    def known_nodes(self, n: RedisServer) -> int:
        return sum(1 for ln in self.cluster_nodes(n) if ln and "noaddr" not in ln[2] and "handshake" not in ln[2])

    def cluster_nodes(self, n: RedisServer) -> list[list[str]]:
        """``CLUSTER NODES`` as asked of ``n``: one list of fields per node."""
        raw = n.command("CLUSTER", "NODES")
        body = raw.split(b"\r\n", 1)[1].decode()
        return [ln.split() for ln in body.splitlines() if ln.strip()]

    def role(self, n: RedisServer) -> str:
        """``master`` or ``slave``, as ``n`` says of itself."""
        info = n.command("INFO", "replication").decode()
        return "master" if "role:master" in info else "slave"

    def in_sync(self, r: RedisServer) -> bool:
        try:
            return "master_link_status:up" in r.command("INFO", "replication").decode()
        except OSError:
            return False

    def replica_of(self, primary: RedisServer) -> RedisServer:
        """A live replica whose primary is ``primary`` (as that replica says)."""
        pid = self.node_id(primary)
        for n in self.nodes:
            if n is primary or n.proc is None or n.proc.poll() is not None:
                continue
            for ln in self.cluster_nodes(n):
                if "myself" in ln[2] and "slave" in ln[2] and ln[3] == pid:
                    return n
        raise LookupError(f"no replica of {primary.port}")

    def primary_of_slot(self, slot: int, asked: RedisServer | None = None) -> RedisServer:
        """The node that ``asked`` (default: any live node) says serves ``slot``."""
        by_port = {n.port: n for n in self.nodes}
        for n in [asked] if asked is not None else self.nodes:
            if n is None or n.proc is None or n.proc.poll() is not None:
                continue
            for ln in self.cluster_nodes(n):
                if "master" not in ln[2] or "fail" in ln[2].split(","):
                    continue
                for r in ln[8:]:
                    if r.startswith("["):
                        continue
                    lo, _, hi = r.partition("-")
                    if int(lo) <= slot <= int(hi or lo):
                        return by_port[int(ln[1].split("@")[0].rsplit(":", 1)[1])]
        raise LookupError(slot)

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in self.nodes
                       if n.proc is not None and n.proc.poll() is None):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
