"""systemd service notifications (``sd_notify(3)``) without libsystemd.

Strategy: systemd passes the address of a datagram socket in ``$NOTIFY_SOCKET`` -- a path, or
``@name`` for the abstract namespace -- and each notification is one datagram of
newline-separated ``KEY=VALUE`` lines.  With the variable unset (not under systemd, or
``Type=simple``) every call is a no-op.  Notifications are advisory: a send that fails (systemd
restarting, its socket buffer full) is logged once and otherwise ignored, and a send never
blocks (``MSG_DONTWAIT``), so a full socket costs a dropped datagram, never a stalled loop.

The watchdog (``$WATCHDOG_USEC``, and ``$WATCHDOG_PID`` when systemd names the process):
:attr:`Notifier.watchdog_s` is the interval within which systemd expects ``WATCHDOG=1``, or
None when no watchdog applies to this process.  :func:`keep_alive` pings at half of it from the
event loop, so a stalled loop sends nothing; *whether* all is well enough to ping is the
caller's ``healthy`` callback (the supervisor asks its workers).

Only the main process speaks to systemd (``NotifyAccess=main``): :func:`child_env` takes the
variables out of a worker's environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping

log = logging.getLogger("ssegw.notify")

#: The variables systemd sets for the main process, removed from children's environments.
ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends ``sd_notify`` datagrams to ``$NOTIFY_SOCKET`` (nothing when it is unset).

    Args:
        environ: the environment to read (default ``os.environ``), for tests.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        # "@name" is the abstract namespace (a leading NUL on the wire); anything but a path
        # or "@" (systemd's vsock: addresses) is not supported here and disables notifying.
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr if addr.startswith("/") else None
        if addr and self.address is None:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket address; not notifying systemd", addr)
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if self.address and usec.isdigit() and int(usec) > 0 and mine else None
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one notification of ``KEY=VALUE`` lines.  Returns False if nothing was sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self.address)
        except OSError as e:  # systemd away, or its queue full: advisory, so log once and go on
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s (further failures are not logged)",
                            self.address.replace("\0", "@"), e)
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (253+, Type=notify-reload) tie this message to the reload
        # it asked for; older versions ignore it.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str | None = None) -> None:
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


#: Longest pause between two watchdog pings while healthy.
PING_MAX_S = 1.0


async def keep_alive(notifier: Notifier, healthy: Callable[[], bool]) -> None:
    """Send ``WATCHDOG=1`` often (every second, or half the watchdog interval if shorter)
    while ``healthy()``; runs until cancelled.  Being a coroutine on the event loop it sends
    nothing while the loop stalls.

    Why often: pings withheld while a worker is stalled must not leave a gap as long as the
    interval once it is healthy again.  Pinging only every half interval, one withheld ping
    made the gap the whole interval, and systemd restarted the service for a worker the
    supervisor had already replaced."""
    if notifier.watchdog_s is None:
        return
    period = min(notifier.watchdog_s / 2, PING_MAX_S)
    while True:
        if healthy():
            notifier.watchdog()
        await asyncio.sleep(period)


async def report_status(notifier: Notifier, status: Callable[[], str], period: float) -> None:
    """Send ``STATUS=`` + ``status()`` every ``period`` seconds; runs until cancelled."""
    while True:
        await asyncio.sleep(period)
        notifier.status(status())


def child_env(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """``env`` without the systemd notification variables (for a worker process)."""
    for k in ENV_KEYS:
        env.pop(k, None)
    return env
