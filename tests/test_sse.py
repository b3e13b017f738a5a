"""Tests for ssegw.core.sse: every frame round-trips through the independent spec parser.

The parser (``tests/sse_parser.py``) is written from WHATWG HTML 9.2.6 and shares no code
with the encoder.  Chunk framing is checked with h11's client-side chunked reader, also
independent of ``sse.chunk``.
"""

from __future__ import annotations

import codecs
import json

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sse_parser import Parser, parse

from ssegw.core.errors import BadRequest, ProtocolError
from ssegw.core.sse import (
    HEARTBEAT,
    LAST_CHUNK,
    MAX_EVENT_NAME,
    RESERVED_EVENT_PREFIX,
    chunk,
    data_lines,
    encode_body,
    encode_comment,
    encode_frame,
    encode_reset,
    encode_retry,
    validate_event_name,
)

# Text biased towards everything that is special to SSE or to str.splitlines().
_SPECIAL = st.sampled_from(
    [
        "\r",
        "\n",
        "\r\n",
        "\n\r",
        "\u2028",
        "\u2029",
        "\x0b",
        "\x0c",
        "\x1c",
        "\x85",
        " ",
        "  ",
        ":",
        "\0",
        "\ufeff",
        "data: x",
        "id: 9",
        "é",
        "\U0001f600",
    ]
)
SSE_TEXT = st.one_of(
    st.text(),
    st.lists(st.one_of(_SPECIAL, st.text(max_size=4)), max_size=12).map("".join),
)
EVENT_NAMES = st.text(min_size=1, max_size=40).filter(lambda s: not any(c in s for c in "\r\n\0"))
IDS = st.from_regex(r"[0-9a-z]{1,16}-[0-9]{1,19}", fullmatch=True)


