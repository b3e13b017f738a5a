"""A reconnect storm on a keyed topic: ``python bench/snapshot.py [--clients 1000 --keys 10000]``.

Two runs on fresh gateways (embedded broker, ``--history-size`` = ``--keys`` so that both
replays send the same number of events), each:

With ``--redis`` the gateway uses a throw-away ``redis-server`` (core 1), and the run also
reports how many reads of history and keyed state went to Redis and how many frames replays
encoded (concurrent identical replays share a read, and a frame still held is reused).

1. ``--keys`` messages with distinct keys (``k0``..) of ~80 bytes are published to one topic,
   in batches of 1,000;
2. ``--clients`` subscribers connect at once (one asyncio client process, ``bench/client.py``,
   all connects in flight together) with ``since=snapshot`` in one run, ``since=earliest`` in
   the other, and each counts the events it receives;
3. measured: the time from the storm's start until every client has all ``--keys`` events (the
   client's ``snap`` minimum), the gateway's CPU time over that window (user + system, /proc),
   and its RSS before the storm and at its peak (sampled every 50 ms).

The gateway runs on core 0, the clients and the publisher on core 1.  Prints one JSON line per
run and appends it to ``bench/results/snapshot.jsonl``; tuning.md "Snapshots: a reconnect storm
on a 10,000-key topic" quotes it.  Everything is bounded (``--timeout``); only processes started
here are stopped, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import PYTHON, Server, emit, log, proc_cpu, proc_rss  # noqa: E402

TOPIC = "bench.board"
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    """A free port below the ephemeral range (with the next one free too: the admin port)."""
    for _ in range(200):
        p = random.randrange(20000, 32000)
        try:
            for q in (p, p + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
        except OSError:
            continue
        return p
    raise RuntimeError("no free port pair below 32000")


def publish_board(port: int, keys: int) -> None:
    pad = "x" * 40
    for lo in range(0, keys, 1000):
        batch = [{"topic": TOPIC, "key": f"k{i}", "data": {"t": time.time(), "k": i, "p": pad}}
                 for i in range(lo, min(keys, lo + 1000))]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/publish", data=json.dumps(batch).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200


class RssPeak:
    """Samples the gateway's RSS every 50 ms in a thread until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = proc_rss(pid)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, proc_rss(self.pid))
            except (OSError, RuntimeError):  # the process is gone
                return

    def stop(self) -> int:
        self._stop.set()
        self._t.join(5)
        return self.peak


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    """A throw-away redis-server on core 1 (no persistence), and its URL."""
    port = free_port()
    proc = subprocess.Popen(["taskset", "-c", "1", "redis-server", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def storm(since: str, args: argparse.Namespace) -> dict[str, object]:
    port = free_port()
    redis_proc, extra = None, []
    if args.redis:
        redis_proc, url = start_redis()
        extra = ["--redis", url]
    server = Server("0", ["--port", str(port), "--admin-port", str(port + 1),
                          "--history-size", str(args.keys), "--max-keys", str(args.keys),
                          "--max-buffer", "256KiB", "--slow-grace", "30s", *extra]).start()
    client: subprocess.Popen[str] | None = None
    try:
        if args.redis:
            deadline = time.monotonic() + 15
            while not server.stats().get("broker", {}).get("up"):  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the gateway never connected to redis"
                time.sleep(0.1)
        publish_board(server.port, args.keys)
        time.sleep(0.5)
        rss0 = proc_rss(server.pid)
        cpu0 = proc_cpu(server.pid)
        peak = RssPeak(server.pid)
        t0 = time.monotonic()
        client = subprocess.Popen(
            ["taskset", "-c", "1", PYTHON, os.path.join(BENCH_DIR, "client.py"), "--port", str(server.port),
             "--conns", str(args.clients), "--topic", TOPIC, "--path", "/events?topic={topic}&since=" + since,
             "--concurrency", str(args.clients), "--max-life", str(args.timeout + 30)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdin is not None and client.stdout is not None
        ready = json.loads(client.stdout.readline())
        t_ready = time.monotonic() - t0
        snap: dict[str, object] = {}
        done_s = None
        while time.monotonic() - t0 < args.timeout:
            client.stdin.write("snap\n")
            client.stdin.flush()
            snap = json.loads(client.stdout.readline())
            if int(snap["min"]) >= args.keys and int(snap["open"]) == ready["ok"]:  # type: ignore[call-overload]
                done_s = time.monotonic() - t0
                break
            time.sleep(0.02)
        cpu = proc_cpu(server.pid) - cpu0
        rss_peak = peak.stop()
        stats = server.stats()
        broker = stats.get("broker") or {}
        client.stdin.write("quit\n")
        client.stdin.flush()
        return {
            "since": since, "clients": args.clients, "keys": args.keys, "connected": ready["ok"],
            "connect_failed": ready["failed"], "heads_s": round(t_ready, 2),
            "all_complete_s": None if done_s is None else round(done_s, 2),
            "events_min": snap.get("min"), "events_sum": snap.get("sum"), "lost": snap.get("lost"),
            "gateway_cpu_s": round(cpu, 2), "rss_before_mb": round(rss0 / 2**20, 1),
            "rss_peak_mb": round(rss_peak / 2**20, 1), "rss_peak_delta_mb": round((rss_peak - rss0) / 2**20, 1),
            "events_replayed": stats.get("events_replayed"), "paced": stats.get("paced"),
            "slow_closed": stats.get("slow_closed"), "broker": "redis" if args.redis else "memory",
            "history_reads": broker.get("history_reads"),  # type: ignore[union-attr]
            "replay_frames_encoded": broker.get("replay_frames_encoded"),  # type: ignore[union-attr]
        }
    finally:
        if client is not None:
            try:
                client.wait(10)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait(5)
        server.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--timeout", type=float, default=180.0, help="give up on a storm after this many seconds")
    ap.add_argument("--only", choices=("snapshot", "earliest"), help="run one of the two storms")
    ap.add_argument("--redis", action="store_true", help="through a throw-away redis-server on core 1 (the "
                    "gateway's --redis) instead of the embedded broker")
    args = ap.parse_args()
    for since in ("snapshot", "earliest"):
        if args.only and since != args.only:
            continue
        log(f"storm: {args.clients} clients, since={since}, {args.keys} keys")
        emit("snapshot", storm(since, args))


if __name__ == "__main__":
    main()
