import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Gateway  # noqa: E402


@pytest.fixture(scope="module")
def gw():
    """One gateway on the embedded broker shared by a test module (fast heartbeats)."""
    g = Gateway("--heartbeat-interval", "1s", "--flush-interval", "10ms")
    g.start()
    yield g
    g.stop()


@pytest.fixture
def gateway(tmp_path):
    """A factory for gateways with their own flags/config; all are stopped at the end."""
    made: list[Gateway] = []

    def make(*args: str, env: dict | None = None, config: str | None = None) -> Gateway:
        g = Gateway(*args, env=env, config=config, tmp_path=tmp_path)
        g.start()
        made.append(g)
        return g

    yield make
    for g in made:
        try:
            g.stop(timeout=20)
        except Exception:
            g.kill()


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server on a free port, killed at the end of the test."""
    from redis_harness import RedisServer

    r = RedisServer(tmp_path / "redis").start()
    yield r
    r.stop()


@pytest.fixture
def redis_cluster(tmp_path):
    """A fresh three-node Redis Cluster on loopback, stopped at the end of the test."""
    from redis_cluster_harness import RedisCluster

    c = RedisCluster(tmp_path / "cluster")
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    yield c
    c.stop()
