"""Topic names and topic patterns.

Rules (docs/api.md "Topic names"):
- a topic name is 1..128 characters of ``A-Z a-z 0-9 _ - . : @ /``; segments are separated by ``.``;
- a pattern is a dot-separated list of segments where ``*`` matches exactly one segment,
  ``>`` as the *last* segment matches one or more segments (``>`` alone matches every topic),
  and ``{sub}`` is replaced by the principal's ``sub`` before matching.

Patterns are compiled once into a tuple of segments and matched segment by segment; no
regular expression is built from user input.
"""

from __future__ import annotations

import re

from .errors import BadRequest

MAX_TOPIC_LEN = 128
#: One character of a topic name (a regular-expression class).
TOPIC_CHAR = r"[A-Za-z0-9_\-.:@/]"
_TOPIC_RE = re.compile(TOPIC_CHAR + r"{1,128}\Z")
_SEGMENT_RE = re.compile(r"(?:[A-Za-z0-9_\-:@/]|\{sub\})+\Z")
#: ``topic_match(name)`` is not None exactly when ``name`` (a str) is a valid topic name.
topic_match = _TOPIC_RE.match


def validate_topic(name: object) -> str:
    """Return ``name`` if it is a valid topic, else raise :class:`BadRequest`."""
    if not isinstance(name, str):
        raise BadRequest("topic must be a string", code="bad_topic")
    if not name:
        raise BadRequest("topic is empty", code="bad_topic")
    if len(name) > MAX_TOPIC_LEN:
        raise BadRequest(f"topic is longer than {MAX_TOPIC_LEN} characters", code="bad_topic")
    if _TOPIC_RE.match(name) is None:
        raise BadRequest(
            f"topic {name!r} has a character outside A-Z a-z 0-9 _ - . : @ /", code="bad_topic"
        )
    return name


class Pattern:
    """A compiled topic pattern (``prices.*``, ``user.{sub}.>``, ``>``)."""

    __slots__ = ("source", "segments", "tail", "has_sub")

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source:
            raise ValueError("pattern is empty")
        parts = source.split(".")
        tail = parts[-1] == ">"
        if tail:
            parts = parts[:-1]
        for part in parts:
            if part == ">":
                raise ValueError(f"pattern {source!r}: '>' is allowed only as the last segment")
            if part != "*" and _SEGMENT_RE.match(part) is None:
                raise ValueError(f"pattern {source!r}: bad segment {part!r}")
        self.source = source
        self.segments: tuple[str, ...] = tuple(parts)
        self.tail = tail
        self.has_sub = "{sub}" in source

    def matches(self, topic: str, sub: str | None = None) -> bool:
        """True if ``topic`` matches; ``{sub}`` segments need ``sub`` (no sub: no match)."""
        segs = topic.split(".")
        n = len(self.segments)
        if self.tail:
            if len(segs) <= n:
                return False
        elif len(segs) != n:
            return False
        for want, got in zip(self.segments, segs, strict=False):
            if want == "*":
                if not got:
                    return False  # '*' is exactly one segment: "prices.*" is not "prices."
                continue
            if "{sub}" in want:
                if not sub:
                    return False
                want = want.replace("{sub}", sub)
            if want != got:
                return False
        return True

    def __repr__(self) -> str:
        return f"Pattern({self.source!r})"


def compile_patterns(sources: object) -> tuple[Pattern, ...]:
    """Compile a list of pattern strings; raise ValueError naming the bad one."""
    if not isinstance(sources, (list, tuple)):
        raise ValueError("patterns must be a list of strings")
    return tuple(Pattern(s) for s in sources)


def any_match(patterns: tuple[Pattern, ...], topic: str, sub: str | None = None) -> bool:
    for p in patterns:
        if p.matches(topic, sub):
            return True
    return False
