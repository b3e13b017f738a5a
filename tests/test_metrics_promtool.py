"""``promtool check metrics`` on a live ``/metrics``: the exposition parses and passes
Prometheus' own lint (counter suffixes, base units, help text), with every metric family
holding samples -- after traffic, refusals and auth failures, so the labelled families carry
label values too.  Single process, and a supervisor with two workers (the aggregated text plus
the supervisor's own ``process_*``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import jwt
import pytest
from checks import uniq
from harness import Gateway, wait_until

PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None)
SECRET = "promtool-hs256-secret-that-is-long-enough-012"

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus')")


def check(text: bytes) -> None:
    assert PROMTOOL is not None
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=30)
    problems = (r.stdout + r.stderr).decode().strip()
    assert r.returncode == 0 and not problems, problems
    assert b"# TYPE ssegw_publish_duration_seconds histogram" in text
    assert b"# TYPE process_cpu_seconds_total counter" in text


def traffic(g: Gateway, token: str | None = None) -> None:
    topic = uniq("promtool")
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    with g.stream(f"/events?topic={topic}", auth) as s:
        assert s.status == 200, s.error_body
        assert g.publish({"topic": topic, "data": "x"}, auth).status == 200
        s.wait_events(1)
    if token:
        assert g.request("GET", "/events?topic=" + topic).status == 401  # an auth failure
    assert g.request("GET", "/events").status == 400  # no topic
    assert g.request("GET", "/nope").status == 404


def test_promtool_single_process(gateway):
    g = gateway("--auth-jwt-secret", SECRET, "--heartbeat-interval", "1s", "--drain-timeout", "1s")
    traffic(g, jwt.encode({"ssegw": {"subscribe": [">"], "publish": [">"]}}, SECRET, algorithm="HS256"))
    check(g.request("GET", "/metrics", admin=True).body)


def test_promtool_supervisor(redis_server, tmp_path):
    g = Gateway("--redis", redis_server.url, "--workers", "2", "--drain-timeout", "1s", "--heartbeat-interval", "1s",
                tmp_path=tmp_path)
    g.start()
    try:
        assert wait_until(lambda: g.metrics().get("ssegw_workers") == 2, 15)
        traffic(g)
        time.sleep(0.1)
        text = g.request("GET", "/metrics", admin=True).body
        check(text)
        assert b"ssegw_worker_restarts_total 0.0" in text and b"ssegw_watchdog_misses_total" in text
    finally:
        g.stop(timeout=20)
