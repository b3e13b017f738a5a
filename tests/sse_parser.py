"""An independent SSE parser written from the WHATWG spec (9.2.6 "Interpreting an event
stream"), used by the tests to check what the gateway sends.  Deliberately not sharing code
with ssegw.core.sse."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Ev:
    data: str
    event: str = "message"
    id: str = ""  # the last event ID buffer when dispatched
    has_id: bool = False  # this event block carried an id field
    retry: int | None = None


@dataclass
class Parser:
    events: list[Ev] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retries: list[int] = field(default_factory=list)
    last_id: str = ""
    _buf: str = ""
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _block_id: bool = False
    _pending_cr: bool = False
    _started: bool = False

    def feed(self, chunk: str) -> list[Ev]:
        n0 = len(self.events)
        if not self._started and chunk:
            self._started = True
            if chunk.startswith("\ufeff"):
                chunk = chunk[1:]
        text = self._buf + chunk
        self._buf = ""
        i = 0
        start = 0
        while i < len(text):
            c = text[i]
            if c == "\r" or c == "\n":
                if self._pending_cr and c == "\n" and i == start:
                    # LF completing a CRLF already consumed as a line end
                    self._pending_cr = False
                    i += 1
                    start = i
                    continue
                self._pending_cr = c == "\r"
                self._line(text[start:i])
                i += 1
                start = i
                continue
            self._pending_cr = False
            i += 1
        self._buf = text[start:]
        return self.events[n0:]

    def _line(self, line: str) -> None:
        if line == "":
            self._dispatch()
            return
        if line.startswith(":"):
            self.comments.append(line[1:])
            return
        if ":" in line:
            name, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            name, value = line, ""
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
                self._block_id = True
        elif name == "retry":
            if value.isdigit():
                self.retries.append(int(value))

    def _dispatch(self) -> None:
        has_id = self._block_id
        self._block_id = False
        if not self._data:
            self._event = ""
            return
        data = "\n".join(self._data)
        self.events.append(Ev(data=data, event=self._event or "message", id=self.last_id, has_id=has_id))
        self._data = []
        self._event = ""


def parse(text: str) -> Parser:
    p = Parser()
    p.feed(text)
    return p
