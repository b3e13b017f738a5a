"""The demo: a synthetic ticker publishing into the embedded broker, and a page at ``/``
that shows it live through EventSource (``ssegw serve --demo``)."""

from __future__ import annotations

import random
import time
from typing import Any

import orjson

from .core.publish import parse_publish

SYMBOLS = ("AAPL", "MSFT", "GOOG", "AMZN", "NVDA", "TSLA")
#: Ticks per second of the synthetic ticker (all symbols together).
RATE = 10.0

PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ssegw demo ticker</title>
<style>
body{font:15px/1.4 system-ui,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse;min-width:24rem}td,th{padding:.3rem .8rem;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}.up{color:#080}.down{color:#b00}#status{margin:.8rem 0;color:#555}
</style></head><body>
<h1>ssegw demo ticker</h1>
<p id="status">connecting&hellip;</p>
<table><thead><tr><th>symbol</th><th>price</th><th>change</th><th>last id</th></tr></thead><tbody id="rows"></tbody></table>
<p><small>Live through <code>EventSource('/events?topic=demo.ticker.SYMBOL&amp;since=last')</code>.
Stop the server and start it again: the page reconnects by itself.</small></p>
<script>
const symbols = %SYMBOLS%;
const rows = document.getElementById('rows'), status = document.getElementById('status');
const cells = {};
for (const s of symbols) {
  const tr = document.createElement('tr');
  tr.innerHTML = `<td>${s}</td><td class="p">&ndash;</td><td class="c">&ndash;</td><td class="i"></td>`;
  rows.appendChild(tr); cells['demo.ticker.' + s] = tr;
}
let count = 0;
window.ticks = 0;
const qs = symbols.map(s => 'topic=demo.ticker.' + s).join('&');
const es = new EventSource('/events?' + qs + '&since=last');
es.onopen = () => { status.textContent = 'live'; };
es.onerror = () => { status.textContent = 'reconnecting...'; };
es.addEventListener('tick', (e) => {
  const t = JSON.parse(e.data);
  const tr = cells[t.topic]; if (!tr) return;
  tr.querySelector('.p').textContent = t.price.toFixed(2);
  const c = tr.querySelector('.c'); c.textContent = (t.change >= 0 ? '+' : '') + t.change.toFixed(2);
  c.className = 'c ' + (t.change >= 0 ? 'up' : 'down');
  tr.querySelector('.i').textContent = e.lastEventId;
  window.ticks = ++count;
  status.textContent = 'live: ' + count + ' ticks received';
});
</script></body></html>
""".replace(b"%SYMBOLS%", orjson.dumps(list(SYMBOLS)))


class Ticker:
    """Publishes a random walk per symbol, ``RATE`` messages per second in total."""

    def __init__(self, worker: Any) -> None:
        self.w = worker
        self.prices = {s: 100.0 + 50 * random.random() for s in SYMBOLS}
        self.i = 0

    def start(self) -> None:
        assert self.w.loop is not None
        self.w.loop.call_later(0.1, self._tick)

    def _tick(self) -> None:
        w = self.w
        if w.draining or w.loop is None:
            return
        sym = SYMBOLS[self.i % len(SYMBOLS)]
        self.i += 1
        old = self.prices[sym]
        new = max(1.0, old * (1 + random.gauss(0, 0.002)))
        self.prices[sym] = new
        topic = "demo.ticker." + sym
        msg = {"topic": topic, "event": "tick", "key": sym,
               "data": {"topic": topic, "symbol": sym, "price": round(new, 2),
                        "change": round(new - old, 4), "ts": time.time()}}
        msgs = parse_publish(msg, 1, orjson.dumps)
        if w.broker.publish_now(msgs) is None:
            w.loop.create_task(self._publish_async(msgs))
        w.loop.call_later(1.0 / RATE, self._tick)

    async def _publish_async(self, msgs: list) -> None:
        try:
            await self.w.broker.publish(msgs)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - the demo ticker skips a tick when the broker is down
            pass
