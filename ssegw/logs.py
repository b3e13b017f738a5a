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
from collections.abc import Callable, Hashable, Mapping
from typing import IO, cast

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
        #: info_numbers' lines, cut at their numbers, by key
        self.templates: dict[Hashable, tuple[str, str, str]] = {}

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return line

    def info_line(self, name: str, msg: str, fields: Mapping[str, object], created: float) -> str:
        """The line ``format`` makes of an INFO record of logger ``name`` with these fields
        (``msg`` without %-arguments), without the record (see :func:`info_fields`)."""
        return self.head(created) + self.info_rest(name, msg, fields)

    def head(self, created: float) -> str:
        """What an INFO line starts with at time ``created``: its stamp (journald: priority)."""
        if self.journald:
            return "<6>"
        secs = int(created)
        # logging's default_msec_format, with LogRecord's msecs (truncated, not rounded)
        ms = int((created - secs) * 1000)
        if secs == self._sec:
            if ms == self._ms:  # lines come many to a millisecond: the same head
                return self._head
        else:
            self._sec = secs
            self._stamp = time.strftime(self.default_time_format, time.localtime(secs))
        self._ms = ms
        self._head = head = f"{self._stamp},{ms:03d} "
        return head

    def info_rest(self, name: str, msg: str, fields: Mapping[str, object]) -> str:
        """The INFO line after :meth:`head`."""
        parts = []
        for k, v in fields.items():
            t = type(v)
            if t is int or t is float:  # never quoted: skip _text_value's scans
                parts.append(f"{k}={v}")
            else:
                parts.append(f"{k}={_text_value(v)}")
        return f"INFO {name}: {msg} {' '.join(parts)}" if fields else f"INFO {name}: {msg}"

    @staticmethod
    def value_text(v: object) -> str:
        """How a field's value appears in a line."""
        t = type(v)
        return f"{v}" if t is int or t is float else _text_value(v)

    _sec = -1
    _stamp = ""
    _ms = -1
    _head = ""

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

    def __init__(self) -> None:
        super().__init__()
        #: info_numbers' lines, cut at their numbers, by key
        self.templates: dict[Hashable, tuple[str, str, str]] = {}

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

    def info_line(self, name: str, msg: str, fields: Mapping[str, object], created: float) -> str:
        return self.head(created) + self.info_rest(name, msg, fields)

    @staticmethod
    def head(created: float) -> str:
        """What an INFO line starts with at time ``created``: the object's first member."""
        return f'{{"ts":"{_rfc3339(created)}",'

    @staticmethod
    def info_rest(name: str, msg: str, fields: Mapping[str, object]) -> str:
        """The INFO line after :meth:`head`: the object's other members."""
        obj: dict[str, object] = {"level": "info", "logger": name, "msg": msg}
        for k, v in fields.items():
            if k != "ts":  # as format(): a field never replaces the line's own members
                obj.setdefault(k, v)
        return orjson.dumps(obj, default=str).decode()[1:]

    @staticmethod
    def value_text(v: object) -> str:
        """How a field's value appears in a line."""
        return orjson.dumps(v, default=str).decode()


def formatter(fmt: str, journald: bool) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter(journald)


