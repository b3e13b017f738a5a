"""The public listener's socket options reach every accepted connection.

The gateway sets send-side limits and dead-peer options once, on the listening socket, and
relies on Linux copying them to each socket it accepts (no setsockopt, and no cached socket
object, per connection).  This checks that on real loopback sockets: the accepted
connection's own options, read back through its transport.
"""

from __future__ import annotations

import socket
import time

from rawclient import InProcess

from ssegw.server.flow import NOTSENT_LOWAT

TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def test_accepted_connections_inherit_the_listener_options() -> None:
    with InProcess("--heartbeat-interval", "3s") as gw:
        c = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        try:
            deadline = time.monotonic() + 5
            conns: list = []
            while not conns and time.monotonic() < deadline:
                conns = gw.call(lambda: [p for p in gw.worker.table.records if p is not None and not p.admin])
                time.sleep(0.02)
            assert len(conns) == 1
            p = conns[0]

            def read() -> dict[str, int]:
                s = p.transport.get_extra_info("socket")
                return {
                    "notsent_lowat": s.getsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT),
                    "keepalive": s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    "keepidle": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    "user_timeout": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                }

            got = gw.call(read)
            # heartbeat 3 s: keepalive idle 3 s, stall timeout 2 x 3 s clamped to >= 5 s -> 6 s.
            assert got == {"notsent_lowat": NOTSENT_LOWAT, "keepalive": 1, "keepidle": 3, "user_timeout": 6000}
        finally:
            c.close()
