"""The shipped front-end recipes, run by Debian's nginx, HAProxy and Caddy in front of a real gateway.

Each recipe (``ssegw print-proxy``) is started as shipped -- only its addresses, ports and
certificate are changed (``frontend_harness.render``) -- on a free loopback port, over TLS with a
throwaway CA, in front of a gateway that trusts ``127.0.0.1`` as its proxy.  Clients connect
from ``127.0.0.5`` (and ``127.0.0.6``), so the address the gateway logs is the client's only
if the recipe passed it on.  For every recipe:

- events flow through it with less than 50 ms added latency (each event timed on a direct
  stream and on a stream through the proxy; nginx's test config turns gzip on for every type,
  and the stream still arrives uncompressed);
- a resume through it is exact (``Last-Event-ID`` reaches the gateway: the missed events, once,
  in order, and no ``ssegw.reset``);
- the client's address reaches the gateway (X-Forwarded-For, or the PROXY protocol for
  ``haproxy``), and a forged X-Forwarded-For from the client does not;
- a client that leaves ends its stream on the gateway at once, or for HAProxy at the next
  heartbeats (Caddy's recipe leaves out ``flush_interval -1`` for this reason);
- a drain's ``retry:`` and the end of the stream reach the client;
- a stream silent for longer than the proxy's idle timeouts (shrunk for the test) stays open
  because of the gateway's heartbeats, and is cut without them (so the timeouts are the ones
  the README names).

``haproxy`` (``send-proxy-v2``) needs the gateway's ``proxy_protocol``: its tests are skipped
while ``check-config`` does not know that key.  A missing server binary skips its recipe
(``.ci/run`` installs them).
"""

from __future__ import annotations

import re
import signal
import statistics
import subprocess
import sys
import time

import pytest
from frontend_harness import Certs, arrivals, make_certs, require, start_stack
from harness import ROOT, Gateway

from ssegw.config import Config, parse_duration
from ssegw.packaged import PROXIES, print_proxy

RECIPES = list(PROXIES)
#: Added latency allowed per event, at the median and the 90th percentile.
MAX_ADDED_S = 0.050


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module", params=RECIPES)
def stack(request, tmp_path_factory, certs):
    """The gateway and one recipe's proxy, shared by the module's tests for that recipe."""
    st = start_stack(request.param, tmp_path_factory.mktemp(request.param), certs)
    yield st
    st.stop()


def _datas(s) -> list[str]:  # noqa: ANN001
    return [e.data for e in s.events if e.event == "message"]


# -- the recipes as shipped ----------------------------------------------------------------


@pytest.mark.parametrize("kind", RECIPES)
def test_packaged_recipe_is_the_repository_text(kind):
    name, _ = PROXIES[kind]
    assert print_proxy(kind) == (ROOT / "deploy" / "proxy" / name).read_text()


def test_packaged_unknown_recipe():
    with pytest.raises(ValueError, match="nginx"):
        print_proxy("apache")


