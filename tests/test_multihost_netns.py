"""Two gateway hosts on one Redis, where host A really is another host: its own network
namespace (own IP, own TCP stack) joined to ours by a veth pair, reaching Redis over that
link.  Host B is a supervisor in our namespace on 127.0.0.1.  Both run ``--workers 2``.

- Cross-host fan-out: subscribers on A and B get every event published on either host,
  once, in order, with the same ids; ``/admin/topics/NAME`` on either host counts both.
- A vanishes from the network (its link goes down: no FIN, no RST) while B keeps
  publishing: A's clients notice the heartbeat silence, reconnect to B with their
  ``Last-Event-ID`` and get exactly what they missed; B stops counting A's subscribers
  within the presence TTL.  A notices that Redis is gone (its ``/readyz`` turns 503).
- A's link comes back: A reconnects to Redis (``/readyz`` 200), a subscriber that stayed
  connected to A inside its namespace through the outage gets the events of the outage
  from A's gap fill, and a new subscriber on A resumes exactly from an id of before the
  outage.  B counts that surviving subscriber again (A rewrites its expired presence).

The tests of this module run in order and share the two hosts (the later ones continue the
outage of the earlier ones).  Needs root, iproute2 and redis-server."""

from __future__ import annotations

import binascii
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid

import jwt
import pytest
from checks import ids, stop_supervised, uniq
from checks import topic_subscribers as subscribers
from checks import worker_stats as stats
from harness import Gateway, Response, Stream, dechunk, request, wait_until
from redis_harness import RedisServer
from sse_parser import Ev, Parser

from ssegw.broker.redis_presence import PRESENCE_TTL_MS

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 for a network namespace")

#: Heartbeat interval of both hosts (s); a client calls a stream dead after 3 of them silent.
HB = 1.0
SILENCE = 3 * HB
PRESENCE_TTL = PRESENCE_TTL_MS / 1000
#: Host A's ports, inside its own namespace (nothing else listens there).
A_PORT, A_ADMIN_PORT = 18080, 18081
#: Auth on, as between real hosts (unauthenticated publishing is for loopback only).
SECRET = "netns-multihost-test-secret-0123456789"
PUBLISH_KEY = "netns-multihost-publish-key"
PUB = {"Authorization": f"Bearer {PUBLISH_KEY}"}
SUB = {"Authorization": "Bearer " + jwt.encode({"ssegw": {"subscribe": [">"]}}, SECRET, "HS256")}
COMMON = ("--workers", "2", "--heartbeat-interval", f"{HB:g}s", "--drain-timeout", "1s",
          "--flush-interval", "10ms", "--retry", "200ms",
          "--auth-jwt-secret", SECRET, "--auth-publish-keys", PUBLISH_KEY)

#: What the tests hand on to the next ones (they continue one outage).
STATE: dict[str, object] = {}


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=10)


# -- the network -------------------------------------------------------------------------


class Net:
    """A namespace ``ns`` whose veth end ``ns_if`` has ``ns_ip``; our end ``host_if`` has ``host_ip``."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns, self.host_if, self.ns_if = f"ssegwmh{tag}", f"smh{tag}h", f"smh{tag}n"
        octet = int(tag[:2], 16) % 250 + 1
        self.host_ip, self.ns_ip = f"10.232.{octet}.1", f"10.232.{octet}.2"
        self.is_up = False

    def create(self) -> Net:
        run("ip", "netns", "add", self.ns)
        run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        run("ip", "link", "set", self.ns_if, "netns", self.ns)
        run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        run("ip", "link", "set", self.host_if, "up")
        self.inside("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        self.inside("ip", "link", "set", "lo", "up")
        self.up()
        return self

    def inside(self, *args: str) -> None:
        run("ip", "netns", "exec", self.ns, *args)

    def down(self) -> None:
        """A's cable is pulled: its packets and ours vanish, nobody sends FIN or RST."""
        self.inside("ip", "link", "set", self.ns_if, "down")
        self.is_up = False

    def up(self) -> None:
        self.inside("ip", "link", "set", self.ns_if, "up")
        self.is_up = True

    def destroy(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=10)


