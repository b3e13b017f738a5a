"""Tests for ssegw.core.ids: ``EPOCH-SEQ`` / ``EPOCH-SEQ0.SEQ1...`` format and parse."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sse_parser import parse

from ssegw.core.errors import BadRequest
from ssegw.core.ids import MAX_ID_LEN, format_id, parse_id
from ssegw.core.sse import data_lines, encode_frame

EPOCHS = st.text(alphabet="0123456789abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=16)
SEQS = st.integers(min_value=0, max_value=10**19 - 1)


@given(epoch=EPOCHS, seq=SEQS)
def test_format_parse_round_trip(epoch: str, seq: int) -> None:
    eid = format_id(epoch, seq)
    assert parse_id(eid) == (epoch, (seq,))


@given(epoch=EPOCHS, seq=SEQS)
def test_formatted_id_is_safe_on_the_wire(epoch: str, seq: int) -> None:
    eid = format_id(epoch, seq)
    assert not any(c in eid for c in "\r\n\0")
    assert eid.isascii() and eid == eid.strip()
    # The id survives the SSE id: field verbatim.
    p = parse(encode_frame(eid, data_lines("x")).decode())
    assert p.events[0].id == eid and p.last_id == eid


@given(epoch=EPOCHS, seqs=st.lists(SEQS, min_size=1, max_size=8))
def test_multi_shard_ids_parse(epoch: str, seqs: list[int]) -> None:
    text = epoch + "-" + ".".join(str(s) for s in seqs)
    assert parse_id(text) == (epoch, tuple(seqs))


@given(a=SEQS, b=SEQS)
def test_ids_of_distinct_seqs_are_distinct(a: int, b: int) -> None:
    assert (format_id("e", a) == format_id("e", b)) == (a == b)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "-",
        "abc",
        "abc-",
        "-12",
        "ABC-1",  # upper-case epoch
        "a_b-1",
        "abc-1.",
        "abc-.1",
        "abc-1..2",
        "abc--1",
        "abc-x",
        "abc-1\n",  # trailing newline must not slip past the anchor
        "abc-1\r",
        "abc-1\0",
        " abc-1",
        "abc-1 ",
        "abc-12345678901234567890",  # 20 digits
        "a" * 17 + "-1",  # epoch too long
        "abc-" + ".".join(["1"] * 65),  # too many shards
        "abc-١",  # Arabic-Indic digit: \d would take it, [0-9] must not
        "abc-1" + "0" * MAX_ID_LEN,
    ],
)
def test_malformed_ids_are_bad_request(text: str) -> None:
    with pytest.raises(BadRequest) as ei:
        parse_id(text)
    assert ei.value.code == "bad_id"
    assert ei.value.status_hint == 400


def test_longest_accepted_id() -> None:
    text = "e-" + ".".join(["1"] * 64)
    assert len(text) <= MAX_ID_LEN
    assert parse_id(text) == ("e", (1,) * 64)


@given(text=st.text(max_size=300))
def test_arbitrary_text_parses_or_is_bad_request(text: str) -> None:
    try:
        epoch, seqs = parse_id(text)
    except BadRequest:
        return
    # Anything accepted is an id the gateway could have issued, and re-formats to itself.
    assert 1 <= len(seqs) <= 64
    assert all(isinstance(s, int) and s >= 0 for s in seqs)
    assert text == epoch + "-" + ".".join(str(s) for s in seqs) or any(
        len(part) > 1 and part.startswith("0") for part in text.split("-", 1)[1].split(".")
    )
    assert not any(c in text for c in "\r\n\0")


@given(text=st.from_regex(r"[0-9a-z]{1,16}-[0-9]{1,19}(\.[0-9]{1,19}){0,5}", fullmatch=True))
def test_well_formed_ids_always_parse(text: str) -> None:
    epoch, seqs = parse_id(text)
    assert text.startswith(epoch + "-")
    assert [int(x) for x in text.split("-", 1)[1].split(".")] == list(seqs)
