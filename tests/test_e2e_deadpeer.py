"""Dead peers: a client that vanishes from the network (no FIN, no RST) is detected and its
slot freed within a bounded time (TCP_USER_TIMEOUT from heartbeat_interval + heartbeats).

The client lives in a network namespace joined to ours by a veth pair; the test takes the
link down, black-holing it, as a phone losing coverage would.  Needs root and iproute2."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from harness import Gateway, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 for a network namespace")

CLIENT = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"GET /events?topic=dead.t HTTP/1.1\r\nHost: x\r\n\r\n")
s.settimeout(30)
print("connected", flush=True)
try:
    while s.recv(65536):
        pass
except OSError:
    pass
"""


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def netns():
    """A namespace with 10.231.X.2 behind a veth pair whose host end is 10.231.X.1."""
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"ssegw{tag}", f"sg{tag}h", f"sg{tag}n"
    octet = int(tag[:2], 16) % 250 + 1
    host_ip, ns_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"
    try:
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        run("ip", "link", "set", ns_if, "netns", ns)
        run("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        run("ip", "link", "set", host_if, "up")
        run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        run("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot make a network namespace here: {e}")
    yield ns, host_if, ns_if, host_ip
    subprocess.run(["ip", "link", "del", host_if], capture_output=True)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.contextmanager
def subscribed_client(g: Gateway, ns: str, host_ip: str):  # noqa: ANN201
    """The CLIENT script in ``ns``, subscribed to ``dead.t``; killed at the end."""
    client = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, host_ip, str(g.port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "connected", client.stderr.read() if client.stderr else ""
        assert wait_until(lambda: g.stats()["streams_open"] == 1, 5)
        yield client
    finally:
        client.kill()
        client.wait(5)
        for f in (client.stdout, client.stderr):
            if f is not None:
                f.close()


def test_black_holed_client_is_detected_and_its_slot_freed(gateway, netns):
    ns, host_if, ns_if, host_ip = netns
    # heartbeat 1 s -> dead-peer timeout 5 s (the floor): detected within ~1 + 5 s.
    g: Gateway = gateway("--host", host_ip, "--heartbeat-interval", "1s")
    with subscribed_client(g, ns, host_ip):
        # Black-hole the client: its packets and ours vanish, nobody sends FIN or RST.
        run("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "down")
        t0 = time.monotonic()
        assert wait_until(lambda: g.stats()["streams_open"] == 0, 20, 0.2), "the dead peer was never detected"
        took = time.monotonic() - t0
        assert took < 12, f"dead peer detected only after {took:.1f}s"
        assert g.wait_slots(0) == 0


def test_black_holed_client_on_a_conflate_topic_is_detected(gateway, netns):
    """A stream whose every topic conflates is kept while stalled, so the kernel's
    TCP_USER_TIMEOUT is off while its transport is paused (Linux would count a live client's
    zero-window probing against it).  A dead one must still go: the gateway asks TCP_INFO
    (nothing acknowledged for the stall timeout, retransmissions unanswered)."""
    ns, host_if, ns_if, host_ip = netns
    # All addresses: the client comes over the veth, the test publishes over loopback
    # (publishing without auth is for loopback peers only).
    g: Gateway = gateway("--host", "0.0.0.0", "--heartbeat-interval", "1s",
                         config='[[topics]]\npattern = "dead.>"\nslow_consumer = "conflate"\n')
    with subscribed_client(g, ns, host_ip):
        run("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "down")
        t0 = time.monotonic()
        # Keep publishing, so the dead peer's socket fills and its transport pauses (the
        # conflate path); 50 keys of 4 KB each keep what it owes under max_buffer.
        i = 0
        while time.monotonic() - t0 < 25 and g.stats()["streams_open"]:
            g.publish([{"topic": "dead.t", "key": f"k{(i + j) % 50}", "data": "x" * 4000} for j in range(10)])
            i += 10
            time.sleep(0.1)
        took = time.monotonic() - t0
        stats = g.stats()
        assert stats["streams_open"] == 0, f"the dead peer was never detected: {stats['slow_closed']}"
        assert took < 20, f"dead peer detected only after {took:.1f}s"
        # Closed by the gateway's own check (the kernel's timeout is off while paused).
        assert stats["slow_closed"].get("dead_peer") == 1, stats["slow_closed"]
