"""A busy worker still accepts connections as fast as they come.

libuv accepts one connection per listening socket per loop iteration; under load an iteration
takes tens of milliseconds, so a busy worker used to accept a few dozen connections a second
and a burst of connects (a flood, a reconnect storm) waited in the kernel's queue for many
seconds before admission could even answer it.  The worker now accepts up to 128 per
readiness event.

Real gateway (uvloop), its loop kept busy by large pipelined publishes on a few keep-alive
connections; then a burst of new connections, each asking one cheap request.  The bound is
loose on purpose (a factor of several below what one accept per iteration would take).
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time

from harness import Gateway

BURST = 800
BOUND_S = 8.0


def _publisher(port: int, stop: threading.Event, sent: list[int]) -> None:
    body = json.dumps([{"topic": f"busy.{i % 50}", "data": {"i": i, "pad": "x" * 80}} for i in range(1000)]).encode()
    req = (b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
           % len(body)) + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        buf = bytearray()
        while not stop.is_set():
            s.sendall(req * 4)  # four in flight: the loop always has one to parse
            for _ in range(4):
                while b"\r\n\r\n" not in buf:
                    buf += s.recv(65536)
                head, _, rest = bytes(buf).partition(b"\r\n\r\n")
                n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(rest) < n:
                    rest += s.recv(65536)
                buf = bytearray(rest[n:])
                sent[0] += 1


def test_a_burst_of_connections_is_accepted_while_the_loop_is_busy() -> None:
    with Gateway("--history-size", "10") as g:
        stop = threading.Event()
        sent = [0]
        pubs = [threading.Thread(target=_publisher, args=(g.port, stop, sent), daemon=True) for _ in range(4)]
        for t in pubs:
            t.start()
        try:
            time.sleep(1.0)
            assert sent[0] > 0, "the publishers got no answer"
            t0 = time.monotonic()
            socks = []
            for _ in range(BURST):  # the kernel completes every handshake (its queue is 4096)
                s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
                s.sendall(b"OPTIONS /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                s.setblocking(False)
                socks.append(s)
            bufs = {s: bytearray() for s in socks}
            pending = set(socks)
            answered = 0
            while pending and time.monotonic() - t0 < BOUND_S * 3:
                readable, _, _ = select.select(list(pending)[:1000], [], [], 0.5)
                for s in readable:
                    try:
                        data = s.recv(4096)
                    except OSError:
                        data = b""
                    if data:
                        bufs[s] += data
                        continue
                    pending.discard(s)
                    answered += bufs[s].startswith(b"HTTP/1.1 204")
            took = time.monotonic() - t0
            for s in socks:
                s.close()
        finally:
            stop.set()
            for t in pubs:
                t.join(10)
        assert answered == BURST, (answered, took)
        assert took < BOUND_S, f"{BURST} connections took {took:.1f}s to be served while the loop was busy"