def test_cli_print_proxy():
    r = subprocess.run([sys.executable, "-m", "ssegw", "print-proxy", "nginx"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == print_proxy("nginx")


def _seconds(text: str, directive: str) -> float:
    m = re.search(rf"^\s*{re.escape(directive)}\s+(\w+);?$", text, re.M)
    assert m, f"no {directive} in the recipe"
    return parse_duration(m.group(1))


def test_recipes_hold_what_streams_need():
    """The directives the README names, and idle timeouts well above the default heartbeat."""
    heartbeat = Config().heartbeat_interval
    nginx = print_proxy("nginx")
    for line in ("proxy_buffering off;", "gzip off;", "proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                 "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
                 "proxy_set_header Last-Event-ID $http_last_event_id;", "keepalive 32;", "ssl http2;"):
        assert line in nginx, line
    for d in ("proxy_read_timeout", "send_timeout"):
        assert _seconds(nginx, d) >= 3 * heartbeat, d
    for kind in ("haproxy", "haproxy-xff"):
        text = print_proxy(kind)
        assert "alpn h2,http/1.1" in text
        for d in ("timeout client", "timeout server", "timeout tunnel"):
            assert _seconds(text, d) >= 3 * heartbeat, (kind, d)
    assert "send-proxy-v2" in print_proxy("haproxy") and "forwardfor" not in print_proxy("haproxy")
    assert "option forwardfor" in print_proxy("haproxy-xff") and "send-proxy" not in print_proxy("haproxy-xff")
    caddy = print_proxy("caddy")
    # Caddy flushes text/event-stream by itself; an explicit "flush_interval -1" would also make
    # it ignore departed clients (see test_client_address_reaches_the_gateway).
    assert not re.search(r"^\s*(encode|flush_interval)\b", caddy, re.M)


# -- through the real servers ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_events_flow_with_little_added_latency(stack):
    topic = f"lat.{stack.kind}"
    direct = stack.direct(f"/events?topic={topic}")
    via = stack.via(f"/events?topic={topic}", {"Accept-Encoding": "gzip, deflate, br"})
    with direct, via:
        assert via.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in via.headers, via.raw_head
        # One event first, so that both subscriptions are live and both paths warm.
        stack.publish({"topic": topic, "data": "warm"})
        assert None not in arrivals([direct, via], [0, 0], 5.0)
        added: list[float] = []
        for i in range(20):
            before = [len(direct.events), len(via.events)]
            stack.publish({"topic": topic, "data": str(i)})
            t_direct, t_via = arrivals([direct, via], before, 5.0)
            assert t_direct is not None and t_via is not None, f"event {i} did not arrive on both streams"
            added.append(t_via - t_direct)
            time.sleep(0.02)
        assert _datas(via) == _datas(direct) == ["warm", *map(str, range(20))]
        assert [e.id for e in via.events] == [e.id for e in direct.events]
    ms = sorted(round(a * 1000, 2) for a in added)
    assert statistics.median(added) < MAX_ADDED_S, f"added latency (ms): {ms}"
    assert ms[int(len(ms) * 0.9) - 1] < MAX_ADDED_S * 1000, f"added latency (ms): {ms}"


@pytest.mark.timeout(60)
def test_resume_through_the_proxy_is_exact(stack):
    topic = f"resume.{stack.kind}"
    with stack.via(f"/events?topic={topic}") as first:
        first_ids = stack.publish([{"topic": topic, "data": f"a{i}"} for i in range(3)])
        assert len(first.wait_events(3)) == 3
        assert [e.id for e in first.events] == first_ids
    missed = stack.publish([{"topic": topic, "data": f"b{i}"} for i in range(4)])
    with stack.via(f"/events?topic={topic}", {"Last-Event-ID": first_ids[-1]}) as again:
        # The replay first, then the live stream.
        assert again.wait_for(lambda s: len(s.events) >= 4)
        live = stack.publish([{"topic": topic, "data": f"c{i}"} for i in range(2)])
        again.wait_events(6)
        time.sleep(0.2)
        again.pump(0.2)  # a duplicate would arrive now
        assert [e.event for e in again.events] == ["message"] * 6, "ssegw.reset or another event appeared"
        assert [e.id for e in again.events] == missed + live
        assert _datas(again) == [*(f"b{i}" for i in range(4)), "c0", "c1"]


def _stream_ip(g: Gateway, topic: str, timeout: float = 5.0) -> str | None:
    """The ``ip=`` of the access line of the (ended) stream on ``topic``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(g.log):
            if "kind=stream" in line and f"topic_names={topic} " in line:
                m = re.search(r" ip=(\S+)", line)
                return m.group(1) if m else "?"
        time.sleep(0.05)
    return None


#: How soon after its client left a stream must end on the gateway (stack heartbeat: 1s).  nginx
#: and Caddy see the client's FIN at once.  HAProxy notices a departed HTTP/1.1 client only when a
#: write to it fails: the next heartbeat or the one after (README "Deploying behind a proxy").
LEAVE_WITHIN_S = {"nginx": 0.5, "caddy": 0.5, "haproxy": 3.0, "haproxy-xff": 3.0}


@pytest.mark.timeout(60)
def test_client_address_reaches_the_gateway(stack):
    """The gateway sees each client's own address, never a forged one; and a client that leaves
    frees its stream there (per-IP limits count a forwarded client's streams, so a page reloaded
    must not find its previous streams still open)."""
    forged, plain = f"addr.forged.{stack.kind}", f"addr.plain.{stack.kind}"
    # The client's own X-Forwarded-For is a lie; the proxy's view of the client is the truth.
    s5 = stack.via(f"/events?topic={forged}", {"X-Forwarded-For": "10.9.9.9"}, source="127.0.0.5")
    s6 = stack.via(f"/events?topic={plain}", source="127.0.0.6")
    with s5, s6:
        stack.publish([{"topic": forged, "data": "x"}, {"topic": plain, "data": "y"}])
        assert len(s5.wait_events(1)) == 1 and len(s6.wait_events(1)) == 1
    left = time.monotonic()
    within = LEAVE_WITHIN_S[stack.kind]
    # Each access line is written when the proxy closes the gateway's stream after its client left.
    assert _stream_ip(stack.gw, forged, timeout=within) == "127.0.0.5", \
        f"no stream line with the client's address within {within}s of its leaving"
    assert _stream_ip(stack.gw, plain, timeout=0.5) == "127.0.0.6"
    assert time.monotonic() - left < within + 0.5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", RECIPES)
def test_drain_retry_and_close_reach_the_client(kind, tmp_path, certs):
    st = start_stack(kind, tmp_path, certs)
    try:
        with st.via("/events?topic=drain") as s:
            st.publish({"topic": "drain", "data": "before"})
            assert len(s.wait_events(1)) == 1
            assert s.parser.retries == [1000], "the stream should open with retry: 1000"
            st.gw.send(signal.SIGTERM)
            # drain_timeout is 1s: every stream gets its retry and is closed within it.
            assert s.wait_for(lambda s: s.ended or s.closed, timeout=5.0), "the stream did not end"
            drained = s.parser.retries[1:]
            assert drained, "the drain's retry: did not reach the client"
            assert 500 <= drained[-1] <= 1500, drained
        assert st.gw.proc is not None and st.gw.proc.wait(15) == 0
    finally:
        st.stop()


# -- heartbeats against the proxy's idle timeouts ---------------------------------------------

#: Each recipe's idle timeouts and the one that cuts a silent stream, shrunk to IDLE_S for the
#: test.  (Caddy has none on a response in progress, so it has nothing to shrink.)
IDLE_S = 0.6
SHRINK = {
    "nginx": {"proxy_read_timeout 60s;": "proxy_read_timeout 600ms;", "proxy_send_timeout 60s;":
              "proxy_send_timeout 600ms;", "send_timeout 60s;": "send_timeout 600ms;"},
    "haproxy": {"timeout client 60s": "timeout client 600ms", "timeout server 60s": "timeout server 600ms",
                "timeout tunnel 1h": "timeout tunnel 600ms"},
}
SHRINK["haproxy-xff"] = SHRINK["haproxy"]
CUTS = {"nginx": "proxy_read_timeout 60s;", "haproxy": "timeout server 60s", "haproxy-xff": "timeout server 60s"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("heartbeat", ["150ms", "30s"])
@pytest.mark.parametrize("kind", list(SHRINK))
def test_heartbeats_keep_a_silent_stream_open(kind, heartbeat, tmp_path, certs):
    """With heartbeats well inside every idle timeout of the proxy a silent stream lives; without
    them the one timeout the README names for that proxy (alone shrunk) cuts it."""
    require(kind)
    recipe = print_proxy(kind)
    shrink = SHRINK[kind] if heartbeat == "150ms" else {CUTS[kind]: SHRINK[kind][CUTS[kind]]}
    for old, new in shrink.items():
        assert old in recipe, old
        recipe = recipe.replace(old, new)
    st = start_stack(kind, tmp_path, certs, heartbeat=heartbeat, recipe=recipe)
    try:
        with st.via("/events?topic=idle") as s:
            s.wait_closed(2 * IDLE_S)  # silent for twice the idle timeouts
            cut = s.closed or s.ended
            if not cut:
                st.publish({"topic": "idle", "data": "still here"})
                assert [e.data for e in s.wait_events(1)] == ["still here"]
        if heartbeat == "150ms":
            assert not cut, f"{kind} cut a stream that had a heartbeat every {heartbeat}"
            assert len(s.parser.comments) >= 3, s.parser.comments
        else:
            assert cut, f"{kind} kept a silent stream open past {shrink}"
    finally:
        st.stop()
