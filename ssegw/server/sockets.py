"""Listening sockets: bind, SO_REUSEADDR, optional SO_REUSEPORT, a deep backlog.

Workers of a supervisor each bind the public port with SO_REUSEPORT so the kernel spreads
new connections between them and a new generation can accept before the old one closes.
"""

from __future__ import annotations

import socket

#: listen() backlog.  A reconnect storm arrives as a burst of SYNs; the kernel caps this at
#: net.core.somaxconn anyway.
BACKLOG = 4096


def bind_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening TCP socket on (host, port).

    Raises:
        OSError: the address cannot be bound (in use, not local, ...).
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
