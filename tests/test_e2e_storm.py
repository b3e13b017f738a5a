"""Reconnect storm: many clients reconnecting at once are all served, paced, and streams that
were already open keep receiving meanwhile."""

import selectors
import socket
import time

from harness import Gateway


def test_reconnect_storm_is_paced_and_everyone_resumes(gateway):
    g: Gateway = gateway("--heartbeat-interval", "5s", "--flush-interval", "10ms")
    topic = "storm.t"
    # Each reconnecting client resumes from before 500 events: every start replays them,
    # which makes starts expensive enough for the pacer to matter.
    first = g.publish({"topic": topic, "data": "before"}).json()["ids"][0]
    g.publish([{"topic": topic, "data": "x" * 100} for _ in range(500)])
    with g.stream(f"/events?topic={topic}") as live:
        assert live.status == 200
        n = 2500  # far more than the pacer's burst (200)
        socks = []
        req = (f"GET /events?topic={topic} HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {first}\r\n\r\n").encode()
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
            socks.append(s)
        t0 = time.monotonic()
        for s in socks:
            s.sendall(req)
        # A publish during the storm reaches the stream that was already open.
        mid = g.publish({"topic": topic, "data": "during"}).json()["ids"][0]
        sel = selectors.DefaultSelector()
        bufs = {}
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            bufs[s] = b""
        done = set()
        deadline = time.monotonic() + 30
        while len(done) < n and time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                bufs[s] += data
                if mid.encode() in bufs[s] or b"data: during" in bufs[s]:
                    done.add(s)
                    sel.unregister(s)
        elapsed = time.monotonic() - t0
        assert len(done) == n, f"only {len(done)} of {n} resumed within 30 s"
        for s in socks:
            assert bufs[s].startswith(b"HTTP/1.1 200 "), bufs[s][:200]
        assert live.wait_events(1, 5) and live.events[0].data == "during"
        for s in socks:
            s.close()
    stats = g.stats()
    assert stats["paced"] > 0, "the pacer never engaged"
    assert elapsed < 30
    assert g.wait_slots(0, timeout=10) == 0