def normalise(text: str) -> str:
    """What a spec parser must hand back for ``text``: CRLF and CR become LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def frame(eid: str, text: str, event: str | None = None) -> bytes:
    return encode_frame(eid, encode_body(event, data_lines(text)))


# -- data lines ----------------------------------------------------------------------


@given(text=SSE_TEXT, event=st.none() | EVENT_NAMES, eid=IDS)
def test_frame_round_trips_through_spec_parser(text: str, event: str | None, eid: str) -> None:
    p = parse(frame(eid, text, event).decode("utf-8"))
    assert len(p.events) == 1
    ev = p.events[0]
    assert ev.data == normalise(text)
    assert ev.event == (event if event is not None else "message")
    assert ev.id == eid and ev.has_id
    assert p.comments == [] and p.retries == []


@given(texts=st.lists(SSE_TEXT, min_size=1, max_size=5))
def test_consecutive_frames_stay_separate(texts: list[str]) -> None:
    stream = b"".join(frame(f"e-{i + 1}", t) for i, t in enumerate(texts))
    p = parse(stream.decode("utf-8"))
    assert [e.data for e in p.events] == [normalise(t) for t in texts]
    assert [e.id for e in p.events] == [f"e-{i + 1}" for i in range(len(texts))]


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        ("", [b""]),
        ("a", [b"a"]),
        ("a\nb", [b"a", b"b"]),
        ("a\rb", [b"a", b"b"]),
        ("a\r\nb", [b"a", b"b"]),
        ("a\n\rb", [b"a", b"", b"b"]),  # LF then CR: two line ends, not one
        ("a\n", [b"a", b""]),
        ("\n", [b"", b""]),
        ("a\u2028b\x0bc\x0cd\x85e", ["a\u2028b\x0bc\x0cd\x85e".encode()]),  # not splitlines()
        ("  lead", [b"  lead"]),
    ],
)
def test_data_lines_split_only_at_cr_lf(text: str, lines: list[bytes]) -> None:
    assert data_lines(text) == b"".join(b"data: " + ln + b"\n" for ln in lines)


def test_data_value_with_leading_space_survives_the_parser() -> None:
    # The parser strips exactly one space after the colon; the encoder always writes one.
    assert parse(frame("e-1", " x").decode()).events[0].data == " x"
    assert parse(frame("e-1", ":x").decode()).events[0].data == ":x"


def test_empty_data_is_still_an_event() -> None:
    p = parse(frame("e-1", "").decode())
    assert [(e.data, e.id) for e in p.events] == [("", "e-1")]


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "ok\nbad\udc00"])
def test_lone_surrogate_data_is_bad_request(text: str) -> None:
    with pytest.raises(BadRequest) as ei:
        data_lines(text)
    assert ei.value.code == "bad_data"


# -- event names and ids ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["a\rb", "a\nb", "a\r\nb", "a\0b", "\n", "\r", "\0", "x\n"])
def test_event_name_with_cr_lf_nul_is_rejected(name: str) -> None:
    with pytest.raises(BadRequest) as ei:
        validate_event_name(name)
    assert ei.value.code == "bad_event"
    assert ei.value.status_hint == 400


@pytest.mark.parametrize("name", ["", None, 5, b"bytes", ["x"], "x" * (MAX_EVENT_NAME + 1)])
def test_event_name_empty_non_string_or_too_long_is_rejected(name: object) -> None:
    with pytest.raises(BadRequest):
        validate_event_name(name)


@pytest.mark.parametrize("name", ["update", "x" * MAX_EVENT_NAME, " lead", "a\u2028b", "é:x", "ssegw.reset"])
def test_event_name_accepted_verbatim(name: str) -> None:
    # Reserved names are refused by the publish parser (see test_publish_parser), not here:
    # the gateway itself sends ssegw.reset through the same encoder rules.
    assert validate_event_name(name) is name


@given(name=st.text(max_size=300))
def test_event_name_is_either_safe_or_bad_request(name: str) -> None:
    try:
        got = validate_event_name(name)
    except BadRequest:
        assert name == "" or len(name) > MAX_EVENT_NAME or any(c in name for c in "\r\n\0")
        return
    assert got == name
    assert p_event(name) == name


def p_event(name: str) -> str:
    return parse(frame("e-1", "x", name).decode()).events[0].event


def test_reserved_prefix_is_ssegw_dot() -> None:
    assert RESERVED_EVENT_PREFIX == "ssegw."


# -- control frames --------------------------------------------------------------------


@pytest.mark.parametrize("topics", [[], ["a"], ["prices.AAPL", "user:1@x/y", "a-b_c"]])
def test_reset_parses_to_reserved_event_with_json_topics(topics: list[str]) -> None:
    p = parse(encode_reset(topics).decode())
    assert len(p.events) == 1
    ev = p.events[0]
    assert ev.event == "ssegw.reset"
    assert json.loads(ev.data) == {"topics": topics}
    assert not ev.has_id  # the client's last id must stay where it was


def test_reset_does_not_move_last_event_id() -> None:
    p = parse((frame("e-7", "x") + encode_reset(["t"])).decode())
    assert p.last_id == "e-7"
    assert [e.event for e in p.events] == ["message", "ssegw.reset"]


@pytest.mark.parametrize("ms", [0, 1, 3000, 2**31])
def test_retry_parses_as_retry_only(ms: int) -> None:
    p = parse(encode_retry(ms).decode())
    assert p.retries == [ms]
    assert p.events == [] and p.comments == []


def test_heartbeat_is_one_comment_and_no_event() -> None:
    p = parse(HEARTBEAT.decode())
    assert p.comments == [""]
    assert p.events == [] and p.retries == []
    assert encode_comment() == HEARTBEAT


@given(text=SSE_TEXT.filter(bool))
def test_comment_text_parses_as_comments_only(text: str) -> None:
    p = parse(encode_comment(text).decode())
    assert p.events == [] and p.retries == []
    assert [c.removeprefix(" ") for c in p.comments] == normalise(text).split("\n")


def test_control_frames_between_events_do_not_disturb_them() -> None:
    stream = encode_retry(1500) + HEARTBEAT + frame("e-1", "a\nb", "up") + encode_comment("pad") + frame("e-2", "c")
    p = parse(stream.decode())
    assert [(e.event, e.data, e.id) for e in p.events] == [("up", "a\nb", "e-1"), ("message", "c", "e-2")]
    assert p.retries == [1500]


# -- chunk framing ---------------------------------------------------------------------


def dechunk(stream: bytes) -> tuple[bytes, bool]:
    """Read a chunked body with h11's client (independent of sse.chunk).

    Returns the body and whether the last chunk was seen.
    """
    c = h11.Connection(h11.CLIENT)
    c.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    c.send(h11.EndOfMessage())
    c.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + stream)
    body = b""
    ended = False
    while True:
        ev = c.next_event()
        if ev is h11.NEED_DATA:
            break
        if isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            ended = True
            break
    return body, ended


@given(payloads=st.lists(st.binary(max_size=300), max_size=8))
def test_chunks_round_trip_and_never_end_the_body(payloads: list[bytes]) -> None:
    framed = [chunk(p) for p in payloads]
    for p, f in zip(payloads, framed, strict=True):
        if not p:
            assert f == b""  # a zero-length chunk would end the chunked body
        else:
            assert not f.startswith(b"0\r\n")
            size, _, rest = f.partition(b"\r\n")
            assert int(size, 16) == len(p) and rest == p + b"\r\n"
    body, ended = dechunk(b"".join(framed))
    assert body == b"".join(payloads)
    assert not ended
    body, ended = dechunk(b"".join(framed) + LAST_CHUNK)
    assert body == b"".join(payloads) and ended


def test_chunk_of_empty_is_nothing() -> None:
    assert chunk(b"") == b""


def test_chunked_sse_round_trip() -> None:
    events = [frame("e-1", "x\r\ny"), encode_reset(["a"]), HEARTBEAT, frame("e-2", "", "ev")]
    body, _ = dechunk(b"".join(chunk(e) for e in events))
    p = parse(body.decode())
    assert [(e.event, e.data) for e in p.events] == [
        ("message", "x\ny"),
        ("ssegw.reset", '{"topics":["a"]}'),
        ("ev", ""),
    ]


# -- the parser fed whole, byte by byte, and in random splits (h11 tr() style) ---------


def feed_bytes(pieces: list[bytes]) -> Parser:
    p = Parser()
    dec = codecs.getincrementaldecoder("utf-8")()
    for piece in pieces:
        p.feed(dec.decode(piece))
    p.feed(dec.decode(b"", final=True))
    return p


def summary(p: Parser) -> tuple:
    return ([(e.event, e.data, e.id, e.has_id) for e in p.events], p.comments, p.retries, p.last_id)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for c in points:
        out.append(data[prev:c])
        prev = c
    out.append(data[prev:])
    return out


_STREAM_PARTS = st.one_of(
    st.builds(lambda t, e: frame("ab-1", t, e), SSE_TEXT, st.none() | EVENT_NAMES),
    st.builds(lambda ms: encode_retry(ms), st.integers(0, 10**6)),
    st.builds(lambda t: encode_comment(t), SSE_TEXT),
    st.builds(lambda ts: encode_reset(ts), st.lists(st.sampled_from(["a", "b.c"]), max_size=3)),
)


@settings(deadline=None)
@given(parts=st.lists(_STREAM_PARTS, min_size=1, max_size=6), cuts=st.lists(st.integers(0, 10**6), max_size=10))
def test_parser_whole_bytewise_and_split_agree(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    whole = summary(feed_bytes([data]))
    assert summary(feed_bytes([data[i : i + 1] for i in range(len(data))])) == whole
    assert summary(feed_bytes(split_at(data, cuts))) == whole
    # With trailing data (the start of the next event) nothing extra is dispatched.
    assert summary(feed_bytes([data, b"id: zz-9\ndata: part"]))[0] == whole[0]
    # And the per-part parses add up to the whole.
    assert sum(len(parse(pt.decode()).events) for pt in parts) == len(whole[0])


def test_encoding_errors_are_protocol_errors() -> None:
    assert issubclass(BadRequest, ProtocolError)
