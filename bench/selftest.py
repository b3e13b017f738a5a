"""Check the subscriber counters offline: a synthetic chunked SSE stream cut into random
reads must be counted exactly by every counting mode, and gaps/duplicates must be seen.

    .venv/bin/python bench/selftest.py
"""

from __future__ import annotations

import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import client  # noqa: E402


def stream(seqs: list[int], rng: random.Random) -> bytes:
    """Response head, the opening comment chunk, then events in chunks of 1..50 with a
    heartbeat chunk now and then -- the shape ssegw writes."""
    out = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
           b"d\r\n: ok\n\nretry: 3000\n\n\r\n"]
    i = 0
    while i < len(seqs):
        k = rng.randint(1, 50)
        t = time.time() - 0.01
        payload = b"".join(
            b'id: ab12cd34-%d\ndata: {"t":%.6f,"sym":"ACME","px":100.5,"n":%d,"pad":"xxxx"}\n\n' % (s, t, s)
            for s in seqs[i:i + k])
        out.append(b"%x\r\n%b\r\n" % (len(payload), payload))
        if rng.random() < 0.1:
            out.append(b"3\r\n:\n\n\r\n")
        i += k
    return b"".join(out)


def feed(cls: type[client.Sub], data: bytes, rng: random.Random) -> tuple[client.Sub, client.App]:
    app = client.App()
    c = cls(app, b"", None)  # type: ignore[arg-type]
    pos = 0
    while pos < len(data):
        n = rng.choice((1, 2, 3, 5, 7, 40, 150, 1000, 20000))
        c.data_received(data[pos:pos + n])
        pos += n
    return c, app


def main() -> int:
    rng = random.Random(7)
    failures = 0
    for trial in range(30):
        n = rng.randint(1, 3000)
        seqs = list(range(5, 5 + n))
        data = stream(seqs, rng)
        for cls, want in ((client.Sub, n), (client.SampledSub, n), (client.SeqSub, seqs[-1]),
                          (client.SeqSampledSub, seqs[-1])):
            c, app = feed(cls, data, rng)
            ok = c.n == want
            if cls in (client.SampledSub, client.SeqSampledSub):
                ok = ok and len(app.lat) == n and app.gaps == 0 and app.dups == 0
            if not ok:
                failures += 1
                print(f"trial {trial} {cls.__name__}: n={c.n} want {want} lat={len(app.lat)} gaps={app.gaps}")
    # A missing and a repeated sequence must be reported by the sequence-checking sampler.
    seqs = [1, 2, 3, 5, 6, 6, 7]
    c, app = feed(client.SeqSampledSub, stream(seqs, rng), rng)
    if (app.gaps, app.dups, c.n) != (1, 1, 7):
        failures += 1
        print(f"gap/dup detection: gaps={app.gaps} dups={app.dups} n={c.n}")
    print(f"{30 * 4 + 1 - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
