"""Tests for ssegw.core.publish: decoded /publish bodies in, validated messages out.

Bodies are decoded with orjson, as the protocol layer does, and the encoded message bodies
are checked through the independent SSE parser.
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sse_parser import parse

from ssegw.core.errors import BadRequest, PayloadTooLarge, ProtocolError
from ssegw.core.publish import MAX_KEY_LEN, Message, parse_message, parse_publish
from ssegw.core.sse import encode_frame

MAX_BATCH = 5


def publish(body: object, max_batch: int = MAX_BATCH) -> list[Message]:
    """Round-trip ``body`` through JSON text first, as a real request would."""
    return parse_publish(orjson.loads(orjson.dumps(body)), max_batch, orjson.dumps)


def as_sse(m: Message, eid: str = "e-1"):
    p = parse(encode_frame(eid, m.body).decode())
    assert len(p.events) == 1
    return p.events[0]


# -- accepted --------------------------------------------------------------------------


def test_single_message_with_string_data() -> None:
    [m] = publish({"topic": "prices.AAPL", "data": "line1\r\nline2\rline3\nline4"})
    assert (m.topic, m.event, m.key) == ("prices.AAPL", None, None)
    ev = as_sse(m)
    assert ev.event == "message"
    assert ev.data == "line1\nline2\nline3\nline4"
    assert m.body.count(b"data: ") == 4


@pytest.mark.parametrize(
    "data",
    [
        0,
        -1,
        1.5,
        True,
        False,
        None,
        [],
        {},
        [1, "a", None],
        {"p": 101.5, "s": "AAPL"},
        {"nested": {"x": [1, 2]}},
        "",
        "  spaced",
        "\u2028",
    ],
)
def test_any_json_data(data: object) -> None:
    [m] = publish({"topic": "t", "data": data})
    ev = as_sse(m)
    if isinstance(data, str):
        assert ev.data == data
    else:
        # Non-string data: compact JSON on one line, decoding back to the value.
        assert "\n" not in ev.data
        assert orjson.loads(ev.data) == data
        assert m.body == b"data: " + orjson.dumps(data) + b"\n"


def test_event_and_key() -> None:
    [m] = publish({"topic": "t", "data": 1, "event": "tick", "key": "AAPL"})
    assert (m.event, m.key) == ("tick", "AAPL")
    ev = as_sse(m)
    assert ev.event == "tick" and ev.data == "1"


def test_null_event_and_key_mean_absent() -> None:
    [m] = publish({"topic": "t", "data": 1, "event": None, "key": None})
    assert m.event is None and m.key is None
    assert as_sse(m).event == "message"


def test_key_at_limit_and_empty_key() -> None:
    [m] = publish({"topic": "t", "data": 1, "key": "k" * MAX_KEY_LEN})
    assert m.key == "k" * MAX_KEY_LEN
    [m] = publish({"topic": "t", "data": 1, "key": ""})
    assert m.key == ""


@pytest.mark.parametrize("n", [1, 2, MAX_BATCH])
def test_batch_in_order(n: int) -> None:
    msgs = publish([{"topic": f"t{i}", "data": i} for i in range(n)])
    assert [m.topic for m in msgs] == [f"t{i}" for i in range(n)]
    assert [as_sse(m).data for m in msgs] == [str(i) for i in range(n)]


def test_batch_of_one_is_a_list_of_one() -> None:
    assert len(publish([{"topic": "t", "data": 1}])) == 1


# -- refused ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "in_detail"),
    [
        ("just a string", "bad_message", "JSON object"),
        (5, "bad_message", "JSON object"),
        (None, "bad_message", "JSON object"),
        (True, "bad_message", "JSON object"),
        ([1], "bad_message", "messages[0]"),
        ([[{"topic": "t", "data": 1}]], "bad_message", "messages[0]"),
        ({"data": 1}, "bad_message", "topic"),
        ({"topic": "t"}, "bad_message", "data"),
        ({}, "bad_message", "topic"),
        ({"topic": "t", "data": 1, "extra": 1}, "bad_message", "extra"),
        ({"topic": "t", "data": 1, "Topic": "x"}, "bad_message", "Topic"),
        ({"topic": "", "data": 1}, "bad_topic", "topic"),
        ({"topic": "a b", "data": 1}, "bad_topic", "topic"),
        ({"topic": "x" * 129, "data": 1}, "bad_topic", "topic"),
        ({"topic": 5, "data": 1}, "bad_topic", "topic"),
        ({"topic": None, "data": 1}, "bad_topic", "topic"),
        ({"topic": ["t"], "data": 1}, "bad_topic", "topic"),
        ({"topic": "t", "data": 1, "event": "a\nb"}, "bad_event", "event"),
        ({"topic": "t", "data": 1, "event": "a\rb"}, "bad_event", "event"),
        ({"topic": "t", "data": 1, "event": "a\0b"}, "bad_event", "event"),
        ({"topic": "t", "data": 1, "event": ""}, "bad_event", "event"),
        ({"topic": "t", "data": 1, "event": 5}, "bad_event", "event"),
        ({"topic": "t", "data": 1, "event": "e" * 257}, "bad_event", "event"),
        ({"topic": "t", "data": 1, "event": "ssegw.reset"}, "bad_event", "reserved"),
        ({"topic": "t", "data": 1, "event": "ssegw.anything"}, "bad_event", "reserved"),
        ({"topic": "t", "data": 1, "key": 5}, "bad_message", "key"),
        ({"topic": "t", "data": 1, "key": ["k"]}, "bad_message", "key"),
        ({"topic": "t", "data": 1, "key": {"k": 1}}, "bad_message", "key"),
        ({"topic": "t", "data": 1, "key": "k" * (MAX_KEY_LEN + 1)}, "bad_message", "key"),
        ([], "bad_message", "empty"),
    ],
)
def test_bad_bodies_are_bad_request(body: object, code: str, in_detail: str) -> None:
    with pytest.raises(BadRequest) as ei:
        publish(body)
    assert ei.value.code == code
    assert ei.value.status_hint == 400
    assert in_detail in ei.value.detail


def test_reserved_prefix_is_exact() -> None:
    # Only the "ssegw." prefix is reserved, not every name mentioning ssegw.
    assert publish({"topic": "t", "data": 1, "event": "ssegw"})[0].event == "ssegw"
    assert publish({"topic": "t", "data": 1, "event": "my.ssegw.x"})[0].event == "my.ssegw.x"


def test_batch_over_max_batch_is_payload_too_large() -> None:
    body = [{"topic": "t", "data": i} for i in range(MAX_BATCH + 1)]
    with pytest.raises(PayloadTooLarge) as ei:
        publish(body)
    assert ei.value.status_hint == 413
    assert ei.value.code == "batch_too_large"


def test_batch_error_names_the_index_and_fails_the_whole_batch() -> None:
    body = [{"topic": "ok", "data": 1}, {"topic": "ok", "data": 2}, {"topic": "bad topic", "data": 3}]
    with pytest.raises(BadRequest) as ei:
        publish(body)
    assert "messages[2].topic" in ei.value.detail


def test_non_string_dict_key_is_refused() -> None:
    # JSON cannot carry one, but the parser must not trust its caller.
    with pytest.raises(BadRequest):
        parse_publish({"topic": "t", "data": 1, 5: "x"}, MAX_BATCH, orjson.dumps)


def test_lone_surrogate_string_data_is_refused() -> None:
    # orjson.loads never yields lone surrogates, but the core must stay total.
    with pytest.raises(BadRequest) as ei:
        parse_publish({"topic": "t", "data": "a\ud800"}, MAX_BATCH, orjson.dumps)
    assert ei.value.code == "bad_data"


_SURROGATE_BUG = (
    "BUG (latent; orjson.loads never yields lone surrogates): validate_event_name accepts a lone "
    "surrogate and encode_body / dumps then raise UnicodeEncodeError / TypeError, not a ProtocolError"
)


@pytest.mark.parametrize(
    "obj",
    [{"topic": "t", "data": "x", "event": "a\ud800"}, {"topic": "t", "data": ["a\ud800"]}],
    ids=["event", "nested-data"],
)
def test_lone_surrogates_elsewhere_are_refused_not_crashing(obj: dict) -> None:
    with pytest.raises(ProtocolError):
        parse_publish(obj, MAX_BATCH, orjson.dumps)


# -- properties ------------------------------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),  # what orjson.loads can produce
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["topic", "data", "event", "key", "t", "a.b", "ssegw.x", "x\ny"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["topic", "data", "event", "key"]) | st.text(max_size=6), inner, max_size=5),
    ),
    max_leaves=20,
)
MESSAGE_LIKE = st.fixed_dictionaries(
    {"topic": st.sampled_from(["t", "a.b", "", "a b", 1]), "data": JSON_VALUES},
    optional={
        "event": st.none() | st.sampled_from(["e", "", "a\nb", "ssegw.r", 3]),
        "key": st.none() | st.sampled_from(["k", "", 3, "k" * 300]),
    },
)


@settings(max_examples=200)
@given(body=st.one_of(JSON_VALUES, MESSAGE_LIKE, st.lists(MESSAGE_LIKE, max_size=MAX_BATCH + 2)))
def test_any_json_gives_messages_or_a_protocol_error(body: object) -> None:
    try:
        msgs = parse_publish(body, MAX_BATCH, orjson.dumps)
    except ProtocolError as e:
        assert e.status_hint in (400, 413)
        return
    items = body if isinstance(body, list) else [body]
    assert len(msgs) == len(items) and 1 <= len(msgs) <= MAX_BATCH
    for m, obj in zip(msgs, items, strict=True):
        assert m.topic == obj["topic"]
        ev = as_sse(m)
        data = obj["data"]
        if isinstance(data, str):
            assert ev.data == data.replace("\r\n", "\n").replace("\r", "\n")
        else:
            assert orjson.loads(ev.data) == orjson.loads(orjson.dumps(data))
        assert ev.event == (obj.get("event") or "message")


@given(raw=st.binary(max_size=200) | st.sampled_from([b'{"topic":"t","data":1}', b'[{"topic":"t","data":"\\u2028"}]']))
def test_any_bytes_through_orjson_give_messages_or_a_protocol_error(raw: bytes) -> None:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return
    try:
        parse_publish(obj, MAX_BATCH, orjson.dumps)
    except ProtocolError:
        pass


def test_parse_message_names_where_in_errors() -> None:
    with pytest.raises(BadRequest) as ei:
        parse_message({"topic": "t", "data": 1, "key": 1}, orjson.dumps, "messages[7]")
    assert ei.value.detail.startswith("messages[7].key")
    m = parse_message({"topic": "t", "data": "x"}, orjson.dumps)
    assert "Message('t'" in repr(m)


# -- the column-wise path for plain batches (publish._plain_batch) ----------------------------

PLAIN_TOPICS = st.sampled_from(["t", "a.b", "x" * 128, "x" * 129, "", "a b", "a\nb", "a\n", "\n", "é", 1, None])
PLAIN_LIKE = st.one_of(
    st.fixed_dictionaries({"topic": PLAIN_TOPICS, "data": JSON_VALUES}),
    MESSAGE_LIKE,
    JSON_SCALARS,
    st.lists(JSON_SCALARS, max_size=2),
)


def _per_message(body: list) -> list[Message] | ProtocolError:
    """The message-by-message path alone (what parse_publish did before the column path)."""
    from ssegw.core import publish as pub

    saved = pub._plain_batch
    pub._plain_batch = lambda obj, dumps: None  # type: ignore[assignment]
    try:
        return parse_publish(body, 10_000, orjson.dumps)
    except ProtocolError as e:
        return e
    finally:
        pub._plain_batch = saved  # type: ignore[assignment]


@settings(max_examples=500)
@given(body=st.lists(PLAIN_LIKE, min_size=1, max_size=8))
def test_the_column_path_and_the_message_path_agree(body: list) -> None:
    """Any batch: the same messages (topic, event, key, body bytes), or the same refusal."""
    body = orjson.loads(orjson.dumps(body))
    want = _per_message(body)
    try:
        got: list[Message] | ProtocolError = parse_publish(body, 10_000, orjson.dumps)
    except ProtocolError as e:
        got = e
    if isinstance(want, ProtocolError):
        assert isinstance(got, ProtocolError) and (got.code, got.detail) == (want.code, want.detail)
    else:
        assert not isinstance(got, ProtocolError)
        assert [(m.topic, m.event, m.key, m.body) for m in got] == [(m.topic, m.event, m.key, m.body) for m in want]


def test_the_column_path_takes_plain_batches_and_leaves_the_rest() -> None:
    from ssegw.core.publish import _plain_batch

    plain = [{"topic": "m.1", "data": {"p": 1}}, {"topic": "m.2", "data": "a\nb"}]
    msgs = _plain_batch(plain, orjson.dumps)
    assert msgs is not None and [(m.topic, m.body) for m in msgs] == [("m.1", b'data: {"p":1}\n'), ("m.2", b"data: a\ndata: b\n")]
    for bad in ([{"topic": "a\nb", "data": 1}], [{"topic": "a", "data": 1, "key": "k"}], [{"topic": "", "data": 1}],
                [{"topic": "x" * 129, "data": 1}], [["topic", "data"]], [{"topic": 1, "data": 1}], [{"data": 1, "x": 2}]):
        assert _plain_batch(bad, orjson.dumps) is None, bad
