"""Lifecycle of a real gateway process: SIGTERM/SIGINT drain, max_lifetime, heartbeats and the
end of a chunked stream, over real sockets."""

from __future__ import annotations

import select
import signal
import socket
import threading
import time

from checks import assert_alive, uniq
from harness import Gateway, Stream, recv_all, request

RETRY_MS = 3000  # the default `retry`


# -- helpers ---------------------------------------------------------------------------------


def pump_until_closed(streams: list[Stream], timeout: float, t0: float) -> dict[int, float]:
    """Read all streams concurrently until each is closed; {index: close time - t0}."""
    closed: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(closed) < len(streams) and time.monotonic() < deadline:
        open_ = {s.sock: i for i, s in enumerate(streams) if i not in closed}
        r, _, _ = select.select(list(open_), [], [], 0.02)
        for sock in r:
            i = open_[sock]
            streams[i].pump(0)
            if streams[i].closed:
                closed[i] = time.monotonic() - t0
    return closed


def wait_exit(g: Gateway, timeout: float) -> int | None:
    assert g.proc is not None
    try:
        return g.proc.wait(timeout)
    except Exception:  # noqa: BLE001
        return None


def readyz_until_503(g: Gateway, timeout: float = 1.0):  # noqa: ANN201
    """Poll /readyz right after a stop signal.  The signal reaches the loop asynchronously, so
    a request racing it may still see 200 -- but only for a moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = g.request("GET", "/readyz", admin=True, timeout=2)
        except ConnectionError:
            # an admin connection caught by the drain before its request was read is closed
            # unanswered: see test_drain_keeps_admin_connections_that_have_not_sent_yet
            if time.monotonic() > deadline:
                raise
            continue
        if r.status != 200 or time.monotonic() > deadline:
            return r
        time.sleep(0.005)


def heartbeats(s: Stream) -> int:
    return sum(1 for c in s.parser.comments if c == "")


# -- SIGTERM / SIGINT drain ----------------------------------------------------------------


def test_sigterm_drains_streams_spread_over_drain_timeout(gateway):
    drain = 2.0
    g = gateway("--heartbeat-interval", "1s", "--flush-interval", "10ms", "--drain-timeout", "2s")
    topic = uniq("drain")
    streams = [g.stream(f"/events?topic={topic}") for _ in range(20)]
    assert all(s.status == 200 for s in streams)
    r = g.publish({"topic": topic, "data": "before-drain"})
    assert r.status == 200
    for s in streams:
        assert [e.data for e in s.wait_events(1, 3)] == ["before-drain"]
    assert g.request("GET", "/readyz", admin=True).status == 200

    t0 = time.monotonic()
    g.send(signal.SIGTERM)
    rr = readyz_until_503(g)
    assert time.monotonic() - t0 < 0.3, "readyz did not turn 503 at once"
    assert rr.status == 503, rr
    body = rr.json()
    assert set(body) == {"error", "detail"}, body
    # /healthz still answers while the loop runs
    assert g.request("GET", "/healthz", admin=True).status == 200
    # the public listener no longer takes new connections
    try:
        resp = request(g.port, "GET", f"/events?topic={topic}", timeout=2)
    except (ConnectionRefusedError, ConnectionResetError, ConnectionError):
        pass
    else:
        assert resp.status == 503 and "retry-after" in resp.headers, resp

    closed = pump_until_closed(streams, drain + 3, t0)
    assert len(closed) == 20, f"only {len(closed)} of 20 streams closed"
    times = sorted(closed.values())
    assert times[-1] <= drain + 0.6, times
    # spread over the drain window, not all at the same instant
    assert times[-1] - times[0] >= drain * 0.3, times
    assert len({round(t, 1) for t in times}) >= 5, times
    finals = []
    for s in streams:
        assert s.ended, "stream closed without the last chunk"
        assert s.parser.retries[0] == RETRY_MS
        assert len(s.parser.retries) == 2, s.parser.retries  # the opening hint and the drain hint
        finals.append(s.parser.retries[-1])
        assert bytes(s.raw).endswith(b"0\r\n\r\n")
        s.close()
    assert all(RETRY_MS * 0.5 <= r <= RETRY_MS * 1.5 for r in finals), finals
    assert len(set(finals)) > 1, f"retry hints are not jittered: {finals}"
    assert wait_exit(g, 3) == 0


def test_sigint_drains_and_exits_0(gateway):
    g = gateway("--heartbeat-interval", "1s", "--flush-interval", "10ms", "--drain-timeout", "1s")
    topic = uniq("sigint")
    s11 = g.stream(f"/events?topic={topic}")
    s10 = Stream(g.port, f"/events?topic={topic}", None, 5, http10=True)
    assert s11.status == 200 and s10.status == 200
    assert s11.chunked and not s10.chunked
    t0 = time.monotonic()
    g.send(signal.SIGINT)
    assert readyz_until_503(g).status == 503
    assert time.monotonic() - t0 < 0.3
    closed = pump_until_closed([s11, s10], 4, t0)
    assert len(closed) == 2 and max(closed.values()) <= 1.6, closed
    assert s11.ended
    # HTTP/1.0: close-delimited, no chunk framing, still a retry hint before the close
    assert len(s10.parser.retries) == 2 and len(s11.parser.retries) == 2
    assert b"\r\n" not in bytes(s10.raw)
    s11.close()
    s10.close()
    assert wait_exit(g, 3) == 0


def test_sigterm_without_streams_exits_promptly(gateway):
    g = gateway("--drain-timeout", "5s")
    # an idle keep-alive connection does not hold the drain up
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as idle:
        t0 = time.monotonic()
        g.send(signal.SIGTERM)
        assert wait_exit(g, 3) == 0
        assert time.monotonic() - t0 < 1.5
        idle.settimeout(2)
        try:
            assert idle.recv(100) == b""
        except ConnectionResetError:
            pass


def test_drain_logs_no_errors(gateway):
    # (found as a bug -- Worker._fire ran timers cancelled earlier in the same wheel batch and
    # logged AttributeError tracebacks -- fixed in 21e7d2c)
    # 50 ms heartbeats: a stream's heartbeat timer and its drain deadline often fire in one tick
    g = gateway("--heartbeat-interval", "50ms", "--flush-interval", "10ms", "--drain-timeout", "1s")
    topic = uniq("drainlog")
    streams = [g.stream(f"/events?topic={topic}") for _ in range(30)]
    assert all(s.status == 200 for s in streams)
    time.sleep(0.2)
    t0 = time.monotonic()
    g.send(signal.SIGTERM)
    closed = pump_until_closed(streams, 4, t0)
    assert len(closed) == 30
    for s in streams:
        s.close()
    assert wait_exit(g, 3) == 0
    g.stop()  # joins the log reader
    log = "".join(g.log)
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_drain_keeps_admin_connections_that_have_not_sent_yet(gateway):
    g = gateway("--drain-timeout", "2s")
    # Streams keep the drain (and the process) going; closes are spread uniformly over the
    # 2 s window, so with 20 of them one outlives the probe below (P(all < 0.3 s) ~ 1e-17).
    topic = uniq("adm")
    streams = [g.stream(f"/events?topic={topic}") for _ in range(20)]
    assert all(st.status == 200 for st in streams)
    probe = socket.create_connection(("127.0.0.1", g.admin_port), timeout=3)
    try:
        time.sleep(0.1)  # accepted, nothing sent yet (a probe's request still in flight)
        g.send(signal.SIGTERM)
        time.sleep(0.2)
        probe.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = recv_all(probe, bytearray(), None, 3)
        assert data.startswith(b"HTTP/1.1 503 "), data
    finally:
        probe.close()
        for st in streams:
            st.close()
        assert wait_exit(g, 4) == 0


# -- max_lifetime ----------------------------------------------------------------------------


def test_max_lifetime_closes_with_retry_and_resume_loses_nothing(gateway):
    life = 2.0
    g = gateway("--heartbeat-interval", "1s", "--flush-interval", "10ms", "--max-lifetime", "2s",
                "--drain-timeout", "1s")
    topic = uniq("life")
    published: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def publisher() -> None:
        i = 0
        try:
            while not stop.is_set():
                r = g.publish({"topic": topic, "data": f"m{i}"})
                assert r.status == 200, r
                published.append((r.json()["ids"][0], f"m{i}"))
                i += 1
                time.sleep(0.03)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    s1 = g.stream(f"/events?topic={topic}")
    t0 = time.monotonic()
    assert s1.status == 200
    th = threading.Thread(target=publisher)
    th.start()
    try:
        assert not s1.wait_closed(life - 0.1), "closed before max_lifetime"
        assert s1.wait_closed(life * 0.1 + 0.8), "not closed after max_lifetime"
        took = time.monotonic() - t0
        assert life - 0.05 <= took <= life * 1.1 + 0.4, took
        assert s1.ended
        assert len(s1.parser.retries) == 2, s1.parser.retries
        assert RETRY_MS * 0.5 <= s1.parser.retries[-1] <= RETRY_MS * 1.5
        got1 = [(e.id, e.data) for e in s1.events]
        assert got1, "no events before the lifetime ended"
        s1.close()
        time.sleep(0.3)  # events keep coming while the client is away
        s2 = g.stream(f"/events?topic={topic}", headers={"Last-Event-ID": s1.parser.last_id})
        assert s2.status == 200
        time.sleep(0.3)
    finally:
        stop.set()
        th.join(10)
    assert not errors, errors
    s2.wait_events(len(published) - len(got1), 5)
    got = got1 + [(e.id, e.data) for e in s2.events]
    assert got == published, "resume after max_lifetime lost, duplicated or reordered events"
    assert not any(e.event == "ssegw.reset" for e in s2.events)
    s2.close()
    m = g.metrics()
    assert m["ssegw_streams_closed_lifetime_total"] >= 1
    assert_alive(g)


# -- heartbeats ------------------------------------------------------------------------------


def test_heartbeats_only_on_silent_connections(gw: Gateway):
    busy_t, quiet_t = uniq("hb.busy"), uniq("hb.quiet")
    busy = gw.stream(f"/events?topic={busy_t}")
    quiet = gw.stream(f"/events?topic={quiet_t}")
    assert busy.status == 200 and quiet.status == 200
    end = time.monotonic() + 2.7
    n = 0
    while time.monotonic() < end:
        assert gw.publish({"topic": busy_t, "data": str(n)}).status == 200
        n += 1
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            busy.pump(0.01)
            quiet.pump(0.01)
    busy.wait_events(n, 2)
    assert [e.data for e in busy.events] == [str(i) for i in range(n)]
    assert heartbeats(busy) == 0, "heartbeat sent on a connection that was never silent"
    assert 2 <= heartbeats(quiet) <= 4, quiet.parser.comments  # 1 s interval over 2.7 s
    assert quiet.events == []
    assert b":\n\n" in bytes(quiet.body)
    busy.close()
    quiet.close()
    assert_alive(gw)


def test_heartbeat_resumes_after_traffic_stops(gw: Gateway):
    topic = uniq("hb.stop")
    with gw.stream(f"/events?topic={topic}") as s:
        assert s.status == 200
        assert gw.publish({"topic": topic, "data": "x"}).status == 200
        s.wait_events(1, 2)
        t_event = time.monotonic()
        assert s.wait_for(lambda st: heartbeats(st) >= 1, 2.5)
        # no heartbeat before a full interval of silence after the event
        assert time.monotonic() - t_event >= 0.9
    assert_alive(gw)


# -- end of a chunked stream ---------------------------------------------------------------------


def test_server_close_sends_last_chunk(gateway):
    g = gateway("--heartbeat-interval", "1s", "--max-lifetime", "1s", "--drain-timeout", "1s")
    topic = uniq("lastchunk")
    with g.stream(f"/events?topic={topic}") as s:
        assert s.status == 200 and s.headers.get("transfer-encoding") == "chunked"
        assert s.wait_closed(3)
        assert s.ended
        # a complete chunk, then the last chunk, then nothing
        assert bytes(s.raw).endswith(b"\r\n0\r\n\r\n")
        assert len(s.parser.retries) == 2, s.parser.retries  # opening hint, then the closing hint
    assert_alive(g)
