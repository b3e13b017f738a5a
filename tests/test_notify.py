"""systemd notifications (``Type=notify``) and the watchdog, against the real gateway.

The test plays systemd: it binds its own AF_UNIX datagram socket, starts the gateway with
``NOTIFY_SOCKET`` (and ``WATCHDOG_USEC``) pointing at it, and records every datagram with the
time it arrived.  Single process: ``READY=1`` once accepting, ``RELOADING=1`` +
``MONOTONIC_USEC`` / ``READY=1`` around SIGHUP, ``WATCHDOG=1`` from the loop (none while the
process is SIGSTOPped), ``STOPPING=1`` on SIGTERM.  Supervisor (Redis, 2 workers): the same
lifecycle, and a worker whose loop stalls (SIGSTOP) withholds ``WATCHDOG=1`` until the
supervisor has killed and replaced it, within ``worker_timeout`` plus a few seconds.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid

import pytest
from checks import started, stop_supervised, uniq, worker_stats
from harness import Gateway, wait_until

from ssegw.notify import Notifier, child_env


class NotifySink:
    """What systemd would receive: every datagram as (arrival time, {KEY: VALUE})."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"ssegw-test-{uuid.uuid4().hex[:12]}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            # A short path: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path is long.
            self._dir = tempfile.mkdtemp(prefix="ssegw-n")
            self.address = os.path.join(self._dir, "notify")
            self.sock.bind(self.address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def times(self, key: str) -> list[float]:
        return [t for t, f in list(self.messages) if key in f]

    def with_key(self, key: str) -> list[dict[str, str]]:
        return [f for _, f in list(self.messages) if key in f]

    def wait_count(self, key: str, n: int, timeout: float) -> bool:
        return wait_until(lambda: len(self.times(key)) >= n, timeout, 0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        if not self.address.startswith("@"):
            shutil.rmtree(self._dir, ignore_errors=True)


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def regular(times: list[float], period: float) -> None:
    """``times`` are pings about ``period`` apart (none missing)."""
    assert len(times) >= 3, times
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) < period * 2.5, gaps


def largest_gap(times: list[float], lo: float, hi: float) -> tuple[float, float]:
    """The longest stretch of [lo, hi] without a ping: (start, length)."""
    pts = [lo, *[t for t in times if lo < t < hi], hi]
    return max(((a, b - a) for a, b in zip(pts, pts[1:], strict=False)), key=lambda x: x[1])


# -- the Notifier itself ---------------------------------------------------------------------


def test_notifier_without_notify_socket_is_a_no_op():
    n = Notifier({})
    assert not n.enabled and n.watchdog_s is None
    assert n.send("READY=1") is False
    n.ready()
    n.watchdog()


def test_notifier_send_errors_are_logged_once_and_never_raise(caplog):
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent/ssegw/notify", "WATCHDOG_USEC": "1000000"})
    assert n.enabled and n.watchdog_s == 1.0
    with caplog.at_level(logging.WARNING, logger="ssegw.notify"):
        for _ in range(3):
            assert n.send("WATCHDOG=1") is False
    assert len([r for r in caplog.records if "cannot notify" in r.message]) == 1
    n.close()


def test_notifier_watchdog_pid_and_child_env():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "500000"}
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_s == 0.5
    assert Notifier({**env, "WATCHDOG_PID": "1"}).watchdog_s is None  # another process's watchdog
    assert Notifier({**env, "WATCHDOG_USEC": "0"}).watchdog_s is None
    assert Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False  # not supported: disabled
    child = child_env({**env, "WATCHDOG_PID": "1", "PATH": "/bin"})
    assert dict(child) == {"PATH": "/bin"}


def test_notifier_abstract_namespace():
    sink = NotifySink(abstract=True)
    try:
        n = Notifier({"NOTIFY_SOCKET": sink.address})
        n.ready("up")
        n.reloading()
        assert sink.wait_count("RELOADING", 1, 2)
        ready, reloading = [f for _, f in sink.messages]
        assert ready == {"READY": "1", "STATUS": "up"}
        assert abs(int(reloading["MONOTONIC_USEC"]) - monotonic_usec()) < 2_000_000
        n.close()
    finally:
        sink.close()


# -- the supervisor's stall rules, with fake workers ----------------------------------------------


class FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.signals: list[int] = []

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)


def fake_supervisor(worker_timeout: float):  # noqa: ANN201
    from ssegw.config import Config
    from ssegw.supervisor import Supervisor, WorkerProc

    sup = Supervisor(Config(workers=2, worker_timeout=worker_timeout), [], socket.socket)
    now = time.monotonic()
    sup._steady_since = now - 100
    made = []
    for pid in (101, 102):
        wp = WorkerProc(pid - 101, 1, FakeProc(pid), f"/nonexistent/ssegw-{pid}.sock")  # type: ignore[arg-type]
        wp.last_seen = now
        sup.workers[pid] = wp
        made.append(wp)
    return sup, made


def discard(sup) -> None:  # noqa: ANN001
    for s in sup.sockets:
        s.close()
    shutil.rmtree(sup.dir, ignore_errors=True)


