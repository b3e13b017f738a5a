"""Listening sockets: bind, SO_REUSEADDR, optional SO_REUSEPORT, a deep backlog.

Workers of a supervisor each bind the public port with SO_REUSEPORT so the kernel spreads
new connections between them and a new generation can accept before the old one closes.
"""

from __future__ import annotations

import os
import resource
import socket

#: Default listen() backlog (config key ``backlog``).  A reconnect storm arrives as a burst of
#: SYNs; the kernel caps this at net.core.somaxconn anyway.
BACKLOG = 4096


def bind_socket(host: str, port: int, reuse_port: bool = False, backlog: int = BACKLOG) -> socket.socket:
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
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        # Name the address: "Address already in use" alone does not say which listener.
        raise OSError(e.errno, f"cannot listen on {host or '*'}:{port}: {e.strerror}") from e
    return sock


#: Descriptors a worker keeps free beyond its public connections: the admin listener and
#: its connections, the broker's connections (reconnects included), log files, the
#: descriptor the event loop itself reserves for accepting while at EMFILE (64), and one
#: accept batch (acceptor.ACCEPT_BATCH) of connections refused but not yet closed.
FD_RESERVE = 64 + 128


def descriptor_budget(reserve: int = FD_RESERVE) -> tuple[int, int]:
    """Raise this process's soft open-files limit to its hard limit (systemd starts services
    with a soft limit of 1024 and a much higher hard one), and return ``(limit, public)``:
    the limit, and how many public connections fit in it while ``reserve`` descriptors and
    those already open stay free.

    Past ``public`` the worker answers new public connections 503 (see Context.on_connect)
    instead of letting accept() fail with EMFILE: at EMFILE the loop silently closes new
    connections on every listener -- the admin one included -- and nothing says why.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep the soft limit we have
    if soft == resource.RLIM_INFINITY:
        return soft, 1 << 30
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 16
    return soft, max(1, soft - in_use - reserve)
