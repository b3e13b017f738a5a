"""The demo: a synthetic ticker publishing into the embedded broker, and a page at ``/``
that shows it live through EventSource (``ssegw serve --demo``)."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import orjson

from .core.publish import parse_publish

SYMBOLS = ("AAPL", "MSFT", "GOOG", "AMZN", "NVDA", "TSLA")
#: The demo's one topic: every symbol is a key of it, so ``since=snapshot`` is the whole board.
TOPIC = "demo.ticker"
#: Ticks per second of the synthetic ticker (all symbols together).
RATE = 10.0

_TEMPLATE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ssegw demo ticker</title>
<style>
body{font:15px/1.4 system-ui,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse;min-width:24rem}td,th{padding:.3rem .8rem;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}.up{color:#080}.down{color:#b00}#status{margin:.8rem 0;color:#555}
</style></head><body>
<h1>ssegw demo ticker</h1>
<p id="status">connecting&hellip;</p>
<table><thead><tr><th>symbol</th><th>price</th><th>change</th><th>last id</th></tr></thead><tbody id="rows"></tbody></table>
<p><small>One topic, one key per symbol, through <code>EventSource('/events?topic=%TOPIC%&amp;since=%SINCE%')</code>:
the whole board at once, then live. Stop the server and start it again: the page reconnects by itself
(a resume the gateway cannot serve ends in <code>ssegw.reset</code>, and the page asks for the board again).</small></p>
<script>
const symbols = %SYMBOLS%;
const rows = document.getElementById('rows'), status = document.getElementById('status');
const cells = {};
for (const s of symbols) {
  const tr = document.createElement('tr');
  tr.innerHTML = `<td>${s}</td><td class="p">&ndash;</td><td class="c">&ndash;</td><td class="i"></td>`;
  rows.appendChild(tr); cells[s] = tr;
}
let count = 0;
window.ticks = 0; window.opened = 0; window.boardAt = null; window.resets = 0; window.compacted = 0;
const url = '/events?topic=%TOPIC%&since=%SINCE%';
function full() { return symbols.every(s => cells[s].querySelector('.i').textContent); }
function onTick(e) {
  const t = JSON.parse(e.data);
  const tr = cells[t.symbol]; if (!tr) return;
  tr.querySelector('.p').textContent = t.price.toFixed(2);
  const c = tr.querySelector('.c'); c.textContent = (t.change >= 0 ? '+' : '') + t.change.toFixed(2);
  c.className = 'c ' + (t.change >= 0 ? 'up' : 'down');
  tr.querySelector('.i').textContent = e.lastEventId;
  window.ticks = ++count;
  if (window.boardAt === null && full()) window.boardAt = performance.now() - window.opened;
  status.textContent = 'live: ' + count + ' ticks received';
}
let es;
function connect() {
  // No Last-Event-ID on a new EventSource: since=%SINCE% gives the current board.  The browser's
  // own reconnects carry Last-Event-ID, which wins over since: a replay, a compacted replay
  // (ssegw.compacted: the newest tick of each symbol that changed) or ssegw.reset.
  es = new EventSource(url);
  es.onopen = () => { window.opened = performance.now(); status.textContent = 'live'; };
  es.onerror = () => { status.textContent = 'reconnecting...'; };
  es.addEventListener('tick', onTick);
  es.addEventListener('ssegw.compacted', () => { window.compacted += 1; });
  es.addEventListener('ssegw.reset', () => {
    // What we hold is stale and the gap cannot be replayed: ask for the board afresh.
    window.resets += 1; es.close();
    for (const s of symbols) cells[s].querySelector('.i').textContent = '';
    window.boardAt = null; connect();
  });
}
connect();
</script></body></html>
""".replace(b"%SYMBOLS%", orjson.dumps(list(SYMBOLS))).replace(b"%TOPIC%", TOPIC.encode())

#: The page, asking for the whole board (``since=snapshot``).
PAGE = _TEMPLATE.replace(b"%SINCE%", b"snapshot")


class Ticker:
    """Publishes a random walk per symbol, ``RATE`` messages per second in total."""

    def __init__(self, worker: Any) -> None:
        self.w = worker
        self.prices = {s: 100.0 + 50 * random.random() for s in SYMBOLS}
        self.i = 0

    def start(self) -> None:
        assert self.w.loop is not None
        # Every symbol once at the start, so the board is complete from the first snapshot.
        self._publish(parse_publish([self._msg(s, 0.0) for s in SYMBOLS], len(SYMBOLS), orjson.dumps))
        self.w.loop.call_later(0.1, self._tick)

    def _msg(self, sym: str, change: float) -> dict[str, object]:
        return {"topic": TOPIC, "event": "tick", "key": sym,
                "data": {"topic": TOPIC, "symbol": sym, "price": round(self.prices[sym], 2),
                         "change": round(change, 4), "ts": time.time()}}

    def _publish(self, msgs: Sequence) -> None:
        w = self.w
        if w.broker.publish_now(msgs) is None:
            w.loop.create_task(self._publish_async(msgs))

    def _tick(self) -> None:
        w = self.w
        if w.draining or w.loop is None:
            return
        sym = SYMBOLS[self.i % len(SYMBOLS)]
        self.i += 1
        old = self.prices[sym]
        new = max(1.0, old * (1 + random.gauss(0, 0.002)))
        self.prices[sym] = new
        self._publish(parse_publish(self._msg(sym, new - old), 1, orjson.dumps))
        w.loop.call_later(1.0 / RATE, self._tick)

    async def _publish_async(self, msgs: Sequence) -> None:
        try:
            await self.w.broker.publish(msgs)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - the demo ticker skips a tick when the broker is down
            pass
