"""Slow consumers over real sockets: a stalled reader never slows the others, memory stays
bounded by max_buffer, ``drop`` closes it (it resumes from history), ``conflate`` gives it
the newest value per key when it reads again."""

from __future__ import annotations

import socket
import time

from harness import Gateway, dechunk, read_head
from sse_parser import parse


def stalled_stream(port: int, path: str) -> socket.socket:
    """A subscriber with a tiny receive buffer that reads its response head, then stops."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    buf = bytearray()
    status, _, _ = read_head(s, buf, 5)
    assert status == 200
    return s


def read_all(s: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Read until EOF/reset or ``timeout``; returns (bytes, closed_by_server)."""
    out = bytearray()
    s.settimeout(0.5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return bytes(out), True
        if not chunk:
            return bytes(out), True
        out += chunk
    return bytes(out), False


def test_stalled_readers_are_dropped_a_mixed_crowd_gets_everything(gateway):
    g: Gateway = gateway("--max-buffer", "64KiB", "--flush-interval", "5ms", "--heartbeat-interval", "1s",
                         "--slow-grace", "1s", "--history-size", "5000")
    topic = "slow.drop"
    stalled = [stalled_stream(g.port, f"/events?topic={topic}") for _ in range(2)]
    normals = [g.stream(f"/events?topic={topic}") for _ in range(3)]
    try:
        assert all(n.status == 200 for n in normals)
        ids: list[str] = []
        closed: dict = {}
        # Publish ~8 KiB events until the server gives up on the stalled readers: their
        # kernel send buffers and transport buffers fill, the transport pauses, what they
        # owe stays over max_buffer for slow_grace and the drop policy closes them.  Bounded.
        for i in range(300):
            ids += g.publish([{"topic": topic, "data": f"{i}.{j}:" + "x" * 8000} for j in range(10)]).json()["ids"]
            for n in normals:
                while n.pump(0.001):
                    pass
            if i % 5 == 4:
                closed = g.stats()["slow_closed"]
                if sum(closed.values()) >= 2:
                    break
        assert sum(closed.values()) == 2, closed
        for n in normals:
            evs = n.wait_events(len(ids), 20)
            assert [e.id for e in evs] == ids, "a normal subscriber lost or reordered events"
        for st in stalled:
            data, eof = read_all(st, 5)
            assert eof, "the dropped stream was not closed"
            # What it did get is a prefix of the stream; it resumes from its last id.
            payload, _, _ = dechunk(data)
            got = parse(payload.decode(errors="replace")).events
            assert [e.id for e in got] == ids[:len(got)]
            last = got[-1].id if got else None
            if last:
                with g.stream(f"/events?topic={topic}", {"Last-Event-ID": last}) as again:
                    rest = again.wait_events(len(ids) - ids.index(last) - 1, 10)
                    assert [e.id for e in rest] == ids[ids.index(last) + 1:]
    finally:
        for st in stalled:
            st.close()
        for n in normals:
            n.close()
    assert g.wait_slots(0) == 0


def test_conflate_gives_a_stalled_reader_the_newest_value_per_key(gateway):
    cfg = '[[topics]]\npattern = "tick.>"\nslow_consumer = "conflate"\n'
    g: Gateway = gateway("--max-buffer", "256KiB", "--flush-interval", "5ms", config=cfg)
    topic = "tick.prices"
    stalled = stalled_stream(g.port, f"/events?topic={topic}")
    with g.stream(f"/events?topic={topic}") as normal:
        keys = [f"K{i}" for i in range(5)]
        last_id = {}
        n = 0
        # Until the stalled reader's transport pauses and held events start being replaced
        # (the kernel absorbs a few MiB first).  Bounded: 400 rounds x 5 x ~8 KiB.
        for rnd in range(400):
            batch = [{"topic": topic, "key": k, "data": f"{k}:{rnd}:" + "p" * 8000} for k in keys]
            for k, eid in zip(keys, g.publish(batch).json()["ids"], strict=True):
                last_id[k] = eid
            n += len(batch)
            while normal.pump(0.001):
                pass
            if rnd % 10 == 9 and g.stats()["conflated"] > 50:
                break
        assert len(normal.wait_events(n, 20)) == n, "the normal subscriber must get every event"
        assert g.stats()["conflated"] > 0, "nothing was conflated: the reader was not slow enough"
        assert sum(g.stats()["slow_closed"].values()) == 0, "conflate must not close the stream"
        data, eof = read_all(stalled, 5)
        assert not eof, "conflate must not drop the stream"
        payload, _, _ = dechunk(data)
        got = parse(payload.decode(errors="replace")).events
        seqs = [int(e.id.rsplit("-", 1)[1]) for e in got]
        assert seqs == sorted(seqs), "events out of order"
        assert len(seqs) == len(set(seqs))
        # After the backlog, the newest value of every key arrived, and far fewer than n events.
        assert {e.id for e in got} >= set(last_id.values())
        assert len(got) < n
    stalled.close()
    assert g.wait_slots(0) == 0


def test_slow_but_steady_reader_keeps_every_event(gateway):
    """A reader slower than the publisher's bursts but faster on average is held (bounded by
    max_buffer), never dropped, and gets every event in order."""
    g: Gateway = gateway("--max-buffer", "4MiB", "--flush-interval", "5ms")
    topic = "slow.steady"
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", g.port))
    s.sendall(f"GET /events?topic={topic} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    buf = bytearray()
    assert read_head(s, buf, 5)[0] == 200
    ids: list[str] = []
    received = bytearray(buf)
    s.settimeout(0.01)
    # Bursts of ~160 KiB every 0.2 s (~800 KiB/s); the reader takes 8 KiB per 5 ms (~1.6 MiB/s
    # at best, less with scheduling): it falls behind within a burst and catches up between.
    for burst in range(15):
        ids += g.publish([{"topic": topic, "data": f"{burst}.{j}:" + "s" * 8000} for j in range(20)]).json()["ids"]
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            try:
                chunk = s.recv(8192)
            except TimeoutError:
                continue
            assert chunk, "the steady reader was closed"
            received += chunk
            time.sleep(0.005)
    s.settimeout(0.5)
    deadline = time.monotonic() + 20
    got: list[str] = []
    while time.monotonic() < deadline:
        payload, _, _ = dechunk(bytes(received))
        got = [e.id for e in parse(payload.decode()).events]
        if len(got) >= len(ids):
            break
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        assert chunk, "the steady reader was closed"
        received += chunk
    s.close()
    assert got == ids, f"got {len(got)} of {len(ids)} events"
    assert sum(g.stats()["slow_closed"].values()) == 0
    assert g.wait_slots(0) == 0
