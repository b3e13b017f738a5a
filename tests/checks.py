"""Assertions shared by the end-to-end tests: the contract's error shape, a liveness check
after hostile traffic, unique topic names."""

from __future__ import annotations

import json
import os
import re
import signal
import uuid
from pathlib import Path

from harness import Gateway, Response, Stream


def uniq(prefix: str) -> str:
    """A topic name no other test uses (tests share gateways and their history)."""
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


def check_error(status: int, body: bytes, expect: int, code: str | None = None) -> dict:
    """``status`` is ``expect`` and ``body`` is the contract's ``{"error", "detail"}``."""
    assert status == expect, (status, body)
    obj = json.loads(body)
    assert isinstance(obj, dict) and set(obj) == {"error", "detail"}, obj
    assert isinstance(obj["error"], str) and obj["error"], obj
    assert isinstance(obj["detail"], str) and obj["detail"], obj
    if code is not None:
        assert obj["error"] == code, obj
    return obj


def assert_error(r: Response, want: int, code: str | None = None) -> dict:
    """A JSON error response with status ``want`` (and error ``code`` if given)."""
    assert r.headers.get("content-type", "").split(";")[0].strip() == "application/json", r.headers
    return check_error(r.status, r.body, want, code)


def assert_healthy(g: Gateway) -> None:
    """The process runs, /healthz is 200, no slot is leaked."""
    assert g.proc is not None and g.proc.poll() is None, "gateway process died"
    r = g.request("GET", "/healthz", admin=True)
    assert r.status == 200 and r.json() == {"status": "ok"}, r
    assert g.wait_slots(0) == 0


def assert_alive(g: Gateway, headers: dict[str, str] | None = None) -> None:
    """Healthy, and a normal publish + subscribe works (with ``headers`` on the stream);
    no slot is leaked."""
    assert_healthy(g)
    topic = uniq("alive")
    with g.stream(f"/events?topic={topic}", headers) as s:
        assert s.status == 200, s.error_body
        r = g.publish({"topic": topic, "data": "ping"})
        assert r.status == 200, r
        evs = s.wait_events(1, timeout=3)
        assert [(e.id, e.data) for e in evs] == [(r.json()["ids"][0], "ping")]
    assert g.wait_slots(0) == 0


def open_streams(g: Gateway, topic: str, n: int, headers: dict[str, str] | None = None) -> list[Stream]:
    """``n`` subscribers of ``topic``, each answered 200."""
    out = []
    for _ in range(n):
        s = g.stream(f"/events?topic={topic}", headers)
        assert s.status == 200, s.error_body
        out.append(s)
    return out


def publish(g: Gateway, topic: str, data: str) -> str:
    """Publish one message; returns its id."""
    r = g.publish({"topic": topic, "data": data})
    assert r.status == 200, r
    return r.json()["ids"][0]


def ids(s: Stream | list) -> list[str]:
    return [e.id for e in (s.events if isinstance(s, Stream) else s)]


# -- supervised gateways: worker processes and the aggregated admin ------------------------


#: the supervisor's log line for each worker it starts
WORKER_STARTED = re.compile(r"worker (\d+) started \(slot (\d+), generation (\d+)\)")


def started(g: Gateway) -> list[tuple[int, int, int]]:
    """(pid, slot, generation) of every `worker ... started` log line so far."""
    return [(int(m.group(1)), int(m.group(2)), int(m.group(3)))
            for m in map(WORKER_STARTED.search, list(g.log)) if m]


def stop_supervised(g: Gateway) -> None:
    """Stop a supervisor, then SIGKILL any of its workers that outlived it (by pid, checked
    to still be an ssegw process)."""
    try:
        g.stop(timeout=15)
    except Exception:  # noqa: BLE001 - a test's teardown must still reap the workers
        g.kill()
    for pid, _, _ in started(g):
        if alive(pid) and is_ssegw(pid):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def is_ssegw(pid: int) -> bool:
    """``pid`` is (still) an ssegw process: checked before a test kills a leftover worker."""
    try:
        return b"ssegw" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def worker_stats(g: Gateway) -> list[dict]:
    """The per-worker part of a supervisor's ``/admin/stats``."""
    r = g.request("GET", "/admin/stats", admin=True)
    assert r.status == 200, r
    return r.json()["workers"]


def topic_subscribers(g: Gateway, topic: str) -> int | None:
    """``GET /admin/topics/NAME``: the cluster-wide count, or None if not answered 200."""
    try:
        r = g.request("GET", f"/admin/topics/{topic}", admin=True, timeout=3)
    except OSError:
        return None
    if r.status != 200:
        return None
    body = r.json()
    assert body["topic"] == topic
    return body["subscribers"]

