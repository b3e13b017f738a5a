"""Subscriber process that counts heartbeats: ``bench/client.py`` with another counter.

Same command line and stdin/stdout protocol as ``bench/client.py`` (``mark``, ``snap``,
``quit``; it *is* client.py's ``main``), but each stream's ``n`` counts SSE heartbeats
(the comment block ``:\\n\\n`` the gateway writes after ``--heartbeat-interval`` of silence;
on the wire ``3\\r\\n:\\n\\n\\r\\n``), found with ``bytes.count(b"\\n:\\n\\n")`` plus a 3-byte
tail for a marker split between two reads.  ``snap`` therefore reports heartbeats received
since the ``mark``: ``min`` over all connections is what ``bench/scale.py capacity`` checks.
``sample K`` switches K streams (spread evenly; all of them when K >= the streams) to
client.py's event counter (``\\nid: ``) and the others back to heartbeats: after ``sample
<all>`` and ``mark``, ``snap`` counts events received, which is how ``capacity`` checks that a
publish reached every stream.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import client  # noqa: E402

HB = b"\n:\n\n"


class HbSub(client.Sub):
    """A stream whose ``n`` is the number of heartbeats received."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        # uvloop keeps the bound data_received of connection_made: after `sample K` changed
        # this stream's class, the method of the new class must be called from here.
        if type(self) is not HbSub:
            type(self).data_received(self, data)
            return
        if self.state != client.STREAM:
            self._head(data)
            return
        # A marker inside (tail + data[:3]) must straddle the two reads: neither part can hold 4 bytes.
        self.n += data.count(HB) + (self.tail + data[:3]).count(HB)
        self.tail = data[-3:] if len(data) >= 3 else (self.tail + data)[-3:]


class HbApp(client.App):
    def __init__(self) -> None:
        super().__init__()
        self.plain = HbSub
        self.sampled = client.Sub  # `sample K`: these K count events instead


# client.main() builds its App by name: every connection it opens is an HbSub.
client.App = HbApp  # type: ignore[misc]

if __name__ == "__main__":
    import uvloop

    uvloop.run(client.main(client.parse_args()))