#: A buffered handler writes once this much is pending (and at every ``flush()``).
BUFFER_BYTES = 64 * 1024
#: The logger whose lines are buffered (one per request: the volume); every other line is
#: written at once, after what is pending, so that lines keep their order in this process
#: and reach the journal in step with the other processes' (a supervisor and its workers).
ACCESS_LOGGER = "ssegw.access"


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Our handler, told apart from others on the root logger (a test's caplog).

    Buffered (a worker, which then calls :func:`flush` every tick, 50 ms): access lines are
    kept and written together, at every tick, at 64 KiB, or with the next other line (any
    other line is written at once, with what was pending before it, in order).  One write per line cost a publish ~40 us of its
    ~120 us at one access line per request (tuning.md "Publish ingest"); nginx's
    ``access_log ... buffer=`` does the same.  What a kill -9 loses is at most one tick of
    INFO lines.  Unbuffered (the default: the supervisor, the CLI's commands): one write per
    line, as logging's StreamHandler.
    """

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self.buffered = False
        #: lines, and info_numbers' lines still as (pieces, a, b, created): made when written
        self.pending: list[str | tuple[tuple[str, str, str], float, int, float]] = []
        self.size = 0

    def emit(self, record: logging.LogRecord) -> None:
        if not self.buffered:
            super().emit(record)
            return
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.pending.append(line)
        self.size += len(line) + 1
        if record.name != ACCESS_LOGGER or record.levelno >= logging.WARNING or self.size >= BUFFER_BYTES:
            self._write()

    def _write(self) -> None:
        """Write what is pending (the handler's lock held)."""
        if not self.pending:
            return
        # info_numbers queues its lines only while our formatter is this handler's.
        fmt = cast("TextFormatter | JsonFormatter", self.formatter)
        text = "\n".join([x if type(x) is str else _numbers_line(fmt, *x) for x in self.pending]) + "\n"  # type: ignore[misc]
        self.pending = []
        self.size = 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # a closed or broken stderr must not take the worker down
            pass

    def flush(self) -> None:
        self.acquire()
        try:
            self._write()
            if self.stream is not None and not getattr(self.stream, "closed", False):
                self.stream.flush()
        except (OSError, ValueError):  # a stream closed or broken under us: nothing to do
            pass
        finally:
            self.release()


def _bare(logger: logging.Logger) -> bool:
    """No handler or filter of its own on the way from ``logger`` up to the root (whose
    handlers the caller has looked at), and nothing stops the record on the way."""
    lg: logging.Logger | None = logger
    while lg is not None:
        if lg.filters or (lg is not logging.root and (lg.handlers or not lg.propagate)):
            return False
        lg = lg.parent
    return True


def _direct(logger: logging.Logger) -> tuple[_Handler, TextFormatter | JsonFormatter] | None:
    """Our buffered handler and its formatter, when nothing but that handler would see an
    INFO record of ``logger`` -- no other handler or filter anywhere on its way, which is
    how a worker runs; None otherwise (a test's caplog, a user's handler)."""
    handlers = logging.root.handlers
    if len(handlers) == 1:
        h = handlers[0]
        if (type(h) is _Handler and h.buffered and not h.filters and h.level <= logging.INFO
                and logger.isEnabledFor(logging.INFO) and _bare(logger)):
            fmt = h.formatter
            if isinstance(fmt, (TextFormatter, JsonFormatter)):
                return h, fmt
    return None


def _append(h: _Handler, logger: logging.Logger, item: str | tuple[tuple[str, str, str], float, int, float],
            size: int) -> None:
    """Queue a line (or info_numbers' parts of one, ``size`` characters about) on ``h``."""
    with h.lock:  # type: ignore[union-attr]
        h.pending.append(item)
        h.size += size + 1
        if h.size >= BUFFER_BYTES or logger.name != ACCESS_LOGGER:
            h._write()


def info_fields(logger: logging.Logger, msg: str, fields: Mapping[str, object]) -> None:
    """``logger.info(msg, extra={"fields": fields})``, the same line, at a third of the cost.

    An access line per request is on the hot path of a publish (~15 us of logging's record
    machinery: LogRecord, handler lookup, locks, %-formatting).  When nothing but our own
    buffered handler would see the record (:func:`_direct`), the formatter builds the line
    from the fields directly; otherwise it goes through logging as usual.
    """
    sink = _direct(logger)
    if sink is not None:
        line = sink[1].info_line(logger.name, msg, fields, time.time())
        _append(sink[0], logger, line, len(line))
        return
    logger.info(msg, extra={"fields": fields})


#: Stand-ins for the two numbers of a line made by :func:`info_numbers`.
HOLES = ("\x00ssegw-number-1\x00", "\x00ssegw-number-2\x00")
#: Lines :func:`info_numbers` keeps made, per formatter; emptied when full.
TEMPLATES_MAX = 1024


def info_numbers(logger: logging.Logger, msg: str, key: Hashable, make: Callable[[Hashable], dict[str, object]],
                 a: float, b: int) -> None:
    """``info_fields(logger, msg, fields)`` for ``fields = make(key)`` with the values
    :data:`HOLES` replaced by the numbers ``a`` and ``b``, for lines logged at a high rate
    whose other fields repeat (an access line per publish: only its duration and size
    change).  ``make(key)`` must give the same fields for the same key.

    The line is the formatter's own (``info_rest``), made once per key with the holes in it
    and cut there; a call queues the pieces, the numbers and the time, and the line (stamp,
    pieces, numbers as the formatter writes numbers) is made when the handler writes what is
    pending -- every tick, with the next other line, or at 64 KiB -- many lines in a row.
    An access line cost a single publish ~15 us of its ~100 us through the formatter
    (tuning.md "Publish ingest").
    """
    sink = _direct(logger)
    if sink is None:
        fields = make(key)
        values = {HOLES[0]: a, HOLES[1]: b}
        logger.info(msg, extra={"fields": {k: values.get(v, v) if type(v) is str else v  # type: ignore[call-overload]
                                           for k, v in fields.items()}})
        return
    h, fmt = sink
    templates = fmt.templates
    pieces = templates.get(key)
    if pieces is None:
        pieces = _cut(fmt, logger.name, msg, make(key))
        if len(templates) >= TEMPLATES_MAX:
            templates.clear()
        templates[key] = pieces
    # The line itself is made when it is written (the next tick, at the latest): lines made
    # one after another there cost a third of one made here, between a request's other work.
    _append(h, logger, (pieces, a, b, time.time()), NUMBERS_LINE + len(pieces[0]) + len(pieces[1]) + len(pieces[2]))


#: What a line of info_numbers adds to its pieces (stamp, numbers), for the buffer's size.
NUMBERS_LINE = 50


def _numbers_line(fmt: TextFormatter | JsonFormatter, pieces: tuple[str, str, str], a: float, b: int,
                  created: float) -> str:
    """The line of :func:`info_numbers`: its cut line with the numbers in, as ``fmt`` writes them."""
    one, two, three = pieces
    return f"{fmt.head(created)}{one}{fmt.value_text(a)}{two}{b}{three}"


def _cut(fmt: TextFormatter | JsonFormatter, name: str, msg: str, fields: Mapping[str, object]) -> tuple[str, str, str]:
    rest = fmt.info_rest(name, msg, fields)
    one, two = fmt.value_text(HOLES[0]), fmt.value_text(HOLES[1])
    first, sep, tail = rest.partition(one)
    middle, sep2, last = tail.partition(two)
    if not sep or not sep2 or one in last or two in last or two in first:
        raise ValueError(f"fields of {msg!r} need each hole once, in order")
    return first, middle, last


#: Workers of this process that asked for buffered lines (a single-process reload runs two
#: generations for a while: lines stay buffered until the last one stops).
_BUFFERING = [0]


def buffer_lines(on: bool) -> None:
    """A worker starts (True) or stops (False) writing our handler's lines every tick (it
    calls :func:`flush`); lines are buffered while any worker does.  Turning it off writes
    what is pending."""
    _BUFFERING[0] = max(0, _BUFFERING[0] + (1 if on else -1))
    for h in logging.getLogger().handlers:
        if isinstance(h, _Handler):
            h.flush()
            h.buffered = _BUFFERING[0] > 0


def flush() -> None:
    """Write our handler's pending lines (cheap when there are none)."""
    for h in logging.getLogger().handlers:
        if isinstance(h, _Handler) and h.pending:
            h.flush()


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
            handler.buffered = _BUFFERING[0] > 0  # a reload keeps the worker's buffering
            h.flush()
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


__all__ = ["JsonFormatter", "TextFormatter", "buffer_lines", "flush", "info_fields", "info_numbers", "priority", "setup", "under_journald"]
