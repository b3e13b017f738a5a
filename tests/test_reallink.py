"""Slow consumers over real links (CONTRACT "Slow consumers", "Ids, history and resume").

The gateway runs as a real process in a network namespace of its own; its clients sit in
another namespace behind a veth with a ``tc tbf`` rate limit and/or a 100 ms RTT (a packet
delay line, ``netlink.py``), so the gateway's TCP sockets see what they would see on the
Internet: a bottleneck link, its queue, a long RTT.  The test publishes and reads ``/admin``
over loopback inside the gateway's namespace.

- A client whose link is faster than the average event rate, fed bursts many times
  ``max_buffer``, is never dropped and gets every event once, in order (it drains each burst
  well within ``slow_grace``).
- A client whose link is slower than the event rate, on a ``drop`` topic, is dropped, and each
  time it reconnects with its last id it resumes exactly: every event once, in order, or an
  ``ssegw.reset`` first when history no longer covers its gap.
- While many slow and stalled clients lag, the gateway's memory stays bounded: its RSS, and
  the kernel send memory of its sockets.

``REALLINK_CODE=/path/to/checkout`` runs another checkout's gateway (see ``nsgateway.py``).
Needs root, iproute2 and /dev/net/tun; skipped otherwise.
"""

from __future__ import annotations

import threading
import time

import netlink
import pytest
from nsgateway import LinkStream, NsGateway
from sse_parser import Ev

pytestmark = pytest.mark.skipif(netlink.available() is not None, reason=str(netlink.available()))

#: Gateway flags common to every test; heartbeats well apart so that they do not shape traffic.
COMMON = ("--flush-interval", "10ms", "--heartbeat-interval", "5s", "--drain-timeout", "1s")


@pytest.fixture
def net():
    n = netlink.Net()
    yield n
    n.destroy()


def start(ns: netlink.Netns, *args: str) -> NsGateway:
    return NsGateway(ns, *COMMON, *args).start()


@pytest.fixture
def stop_gateways():
    made: list[NsGateway] = []
    yield made
    for g in made:
        try:
            g.stop(timeout=10)
        except Exception:  # noqa: BLE001 - teardown: a gateway that will not stop is killed
            g.kill()


# -- clients and publishers ------------------------------------------------------------------


class Client:
    """An EventSource-like subscriber over a link: on EOF it reconnects (at most ``max_sessions``
    times) with the last id it saw as ``Last-Event-ID``.  ``sessions`` holds each connection's
    events; ``closes`` counts the streams the gateway ended."""

    def __init__(
        self,
        ns: netlink.Netns,
        host: str,
        port: int,
        topic: str,
        *,
        reconnect: bool = True,
        rcvbuf: int | None = None,
        max_sessions: int = 30,
        fast: bool = True,
    ) -> None:
        self.ns, self.host, self.port, self.topic = ns, host, port, topic
        self.reconnect, self.rcvbuf, self.max_sessions, self.fast = reconnect, rcvbuf, max_sessions, fast
        self.sessions: list[list[Ev]] = []
        self.last: str | None = None
        self.closes = 0
        self.stream: LinkStream | None = None
        self._seen = 0
        self.open()

    def open(self) -> None:
        headers = {"Last-Event-ID": self.last} if self.last is not None else {}
        s = LinkStream(
            self.ns, self.host, self.port, f"/events?topic={self.topic}", headers, rcvbuf=self.rcvbuf, fast=self.fast
        )
        assert s.status == 200, s.error_body
        self.stream, self._seen = s, 0
        self.sessions.append([])

    def pump(self, timeout: float) -> None:
        s = self.stream
        if s is None:
            return
        s.pump(timeout)
        evs = s.events
        if len(evs) > self._seen:
            new = evs[self._seen :]
            self._seen = len(evs)
            self.sessions[-1].extend(new)
            for e in new:
                if e.has_id:
                    self.last = e.id
        if s.closed:
            self.closes += 1
            s.close()
            self.stream = None
            if self.reconnect and len(self.sessions) < self.max_sessions:
                self.open()

    def ids(self) -> list[str]:
        return [e.id for sess in self.sessions for e in sess if e.has_id]

    def has(self, event_id: str) -> bool:
        return self.last == event_id

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


class Pump(threading.Thread):
    """Reads every client until ``halt`` (each read bounded; the loop bounded in time)."""

    def __init__(self, clients: list[Client], limit_s: float = 60.0) -> None:
        super().__init__(daemon=True)
        self.clients, self.limit_s = clients, limit_s
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        end = time.monotonic() + self.limit_s
        try:
            while not self.halt.is_set() and time.monotonic() < end:
                for c in self.clients:
                    c.pump(0.002 if len(self.clients) > 1 else 0.05)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread, which raises it
            self.error = e

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


