"""Counters never go backwards while the supervisor lives (CONTRACT "Admin"): not when a worker
is killed (kill -9), not across a SIGHUP reload.  The supervisor keeps each worker's highest
counters and, when a worker exits, adds them to a retired total; /metrics includes it.

Also the pure part: a snapshot's monotonic part (counters, labelled counters, histogram counts
and sums -- never gauges) and back."""

from __future__ import annotations

import os
import signal

import pytest
from checks import alive, open_streams, publish, started, stop_supervised, uniq, worker_stats
from harness import Gateway, wait_until

from ssegw.supervisor import as_snapshot, counters_of

# -- the monotonic part of a snapshot -----------------------------------------------------------


def test_counters_of_keeps_counters_labels_and_histograms_not_gauges():
    snap = {
        "workers": 1, "connections_open": 7, "streams_open": 3,  # gauges
        "events_delivered": 40, "connections_accepted": 9,  # counters
        "responses": {"404": 2, "503": 1}, "slow_closed": {},  # labelled
        "hist_writes": {"counts": [1, 0, 4], "sum": 12.5},  # a histogram
        "pid": 1234, "broker": {"kind": "redis"},  # neither
    }
    flat = counters_of(snap)
    assert flat == {
        ("events_delivered", ""): 40, ("connections_accepted", ""): 9,
        ("responses", "404"): 2, ("responses", "503"): 1,
        ("hist_writes", "#0"): 1, ("hist_writes", "#1"): 0, ("hist_writes", "#2"): 4, ("hist_writes", "sum"): 12.5,
    }
    assert as_snapshot(flat) == {
        "events_delivered": 40, "connections_accepted": 9, "responses": {"404": 2, "503": 1},
        "hist_writes": {"counts": [1, 0, 4], "sum": 12.5},
    }


# -- against real workers -------------------------------------------------------------------------


def monotonic_series(g: Gateway) -> dict[str, float]:
    """Every ssegw_* counter and histogram series of one /metrics scrape."""
    text = g.request("GET", "/metrics", admin=True).body.decode()
    kinds: dict[str, str] = {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            kinds[name] = kind
        elif line and not line.startswith("#") and line.startswith("ssegw_"):
            series, _, value = line.rpartition(" ")
            name = series.split("{", 1)[0]
            family = next((f for f in (name.removesuffix(s) for s in ("_total", "_bucket", "_count", "_sum"))
                           if kinds.get(f) in ("counter", "histogram")), None)
            if family is not None and not name.endswith("_created"):
                out[series] = float(value)
    return out


def assert_not_lower(before: dict[str, float], after: dict[str, float], when: str) -> None:
    lower = {k: (v, after.get(k)) for k, v in before.items() if after.get(k, 0.0) < v}
    assert not lower, f"{when}: counters went backwards: {lower}"


def traffic(g: Gateway, topic: str, n: int) -> None:
    streams = open_streams(g, topic, 6)
    try:
        ids = [publish(g, topic, f"m{i}") for i in range(n)]
        for s in streams:
            s.wait_events(n, 5)
            assert [e.id for e in s.events] == ids
        # Error responses and other labelled counters too.
        assert g.request("GET", "/nope").status == 404
    finally:
        for s in streams:
            s.close()


def test_counters_survive_kill_9_and_reload(redis_server):
    g = Gateway("--redis", redis_server.url, "--workers", "2", "--drain-timeout", "1s", "--flush-interval", "10ms",
                "--heartbeat-interval", "1s")
    try:
        g.start()
        assert wait_until(lambda: len(worker_stats(g)) == 2 and g.request("GET", "/readyz", admin=True).status == 200,
                          15, 0.1), "".join(g.log)
        topic = uniq("ctr")
        traffic(g, topic, 10)
        assert wait_until(lambda: all(w["events_delivered"] > 0 and w["events_published"] > 0
                                      for w in worker_stats(g)), 5, 0.1), worker_stats(g)
        first = monotonic_series(g)
        assert first["ssegw_events_delivered_total"] == 60
        assert first["ssegw_events_published_total"] == 10

        # kill -9 one worker (its counters were nonzero): nothing lower, before or after the
        # restart.
        victim = worker_stats(g)[0]["pid"]
        n_started = len(started(g))
        os.kill(victim, signal.SIGKILL)
        assert_not_lower(first, monotonic_series(g), "just after kill -9")
        assert wait_until(lambda: len(started(g)) > n_started and len(worker_stats(g)) == 2, 10, 0.05)
        assert not alive(victim)
        after_kill = monotonic_series(g)
        assert_not_lower(first, after_kill, "after the restart")
        assert after_kill["ssegw_events_delivered_total"] == 60
        assert after_kill["ssegw_worker_restarts_total"] == 1

        # More traffic on the new worker set, then SIGHUP: every worker is replaced.
        traffic(g, topic, 5)
        assert wait_until(lambda: monotonic_series(g)["ssegw_events_delivered_total"] == 90, 5, 0.05)
        before_hup = monotonic_series(g)
        assert_not_lower(after_kill, before_hup, "more traffic")
        g.send(signal.SIGHUP)
        seen = [before_hup]
        ok = wait_until(lambda: seen.append(monotonic_series(g)) or
                        any("generation 2 ready" in line for line in g.log), 15, 0.05)
        assert ok, "".join(g.log)
        gen2 = {pid for pid, _, gen in started(g) if gen == 2}
        assert wait_until(lambda: seen.append(monotonic_series(g)) or
                          {w["pid"] for w in worker_stats(g)} == gen2, 5, 0.05)
        old = {pid for pid, _, gen in started(g) if gen == 1}
        assert wait_until(lambda: seen.append(monotonic_series(g)) or not any(alive(p) for p in old), 10, 0.05)
        seen.append(monotonic_series(g))
        # Every scrape through the reload (old generation draining, then gone) was no lower
        # than the one before it.
        for a, b in zip(seen, seen[1:], strict=False):
            assert_not_lower(a, b, "during the reload")
        final = seen[-1]
        assert final["ssegw_events_delivered_total"] == 90
        assert final["ssegw_events_published_total"] == 15
        assert final["ssegw_worker_restarts_total"] == 1
    finally:
        stop_supervised(g)


def test_single_process_counters_survive_reload(gateway):
    g = gateway("--drain-timeout", "1s", "--flush-interval", "10ms")
    topic = uniq("ctr1")
    traffic(g, topic, 4)
    before = monotonic_series(g)
    assert before["ssegw_events_delivered_total"] == 24
    g.send(signal.SIGHUP)
    seen = [before]
    assert wait_until(lambda: seen.append(monotonic_series(g)) or
                      any("generation 1 stopped" in line for line in g.log), 5, 0.02), "".join(g.log)
    seen.append(monotonic_series(g))
    for a, b in zip(seen, seen[1:], strict=False):
        assert_not_lower(a, b, "during the reload")
    assert seen[-1]["ssegw_events_delivered_total"] == 24
    m = g.metrics()
    assert m["ssegw_workers"] == 1


pytestmark = pytest.mark.timeout(60)
