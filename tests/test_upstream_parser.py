"""core/sseparse.py, the upstream parser: fed whole, one byte at a time and in random cuts; checked
against the independent spec parser in tests/sse_parser.py; bounded whatever the input."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sse_parser import Parser

from ssegw.core.sseparse import SSEParser, StreamError

STREAM = (b"\xef\xbb\xbfretry: 2500\r\n: comment\n\nid: 1\nevent: price\ndata: a\ndata:  b\r\n\r"
          b"\nid\ndata: no id\n\nevent: only-a-name\n\ndata\n\nid: x\0y\ndata: nul id ignored\n\n"
          b"data: tail-without-blank-line")


def feed_all(parts: list[bytes]) -> tuple[list[tuple[str | None, str, str | None]], SSEParser]:
    p = SSEParser(1 << 16, 1 << 16)
    out = []
    for part in parts:
        out += [(e.event, e.data, e.id) for e in p.feed(part)]
    return out, p


EXPECTED = [("price", "a\n b", "1"), (None, "no id", None), (None, "", None), (None, "nul id ignored", None)]


@pytest.mark.parametrize("cut", ["whole", "bytes", "random"])
def test_parser_cuts(cut: str) -> None:
    if cut == "whole":
        parts = [STREAM]
    elif cut == "bytes":
        parts = [STREAM[i:i + 1] for i in range(len(STREAM))]
    else:
        rnd = random.Random(7)
        parts, i = [], 0
        while i < len(STREAM):
            n = rnd.randint(1, 9)
            parts.append(STREAM[i:i + n])
            i += n
    got, p = feed_all(parts)
    assert got == EXPECTED
    assert p.retry_ms == 2500
    assert p.last_id is None  # "id" with no value reset it; the NUL one was ignored


def test_agrees_with_the_spec_parser() -> None:
    got, _ = feed_all([STREAM])
    ref = Parser()
    ref.feed(STREAM.decode("utf-8"))
    assert [e.data for e in ref.events] == [d for _, d, _ in got]
    assert [e.event for e in ref.events] == [e or "message" for e, _, _ in got]


def test_bounds() -> None:
    p = SSEParser(100, 150)
    with pytest.raises(StreamError) as e:
        for _ in range(20):
            p.feed(b"x" * 10)  # a line that never ends
    assert e.value.reason == "too_large"
    p = SSEParser(100, 150)
    with pytest.raises(StreamError) as e:
        p.feed(b"data: " + b"y" * 80 + b"\n" + b"data: " + b"y" * 80 + b"\n")
    assert e.value.reason == "too_large"
    with pytest.raises(StreamError) as e:
        SSEParser(100, 100).feed(b"data: \xff\n\n")
    assert e.value.reason == "malformed"


def test_resume_id_is_kept() -> None:
    p = SSEParser(100, 100, last_id="u-9")
    assert [e.id for e in p.feed(b"data: a\n\n")] == ["u-9"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=20))
def test_any_bytes_give_events_or_stream_error(parts: list[bytes]) -> None:
    p = SSEParser(64, 128)
    try:
        for part in parts:
            for ev in p.feed(part):
                assert len(ev.data.encode()) <= 128
    except StreamError as e:
        assert e.reason in ("too_large", "malformed")