def publish_batch(g: NsGateway, topic: str, n: int, size: int, tag: str, batch: int = 500) -> list[str]:
    """``n`` events of ``size`` ASCII bytes each, ``batch`` per request, requests back to back;
    their ids in order."""
    ids: list[str] = []
    for start_at in range(0, n, batch):
        msgs = [
            {"topic": topic, "data": f"{tag}{start_at + i:07d}".ljust(size, "x")}
            for i in range(min(batch, n - start_at))
        ]
        r = g.publish(msgs)
        assert r.status == 200, r
        ids += r.json()["ids"]
    return ids


class Publisher(threading.Thread):
    """``rate`` events/s of ``size`` bytes on ``topic``, in batches every 50 ms, until ``halt``."""

    def __init__(self, g: NsGateway, topic: str, rate: float, size: int, limit_s: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.g, self.topic, self.rate, self.size, self.limit_s = g, topic, rate, size, limit_s
        self.halt = threading.Event()
        self.ids: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        per = max(1, round(self.rate * 0.05))
        t0 = time.monotonic()
        try:
            for k in range(int(self.limit_s / 0.05)):
                if self.halt.is_set():
                    break
                self.ids += publish_batch(self.g, self.topic, per, self.size, f"{k}:")
                self.halt.wait(max(0.0, t0 + (k + 1) * 0.05 - time.monotonic()))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e

    def stop(self) -> list[str]:
        self.halt.set()
        self.join(10)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error
        return self.ids


def check_resumed(c: Client, published: list[str]) -> dict[str, int]:
    """Every session continues exactly where the previous one ended: the next published event,
    or (only at a session's start) ``ssegw.reset`` naming the topic, then live events with no
    replay.  Nothing twice, nothing out of order.  Returns counts for the report."""
    pos = {i: k for k, i in enumerate(published)}
    expect = 0  # index in ``published`` of the next event the client must get
    resets = 0
    for n, sess in enumerate(c.sessions):
        evs = [e for e in sess if e.has_id or e.event == "ssegw.reset"]
        if evs and evs[0].event == "ssegw.reset":
            assert n > 0, "reset on the first session (no Last-Event-ID)"
            assert c.topic in evs[0].data, evs[0]
            resets += 1
            evs = evs[1:]
            if evs:
                assert evs[0].id in pos, evs[0]
                assert pos[evs[0].id] >= expect, f"session {n}: after a reset, an event already seen"
                expect = pos[evs[0].id]
        for e in evs:
            assert e.event != "ssegw.reset", f"session {n}: reset after the first event"
            assert e.id in pos, f"session {n}: unknown id {e.id!r}"
            got = pos[e.id]
            assert got == expect, (
                f"session {n}: got #{got} ({e.id}), want #{expect} "
                f"({published[expect] if expect < len(published) else 'nothing'})"
            )
            expect += 1
    return {"sessions": len(c.sessions), "resets": resets, "received": len(c.ids()), "next": expect}


def wait_until_has(clients: list[Client], last: str, timeout: float) -> bool:
    """Until every client got ``last`` (False at once when one that does not reconnect was closed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(c.has(last) for c in clients):
            return True
        if any(c.closes and not c.reconnect for c in clients):
            return False
        time.sleep(0.05)
    return all(c.has(last) for c in clients)


# -- 1. a client that keeps up on average is never dropped --------------------------------------


def bursts_to_far_client(
    net: netlink.Net,
    made: list[NsGateway],
    *,
    rate_mbit: float,
    delay_ms: float,
    max_buffer_kib: int,
    bursts: int,
    burst_events: int,
    size: int,
    period: float,
) -> None:
    srv, cli = net.ns("gw"), net.ns("cl")
    far = net.link(srv, cli, delay_ms=delay_ms, rate_mbit=rate_mbit)
    near = net.link(srv, cli)  # no limit: the control
    g = start(srv, "--max-buffer", f"{max_buffer_kib}KiB", "--slow-consumer", "drop")
    made.append(g)
    burst_bytes = burst_events * size
    link_bps = rate_mbit * 1e6 / 8
    # The premise: the average is well below the link, a burst well over max_buffer and drained
    # (at the link's rate, plus an RTT) well within slow_grace (5 s).
    assert burst_bytes / period < 0.5 * link_bps and burst_bytes > 4 * max_buffer_kib * 1024
    assert burst_bytes * 1.2 / link_bps + 2 * delay_ms / 1000 < 2.5
    clients = [
        Client(cli, far.a_ip, g.port, "burst", reconnect=False),
        Client(cli, near.a_ip, g.port, "burst", reconnect=False),
    ]
    pump = Pump(clients)
    pump.start()
    published: list[str] = []
    try:
        for b in range(bursts):
            t0 = time.monotonic()
            # A burst as it comes from a busy backend: many small requests back to back, so it
            # reaches the gateway over several flushes (one huge request would be one write).
            published += publish_batch(g, "burst", burst_events, size, f"b{b}:", batch=16)
            time.sleep(max(0.0, t0 + period - time.monotonic()))
        wait_until_has(clients, published[-1], burst_bytes * 1.5 / link_bps + 5)
    finally:
        pump.stop()
        for c in clients:
            c.close()
    stats = g.stats()
    for c, name in zip(clients, ("far", "near"), strict=True):
        assert c.closes == 0, (
            f"{name} client dropped though its link ({rate_mbit} Mbit/s) is > 2x the average; "
            f"received {len(c.ids())} of {len(published)}; slow_closed {stats.get('slow_closed')}"
        )
        assert c.ids() == published, f"{name}: {check_resumed(c, published)}"


def test_fast_far_client_survives_bursts_over_max_buffer(net, stop_gateways):
    """8 Mbit/s, 100 ms RTT; 4 bursts of 384 KiB (6 x max_buffer 64 KiB) 2 s apart: 1.5 Mbit/s
    on average, each burst on the wire for ~0.4 s."""
    bursts_to_far_client(
        net,
        stop_gateways,
        rate_mbit=8,
        delay_ms=50,
        max_buffer_kib=64,
        bursts=4,
        burst_events=384,
        size=1024,
        period=2.0,
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fast_far_client_survives_bursts_over_max_buffer_long(net, stop_gateways):
    """50 Mbit/s, 100 ms RTT, default max_buffer (256 KiB); 10 bursts of 3 MiB (12 x max_buffer)
    3 s apart: 8 Mbit/s on average, each burst on the wire for ~0.5 s -- the SNDBUF/RTT cap
    (fixed 128 KiB: ~19 Mbit/s at 100 ms) makes each burst take ~1.3 s instead."""
    bursts_to_far_client(
        net,
        stop_gateways,
        rate_mbit=50,
        delay_ms=50,
        max_buffer_kib=256,
        bursts=10,
        burst_events=3072,
        size=1024,
        period=3.0,
    )


def steady_far_client(
    net: netlink.Net,
    made: list[NsGateway],
    *,
    rate_mbit: float,
    delay_ms: float,
    event_rate: float,
    size: int,
    seconds: float,
) -> None:
    srv, cli = net.ns("gw"), net.ns("cl")
    far = net.link(srv, cli, delay_ms=delay_ms, rate_mbit=rate_mbit)
    g = start(srv, "--slow-consumer", "drop")
    made.append(g)
    assert event_rate * (size + 60) * 8 < 0.6 * rate_mbit * 1e6  # the link has room to spare
    c = Client(cli, far.a_ip, g.port, "steady", reconnect=False)
    pump = Pump([c])
    pump.start()
    pub = Publisher(g, "steady", rate=event_rate, size=size)
    pub.start()
    try:
        time.sleep(seconds)
        published = pub.stop()
        wait_until_has([c], published[-1], 10)
    finally:
        pub.halt.set()
        pump.stop()
        c.close()
    stats = g.stats()
    assert c.closes == 0, (
        f"dropped though its link ({rate_mbit} Mbit/s, RTT {2 * delay_ms:g} ms) has room for "
        f"the events ({event_rate * size * 8 / 1e6:.0f} Mbit/s); received {len(c.ids())} of "
        f"{len(published)}; slow_closed {stats.get('slow_closed')}"
    )
    assert c.ids() == published, check_resumed(c, published)


def test_far_client_with_room_on_its_link_keeps_up(net, stop_gateways):
    """A 50 Mbit/s link 100 ms away, 24 Mbit/s of events for 10 s: one TCP stream must carry
    more than a 128 KiB (x2) send buffer allows at that RTT (~19 Mbit/s); 10 s, so that a
    stream held to that cap stays behind for well over slow_grace (5 s)."""
    steady_far_client(net, stop_gateways, rate_mbit=50, delay_ms=50, event_rate=3000, size=1000, seconds=10)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_far_client_with_room_on_its_link_keeps_up_long(net, stop_gateways):
    """The same for 40 s at 27 Mbit/s of events."""
    steady_far_client(net, stop_gateways, rate_mbit=50, delay_ms=50, event_rate=3400, size=1000, seconds=40)


# -- 2. a client slower than the event rate is dropped and resumes exactly -----------------------


def test_slow_client_dropped_then_resumes_exactly(net, stop_gateways):
    """1 Mbit/s link, 2x over by the event rate (~250 KB/s of events) on a drop topic: the
    gateway drops the client; it reconnects with its last id each time; once publishing stops
    it catches up.  Everything it got, over all its sessions, is every event once in order
    (or a reset where history no longer covered its gap)."""
    srv, cli = net.ns("gw"), net.ns("cl")
    slow = net.link(srv, cli, rate_mbit=1.0)
    g = start(srv, "--max-buffer", "64KiB", "--slow-consumer", "drop", "--history-size", "20000")
    stop_gateways.append(g)
    c = Client(cli, slow.a_ip, g.port, "ticker")
    pump = Pump([c])
    pump.start()
    pub = Publisher(g, "ticker", rate=1000, size=200)
    pub.start()
    try:
        # dropped once it has not kept up for slow_grace (5 s): allow 2 x that
        deadline = time.monotonic() + 12
        while c.closes == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # published across the reconnect too
        published = pub.stop()
        caught_up = wait_until_has([c], published[-1], 15)
    finally:
        pub.halt.set()
        pump.stop()
        c.close()
    stats = g.stats()
    report = check_resumed(c, published)
    print(f"slow client: {report} of {len(published)} published; slow_closed {stats.get('slow_closed')}")
    assert c.closes >= 1, f"never dropped: {report}, slow_closed {stats.get('slow_closed')}"
    assert caught_up, f"did not catch up: {report} of {len(published)}"
    assert report["next"] == len(published), report


# -- 3. memory stays bounded while slow clients lag ----------------------------------------------


def test_memory_bounded_while_slow_clients_lag(net, stop_gateways):
    """30 clients sharing a 4 Mbit/s link (each far slower than the 500 KB/s of events; they
    reconnect with their last id whenever dropped, so replays are in the mix) and 10 stalled
    readers (4 KiB receive buffer, never read) on the gateway's loopback -- a local reverse
    proxy that stopped reading; MTU 64 KiB, where an autotuned send buffer starts at ~4 MiB --
    for 8 s.  Unbounded, each would hold ~4 MB.  Budget per connection: 4 x max_buffer of RSS
    (held events, the transport, a replay slice) and at most 1 MiB of kernel send memory on any
    one socket (the kernel's own cap, tcp_wmem[2], is 4 MiB, which autotuning reaches on
    loopback)."""
    n_slow, n_stalled, max_buffer = 30, 10, 64 * 1024
    srv, cli = net.ns("gw"), net.ns("cl")
    link = net.link(srv, cli, rate_mbit=4.0)
    g = start(srv, "--max-buffer", "64KiB", "--slow-consumer", "drop", "--history-size", "2000")
    stop_gateways.append(g)
    slow = [Client(cli, link.a_ip, g.port, "flood") for _ in range(n_slow)]
    stalled = [LinkStream(srv, "127.0.0.1", g.port, "/events?topic=flood", rcvbuf=4096) for _ in range(n_stalled)]
    assert all(s.status == 200 for s in stalled)
    time.sleep(0.5)
    base = g.rss_kib()
    pump = Pump(slow)
    pump.start()
    pub = Publisher(g, "flood", rate=500, size=1000)
    pub.start()
    peak_rss, peak_kernel, peak_socket = base, 0, 0
    try:
        for _ in range(16):  # 8 s, sampled every 0.5 s
            time.sleep(0.5)
            peak_rss = max(peak_rss, g.rss_kib())
            total, largest, _ = g.send_queue_bytes()
            peak_kernel, peak_socket = max(peak_kernel, total), max(peak_socket, largest)
        published = pub.stop()
    finally:
        pub.halt.set()
        pump.stop()
        for c in slow:
            c.close()
        for s in stalled:
            s.close()
    n = n_slow + n_stalled
    grew = (peak_rss - base) * 1024
    print(
        f"RSS {base / 1024:.1f} -> peak {peak_rss / 1024:.1f} MiB, kernel send memory peak "
        f"{peak_kernel / 2**20:.1f} MiB (one socket: {peak_socket / 1024:.0f} KiB); {len(published)} events published; "
        f"slow clients' sessions {sum(len(c.sessions) for c in slow)}"
    )
    unbounded = len(published) * 1000 * n
    assert grew <= n * 4 * max_buffer + (24 << 20), (
        f"RSS grew {grew / 2**20:.1f} MiB (from {base / 1024:.1f} MiB) with {n} lagging clients; "
        f"unbounded would be ~{unbounded / 2**20:.0f} MiB"
    )
    assert peak_socket <= 1 << 20, f"the kernel held {peak_socket / 1024:.0f} KiB for one lagging client"
    assert peak_kernel <= n * (1 << 20), f"kernel send memory {peak_kernel / 2**20:.1f} MiB for {n} clients"
    assert g.request("GET", "/healthz", admin=True).status == 200
