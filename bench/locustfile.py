"""Locust load test for ssegw (and for any SSE server that takes ssegw's ``POST /publish`` body).

    pip install -e '.[bench]'
    locust -f bench/locustfile.py --host http://127.0.0.1:8080                        # web UI, :8089
    locust -f bench/locustfile.py --host http://127.0.0.1:8080 --headless -u 200 -r 50 -t 30s --csv out/ssegw
    locust -f bench/locustfile.py --host ... --master --expect-workers 2 ...          # distributed:
    locust -f bench/locustfile.py --worker --master-host 127.0.0.1                     # one per core

What Locust's statistics show:

- ``SSE <name>``: one entry **per received event**, ``response_time`` = receive time minus the
  publish time the publisher put into the event's data (ms; both on one machine's clock, so in
  a distributed run keep the clocks in sync or read only the relative figures); ``<name>`` is
  the topic (``user.*`` for per-user topics, ``churn:`` / ``slow:`` prefixes for those users).
  Failures of the same name: ``gap`` (events missing between two received ones of one
  publisher on one topic), ``duplicate`` (an event received twice or out of order), ``reset``
  (the gateway said history no longer covers a resume: ``ssegw.reset``).
- ``CONNECT <name>``: time to the response head of each subscribe (reconnects included);
  a failure for a refused or non-200 subscribe.
- ``POST publish`` / ``POST publish batch``: the publishers' requests (geventhttpclient).

How gaps are found: each publisher numbers its messages per topic (``"n"``) and names itself
(``"s"``), next to the publish time (``"t"``) in the event data; a subscriber checks that ``n``
grows by one for every (publisher, topic) it hears from, across reconnects too (churn users
resume with ``Last-Event-ID``).  A publish answered with anything but 200 gives its numbers
back, so only events the gateway accepted are expected.

Locust runs on gevent: the subscribers here are raw sockets with an incremental parser (the
chunked body is de-framed and split into events as it arrives; one regex per event for the
publish stamp).  The per-event cost is dominated by Locust's own statistics (one request
event per SSE event): see bench/README.md for how many events/s and streams one Locust
process handles, and when to use ``python -m bench run`` instead.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import socket
import time
from urllib.parse import quote, urlsplit

import gevent
from locust import FastHttpUser, User, between, constant, events, task

# The publisher's stamp, first in each event's data: {"t":<time.time()>,"s":"<publisher>/<topic>","n":<seq>
STAMP = re.compile(rb'\{"t":([0-9.]+),"s":"([^"]+)","n":(\d+)')
PAD = b"x" * 60
_publishers = itertools.count()
_directed = itertools.count()


@events.init_command_line_parser.add_listener
def _options(parser) -> None:  # type: ignore[no-untyped-def]
    parser.add_argument("--ssegw-rate", type=float, default=10.0,
                        help="POST /publish requests per second of each publisher user (a batch is one request)")
    parser.add_argument("--ssegw-batch", type=int, default=10, help="messages per batch request")
    parser.add_argument("--ssegw-directed-topics", type=int, default=100,
                        help="per-user topics user.0 … user.N-1 (directed subscribers and publisher)")
    parser.add_argument("--ssegw-inject-gap", action="store_true", default=False, include_in_web_ui=False,
                        help="self-check: publishers skip one sequence number, so subscribers must report a gap")


def option(env, name: str, default):  # type: ignore[no-untyped-def]
    opts = getattr(env, "parsed_options", None)
    return getattr(opts, name, default) if opts is not None else default


class SequenceError(Exception):
    """A gap or a duplicate in a publisher's numbering: a lost or repeated event."""


class ResetError(Exception):
    """``event: ssegw.reset``: history did not cover a resume."""


