"""The in-memory pub/sub that both baseline servers share: what a Python user writes next to
sse-starlette or aiohttp-sse when following their docs' "broadcast" examples.

- one unbounded ``asyncio.Queue`` per subscriber (the docs' pattern; nothing bounds a slow
  reader's queue -- that is the baseline's behaviour, not a choice made here);
- ids ``b0-<n>`` from one counter, so that the bench's ``seq`` counting reads them like
  ssegw's ``<epoch>-<seq>`` ids;
- a ``deque(maxlen=1000)`` of history per topic, replayed after a ``Last-Event-ID``;
- ``POST /publish`` takes ssegw's body (one message or a JSON array) and answers
  ``{"ids": [...]}``; ``GET /admin/stats`` reports ``streams_open`` in ssegw's shape so that
  the bench's coordinator can wait for every stream (the only bench-specific route).

Each server prints ``serving on http://HOST:PORT (admin http://HOST:PORT)`` on stderr once
its socket listens (bench/common.py's ``Server`` reads the port from it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import socket
import sys
from typing import Any

HISTORY = 1000


class Hub:
    def __init__(self) -> None:
        self.subscribers: dict[str, set[asyncio.Queue[dict[str, str]]]] = collections.defaultdict(set)
        self.history: dict[str, collections.deque[dict[str, str]]] = collections.defaultdict(
            lambda: collections.deque(maxlen=HISTORY))
        self.seq = itertools.count(1)
        self.streams = 0

    def publish(self, body: Any) -> list[str]:
        """Publish one message or a list of them; returns their ids.  Raises KeyError,
        TypeError or ValueError on a malformed message (the app answers 400)."""
        msgs = body if isinstance(body, list) else [body]
        ids = []
        for m in msgs:
            data = m["data"]
            event = {"id": f"b0-{next(self.seq)}",
                     "data": data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))}
            if m.get("event"):
                event["event"] = str(m["event"])
            self.history[m["topic"]].append(event)
            for q in self.subscribers[m["topic"]]:
                q.put_nowait(event)
            ids.append(event["id"])
        return ids

    def subscribe(self, topics: list[str], last_event_id: str | None) -> tuple[asyncio.Queue[dict[str, str]], list]:
        """A queue for the live events of ``topics`` and the history after ``last_event_id``
        (taken in the same step, so nothing is missed or sent twice)."""
        q: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        for t in topics:
            self.subscribers[t].add(q)
        replay: list[dict[str, str]] = []
        if last_event_id and last_event_id.startswith("b0-"):
            after = int(last_event_id[3:])
            replay = sorted((e for t in topics for e in self.history[t] if int(e["id"][3:]) > after),
                            key=lambda e: int(e["id"][3:]))
        self.streams += 1
        return q, replay

    def unsubscribe(self, topics: list[str], q: asyncio.Queue[dict[str, str]]) -> None:
        for t in topics:
            self.subscribers[t].discard(q)
        self.streams -= 1

    def stats(self) -> dict[str, object]:
        return {"workers": [{"streams_open": self.streams}]}


def listen_socket(argv: list[str] | None = None) -> socket.socket:
    """``--host``/``--port`` (0: any free port), bound and listening."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8090)
    args = ap.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(4096)
    host, port = sock.getsockname()
    sys.stderr.write(f"serving on http://{host}:{port} (admin http://{host}:{port})\n")
    sys.stderr.flush()
    return sock
