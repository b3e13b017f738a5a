"""Server-Sent Events encoding: the one encoder (WHATWG HTML, "Server-sent events", 9.2).

Strategy: a published message is validated and turned into its field lines (``event:`` and
``data:``) exactly once, when it is published.  The broker then prefixes the ``id:`` line,
once, and every subscriber of the topic is handed that same ``bytes`` object.  Nothing here
is ever done per subscriber.

Rules enforced (the parser side of the spec makes them necessary):
- ``event`` and ``id`` values must not contain CR, LF or NUL: a CR or LF would end the field
  early and let a publisher inject fields; the spec ignores ``id`` values containing NUL.
- ``data`` is split into lines at CRLF, CR and LF alike -- never with ``str.splitlines()``,
  which also splits at U+2028, VT, FF and friends that SSE treats as ordinary characters.
- Every field is written as ``name: value``.  The parser strips exactly one space after the
  colon, so a value that itself starts with a space survives.
- Events end with a blank line.  Line ends are always LF.

HTTP chunk framing (``chunk()``) lives here too, so that framing is computed together with
the payload it frames and never as an empty chunk (an empty chunk ends a chunked body).
"""

from __future__ import annotations

import re

from .errors import BadRequest

#: Longest accepted ``event`` name, in characters.  Event names are routing labels for
#: ``addEventListener``; nothing sensible needs more, and it bounds a per-event cost.
MAX_EVENT_NAME = 256

_LINE_SPLIT = re.compile(r"\r\n|\r|\n")
_BAD_FIELD = re.compile(r"[\r\n\0]")

HEARTBEAT = b":\n\n"
RESERVED_EVENT_PREFIX = "ssegw."


def validate_event_name(name: object) -> str:
    """Return ``name`` if it can be an ``event:`` value, else raise BadRequest."""
    if not isinstance(name, str):
        raise BadRequest("event must be a string", code="bad_event")
    if not name:
        raise BadRequest("event name is empty", code="bad_event")
    if len(name) > MAX_EVENT_NAME:
        raise BadRequest(f"event name is longer than {MAX_EVENT_NAME} characters", code="bad_event")
    if _BAD_FIELD.search(name):
        raise BadRequest("event name contains CR, LF or NUL", code="bad_event")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("event name is not valid Unicode (lone surrogate)", code="bad_event") from None
    return name


def data_lines(text: str) -> bytes:
    """Encode ``text`` as ``data:`` lines, split at CRLF, CR and LF (not splitlines())."""
    try:
        return b"".join(b"data: " + line.encode("utf-8") + b"\n" for line in _LINE_SPLIT.split(text))
    except UnicodeEncodeError:
        raise BadRequest("data is not valid Unicode (lone surrogate)", code="bad_data") from None


def encode_body(event: str | None, data: bytes) -> bytes:
    """The id-less part of an event: optional ``event:`` line, then the ``data:`` lines.

    Args:
        event: a name already checked by :func:`validate_event_name`, or None.
        data: the output of :func:`data_lines`.
    """
    if event is None:
        return data
    return b"event: " + event.encode("utf-8") + b"\n" + data


def encode_frame(event_id: str, body: bytes) -> bytes:
    """A complete event: ``id:`` line, body, blank line.  Done once per event."""
    return b"id: " + event_id.encode("ascii") + b"\n" + body + b"\n"


def encode_retry(ms: int) -> bytes:
    return b"retry: %d\n\n" % ms


def encode_comment(text: str = "") -> bytes:
    """A comment block (heartbeat, padding).  Each line of ``text`` becomes a ``:`` line."""
    if not text:
        return HEARTBEAT
    return b"".join(b": " + ln.encode("utf-8") + b"\n" for ln in _LINE_SPLIT.split(text)) + b"\n"


def encode_reset(topics: list[str], dumps: object = None) -> bytes:
    """``event: ssegw.reset`` carrying ``{"topics": [...]}``.  It has no ``id:`` line: it is
    not a published event, and leaving the client's last id where it was keeps resume honest.
    Topic names are validated ASCII without quotes or backslashes, so plain formatting is
    valid JSON.
    """
    return _topics_event(b"ssegw.reset", topics)


def encode_compacted(topics: list[str]) -> bytes:
    """``event: ssegw.compacted`` carrying ``{"topics": [...]}``, without ``id:`` (as
    :func:`encode_reset`): for those topics the replay that follows holds only the newest
    event of each key changed in the gap."""
    return _topics_event(b"ssegw.compacted", topics)


def _topics_event(name: bytes, topics: list[str]) -> bytes:
    inner = ",".join(f'"{t}"' for t in topics)
    return b"event: " + name + b'\ndata: {"topics":[' + inner.encode("ascii") + b"]}\n\n"


def chunk(payload: bytes) -> bytes:
    """Frame ``payload`` as one HTTP/1.1 chunk.  Never emits a zero-length chunk."""
    if not payload:
        return b""
    return b"%x\r\n%b\r\n" % (len(payload), payload)


#: The last chunk of a chunked body (RFC 9112 7.1).
LAST_CHUNK = b"0\r\n\r\n"