class Stream:
    """One SSE response on a plain (gevent-patched) socket.

    ``feed`` de-frames a chunked body (or passes a close-delimited one through) and
    ``events`` returns the complete events buffered so far as (id, event, data) -- only the
    bytes of new reads are looked at, never the whole stream again."""

    __slots__ = ("sock", "raw", "body", "chunked", "left", "skip", "done")

    def __init__(self, host: str, port: int, path: str, last_id: str | None, rcvbuf: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        head = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
        if last_id:
            head += f"Last-Event-ID: {last_id}\r\n"
        self.sock.sendall((head + "\r\n").encode())
        self.raw = self.body = b""
        self.chunked = False
        self.left = self.skip = 0
        self.done = False

    def head(self) -> int:
        """Read the response head; returns the status code."""
        while b"\r\n\r\n" not in self.raw:
            data = self.sock.recv(16384)
            if not data:
                raise ConnectionError("closed before the response head")
            self.raw += data
        head, _, rest = self.raw.partition(b"\r\n\r\n")
        self.chunked = b"\r\ntransfer-encoding: chunked" in head.lower()
        self.raw = b""
        self.feed(rest)
        return int(head[9:12])

    def feed(self, data: bytes) -> None:
        if not self.chunked:
            self.body += data
            return
        raw = self.raw + data
        n, i, out = len(raw), 0, []
        while i < n:
            if self.skip:  # the CRLF after a chunk's data
                k = min(self.skip, n - i)
                self.skip -= k
                i += k
                continue
            if not self.left:
                j = raw.find(b"\r\n", i)
                if j < 0:
                    break
                size = int(raw[i:j].split(b";", 1)[0], 16)
                i = j + 2
                if size == 0:
                    self.done = True
                    break
                self.left = size
            k = min(self.left, n - i)
            out.append(raw[i:i + k])
            self.left -= k
            i += k
            if not self.left:
                self.skip = 2
        self.raw = raw[i:]
        self.body += b"".join(out)

    def events(self) -> list[tuple[bytes | None, bytes | None, bytes]]:
        buf = self.body
        if b"\r" in buf:  # CRLF or CR line ends: make them LF (a CR last may be half a CRLF)
            hold = buf.endswith(b"\r")
            buf = (buf[:-1] if hold else buf).replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if hold else b"")
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.body = buf
            return []
        self.body = buf[end + 2:]
        out = []
        for block in buf[:end].split(b"\n\n"):
            eid = name = None
            data: list[bytes] = []
            for line in block.split(b"\n"):
                field, _, value = line.partition(b":")
                value = value[1:] if value[:1] == b" " else value
                if field == b"data":
                    data.append(value)
                elif field == b"id":
                    eid = value
                elif field == b"event":
                    name = value
            if data or eid is not None:
                out.append((eid, name, b"\n".join(data)))
        return out

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:  # already gone
            pass


class SSEUser(User):
    """A subscriber: one stream at a time on ``topics``; reconnects with ``Last-Event-ID``
    when the stream ends (or, with ``hold``, after a random time in that range: churn)."""

    abstract = True
    topics: list[str] = ["ticker"]
    stat_name = ""                       # Locust's name for the events; default: the topics
    hold: tuple[float, float] | None = None
    stall: tuple[float, float] | None = None  # (every, for): stop reading for `for` s every `every` s
    rcvbuf = 0                           # SO_RCVBUF before connect (0: the kernel's default)
    wait_time = constant(0)              # between a stream's end and the reconnect

    def on_start(self) -> None:
        u = urlsplit(self.host or "http://127.0.0.1:8080")
        self.addr = (u.hostname or "127.0.0.1", u.port or 80)
        self.last_id: str | None = None
        self.seen: dict[bytes, int] = {}
        self.my_topics = self.pick_topics()
        self.name = self.stat_name or ",".join(self.my_topics)
        self.path = "/events?" + "&".join("topic=" + quote(t, safe="") for t in self.my_topics)
        self.fire = self.environment.events.request.fire

    def pick_topics(self) -> list[str]:
        return list(self.topics)

    @task
    def listen(self) -> None:
        t0 = time.time()
        try:
            stream = Stream(*self.addr, self.path, self.last_id, self.rcvbuf)
            status = stream.head()
        except OSError as e:
            self.fire(request_type="CONNECT", name=self.name, response_time=(time.time() - t0) * 1000,
                      response_length=0, exception=e, context={})
            return
        if status != 200:
            stream.close()
            self.fire(request_type="CONNECT", name=self.name, response_time=(time.time() - t0) * 1000,
                      response_length=0, exception=ConnectionError(f"HTTP {status}"), context={})
            return
        self.fire(request_type="CONNECT", name=self.name, response_time=(time.time() - t0) * 1000,
                  response_length=0, exception=None, context={})
        try:
            self.read(stream)
        finally:
            stream.close()

    def read(self, stream: Stream) -> None:
        end = time.monotonic() + random.uniform(*self.hold) if self.hold else None
        next_stall = time.monotonic() + self.stall[0] if self.stall else None
        stream.sock.settimeout(None)
        self.on_events(stream.events())
        while not stream.done:
            now = time.monotonic()
            if end is not None:
                if now >= end:
                    return
                stream.sock.settimeout(end - now)
            if next_stall is not None and now >= next_stall:
                assert self.stall is not None
                gevent.sleep(self.stall[1])
                next_stall = time.monotonic() + self.stall[0]
            try:
                data = stream.sock.recv(65536)
            except TimeoutError:
                return
            except OSError as e:  # reset by the gateway (e.g. a slow reader dropped): reconnect
                self.fire(request_type="CONNECT", name=self.name, response_time=0, response_length=0,
                          exception=e, context={})
                return
            if not data:
                return
            stream.feed(data)
            self.on_events(stream.events())

    def on_events(self, evs: list[tuple[bytes | None, bytes | None, bytes]]) -> None:
        if not evs:
            return
        now = time.time()
        fire, name, seen = self.fire, self.name, self.seen
        for eid, ev, data in evs:
            if eid is not None:
                self.last_id = eid.decode()
            if ev == b"ssegw.reset":
                seen.clear()  # no replay for those topics: numbering restarts from what comes next
                fire(request_type="SSE", name=name, response_time=0, response_length=len(data),
                     exception=ResetError("reset"), context={})
                continue
            m = STAMP.match(data)
            if m is None:  # not from our publishers (e.g. the demo ticker): not timed
                continue
            key, n = m.group(2), int(m.group(3))
            last = seen.get(key)
            if last is not None and n != last + 1:
                fire(request_type="SSE", name=name, response_time=0, response_length=0, context={},
                     exception=SequenceError("duplicate" if n <= last else "gap"))
                if n <= last:
                    continue
            seen[key] = n
            fire(request_type="SSE", name=name, response_time=(now - float(m.group(1))) * 1000,
                 response_length=len(data), exception=None, context={})


