"""Chromium through the nginx recipe over HTTP/2: 12 EventSource streams to one origin.

Over HTTP/1.1 a browser opens at most 6 connections per origin, and an EventSource holds one for
as long as it lives, so a page's 7th stream waits forever -- the usual "SSE hangs" report.  Behind
the shipped nginx recipe (TLS + HTTP/2), every stream of the page shares one connection: all 12
open, all 12 receive their event, and the page says its protocol was ``h2``.  The control runs
the same page through the recipe with ``http2`` taken out: 6 streams open, the other 6 wait.

The browser trusts the throwaway certificate through Chromium's
``--ignore-certificate-errors-spki-list`` (the server key's hash: that key and no other), not by
ignoring certificate errors.  Chromium is the system one (``/usr/bin/chromium``), as in
``test_browser.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from frontend_harness import make_certs, require, start_stack
from test_browser import CHROMIUM, CHROMIUM_ARGS, _unavailable

from ssegw.packaged import print_proxy

pytestmark = pytest.mark.browser

STREAMS = 12

_OPEN = """(n) => {
  window.got = {}; window.opened = 0; window.errors = 0; window.sources = [];
  for (let i = 0; i < n; i++) {
    const es = new EventSource('/events?topic=h2.' + i);
    window.got[i] = [];
    es.onopen = () => { window.opened += 1; };
    es.onerror = () => { window.errors += 1; };
    es.onmessage = (e) => window.got[i].push(e.data);
    window.sources.push(es);
  }
}"""


@pytest.fixture(params=["h2", "http/1.1"])
def stack(request, tmp_path):
    """The nginx recipe as shipped (h2), or with ``http2`` taken out of its listen lines (the
    control: the same page over HTTP/1.1)."""
    require("nginx")
    recipe = print_proxy("nginx")
    if request.param == "http/1.1":
        assert recipe.count(" ssl http2;") == 2
        recipe = recipe.replace(" ssl http2;", " ssl;")
    st = start_stack("nginx", tmp_path, make_certs(tmp_path / "certs"), recipe=recipe, extra="demo = true\n")
    yield st, request.param
    st.stop()


@pytest.mark.timeout(90)
def test_twelve_event_sources_over_http2(stack):
    stack, protocol = stack
    if not Path(CHROMIUM).exists():
        _unavailable(f"{CHROMIUM} is missing")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:  # pragma: no cover - depends on the environment
        _unavailable(f"playwright is not installed: {e}")
    spki = f"--ignore-certificate-errors-spki-list={stack.fe.certs.spki}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[*CHROMIUM_ARGS, spki])
        try:
            page = browser.new_context().new_page()
            page.set_default_timeout(15_000)
            resp = page.goto(f"https://127.0.0.1:{stack.fe.port}/")
            assert resp is not None and resp.status == 200
            # The demo page's own stream would be a 13th; close it so that the count is ours.
            page.evaluate("() => { es.close(); }")
            assert page.evaluate("performance.getEntriesByType('navigation')[0].nextHopProtocol") == protocol

            page.evaluate(_OPEN, STREAMS)
            if protocol == "http/1.1":
                # The control: 6 connections per origin, so 6 streams open and the rest wait.
                page.wait_for_function("() => window.opened >= 6")
                page.wait_for_timeout(1000)
                assert page.evaluate("window.opened") == 6
                return
            page.wait_for_function("(n) => window.opened >= n", arg=STREAMS)
            ids = stack.publish([{"topic": f"h2.{i}", "data": f"to {i}"} for i in range(STREAMS)])
            assert len(ids) == STREAMS
            page.wait_for_function(
                "(n) => Object.values(window.got).filter((v) => v.length > 0).length >= n", arg=STREAMS)
            got = page.evaluate("window.got")
            assert got == {str(i): [f"to {i}"] for i in range(STREAMS)}
            assert page.evaluate("window.errors") == 0
            # One origin, one HTTP/2 connection: the gateway holds a stream for each.
            assert stack.gw.metrics()["ssegw_streams_open"] >= STREAMS
            page.evaluate("() => window.sources.forEach((es) => es.close())")
        finally:
            browser.close()
