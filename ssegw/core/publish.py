"""The publish-body parser: decoded JSON in, validated messages out, all-or-nothing.

``POST /publish`` takes one message object or an array of 1..max_batch of them.  Each message
is ``{"topic": NAME, "data": ANY_JSON, "event": NAME?, "key": STRING?}``.  Every message is
validated and encoded (event and data lines) *before* anything is published, so one bad
message fails the whole request and publishes nothing.

The JSON text itself is decoded by the protocol layer (orjson); this module receives the
decoded value plus a ``dumps`` callable for compact-encoding non-string data, which keeps the
core free of third-party imports.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from itertools import repeat
from operator import itemgetter
from typing import overload

from .errors import BadRequest, PayloadTooLarge
from .sse import RESERVED_EVENT_PREFIX, data_lines, encode_body, validate_event_name
from .topics import MAX_TOPIC_LEN, TOPIC_CHAR, topic_match, validate_topic

#: Longest conflation key, in characters; keys are map keys in a slow client's buffer.
MAX_KEY_LEN = 256
_FIELDS = frozenset(("topic", "data", "event", "key"))


class Message:
    """A validated message: ``body`` is its event/data lines, encoded once."""

    __slots__ = ("topic", "event", "key", "body")

    def __init__(self, topic: str, event: str | None, key: str | None, body: bytes) -> None:
        self.topic = topic
        self.event = event
        self.key = key
        self.body = body

    def __repr__(self) -> str:
        return f"Message({self.topic!r}, event={self.event!r}, key={self.key!r})"


def parse_message(obj: object, dumps: Callable[[object], bytes], where: str = "message") -> Message:
    """Validate one decoded message object.

    Raises:
        BadRequest: naming the field and, in a batch, the index (``messages[3].topic``).
    """
    if not isinstance(obj, dict):
        raise BadRequest(f"{where} must be a JSON object", code="bad_message")
    unknown = [k for k in obj if k not in _FIELDS]
    if unknown:
        raise BadRequest(f"{where}: unknown field {sorted(unknown)[0]!r}", code="bad_message")
    if "topic" not in obj:
        raise BadRequest(f"{where}: missing field 'topic'", code="bad_message")
    if "data" not in obj:
        raise BadRequest(f"{where}: missing field 'data'", code="bad_message")
    try:
        topic = validate_topic(obj["topic"])
    except BadRequest as e:
        raise BadRequest(f"{where}.topic: {e.detail}", code="bad_topic") from None
    event = obj.get("event")
    if event is not None:
        try:
            event = validate_event_name(event)
        except BadRequest as e:
            raise BadRequest(f"{where}.event: {e.detail}", code="bad_event") from None
        if event.startswith(RESERVED_EVENT_PREFIX):
            raise BadRequest(
                f"{where}.event: names starting with {RESERVED_EVENT_PREFIX!r} are reserved",
                code="bad_event",
            )
    key = obj.get("key")
    if key is not None:
        if not isinstance(key, str):
            raise BadRequest(f"{where}.key must be a string", code="bad_message")
        if len(key) > MAX_KEY_LEN:
            raise BadRequest(f"{where}.key is longer than {MAX_KEY_LEN} characters", code="bad_message")
    data = obj["data"]
    try:
        if isinstance(data, str):
            lines = data_lines(data)
        else:
            try:
                lines = b"data: %s\n" % dumps(data)
            except (TypeError, ValueError) as e:  # orjson.JSONEncodeError is a TypeError
                raise BadRequest(f"cannot be encoded as JSON ({e})", code="bad_data") from None
    except BadRequest as e:
        raise BadRequest(f"{where}.data: {e.detail}", code="bad_data") from None
    return Message(topic, event, key, encode_body(event, lines))


#: Newline-terminated topic names, one after another (topics.py's name rule, per line).
_TOPIC_LINES = re.compile(rf"(?:{TOPIC_CHAR}{{1,{MAX_TOPIC_LEN}}}\n)*\Z")


class PlainBatch(Sequence[Message]):
    """Messages of the plain shape -- ``{"topic": NAME, "data": ...}`` each: no event name,
    no key -- kept as two columns, topic names and encoded bodies.  A sequence of
    :class:`Message` to whoever iterates it (made on first use); a broker that knows it reads
    the columns instead (the embedded broker: no Message object per message, and its frames
    and ids made by C loops; tuning.md "Publish ingest")."""

    __slots__ = ("topics", "bodies", "_messages")

    def __init__(self, topics: list[str], bodies: list[bytes]) -> None:
        self.topics = topics
        self.bodies = bodies
        self._messages: list[Message] | None = None

    def messages(self) -> list[Message]:
        msgs = self._messages
        if msgs is None:
            msgs = self._messages = list(map(Message, self.topics, repeat(None), repeat(None), self.bodies))
        return msgs

    def __len__(self) -> int:
        return len(self.topics)

    def __iter__(self) -> Iterator[Message]:
        return iter(self.messages())

    @overload
    def __getitem__(self, i: int) -> Message: ...

    @overload
    def __getitem__(self, i: slice) -> list[Message]: ...

    def __getitem__(self, i: int | slice) -> Message | list[Message]:
        return self.messages()[i]

    def __repr__(self) -> str:
        return f"PlainBatch({self.topics!r})"


def topics_of(msgs: Sequence[Message]) -> list[str]:
    """The topic of each message, in order."""
    if type(msgs) is PlainBatch:
        return msgs.topics
    return [m.topic for m in msgs]


_TOPIC = itemgetter("topic")
_DATA = itemgetter("data")


def _plain_batch(obj: list, dumps: Callable[[object], bytes]) -> PlainBatch | None:
    """The batch of the shape market-data publishers send -- every message exactly
    ``{"topic": NAME, "data": ...}`` -- validated column by column, in C loops (``map``,
    one regex over all topic names), not message by message: a batch of 100 spends ~0.5 us
    a message less here (tuning.md "Publish ingest").  None when any message is of another
    shape or fails a check: the caller then takes the message by message path, which gives
    the same result for a good batch and words the error for a bad one
    (tests/test_publish_parser.py holds the two paths to the same output).
    """
    try:
        topics = list(map(_TOPIC, obj))  # TypeError: not an object; KeyError: no topic
        datas = list(map(_DATA, obj))
        joined = "\n".join(topics)  # TypeError: a topic that is not a string
    except (TypeError, KeyError):
        return None
    if (set(map(len, obj)) != {2}  # no other field (and, with topic and data found, dicts only)
            or joined.count("\n") != len(topics) - 1  # no name with a newline of its own
            or _TOPIC_LINES.match(joined + "\n") is None):
        return None
    try:
        if str in set(map(type, datas)):
            bodies = [data_lines(d) if type(d) is str else b"data: %s\n" % dumps(d) for d in datas]
        else:  # JSON data only (the common case): one line each, C loops throughout
            bodies = list(map(b"data: %s\n".__mod__, map(dumps, datas)))
    except (BadRequest, TypeError, ValueError):
        return None
    return PlainBatch(topics, bodies)


def parse_publish(obj: object, max_batch: int, dumps: Callable[[object], bytes]) -> Sequence[Message]:
    """Validate a decoded ``/publish`` body: one message or an array of them.

    Raises:
        BadRequest: a malformed message or an empty array (nothing is published).
        PayloadTooLarge: more than ``max_batch`` messages.
    """
    if isinstance(obj, list):
        if not obj:
            raise BadRequest("empty batch: send 1 or more messages", code="bad_message")
        if len(obj) > max_batch:
            raise PayloadTooLarge(
                f"batch of {len(obj)} messages is over max_batch ({max_batch})", code="batch_too_large"
            )
        fast = _plain_batch(obj, dumps)
        if fast is not None:
            return fast
        out: list[Message] = []
        append = out.append
        for i, m in enumerate(obj):
            # Fast path for the shape of nearly every message, {"topic": NAME, "data": ...}:
            # the same checks as parse_message, inline (a batch of 100 spends most of its
            # time here).  Anything else, or anything that fails, takes the full path, which
            # also words the error.
            if type(m) is dict and len(m) == 2:
                topic = m.get("topic")
                if type(topic) is str and "data" in m and topic_match(topic) is not None:
                    data = m["data"]
                    try:
                        append(Message(topic, None, None,
                                       data_lines(data) if type(data) is str else b"data: %s\n" % dumps(data)))
                        continue
                    except (BadRequest, TypeError, ValueError):
                        pass
            append(parse_message(m, dumps, f"messages[{i}]"))
        return out
    return [parse_message(obj, dumps)]