def test_watchdog_withheld_only_for_a_worker_that_answered_and_went_silent():
    sup, (a, b) = fake_supervisor(worker_timeout=2.0)
    try:
        assert (sup.heartbeat, sup.late_after) == (0.5, 1.0)
        assert sup.responsive()
        b.last_seen = None  # starting (waiting for its broker): not a stalled loop
        b.started = time.monotonic() - 20
        assert sup.responsive()
        a.last_seen = time.monotonic() - 1.5  # missed a heartbeat
        assert not sup.responsive()
        a.exiting = True  # drained, control socket closed, on its way out
        assert sup.responsive()
        a.exiting = False
        sup._steady_since = time.monotonic()  # the supervisor itself was stalled: no verdict yet
        assert sup.responsive()
    finally:
        discard(sup)


def test_stalled_worker_is_killed_once_starting_one_is_not(caplog):
    import asyncio

    sup, (a, b) = fake_supervisor(worker_timeout=0.2)
    a.last_seen = time.monotonic() - 1.0  # answered once, silent since
    b.last_seen = None  # never answered: starting, with READY_TIMEOUT to come up

    async def run() -> None:
        task = asyncio.get_running_loop().create_task(sup._heartbeat())
        await asyncio.sleep(0.4)
        task.cancel()

    try:
        with caplog.at_level(logging.ERROR, logger="ssegw.supervisor"):
            asyncio.run(run())
        assert a.proc.signals == [signal.SIGKILL] and a.killed  # once, though silent for many rounds
        assert b.proc.signals == [] and not b.killed
        msgs = [r.getMessage() for r in caplog.records if "stalled" in r.getMessage()]
        assert len(msgs) == 1 and msgs[0].startswith("worker 101 (slot 0, generation 1) stalled: no answer for 1.")
    finally:
        discard(sup)


# -- one process ------------------------------------------------------------------------------