# -- host A: a supervisor inside the namespace -------------------------------------------------


class NetStream(Stream):
    """``harness.Stream`` to any address (the harness one connects to 127.0.0.1)."""

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str] | None = None,
                 timeout: float = 10.0) -> None:
        self.open(socket.create_connection((host, port), timeout=timeout), host, port, path, headers, timeout)


class NetnsGateway(Gateway):
    """``ssegw serve`` run with ``ip netns exec NS``, listening on the namespace's address."""

    def __init__(self, net: Net, *args: str) -> None:
        # Later flags win: these override the harness's --port 0 --admin-port 0.
        super().__init__("--host", net.ns_ip, "--port", str(A_PORT), "--admin-host", net.ns_ip,
                         "--admin-port", str(A_ADMIN_PORT), *args)
        self.net = net
        self.host = net.ns_ip
        self.prefix = ["ip", "netns", "exec", net.ns]

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                admin: bool = False, timeout: float = 10.0) -> Response:
        return request(self.admin_port if admin else self.port, method, path, body, headers, timeout,
                       host=self.host)

    def stream(self, path: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> Stream:
        return NetStream(self.host, self.port, path, headers, timeout)


# -- helpers -----------------------------------------------------------------------------------


def ready(g: Gateway) -> bool:
    try:
        if g.request("GET", "/readyz", admin=True, timeout=2).status != 200:
            return False
        ws = stats(g)
        return len(ws) == 2 and all(w["broker"]["up"] for w in ws)
    except OSError:
        return False


def wait_count(g: Gateway, topic: str, n: int, timeout: float) -> int | None:
    seen: list[int | None] = [None]

    def ok() -> bool:
        seen[0] = subscribers(g, topic)
        return seen[0] == n

    wait_until(ok, timeout, 0.1)
    return seen[0]


def sub(g: Gateway, path: str, last: str | None = None) -> Stream:
    """A subscriber (with its token; resuming after ``last`` if given), answered 200."""
    s = g.stream(path, {**SUB, "Last-Event-ID": last} if last is not None else SUB)
    assert s.status == 200, s.error_body
    return s


def publish(g: Gateway, topic: str, data: str) -> str:
    r = g.publish({"topic": topic, "data": data}, PUB)
    assert r.status == 200, r
    return r.json()["ids"][0]


def seq(event_id: str) -> tuple[str, int]:
    epoch, _, n = event_id.rpartition("-")
    return epoch, int(n)


def wanted(published: list[tuple[str, str, str]], topics: set[str], after: str | None = None) -> list[str]:
    """Ids of ``published`` (id, topic, data) on ``topics``, those after ``after`` only if given."""
    out = [i for i, t, _ in published if t in topics]
    return out[out.index(after) + 1:] if after is not None else out


def resets(evs: list[Ev]) -> list[Ev]:
    return [e for e in evs if e.event == "ssegw.reset"]


class Publisher(threading.Thread):
    """Publishes through ``g`` every ``period`` s, cycling over ``topics``; records (id, topic, data)."""

    def __init__(self, g: Gateway, topics: list[str], period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.g, self.topics, self.period = g, topics, period
        self.halt = threading.Event()
        self.sent: list[tuple[str, str, str]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.halt.is_set() and n < 5000:
            topic, data = self.topics[n % len(self.topics)], f"p{n}"
            n += 1
            try:
                r = self.g.publish({"topic": topic, "data": data}, PUB)
            except OSError as e:
                self.errors.append(repr(e))
            else:
                if r.status == 200:
                    self.sent.append((r.json()["ids"][0], topic, data))
                else:
                    self.errors.append(repr(r))
            self.halt.wait(self.period)

    def finish(self) -> list[tuple[str, str, str]]:
        self.halt.set()
        self.join(5)
        assert not self.is_alive()
        assert not self.errors, self.errors[:5]
        return self.sent


# -- a subscriber inside A's namespace (it stays connected to A through the outage) ------------

WITNESS = r"""
import binascii, select, socket, sys, time
host, port, path, life, auth = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5]
s = socket.create_connection((host, port), timeout=5)
s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
          f"Authorization: {auth}\r\n\r\n".encode())
print("connected", flush=True)
deadline = time.monotonic() + life
while time.monotonic() < deadline:
    r, _, _ = select.select([s, sys.stdin], [], [], 1.0)
    if sys.stdin in r and not sys.stdin.readline():
        break
    if s in r:
        try:
            data = s.recv(65536)
        except OSError as e:
            print("error", e, flush=True)
            break
        if not data:
            print("eof", flush=True)
            break
        print("data", binascii.hexlify(data).decode(), flush=True)
s.close()
"""

READYZ_POLL = r"""
import socket, sys, time
host, port, want, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
t0 = time.monotonic()
while time.monotonic() - t0 < limit:
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            s.settimeout(2)
            status = int(s.recv(4096).split(b" ")[1])
    except (OSError, ValueError, IndexError):
        status = 0
    if status == want:
        print(f"{status} {time.monotonic() - t0:.2f}", flush=True)
        sys.exit(0)
    time.sleep(0.1)
print("timeout", flush=True)
"""


class Witness:
    """A raw-socket subscriber run inside the namespace; it pipes the bytes it gets back to us."""

    def __init__(self, net: Net, port: int, path: str, life: float = 150.0) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", net.ns, sys.executable, "-c", WITNESS, net.ns_ip, str(port), path, str(life),
             SUB["Authorization"]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.raw = bytearray()
        self.end = ""
        self.connected = threading.Event()
        self.last_rx = time.monotonic()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            kind, _, rest = line.strip().partition(" ")
            if kind == "connected":
                self.connected.set()
            elif kind == "data":
                self.raw += binascii.unhexlify(rest)
                self.last_rx = time.monotonic()
            else:
                self.end = line.strip()

    def parsed(self) -> tuple[int, list[Ev]]:
        data = bytes(self.raw)
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return 0, []
        status = int(head.split(b" ")[1])
        payload = dechunk(rest)[0] if b"transfer-encoding: chunked" in head.lower() else rest
        p = Parser()
        p.feed(payload.decode("utf-8", errors="replace"))
        return status, p.events

    def events(self) -> list[Ev]:
        return self.parsed()[1]

    def wait_for_id(self, event_id: str, timeout: float) -> bool:
        return wait_until(lambda: event_id in ids(self.events()) or bool(self.end), timeout, 0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None and not f.closed:
                f.close()


def ns_python(net: Net, code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", net.ns, sys.executable, "-c", code, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=5)
    return out.strip()


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net():
    n = Net()
    try:
        n.create()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, FileNotFoundError) as e:
        n.destroy()
        pytest.skip(f"cannot make a network namespace here: {e}")
    yield n
    n.destroy()


@pytest.fixture(scope="module")
def redis(net, tmp_path_factory):
    """One redis-server listening on loopback and on our end of the veth link."""
    r = RedisServer(tmp_path_factory.mktemp("redis"),
                    extra=("--bind", "127.0.0.1", net.host_ip, "--protected-mode", "no"))
    r.start()
    try:
        with socket.create_connection((net.host_ip, r.port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            assert s.recv(64).startswith(b"+PONG")
        yield r
    finally:
        r.kill()


@pytest.fixture(scope="module")
def hosts(net, redis):
    a = NetnsGateway(net, "--redis", f"redis://{net.host_ip}:{redis.port}/0", *COMMON)
    b = Gateway("--redis", redis.url, *COMMON)
    made: list[Gateway] = []
    try:
        for g in (a, b):
            g.start()
            made.append(g)
        for g in made:
            assert wait_until(lambda g=g: ready(g), 15, 0.1), "host not ready:\n" + "".join(g.log)
        yield a, b
    finally:
        witness = STATE.get("witness")
        if isinstance(witness, Witness):
            witness.stop()
        STATE.clear()
        if not net.is_up:
            net.up()  # let A leave Redis cleanly
        for g in made:
            stop_supervised(g)


# -- 1. fan-out and presence across hosts ------------------------------------------------------------


def test_cross_host_fanout_same_ids_and_presence(hosts):
    a, b = hosts
    t1, t2 = uniq("xh1"), uniq("xh2")
    both = f"/events?topic={t1}&topic={t2}"
    streams: dict[str, list[Stream]] = {
        "a_both": [sub(a, both) for _ in range(3)],
        "a_t1": [sub(a, f"/events?topic={t1}") for _ in range(2)],
        "b_both": [sub(b, both) for _ in range(2)],
        "b_t2": [sub(b, f"/events?topic={t2}")],
    }
    every = [s for group in streams.values() for s in group]
    try:
        for s in every:
            assert s.status == 200, s.error_body
        # Cluster-wide presence, asked of either host: t1 = 3 + 2 on A + 2 on B, t2 = 3 + 2 + 1.
        for g in (a, b):
            assert wait_count(g, t1, 7, 3.5) == 7
            assert wait_count(g, t2, 6, 3.5) == 6

        # Publish alternately on A and on B, alternating topics every two.
        sent: list[tuple[str, str, str]] = []
        for i in range(12):
            g, topic = (a, b)[i % 2], (t1, t2)[i // 2 % 2]
            data = f"{'ab'[i % 2]}{i}"
            sent.append((publish(g, topic, data), topic, data))
        all_ids = [i for i, _, _ in sent]
        # One Redis, one sequence: the ids from both hosts form one increasing series.
        assert len({seq(i)[0] for i in all_ids}) == 1
        assert [seq(i)[1] for i in all_ids] == sorted({seq(i)[1] for i in all_ids})

        for key, group in streams.items():
            topics = {t1, t2} if key.endswith("both") else {t1} if key.endswith("t1") else {t2}
            want = [(i, d) for i, t, d in sent if t in topics]
            for s in group:
                s.wait_events(len(want), 5)
                assert [(e.id, e.data) for e in s.events] == want, key
                assert not resets(s.events)
        # The same event has the same id on both hosts.
        assert ids(streams["a_both"][0]) == ids(streams["b_both"][0]) == all_ids
        for g in (a, b):
            assert sum(w["events_delivered"] for w in stats(g)) > 0
    finally:
        for s in every:
            s.close()
    for g in (a, b):
        assert wait_count(g, t1, 0, 3.5) == 0


# -- 2. host A vanishes from the network ---------------------------------------------------------------


def test_host_a_black_holed_its_clients_resume_on_b(net, hosts):
    a, b = hosts
    t1, t2, tw = uniq("bh1"), uniq("bh2"), uniq("bhw")
    both = f"/events?topic={t1}&topic={t2}"
    on_a = [sub(a, both) for _ in range(4)]
    on_b = [sub(b, both) for _ in range(2)]
    # A subscriber inside A's namespace: the outage does not cut it from A (test 3).
    witness = Witness(net, a.port, f"/events?topic={t1}&topic={tw}")
    resumed: dict[int, Stream] = {}  # by index in on_a
    pub = Publisher(b, [t1, t2, tw])
    poll: subprocess.Popen[str] | None = None
    try:
        assert witness.connected.wait(10), "the subscriber inside the namespace did not connect"
        for s in on_a + on_b:
            assert s.status == 200, s.error_body
        assert wait_until(lambda: witness.parsed()[0] == 200, 5, 0.05), witness.raw[:300]
        # Presence before: t1 = 4 (A) + 1 (witness on A) + 2 (B); tw = the witness.
        assert wait_count(b, t1, 7, 3.5) == 7
        assert wait_count(b, tw, 1, 3.5) == 1
        assert wait_count(a, t1, 7, 3.5) == 7

        pub.start()
        last_rx = {id(s): time.monotonic() for s in on_a}

        def pump_all(limit: float) -> None:
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline:
                for s in on_a:
                    if not s.closed and s.pump(0):
                        last_rx[id(s)] = time.monotonic()
                for s in on_b + list(resumed.values()):
                    s.pump(0)
                time.sleep(0.01)

        # Everyone is receiving (through A for A's clients) before the link goes down.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (len(pub.sent) >= 20 and all(len(s.events) >= 5 for s in on_a)):
            pump_all(0.05)
        assert all(len(s.events) >= 5 for s in on_a), [len(s.events) for s in on_a]
        pump_all(0.1)

        net.down()
        t_down = time.monotonic()
        poll = ns_python(net, READYZ_POLL, net.ns_ip, str(a.admin_port), "503", "20")

        # A's clients see silence: after 3 heartbeats they close and resume on B from their last id.
        detected: dict[int, float] = {}
        eof_before: list[int] = []
        deadline = t_down + SILENCE + 5
        while time.monotonic() < deadline and len(detected) < len(on_a):
            pump_all(0.05)
            now = time.monotonic()
            for k, s in enumerate(on_a):
                if k in detected:
                    continue
                if s.closed:
                    eof_before.append(k)  # FIN or RST from a host that is not there
                if now - last_rx[id(s)] > SILENCE:
                    detected[k] = now - t_down
                    last = s.events[-1].id
                    s.close()
                    resumed[k] = sub(b, both, last)
        assert not eof_before, f"A's streams {eof_before} saw an end while A was cut off"
        assert len(detected) == len(on_a), f"silence noticed by {len(detected)} of {len(on_a)} clients"
        assert all(SILENCE - 0.5 <= d <= SILENCE + 3 for d in detected.values()), detected

        # Until A's presence expires, B counts A's dead subscribers and the resumed ones.
        assert wait_count(b, t1, 11, 3.5) == 11
        # Within the presence TTL of A's last refresh, B stops counting A (4 dead + the witness).
        left = PRESENCE_TTL + 3 - (time.monotonic() - t_down)
        assert wait_count(b, t1, 6, max(left, 0.5)) == 6, f"{time.monotonic() - t_down:.1f}s after the link went down"
        expired = time.monotonic() - t_down
        assert PRESENCE_TTL - 3 <= expired <= PRESENCE_TTL + 3, expired
        assert subscribers(b, tw) == 0

        # A noticed that Redis went away (asked from inside its namespace).
        status = finish(poll, 25)
        poll = None
        assert status.startswith("503 "), f"A's /readyz never said 503 while cut off from Redis: {status!r}"

        sent = pub.finish()
        sent.append((publish(b, t1, "last"), t1, "last"))
        pump_all(0.05)
        # Each resumed client got exactly what it missed: none lost, none twice, in order.
        for k, old in enumerate(on_a):
            new = resumed[k]
            assert new.wait_for(lambda x: sent[-1][0] in ids(x), 5)
            assert ids(old) + ids(new) == wanted(sent, {t1, t2}), (len(ids(old)), len(ids(new)))
            assert [e.data for e in old.events + new.events] == [d for _, t, d in sent if t in (t1, t2)]
            assert not resets(new.events)
        # B's own clients lost nothing either.
        for s in on_b:
            assert s.wait_for(lambda x: sent[-1][0] in ids(x), 5)
            assert ids(s) == wanted(sent, {t1, t2})
        # The subscriber inside A's namespace is still connected to A (test 3 checks what it got).
        assert not witness.end, witness.end
        STATE.update(t1=t1, t2=t2, tw=tw, sent=sent, witness=witness, a_last=on_a[0].events[-1].id,
                     before=ids(on_a[0]))
    finally:
        pub.halt.set()
        if poll is not None:
            finish(poll, 1)
        for s in on_a + on_b + list(resumed.values()):
            s.close()
        if "witness" not in STATE:
            witness.stop()


# -- 3. host A comes back --------------------------------------------------------------------------------


def outage() -> dict[str, object]:
    if "witness" not in STATE:
        pytest.skip("continues the outage of test_host_a_black_holed_its_clients_resume_on_b")
    return STATE


def test_host_a_back_fills_its_gap_and_resumes_exactly(net, hosts):
    a, b = hosts
    st = outage()
    t1, t2, tw = str(st["t1"]), str(st["t2"]), str(st["tw"])
    witness: Witness = st["witness"]  # type: ignore[assignment]
    sent: list[tuple[str, str, str]] = st["sent"]  # type: ignore[assignment]
    gaps_before = [w["broker"]["gap_events"] for w in stats(b)]
    s = None
    try:
        net.up()
        t_up = time.monotonic()
        # A finds Redis again: /readyz 200, asked from our namespace.
        assert wait_until(lambda: ready(a), 15, 0.1), "host A never got Redis back:\n" + "".join(a.log[-20:])
        took = time.monotonic() - t_up
        assert took < 10, f"A took {took:.1f}s to get Redis back"
        assert a.request("GET", "/readyz", admin=True).json() == {"status": "ready"}
        ws = stats(a)
        assert all(w["broker"]["gap_lost"] == 0 for w in ws), ws
        assert sum(w["broker"]["gap_events"] for w in ws) > 0, "A filled no gap"
        assert [w["broker"]["gap_events"] for w in stats(b)] == gaps_before  # B never lost Redis

        # More events, through both hosts now.
        for i in range(6):
            g, topic = (a, b)[i % 2], (t1, t2, tw)[i % 3]
            sent.append((publish(g, topic, f"back{i}"), topic, f"back{i}"))
        sent.append((publish(a, tw, "end"), tw, "end"))

        # The subscriber that stayed connected to A through the outage: every event of its
        # topics, those of the outage filled from Redis history, once, in order, no reset.
        assert witness.wait_for_id(sent[-1][0], 10), (witness.end, len(witness.events()))
        evs = witness.events()
        assert not witness.end, witness.end
        assert not resets(evs)
        assert ids(evs) == wanted(sent, {t1, tw})
        assert [e.data for e in evs] == [d for _, t, d in sent if t in (t1, tw)]

        # A new subscriber on A resumes from an id of before the outage: exactly the rest.
        s = sub(a, f"/events?topic={t1}&topic={t2}", str(st["a_last"]))
        want = wanted(sent, {t1, t2}, after=str(st["a_last"]))
        s.wait_events(len(want), 5)
        assert not resets(s.events)
        assert ids(s) == want
        assert list(st["before"]) + ids(s) == wanted(sent, {t1, t2})  # type: ignore[call-overload]
    finally:
        if s is not None:
            s.close()


def presence_dump(r: RedisServer) -> str:
    """What Redis holds of presence (for failure messages): each worker's hash and score."""
    keys = r.command("KEYS", "*presence*").decode(errors="replace").split("\r\n")[2::2]
    out = [f"workers: {r.command('ZRANGE', '{ssegw:0}:workers', '0', '-1', 'WITHSCORES')!r}"]
    out += [f"{k}: {r.command('HGETALL', k)!r}" for k in keys if k]
    return "\n".join(out)


def test_host_a_back_counts_its_subscribers_again(hosts, redis):
    """The witness kept its stream on A through an outage longer than the presence TTL; once
    A is back, B must count it again."""
    a, b = hosts
    st = outage()
    tw = str(st["tw"])
    witness: Witness = st["witness"]  # type: ignore[assignment]
    try:
        assert not witness.end, witness.end
        assert wait_until(lambda: ready(a), 15, 0.1)
        seen = wait_count(b, tw, 1, 5)
        assert seen == 1, (f"B counts {seen} subscribers of {tw}; A has one, connected through the outage\n"
                           + presence_dump(redis))
    finally:
        witness.stop()
        STATE.pop("witness", None)
