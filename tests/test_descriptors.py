"""The open-files limit: admin and existing streams survive a flood of connections.

At EMFILE the event loop closes new connections on every listener without a word -- the
admin listener's too -- so a flood of idle connections used to take ``/healthz`` down with
it.  A worker keeps a reserve of descriptors: past its budget it answers new public
connections 503 (with Retry-After) and logs that once; admin, existing streams and the
broker keep working; once connections close it accepts again (logged once).

Real gateway under ``prlimit --nofile=400``, raw sockets.
"""

from __future__ import annotations

import shutil
import socket
import time

import pytest
from harness import Gateway, wait_until

LIMIT = 400

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")


def answered(sock: socket.socket) -> bytes:
    """What the server sent on ``sock`` so far, without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(4096)
    except BlockingIOError:
        return b""
    except OSError:
        return b"<reset>"


def test_a_flood_of_idle_connections_leaves_admin_and_streams_working() -> None:
    g = Gateway("--heartbeat-interval", "1s", "--head-timeout", "30s")
    g.prefix = ["prlimit", f"--nofile={LIMIT}:{LIMIT}"]
    with g:
        with g.stream("/events?topic=fd.t") as s:
            idle: list[socket.socket] = []
            try:
                for _ in range(LIMIT):
                    try:
                        idle.append(socket.create_connection(("127.0.0.1", g.port), timeout=2))
                    except OSError:
                        break
                time.sleep(0.5)
                answers = [answered(c) for c in idle]
                refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
                kept = [a for a in answers if a == b""]
                assert refused, "no connection was refused at the open-files limit"
                assert all(b"retry-after:" in a.lower() for a in refused)
                # The budget leaves a reserve: far fewer than LIMIT idle connections are kept.
                assert 0 < len(kept) < LIMIT - 32, (len(kept), len(refused))
                # The admin listener still answers, and says how many are open.
                assert g.request("GET", "/healthz", admin=True).status == 200
                assert g.stats()["connections_open"] >= len(kept)
                # One more attempt: refused again, but logged once only.
                extra = socket.create_connection(("127.0.0.1", g.port), timeout=2)
                assert wait_until(lambda: extra.recv(12) == b"HTTP/1.1 503", timeout=3)
                extra.close()
                assert sum("open-files limit reached" in line for line in g.log) == 1, g.log[-5:]
            finally:
                for c in idle:
                    c.close()
            # Below the limit again: new connections are served; the stream opened before
            # the flood still receives what is published.
            assert wait_until(lambda: g.stats()["connections_open"] <= 2, timeout=10)
            assert g.publish([{"topic": "fd.t", "data": "after"}]).status == 200
            evs = s.wait_events(1, timeout=5)
            assert [e.data for e in evs] == ["after"]
            assert wait_until(lambda: sum("below the open-files limit again" in line for line in g.log) == 1, timeout=3)