def test_single_process_lifecycle_and_watchdog(tmp_path):
    sink = NotifySink(abstract=True)
    cfg = tmp_path / "ssegw.toml"
    cfg.write_text('retry = "1s"\n')
    g = Gateway("--config", str(cfg), "--drain-timeout", "1s", "--flush-interval", "10ms",
                env={"NOTIFY_SOCKET": sink.address, "WATCHDOG_USEC": "300000"})
    try:
        g.start()
        assert g.proc is not None
        pid = g.proc.pid
        assert sink.wait_count("READY", 1, 5), sink.messages
        # Accepting by then (it binds and serves before it says so).
        assert g.publish({"topic": uniq("n"), "data": "x"}).status == 200
        assert sink.with_key("READY")[0]["STATUS"] == "serving: 1 worker, 0 connections"

        # WATCHDOG=1 every 0.15 s, from the loop.
        time.sleep(1.2)
        regular(sink.times("WATCHDOG"), 0.15)

        # SIGHUP: RELOADING=1 with the monotonic clock, then READY=1 once the new generation serves.
        before = monotonic_usec()
        g.send(signal.SIGHUP)
        assert sink.wait_count("READY", 2, 5), sink.messages
        reloading = sink.with_key("RELOADING")
        assert len(reloading) == 1
        assert before <= int(reloading[0]["MONOTONIC_USEC"]) <= monotonic_usec()
        assert sink.times("RELOADING")[0] <= sink.times("READY")[1]
        assert sink.with_key("READY")[1]["STATUS"].startswith("reloaded: generation 2"), sink.messages

        # A broken config: the reload fails, READY=1 all the same, the old generation serves on.
        cfg.write_text('retry = "soon"\n')
        g.send(signal.SIGHUP)
        assert sink.wait_count("READY", 3, 5), sink.messages
        assert len(sink.with_key("RELOADING")) == 2
        assert sink.with_key("READY")[2]["STATUS"].startswith("reload failed: retry"), sink.messages
        assert g.publish({"topic": uniq("n"), "data": "y"}).status == 200

        # A stopped process sends nothing (systemd would restart it), and pings again after.
        os.kill(pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        time.sleep(1.2)
        t_cont = time.monotonic()
        os.kill(pid, signal.SIGCONT)
        assert not [t for t in sink.times("WATCHDOG") if t_stop + 0.05 < t < t_cont], "pinged while stopped"
        assert wait_until(lambda: len([t for t in sink.times("WATCHDOG") if t > t_cont]) >= 3, 3, 0.05)
        regular([t for t in sink.times("WATCHDOG") if t > t_cont], 0.15)

        g.send(signal.SIGTERM)
        assert sink.wait_count("STOPPING", 1, 3), sink.messages
        assert g.proc.wait(5) == 0
    finally:
        if g.proc is not None and g.proc.poll() is None:
            os.kill(g.proc.pid, signal.SIGCONT)
        g.kill()
        sink.close()


def test_no_notify_socket_no_change(gateway):
    """Without NOTIFY_SOCKET the gateway behaves as it always did (and SIGHUP reloads)."""
    g = gateway("--drain-timeout", "1s")
    g.send(signal.SIGHUP)
    assert wait_until(lambda: any("generation 2 serving" in line for line in g.log), 5, 0.05), "".join(g.log)
    assert g.publish({"topic": uniq("n"), "data": "x"}).status == 200


# -- a supervisor with two workers -------------------------------------------------------------


STALLED = re.compile(r"worker (\d+) \(slot (\d+), generation (\d+)\) stalled: no answer for ([\d.]+)s")


def test_supervisor_lifecycle_and_watchdog(redis_server):
    sink = NotifySink()
    worker_timeout = 2.0
    g = Gateway("--redis", redis_server.url, "--workers", "2", "--worker-timeout", "2s", "--drain-timeout", "1s",
                "--flush-interval", "10ms",
                env={"NOTIFY_SOCKET": sink.address, "WATCHDOG_USEC": "400000"})
    try:
        g.start()
        assert sink.wait_count("READY", 1, 15), "".join(g.log)
        # READY=1 only once both workers serve.
        assert len(worker_stats(g)) == 2
        assert g.publish({"topic": uniq("n"), "data": "x"}).status == 200
        assert sink.with_key("READY")[0]["STATUS"].startswith("serving: 2 workers"), sink.messages
        time.sleep(1.2)
        regular(sink.times("WATCHDOG"), 0.2)

        # SIGHUP: RELOADING=1, then READY=1 once generation 2 is ready.
        before = monotonic_usec()
        g.send(signal.SIGHUP)
        assert sink.wait_count("READY", 2, 15), "".join(g.log)
        assert before <= int(sink.with_key("RELOADING")[0]["MONOTONIC_USEC"]) <= monotonic_usec()
        assert sink.times("RELOADING")[0] <= sink.times("READY")[1]
        assert wait_until(lambda: any("generation 2 ready" in line for line in g.log), 2, 0.02)
        assert sink.with_key("READY")[1]["STATUS"].startswith("reloaded: generation 2"), sink.messages
        gen2 = {pid for pid, _, gen in started(g) if gen == 2}
        assert wait_until(lambda: {w["pid"] for w in worker_stats(g)} == gen2, 5, 0.1)
        assert wait_until(lambda: not any(gen == 1 and _alive(pid) for pid, _, gen in started(g)), 5, 0.1)

        # One worker's loop stalls.
        time.sleep(0.6)
        victim = worker_stats(g)[0]["pid"]
        slot = next(s for pid, s, _ in started(g) if pid == victim)
        n_started = len(started(g))
        os.kill(victim, signal.SIGSTOP)
        t_stop = time.monotonic()
        # Killed (logged once, with how long it was silent) and replaced on its slot.
        assert wait_until(lambda: any(STALLED.search(line) for line in g.log), worker_timeout + 3, 0.02), \
            "".join(g.log)
        t_killed = time.monotonic()
        line = next(m for m in map(STALLED.search, g.log) if m)
        assert int(line.group(1)) == victim and int(line.group(2)) == slot
        assert worker_timeout <= float(line.group(4)) <= worker_timeout + 1.5
        assert t_killed - t_stop <= worker_timeout + 2
        assert wait_until(lambda: len(started(g)) > n_started, 5, 0.02), "".join(g.log)
        t_replaced = time.monotonic()
        new_pid, new_slot, _ = started(g)[-1]
        assert new_slot == slot and new_pid != victim
        assert wait_until(lambda: victim not in {w["pid"] for w in worker_stats(g)}
                          and len(worker_stats(g)) == 2, 5, 0.1), worker_stats(g)
        assert not _alive(victim)
        # WATCHDOG=1 paused while the worker was stalled (from a missed heartbeat on) ...
        start, length = largest_gap(sink.times("WATCHDOG"), t_stop, t_replaced)
        assert length >= 0.8, (length, sink.times("WATCHDOG"))
        assert t_stop <= start <= t_stop + 1.5
        # ... and pings regularly again once it is gone.
        assert wait_until(lambda: len([t for t in sink.times("WATCHDOG") if t > t_replaced]) >= 4, 3, 0.05)
        regular([t for t in sink.times("WATCHDOG") if t > t_replaced], 0.2)
        assert sum(1 for ln in g.log if STALLED.search(ln)) == 1, "logged once"
        m = g.metrics()
        assert m["ssegw_worker_restarts_total"] == 1
        if "ssegw_watchdog_misses_total" in m:
            assert m["ssegw_watchdog_misses_total"] >= 1
        statuses = [f["STATUS"] for f in sink.with_key("STATUS")]
        assert any(s.startswith("serving: 2 workers") for s in statuses[-3:]), statuses

        g.send(signal.SIGTERM)
        assert sink.wait_count("STOPPING", 1, 3), sink.messages
        assert g.proc is not None and g.proc.wait(10) == 0
    finally:
        for pid, _, _ in started(g):
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        stop_supervised(g)
        sink.close()


def _alive(pid: int) -> bool:
    from checks import alive

    return alive(pid)


pytestmark = pytest.mark.timeout(60)
