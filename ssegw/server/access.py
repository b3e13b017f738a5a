"""Access lines: one per finished request or stream (README "Logs").

One log call when a request is answered or a stream ends, nothing per event.  What a line
holds is chosen so that no secret can be in it: the path without its query string (it can
carry ?token=), never a header value, never the body.  Successful lines are sampled
(``access_log_sample``) with the stdlib's Mersenne Twister (~30 ns a draw); errors
(status >= 400) always get their line.  Successful requests on the admin listener (scrapes,
health checks) get none: they would drown the rest (the protocol does not ask for them).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
from collections.abc import Hashable, Sequence
from typing import cast

from .. import logs

access_log = logging.getLogger("ssegw.access")

#: What a stream line shows of its topics (all of them are counted).
ACCESS_TOPICS = 3
#: Longest path shown (the request line may be up to 8 KiB).
ACCESS_PATH = 200
# struct tcp_info (linux/tcp.h): u64 tcpi_bytes_acked at offset 120 (Linux >= 4.1).
_TCPI_BYTES_ACKED = 120
_TCPI_LEN = _TCPI_BYTES_ACKED + 8
_random = random.random


class _State:
    __slots__ = ("on", "sample")

    def __init__(self) -> None:
        self.on = True
        self.sample = 1.0


#: ``access_log`` and ``access_log_sample``, for every worker (generation) of this process.
STATE = _State()


def configure_access(on: bool, sample: float) -> None:
    """Set ``access_log`` and ``access_log_sample`` (the worker does, from its config)."""
    STATE.on = on
    STATE.sample = sample


def wanted(status: int) -> bool:
    if not STATE.on or not access_log.isEnabledFor(logging.INFO):
        return False
    return status >= 400 or STATE.sample >= 1.0 or _random() < STATE.sample


def path_of(target: bytes) -> str:
    """The path only: a query string can carry a token (?token=...)."""
    return target.partition(b"?")[0][:ACCESS_PATH].decode("latin-1")


def bytes_acked(transport: asyncio.BaseTransport) -> int | None:
    """Bytes of this connection the client's TCP acknowledged (TCP_INFO), or None (not TCP,
    not Linux, already closed).  Read once, when a stream ends: no per-write counter."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_LEN)
    except (OSError, AttributeError):  # closed meanwhile, not TCP, or no TCP_INFO
        return None
    if len(info) < _TCPI_LEN:
        return None
    return int(struct.unpack_from("=Q", info, _TCPI_BYTES_ACKED)[0])


def request_line(method: bytes | None, target: bytes | None, status: int, seconds: float, nbytes: int,
                 ip: str, error: str, admin: bool) -> None:
    """Log an answered request (``method``/``target`` None: refused before any request)."""
    state = STATE  # wanted(status), inlined: once per request
    if not state.on or not access_log.isEnabledFor(logging.INFO):
        return
    if status < 400 and state.sample < 1.0 and _random() >= state.sample:
        return
    if target is not None and len(target) > _KEY_TARGET:  # not kept as a key as it is
        target = path_of(target).encode("latin-1")
    # Only the duration and the size differ between the lines of one publisher: the rest of
    # the line is made once per key (logs.info_numbers).
    # Milliseconds to the microsecond (round(x, 3) costs ~3 times as much, for ties only).
    logs.info_numbers(access_log, "request", (method, target, status, ip, error, admin), _request_fields,
                      int(seconds * 1_000_000 + 0.5) / 1000, nbytes)


#: Longest target kept as it is in a key of :func:`request_line`'s lines.
_KEY_TARGET = 256


def _request_fields(key: Hashable) -> dict[str, object]:
    method: bytes | None
    target: bytes | None
    method, target, status, ip, error, admin = cast(tuple, key)
    fields: dict[str, object] = {
        "kind": "request",
        "method": method.decode("latin-1") if method is not None else "-",
        "path": path_of(target) if target is not None else "-",
        "status": status,
        "duration_ms": logs.HOLES[0],
        "bytes_out": logs.HOLES[1],
        "ip": ip,
    }
    if error:
        fields["error"] = error
    if admin:
        fields["listener"] = "admin"
    return fields


def stream_line(seconds: float, topics: Sequence[str], reason: str, ip: str, events: int,
                transport: asyncio.BaseTransport | None) -> None:
    """Log a stream that ended (``reason``: who or what ended it; ``transport``: its socket
    can still be asked what the client acknowledged)."""
    if not wanted(200):
        return
    fields: dict[str, object] = {
        "kind": "stream",
        "status": 200,
        "duration_s": round(seconds, 3),
        "topics": len(topics),
        "topic_names": ",".join(topics[:ACCESS_TOPICS]),
        "close": reason,
        "events": events,
        "ip": ip,
    }
    acked = bytes_acked(transport) if transport is not None else None
    if acked is not None:
        fields["bytes_out"] = acked
    logs.info_fields(access_log, "stream", fields)
