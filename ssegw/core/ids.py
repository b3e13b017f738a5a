"""Event ids: ``EPOCH-SEQ`` (one shard) or ``EPOCH-SEQ0.SEQ1...`` (one sequence per shard).

Why this shape: a connection may subscribe to many topics but hands back one
``Last-Event-ID``.  Every event therefore gets its position in a sequence shared by all the
topics of its broker shard, assigned atomically with the history append; "resume after id X"
is then "for every topic, the events with a higher sequence", whatever topic X was from.
The embedded broker is a single shard.  ``EPOCH`` names one incarnation of the broker's
sequence (a restarted embedded broker, a Redis that lost its data): an id from another epoch
cannot be placed and is answered with ``ssegw.reset`` instead of a silent gap.

Ids contain only ``[0-9a-z.-]``: no CR, LF or NUL, and nothing a proxy would mangle.
"""

from __future__ import annotations

import re

from .errors import BadRequest

MAX_ID_LEN = 256
_ID_RE = re.compile(r"([0-9a-z]{1,16})-([0-9]{1,19}(?:\.[0-9]{1,19}){0,63})\Z")


def format_id(epoch: str, seq: int) -> str:
    return f"{epoch}-{seq}"


def parse_id(text: str) -> tuple[str, tuple[int, ...]]:
    """Split an id into (epoch, per-shard sequences).

    Raises:
        BadRequest: the text is not an id this gateway could have issued (400 "bad_id").
    """
    if len(text) > MAX_ID_LEN:
        raise BadRequest("last event id is too long", code="bad_id")
    m = _ID_RE.match(text)
    if m is None:
        raise BadRequest("last event id is malformed", code="bad_id")
    return m.group(1), tuple(int(s) for s in m.group(2).split("."))
