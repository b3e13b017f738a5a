"""Tests for ssegw.core.topics: topic names (CONTRACT "Topic names") and auth patterns."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssegw.core.errors import BadRequest
from ssegw.core.topics import MAX_TOPIC_LEN, Pattern, any_match, compile_patterns, validate_topic

ALLOWED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.:@/"
SEG_CHARS = ALLOWED.replace(".", "")


# -- names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "prices.AAPL", "user:42@example.com/inbox", "a-b_c", "x" * MAX_TOPIC_LEN, ALLOWED, "0", ".", "a..b"],
)
def test_valid_topic_names(name: str) -> None:
    assert validate_topic(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * (MAX_TOPIC_LEN + 1),
        "a b",
        "a\nb",
        "a\n",  # the anchor must not allow a trailing newline
        "a\r",
        "a\0",
        "é",
        "ＡＢ",  # full-width letters
        "١٢",  # non-ASCII digits
        "a*",
        "a>",
        "a,b",
        'a"b',
        "a\\b",
        "{sub}",
        "a#b",
        "a?b",
        "a%2Fb",
    ],
)
def test_invalid_topic_names(name: str) -> None:
    with pytest.raises(BadRequest) as ei:
        validate_topic(name)
    assert ei.value.code == "bad_topic"
    assert ei.value.status_hint == 400


@pytest.mark.parametrize("name", [None, 1, b"abc", ["a"], {"a": 1}])
def test_non_string_topic(name: object) -> None:
    with pytest.raises(BadRequest):
        validate_topic(name)


@given(name=st.text(max_size=140) | st.text(alphabet=ALLOWED, max_size=140))
def test_validate_topic_is_name_or_bad_request(name: str) -> None:
    ok = 1 <= len(name) <= MAX_TOPIC_LEN and all(c in ALLOWED for c in name)
    try:
        got = validate_topic(name)
    except BadRequest:
        assert not ok
        return
    assert ok and got == name


# -- patterns --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "topic", "sub", "want"),
    [
        # CONTRACT examples.
        ("prices.*", "prices.AAPL", None, True),
        ("prices.*", "prices", None, False),
        ("prices.*", "prices.AAPL.x", None, False),
        (">", "a", None, True),
        (">", "a.b.c", None, True),
        ("a.>", "a.b", None, True),
        ("a.>", "a.b.c.d", None, True),
        ("a.>", "a", None, False),
        ("a.>", "b.c", None, False),
        # Literal and star.
        ("prices.AAPL", "prices.AAPL", None, True),
        ("prices.AAPL", "prices.aapl", None, False),
        ("prices.AAPL", "prices.AAPL.x", None, False),
        ("*", "a", None, True),
        ("*", "a.b", None, False),
        ("*.b", "a.b", None, True),
        ("*.b", "a.c", None, False),
        ("a.*.c", "a.x.c", None, True),
        ("a.*.c", "a.x.y.c", None, False),
        ("*.>", "a", None, False),
        ("*.>", "a.b", None, True),
        # {sub}.
        ("user.{sub}", "user.alice", "alice", True),
        ("user.{sub}", "user.bob", "alice", False),
        ("user.{sub}", "user.alice", None, False),
        ("user.{sub}", "user.alice", "", False),
        ("user.{sub}.>", "user.alice.inbox", "alice", True),
        ("user.{sub}.>", "user.alice", "alice", False),
        ("u-{sub}", "u-alice", "alice", True),
        ("u-{sub}", "u-bob", "alice", False),
        # A sub with a dot must not smuggle in a second segment as a wildcard would.
        ("user.{sub}", "user.a.b", "a.b", False),
        ("user.{sub}", "user.x", "*", False),
    ],
)
def test_pattern_matching(pattern: str, topic: str, sub: str | None, want: bool) -> None:
    assert Pattern(pattern).matches(topic, sub) is want


@pytest.mark.parametrize("bad", ["", "a..b", ".a", "a.", "a.>.b", ">.a", "a>", "a*", "*a", "a b", "a.{sub", "é"])
def test_bad_patterns_are_value_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        Pattern(bad)


def test_pattern_attributes() -> None:
    p = Pattern("user.{sub}.>")
    assert p.source == "user.{sub}.>"
    assert p.tail and p.has_sub
    assert p.segments == ("user", "{sub}")
    assert not Pattern("a.*").tail and not Pattern("a.*").has_sub
    assert "user.{sub}.>" in repr(p)


def test_compile_patterns_and_any_match() -> None:
    ps = compile_patterns(["prices.*", "user.{sub}.>"])
    assert any_match(ps, "prices.X")
    assert any_match(ps, "user.me.x", "me")
    assert not any_match(ps, "user.me.x", "you")
    assert not any_match(ps, "other")
    assert not any_match((), "prices.X")
    with pytest.raises(ValueError):
        compile_patterns("prices.*")
    with pytest.raises(ValueError):
        compile_patterns(["ok", "a..b"])


def reference_match(pattern: str, topic: str, sub: str | None) -> bool:
    """CONTRACT semantics, written independently: segment lists compared position by position."""
    want = pattern.split(".")
    got = topic.split(".")
    if want[-1] == ">":
        head = want[:-1]
        if len(got) < len(head) + 1:
            return False
        got = got[: len(head)]
        want = head
    if len(want) != len(got):
        return False
    for w, g in zip(want, got, strict=True):
        if w == "*":
            continue
        if "{sub}" in w:
            if not sub:
                return False
            w = w.replace("{sub}", sub)
        if w != g:
            return False
    return True


_SEGS = st.sampled_from(["a", "b", "ab", "X1", "u:1", "@/"])
_PSEGS = st.one_of(_SEGS, st.just("*"), st.just("{sub}"), st.just("x{sub}"))


@given(
    psegs=st.lists(_PSEGS, min_size=0, max_size=4),
    tail=st.booleans(),
    tsegs=st.lists(_SEGS, min_size=1, max_size=6),
    sub=st.none() | _SEGS,
)
def test_pattern_agrees_with_reference(psegs: list[str], tail: bool, tsegs: list[str], sub: str | None) -> None:
    if not psegs and not tail:
        psegs = ["*"]
    pattern = ".".join(psegs + ([">"] if tail else []))
    topic = ".".join(tsegs)
    assert Pattern(pattern).matches(topic, sub) == reference_match(pattern, topic, sub)


@given(topic=st.text(alphabet=ALLOWED, min_size=1, max_size=40))
def test_gt_alone_matches_every_valid_topic(topic: str) -> None:
    assert Pattern(">").matches(topic)


@given(segs=st.lists(st.text(alphabet=SEG_CHARS, min_size=1, max_size=5), min_size=1, max_size=5))
def test_literal_pattern_matches_only_itself(segs: list[str]) -> None:
    topic = ".".join(segs)
    p = Pattern(topic)
    assert p.matches(topic)
    assert not p.matches(topic + ".x")
    assert not p.matches(topic + "x")
    if len(segs) > 1:
        assert not p.matches(".".join(segs[:-1]))


@pytest.mark.parametrize(
    ("pattern", "topic"),
    [("prices.*", "prices."), ("*.x", ".x"), ("a.*.c", "a..c"), ("*", "")],
)
def test_star_never_matches_an_empty_segment(pattern: str, topic: str) -> None:
    """``*`` is exactly one segment, and an empty one is none (a ``prices.*`` token must not
    subscribe to ``prices.``).  ``>`` alone still matches every topic (its contract)."""
    assert not Pattern(pattern).matches(topic)


def test_wildcards_still_match_real_segments() -> None:
    assert Pattern("prices.*").matches("prices.AAPL")
    assert Pattern("a.>").matches("a.b.c")
    assert Pattern(">").matches("x")