class TickerUser(SSEUser):
    """Fan-out: every one of these reads the same ticker topic."""

    weight = 10
    topics = ["ticker"]


class DirectedUser(SSEUser):
    """Per-user push: each user reads its own topic ``user.<k>`` (k cycles over
    ``--ssegw-directed-topics``)."""

    weight = 4
    stat_name = "user.*"

    def pick_topics(self) -> list[str]:
        return [f"user.{next(_directed) % option(self.environment, 'ssegw_directed_topics', 100)}"]


class ChurnUser(SSEUser):
    """Reconnect churn: holds the ticker stream 1–4 s, closes it, and resumes with
    ``Last-Event-ID`` after 0.1–1 s; every resume must be exact (no gap, no duplicate)."""

    weight = 2
    topics = ["ticker"]
    stat_name = "churn:ticker"
    hold = (1.0, 4.0)
    wait_time = between(0.1, 1.0)


class SlowReaderUser(SSEUser):
    """A slow reader: a 4 KiB receive buffer and a 2 s pause in reading every 5 s.  What it
    receives is reported under its own name; the gateway may drop it (it then resumes)."""

    weight = 1
    topics = ["ticker"]
    stat_name = "slow:ticker"
    stall = (5.0, 2.0)
    rcvbuf = 4096


class PublisherUser(FastHttpUser):
    """Posts single messages and batches to ``POST /publish`` (``--ssegw-rate`` requests/s),
    each event's data stamped with the publish time and this publisher's sequence per topic."""

    abstract = True
    topics: list[str] = ["ticker"]
    headers = {"Content-Type": "application/json"}

    def on_start(self) -> None:
        self.me = f"{os.getpid():x}.{next(_publishers)}".encode()
        self.n: dict[bytes, int] = {}
        self.rate = option(self.environment, "ssegw_rate", 10.0)
        self.batch = option(self.environment, "ssegw_batch", 10)
        self.skip_once = option(self.environment, "ssegw_inject_gap", False)
        self.next_at = time.monotonic()

    def wait_time(self) -> float:
        self.next_at = max(self.next_at + 1.0 / self.rate, time.monotonic() - 1.0)
        return max(0.0, self.next_at - time.monotonic())

    def pick_topic(self) -> bytes:
        return random.choice(self.topics).encode()

    def message(self, topic: bytes) -> bytes:
        n = self.n.get(topic, 0) + 1
        if self.skip_once and n > 20:
            self.skip_once = False
            n += 1  # the self-check: a number nobody will ever receive
        self.n[topic] = n
        return (b'{"topic":"%s","data":{"t":%.6f,"s":"%s/%s","n":%d,"pad":"%s"}}'
                % (topic, time.time(), self.me, topic, n, PAD))

    def post(self, topics: list[bytes], name: str) -> None:
        before = {t: self.n.get(t, 0) for t in topics}
        msgs = [self.message(t) for t in topics]
        body = msgs[0] if len(msgs) == 1 else b"[" + b",".join(msgs) + b"]"
        with self.client.post("/publish", data=body, headers=self.headers, name=name, catch_response=True) as r:
            if r.status_code != 200:
                self.n.update(before)  # nothing of the request was published: reuse the numbers
                r.failure(f"HTTP {r.status_code}")

    @task(3)
    def publish_one(self) -> None:
        self.post([self.pick_topic()], "publish")

    @task(1)
    def publish_batch(self) -> None:
        self.post([self.pick_topic() for _ in range(self.batch)], "publish batch")


class TickerPublisher(PublisherUser):
    fixed_count = 1
    topics = ["ticker"]


class DirectedPublisher(PublisherUser):
    fixed_count = 1

    def on_start(self) -> None:
        super().on_start()
        self.topics = [f"user.{k}" for k in range(option(self.environment, "ssegw_directed_topics", 100))]
