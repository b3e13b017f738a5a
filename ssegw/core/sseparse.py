"""A bounded, incremental parser for an upstream's ``text/event-stream`` body.

Rules (WHATWG HTML, "Server-sent events", 9.2.6 "Interpreting an event stream"), and where we
are stricter because an upstream's bytes are re-published to many clients:
- Lines end at CRLF, CR or LF; a CR at the end of one chunk followed by LF at the start of the
  next is one line end (never an extra blank line that would dispatch early).
- ``:`` starts a comment (an upstream's heartbeat); ``field: value`` strips one space after the
  colon; a line without a colon is a field with an empty value; unknown fields are ignored.
- ``data`` lines accumulate (joined with LF); a blank line dispatches the event unless its data
  is empty (then only the event name is reset, as the spec says).  ``event`` names it.  ``id``
  sets the last event id unless it contains NUL (ignored, as the spec says); it survives
  across events.  ``retry`` with ASCII digits only sets the reconnection time.
- A leading UTF-8 BOM is skipped.  The stream must be UTF-8: the spec decodes with
  replacement characters, we refuse it (:class:`StreamError` ``malformed``) rather than
  re-publish mangled text to every subscriber.
- Bounded: a line longer than ``max_line`` bytes, or an event whose data grows over
  ``max_event`` bytes, is :class:`StreamError` ``too_large`` -- the parser never holds more
  than about ``max_line + max_event`` bytes, whatever the upstream sends.

Sans-I/O: bytes in, :class:`UpEvent` objects out; the caller owns the socket and the timers.
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
_DIGITS = re.compile(r"[0-9]+\Z")


class StreamError(ValueError):
    """The upstream stream cannot be parsed further.  ``reason``: ``malformed`` or ``too_large``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class UpEvent:
    """One dispatched upstream event: its ``event`` name (None: the default ``message``),
    its data as text (lines joined with LF) and the upstream's last event id at dispatch."""

    __slots__ = ("event", "data", "id")

    def __init__(self, event: str | None, data: str, id: str | None) -> None:
        self.event = event
        self.data = data
        self.id = id

    def __repr__(self) -> str:
        return f"UpEvent(event={self.event!r}, data={self.data[:40]!r}, id={self.id!r})"


class SSEParser:
    """Feed body bytes with :meth:`feed`; read ``last_id`` and ``retry_ms`` at any time."""

    __slots__ = ("max_line", "max_event", "_buf", "_cr", "_bom", "_data", "_size", "_event", "last_id",
                 "retry_ms")

    def __init__(self, max_line: int, max_event: int, last_id: str | None = None) -> None:
        self.max_line = max_line
        self.max_event = max_event
        self._buf = b""  # an unfinished line
        self._cr = False  # the previous chunk ended with CR: a leading LF is part of that line end
        self._bom = True  # still at the start of the stream
        self._data: list[str] = []
        self._size = 0
        self._event: str | None = None
        self.last_id = last_id
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[UpEvent]:
        """Parse ``chunk``; returns the events it completed, in order.

        Raises:
            StreamError: the stream is malformed or over a bound; the parser is then unusable.
        """
        if self._cr:
            self._cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        data = self._buf + chunk if self._buf else chunk
        if self._bom:
            if len(data) < 3 and _BOM.startswith(data):
                self._buf = data
                return []
            self._bom = False
            if data.startswith(_BOM):
                data = data[3:]
        out: list[UpEvent] = []
        pos = 0
        for m in _LINE_END.finditer(data):
            start = m.start()
            if start - pos > self.max_line:
                raise StreamError("too_large", f"upstream line of {start - pos} bytes is over max_body ({self.max_line})")
            self._line(data[pos:start], out)
            pos = m.end()
        rest = data[pos:]
        if len(rest) > self.max_line:
            raise StreamError("too_large", f"upstream line of over {self.max_line} bytes (max_body)")
        if data.endswith(b"\r"):
            self._cr = True
        self._buf = rest
        return out

    def _line(self, raw: bytes, out: list[UpEvent]) -> None:
        if not raw:
            if self._data:
                out.append(UpEvent(self._event, "\n".join(self._data), self.last_id))
            self._data = []
            self._size = 0
            self._event = None
            return
        if raw[:1] == b":":
            return  # a comment
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise StreamError("malformed", "upstream sent a line that is not valid UTF-8") from None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._size += len(raw) + 1
            if self._size > self.max_event:
                raise StreamError("too_large", f"upstream event of over {self.max_event} bytes (max_body)")
            self._data.append(value)
        elif name == "event":
            self._event = value or None
        elif name == "id":
            if "\0" not in value:
                self.last_id = value or None
        elif name == "retry":
            if _DIGITS.match(value):
                self.retry_ms = int(value)
