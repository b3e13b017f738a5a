"""Log output: ``log_format = "text"`` or ``"json"``, on stderr, journald-aware.

Strategy: one handler on the root logger, writing one line per record to stderr; ``cli`` calls
:func:`setup` at start and again on a reload.  Every process sets itself up: supervisor workers
are started with the same ``serve`` arguments (and read the same config), so they use the same
format; they write to the stderr they inherit.

- text: ``2026-12-02 21:30:00,123 INFO ssegw.http: message``; extra fields (access lines) follow
  the message as ``key=value``, a value with a space or a quote in JSON quotes.
- json: one object per line, built by orjson: ``ts`` (RFC 3339, UTC, ms), ``level``,
  ``logger``, ``msg``, then the record's ``fields`` (access lines), then ``exc`` (a traceback)
  if there is one.

Under journald (systemd's ``JOURNAL_STREAM`` names the device and inode of our stderr, as
``systemd.exec(5)`` documents; a matching stderr means it goes to the journal, not a terminal or a
file it was redirected to) journald stamps each line itself, and reads a leading ``<N>`` as
the line's syslog priority (sd-daemon(3)).  So text lines drop our timestamp and start with
``<3>`` (ERROR and CRITICAL), ``<4>`` (WARNING), ``<6>`` (INFO) or ``<7>`` (DEBUG):
``journalctl -p err`` then shows the errors.  JSON lines keep their ``ts`` and get *no*
prefix: a consumer of the journal's MESSAGE expects the JSON object alone (journald strips a
leading ``<N>`` but a reader of the same format on a file would not), and the level is in the
object.  The journal then stores every JSON line at priority 6 (journald's default for a
stream); filter on the ``level`` field instead.

Secrets: nothing here adds a field; what goes into a line is what the caller passed.  The
callers never pass a token, a query string or a header value (see server/protocol.py's
access line).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import IO

import orjson

#: sd-daemon(3) priority prefixes, by level (a level in between takes the next one above).
_PRIORITY = ((logging.ERROR, "<3>"), (logging.WARNING, "<4>"), (logging.INFO, "<6>"), (logging.DEBUG, "<7>"))


def priority(levelno: int) -> str:
    """The ``<N>`` prefix journald reads as a line's syslog priority."""
    for level, prefix in _PRIORITY:
        if levelno >= level:
            return prefix
    return "<7>"


def under_journald(environ: Mapping[str, str], stream: IO[str]) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (``JOURNAL_STREAM`` is
    ``DEVICE:INODE`` of it).  A stderr redirected elsewhere by the service does not match."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no descriptor (a test's StringIO), or closed
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def _text_value(v: object) -> str:
    s = v if isinstance(v, str) else str(v)
    if not s or " " in s or '"' in s or "=" in s:
        return orjson.dumps(s).decode()
    return s


class TextFormatter(logging.Formatter):
    """``asctime LEVEL logger: message key=value ...``; under journald ``<N>LEVEL logger: ...``."""

    def __init__(self, journald: bool = False) -> None:
        fmt = "%(levelname)s %(name)s: %(message)s" if journald else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.journald = journald

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return line

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if self.journald:
            # Every line of a multi-line record (a traceback) carries the priority, or
            # journald would file the continuation lines at the default (info).
            p = priority(record.levelno)
            return p + line.replace("\n", "\n" + p)
        return line


def _rfc3339(created: float) -> str:
    secs = int(created)
    ms = int((created - secs) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the record's fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "ts": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            for k, v in fields.items():
                obj.setdefault(k, v)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(obj, default=str).decode()


def formatter(fmt: str, journald: bool) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter(journald)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Our handler, told apart from others on the root logger (a test's caplog)."""


def setup(fmt: str = "text", level: str = "info", environ: Mapping[str, str] | None = None,
          stream: IO[str] | None = None) -> logging.Handler:
    """Send the root logger's records to ``stream`` (stderr) in ``fmt``; called again on a
    reload, it replaces its own handler and keeps any other.

    Args:
        fmt: ``"text"`` or ``"json"``.
        level: the root logger's level (``log_level``).
        environ: where ``JOURNAL_STREAM`` is read (default ``os.environ``).
    """
    stream = sys.stderr if stream is None else stream
    env = os.environ if environ is None else environ
    handler = _Handler(stream)
    handler.setFormatter(formatter(fmt, under_journald(env, stream)))
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _Handler):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


__all__ = ["JsonFormatter", "TextFormatter", "priority", "setup", "under_journald"]
