"""A gateway behind real links: ``ssegw serve`` in a network namespace of its own (``ip netns
exec``), clients in other namespaces reaching it over ``netlink.Link``s, the test itself
publishing and reading ``/admin`` through loopback *inside* the gateway's namespace (a socket
made there; so ``/publish`` needs no auth: the peer is loopback).

``REALLINK_CODE=/path/to/checkout`` runs that checkout's ``ssegw`` instead of this one (via
``PYTHONSAFEPATH=1 PYTHONPATH=...``, as ``bench/scale.py --code`` does), so the same tests and
benches can measure the code before a change.
"""

from __future__ import annotations

import os
import re

import netlink
from harness import Gateway, Response, Stream, dechunk, request
from sse_parser import Ev


def code_root() -> str | None:
    """The checkout whose ``ssegw`` runs (None: this one)."""
    return os.environ.get("REALLINK_CODE") or None


class NsGateway(Gateway):
    """``ssegw serve`` inside ``ns``, public listener on every address of that namespace (only
    its own ``lo`` and link ends), admin listener on its loopback."""

    def __init__(self, ns: netlink.Netns, *args: str, code: str | None = None) -> None:
        code = code or code_root()
        env = {"PYTHONSAFEPATH": "1", "PYTHONPATH": code} if code else None
        # Later flags win over the harness's --port 0 --admin-port 0.
        super().__init__("--host", "0.0.0.0", "--admin-host", "127.0.0.1", *args, env=env)
        self.ns = ns
        self.code = code
        self.prefix = ns.prefix

    @property
    def pid(self) -> int:
        """``ip netns exec`` execs the command, so this is the gateway's own process."""
        assert self.proc is not None
        return self.proc.pid

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        admin: bool = False,
        timeout: float = 10.0,
    ) -> Response:
        with netlink.entered(self.ns.name):
            return request(self.admin_port if admin else self.port, method, path, body, headers, timeout)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def send_queue_bytes(self) -> tuple[int, int, int]:
        """(sum, largest, count) of skmem ``w`` (wmem_queued) over the public listener's accepted
        sockets: the kernel memory the gateway holds for sending to its clients."""
        text = self.ns.ss(f"( sport = :{self.port} )")  # every state: orphans (FIN-WAIT) hold data too
        ws = [int(m.group(1)) for m in re.finditer(r"skmem:\([^)]*?\bw(\d+)", text)]
        return sum(ws), max(ws, default=0), len(ws)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class LinkStream(Stream):
    """``harness.Stream`` from namespace ``ns`` to ``host:port`` (optionally with a small
    ``rcvbuf``, set before connecting so the window scale stays small, as a phone's would).

    ``fast``: instead of the spec parser (``sse_parser``, ~6 MB/s of CPU on this machine, too
    slow to be sure the *link* is the bottleneck at tens of Mbit/s), split events on blank
    lines and keep only their ``id:`` and ``event:`` fields (no ``data``), without keeping the
    raw bytes.  Good for checking delivery (which ids, in which order); encoding is checked by
    the tests that use the spec parser."""

    def __init__(
        self,
        ns: netlink.Netns,
        host: str,
        port: int,
        path: str,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
        rcvbuf: int | None = None,
        fast: bool = False,
    ) -> None:
        self.fast = fast
        self._text = bytearray()
        self.open(ns.connect(host, port, timeout, rcvbuf), host, port, path, headers, timeout)

    def _consume(self, data: bytes) -> None:
        if not self.fast:
            super()._consume(data)
            return
        data = self._pending + data
        if self.chunked:
            payload, self._pending, ended = dechunk(data)
            self.ended = self.ended or ended
        else:
            payload, self._pending = data, b""
        text = self._text
        text += payload
        end = text.rfind(b"\n\n")
        if end < 0:
            return
        events = self.parser.events
        for block in bytes(text[:end]).split(b"\n\n"):
            ev_id = name = None
            for line in block.split(b"\n"):
                if line.startswith(b"id: "):
                    ev_id = line[4:].decode()
                elif line.startswith(b"event: "):
                    name = line[7:].decode()
            if ev_id is not None or name is not None:
                events.append(Ev("", name or "message", ev_id or "", ev_id is not None))
        del text[: end + 2]
