"""End-to-end tests of ``GET /events`` (docs/api.md "Subscribe" and "Ids, history and resume").

Every test talks to a real gateway process over real sockets (``harness``), and parses what
it receives with the independent spec parser (``sse_parser``).  Topics are unique per test,
so tests sharing the module gateway cannot see each other's history.
"""

from __future__ import annotations

import json
import select
import socket
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest
from checks import check_error
from harness import Gateway, Response, Stream, request
from sse_parser import Ev, Parser

# -- helpers --------------------------------------------------------------------------------


def new_topic(tag: str = "t") -> str:
    return f"e2e.sub.{tag}.{uuid.uuid4().hex[:10]}"


def path(*topics: str, **params: str) -> str:
    fields = [("topic", t) for t in topics] + list(params.items())
    return "/events?" + urlencode(fields)


def pub(gw: Gateway, msgs: object) -> list[str]:
    r = gw.publish(msgs)
    assert r.status == 200, r
    ids = r.json()["ids"]
    assert isinstance(ids, list) and all(isinstance(i, str) for i in ids)
    return ids


def assert_error(status: int, headers: dict[str, str], body: bytes, want: int, code: str | None = None) -> dict:
    assert headers.get("content-type", "").split(";")[0].strip() == "application/json", headers
    return check_error(status, body, want, code)


def assert_response_error(r: Response, want: int, code: str | None = None) -> dict:
    return assert_error(r.status, r.headers, r.body, want, code)


def refused(gw: Gateway, p: str, headers: dict[str, str] | None = None, want: int = 400,
            code: str | None = None) -> dict:
    s = Stream(gw.port, p, headers, 5)
    try:
        assert s.status != 200, "expected a refusal, got a stream"
        assert s.body == b""  # not a single stream byte
        return assert_error(s.status, s.headers, s.error_body, want, code)
    finally:
        s.close()


def quiet(s: Stream, n: int, wait: float = 0.1) -> None:
    """Assert that nothing beyond ``n`` events arrives within ``wait`` seconds."""
    evs = s.wait_events(n + 1, timeout=wait)
    assert len(evs) == n, [(e.id, e.event, e.data) for e in evs[n:]]


def by_topic(evs: list[Ev], data_topic: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in evs:
        out.setdefault(data_topic[e.data], []).append(e.data)
    return out


@pytest.fixture(scope="module")
def gw_hist3() -> Iterator[Gateway]:
    """A gateway keeping only 3 events per topic, and no keyed state (so that what history
    misses is reset, not compacted: tests/test_keyed_e2e.py has the compacted resumes)."""
    g = Gateway("--history-size", "3", "--max-keys", "0", "--heartbeat-interval", "1s", "--flush-interval", "10ms")
    g.start()
    yield g
    g.stop()


# -- stream head, retry, heartbeats ----------------------------------------------------------


def test_stream_headers_and_retry(gw: Gateway) -> None:
    t = new_topic()
    with gw.stream(path(t)) as s:
        assert s.status == 200
        assert s.raw_head.startswith(b"HTTP/1.1 200 ")
        assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert s.headers["cache-control"] == "no-store, no-transform"
        assert s.headers["x-accel-buffering"] == "no"
        assert "content-length" not in s.headers
        assert "content-encoding" not in s.headers
        assert s.wait_for(lambda x: x.parser.retries, timeout=2)
        assert s.parser.retries == [3000]  # default retry = 3s
        ids = pub(gw, {"topic": t, "data": "x"})
        assert [e.id for e in s.wait_events(1)] == ids
        text = s.body.decode()
        # the retry line comes before the first event, after at most a comment
        assert text.index("retry: 3000\n") < text.index("id: ")
        for line in text[: text.index("retry:")].split("\n"):
            assert line == "" or line.startswith(":"), text
    assert gw.wait_slots(0) == 0


def test_heartbeats_only_when_silent(gw: Gateway) -> None:
    """A silent stream gets a heartbeat every ~1s (heartbeat_interval); streams that get an
    event every 0.3s (one topic, and several topics) get none, until they fall silent."""
    quiet_t, busy_t, a, b = new_topic("q"), new_topic("busy"), new_topic("a"), new_topic("b")
    with gw.stream(path(quiet_t)) as silent, gw.stream(path(busy_t)) as busy, gw.stream(path(a, b)) as multi:
        streams = (silent, busy, multi)
        assert all(s.status == 200 for s in streams)
        opened = time.monotonic()
        assert all(s.wait_for(lambda x: x.parser.retries, timeout=2) for s in streams)
        base = [len(s.parser.comments) for s in streams]
        arrivals: list[list[float]] = [[], [], []]

        def pump_all(duration: float) -> None:
            deadline = time.monotonic() + duration
            while True:
                for k, s in enumerate(streams):
                    s.pump(0)
                    while len(arrivals[k]) < len(s.parser.comments) - base[k]:
                        arrivals[k].append(time.monotonic())
                if time.monotonic() >= deadline:
                    return
                time.sleep(0.01)

        last_pub = 0.0
        for i in range(11):  # one event every 0.3s for 3.3s: the busy streams are never silent for 1s
            pub(gw, [{"topic": busy_t, "data": str(i)}, {"topic": (a, b)[i % 2], "data": str(i)}])
            last_pub = time.monotonic()
            pump_all(0.3)
        assert len(busy.events) == 11 and len(multi.events) == 11 and silent.events == []
        assert arrivals[1] == [] and arrivals[2] == [], (busy.parser.comments, multi.parser.comments)
        # the silent stream: a heartbeat at ~1s, ~2s, ~3s of silence, no more often
        hb = arrivals[0]
        assert 3 <= len(hb) <= 4, [round(x - opened, 3) for x in hb]
        assert hb[0] - opened <= 1.35
        gaps = [y - x for x, y in zip(hb, hb[1:], strict=False)]
        assert all(0.85 <= g <= 1.35 for g in gaps), gaps
        # now the busy streams fall silent: a heartbeat after one interval
        pump_all(1.45)
        for k in (1, 2):
            assert arrivals[k], "no heartbeat after the events stopped"
            assert 0.85 <= arrivals[k][0] - last_pub <= 1.4, arrivals[k][0] - last_pub
        assert not any(s.closed for s in streams)
    assert gw.wait_slots(0) == 0


# -- event encoding -----------------------------------------------------------------------------


def test_event_fields_and_data_lines(gw: Gateway) -> None:
    t = new_topic()
    msgs = [
        {"topic": t, "data": "plain"},
        {"topic": t, "data": "l1\r\nl2\rl3\nl4", "event": "multi"},
        {"topic": t, "data": "trailing\n"},
        {"topic": t, "data": ""},
        {"topic": t, "data": "  leading spaces"},
        {"topic": t, "data": "sep\u2028not\u0085split\x0bnor\x0cthis"},
        {"topic": t, "data": "h\u00e9llo \u2713 \U0001f389 \u65e5\u672c"},
        {"topic": t, "data": {"b": [1, 2.5, None, True], "a": "x\ny", "u": "\u00e9\U0001f389"}},
        {"topic": t, "data": 42},
        {"topic": t, "data": None},
        {"topic": t, "data": ["a", {"k": "v"}]},
        {"topic": t, "data": "data: injected\n\nid: 999\nevent: evil"},
    ]
    with gw.stream(path(t)) as s:
        assert s.status == 200
        ids = pub(gw, msgs)
        evs = s.wait_events(len(msgs))
        quiet(s, len(msgs))
        assert [e.id for e in evs] == ids
        assert all(e.has_id for e in evs)
        assert [e.event for e in evs] == ["message", "multi"] + ["message"] * 10
        assert [e.data for e in evs] == [
            "plain",
            "l1\nl2\nl3\nl4",
            "trailing\n",
            "",
            "  leading spaces",
            "sep\u2028not\u0085split\x0bnor\x0cthis",
            "h\u00e9llo \u2713 \U0001f389 \u65e5\u672c",
            evs[7].data,
            "42",
            "null",
            '["a",{"k":"v"}]',
            "data: injected\n\nid: 999\nevent: evil",
        ]
        obj = msgs[7]["data"]
        # compact JSON on one line (non-ASCII may be escaped or not)
        assert evs[7].data in (json.dumps(obj, separators=(",", ":"), ensure_ascii=False),
                               json.dumps(obj, separators=(",", ":")))
        raw = s.body.decode("utf-8")
        # exact wire form: one data: line per line, LF line ends, blank line after each event
        assert f"id: {ids[1]}\nevent: multi\ndata: l1\ndata: l2\ndata: l3\ndata: l4\n\n" in raw
        assert f"id: {ids[3]}\ndata: \n\n" in raw
        assert f"id: {ids[7]}\ndata: {evs[7].data}\n\n" in raw
        assert f"id: {ids[11]}\ndata: data: injected\ndata: \ndata: id: 999\ndata: event: evil\n\n" in raw
        assert "\r" not in raw
    assert gw.wait_slots(0) == 0


def test_ids_unique_and_clean(gw: Gateway) -> None:
    topics = [new_topic(str(i)) for i in range(3)]
    with gw.stream(path(*topics)) as s:
        assert s.status == 200
        ids: list[str] = []
        for i in range(10):
            ids += pub(gw, [{"topic": t, "data": f"{i}-{t}"} for t in topics])
        evs = s.wait_events(30)
        quiet(s, 30)
        seen = [e.id for e in evs]
        assert len(set(ids)) == 30
        assert sorted(seen) == sorted(ids)
        assert len(set(seen)) == 30
        for i in ids:
            assert i and not any(c in i for c in "\r\n\0")
    assert gw.wait_slots(0) == 0


def test_multi_topic_and_per_topic_order(gw: Gateway) -> None:
    topics = [new_topic(str(i)) for i in range(3)]
    other = new_topic("other")
    data_topic: dict[str, str] = {}
    sent: dict[str, list[str]] = {t: [] for t in topics}
    with gw.stream(path(*topics)) as s_all, gw.stream(path(topics[1])) as s_one:
        assert s_all.status == 200 and s_one.status == 200
        n = 0
        for r in range(40):
            batch = []
            for k in range(1 + r % 4):
                t = topics[(r + k) % 3]
                d = f"{t}#{len(sent[t])}"
                sent[t].append(d)
                data_topic[d] = t
                batch.append({"topic": t, "data": d})
                n += 1
            batch.append({"topic": other, "data": "not mine"})
            pub(gw, batch if len(batch) > 1 else batch[0])
        evs = s_all.wait_events(n, timeout=10)
        quiet(s_all, n)
        assert by_topic(evs, data_topic) == sent
        one = s_one.wait_events(len(sent[topics[1]]))
        quiet(s_one, len(sent[topics[1]]), wait=0.1)
        assert [e.data for e in one] == sent[topics[1]]
    assert gw.wait_slots(0) == 0


def test_allowed_topic_characters_and_128_chars(gw: Gateway) -> None:
    t = f"A-z_0.9:@/{uuid.uuid4().hex[:6]}"  # every allowed character class
    t128 = ("x" * 118) + uuid.uuid4().hex[:10]
    assert len(t128) == 128
    with gw.stream(path(t, t128)) as s:
        assert s.status == 200
        ids = pub(gw, [{"topic": t, "data": "1"}, {"topic": t128, "data": "2"}])
        assert [e.id for e in s.wait_events(2)] == ids
    assert gw.wait_slots(0) == 0


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "",
        "since=last",
        "topic=",
        "topic=a%20b",
        "topic=a%23b",
        "topic=a*b",
        "topic=a%3Eb",
        "topic=a,b",
        "topic=%C3%A9t%C3%A9",
        "topic=" + "x" * 129,
        "topic=ok&topic=" + "y" * 129,
        "topic=%FF",
    ],
    ids=["none", "since-only", "empty", "space", "hash", "star", "gt", "comma", "unicode", "129-chars",
         "second-bad", "bad-utf8"],
)
def test_400_bad_or_missing_topic(gw: Gateway, query: str) -> None:
    refused(gw, "/events?" + query, want=400)
    assert gw.wait_slots(0) == 0


def test_400_too_many_topics(gateway) -> None:  # noqa: ANN001
    g = gateway("--max-topics-per-conn", "2")
    with g.stream(path("a", "b")) as s:
        assert s.status == 200
    refused(g, path("a", "b", "c"), want=400, code="too_many_topics")
    assert g.wait_slots(0) == 0


@pytest.mark.parametrize("since", ["", "first", "LAST", "0", "latest"])
def test_400_bad_since(gw: Gateway, since: str) -> None:
    refused(gw, path(new_topic(), since=since), want=400, code="bad_since")
    assert gw.wait_slots(0) == 0


@pytest.mark.parametrize("bad", ["hello", "abc-", "-5", "ABC-1", "a b-1", "x" * 300, "1-2-3", "zz-1.x"])
def test_400_malformed_id(gw: Gateway, bad: str) -> None:
    t = new_topic()
    refused(gw, path(t), {"Last-Event-ID": bad}, want=400, code="bad_id")
    refused(gw, path(t, last_event_id=bad), want=400, code="bad_id")
    assert gw.wait_slots(0) == 0


def test_404_unknown_path(gw: Gateway) -> None:
    for p in ("/nope", "/events/x?topic=a", "/Events?topic=a", "/metrics", "/healthz", "/admin/stats"):
        assert_response_error(gw.request("GET", p), 404, "not_found")
    assert gw.wait_slots(0) == 0


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_405_wrong_method_on_events(gw: Gateway, method: str) -> None:
    r = gw.request(method, path(new_topic()), b"", {"Content-Type": "application/json"})
    assert_response_error(r, 405, "method_not_allowed")
    allow = [m.strip() for m in r.headers["allow"].split(",")]
    assert "GET" in allow and method not in allow
    assert gw.wait_slots(0) == 0


# -- resume -----------------------------------------------------------------------------------------


def _resume_scenario(gw: Gateway, how: str) -> None:
    a, b, c = new_topic("a"), new_topic("b"), new_topic("c")
    with gw.stream(path(a, b)) as s:
        assert s.status == 200
        first: list[str] = []
        for i in range(3):
            first += pub(gw, {"topic": a, "data": f"a-old{i}"})
            first += pub(gw, {"topic": b, "data": f"b-old{i}"})
        evs = s.wait_events(6)
        assert sorted(e.id for e in evs) == sorted(first)
        last = evs[-1].id
    # the gap: publishes on both topics (singles and a batch) and on a topic not subscribed
    missed: list[tuple[str, str]] = []
    plan = [a, c, b, b, a, c, a, b]
    for i, t in enumerate(plan[:4]):
        missed.append((pub(gw, {"topic": t, "data": f"{t}-m{i}"})[0], t))
    batch = [{"topic": t, "data": f"{t}-m{i + 4}"} for i, t in enumerate(plan[4:])]
    missed += list(zip(pub(gw, batch), plan[4:], strict=True))
    want = {a: [i for i, t in missed if t == a], b: [i for i, t in missed if t == b]}
    n = len(want[a]) + len(want[b])
    headers: dict[str, str] | None = None
    if how == "header":
        p, headers = path(a, b), {"Last-Event-ID": last}
    elif how == "query":
        p = path(a, b, last_event_id=last)
    else:  # both: the header wins over the query
        p, headers = path(a, b, last_event_id=first[0]), {"Last-Event-ID": last}
    with gw.stream(p, headers) as s2:
        assert s2.status == 200
        evs = s2.wait_events(n)
        quiet(s2, n)
        assert all(e.event == "message" for e in evs)  # no reset: history covers the gap
        got = {a: [e.id for e in evs if e.data.startswith(a)], b: [e.id for e in evs if e.data.startswith(b)]}
        assert got == want
        live = pub(gw, [{"topic": b, "data": f"{b}-live"}, {"topic": c, "data": "x"}, {"topic": a, "data": f"{a}-live"}])
        evs = s2.wait_events(n + 2)
        quiet(s2, n + 2)
        assert [e.id for e in evs[n:]] == [live[0], live[2]]
        assert len({e.id for e in evs}) == n + 2
    assert gw.wait_slots(0) == 0


def test_resume_with_last_event_id_header(gw: Gateway) -> None:
    _resume_scenario(gw, "header")


def test_resume_with_last_event_id_query(gw: Gateway) -> None:
    _resume_scenario(gw, "query")


def test_resume_header_wins_over_query(gw: Gateway) -> None:
    _resume_scenario(gw, "both")


def test_resume_multi_topic_one_id_covers_every_topic(gw: Gateway) -> None:
    a, b, c = new_topic("a"), new_topic("b"), new_topic("c")
    # an id seen on c (a topic the new connection does not even ask for)
    pub(gw, [{"topic": a, "data": "a-before"}, {"topic": b, "data": "b-before"}])
    mark = pub(gw, {"topic": c, "data": "c-mark"})[0]
    after = pub(gw, [{"topic": b, "data": "b1"}, {"topic": a, "data": "a1"}, {"topic": c, "data": "c1"},
                     {"topic": a, "data": "a2"}])
    with gw.stream(path(a, b), {"Last-Event-ID": mark}) as s:
        assert s.status == 200
        evs = s.wait_events(3)
        quiet(s, 3)
        assert [e.data for e in evs if e.data.startswith("a")] == ["a1", "a2"]
        assert [e.data for e in evs if e.data.startswith("b")] == ["b1"]
        assert sorted(e.id for e in evs) == sorted([after[0], after[1], after[3]])
    assert gw.wait_slots(0) == 0


def test_resume_from_latest_id_replays_nothing(gw: Gateway) -> None:
    t = new_topic()
    ids = pub(gw, [{"topic": t, "data": str(i)} for i in range(3)])
    with gw.stream(path(t), {"Last-Event-ID": ids[-1]}) as s:
        assert s.status == 200
        quiet(s, 0)
        live = pub(gw, {"topic": t, "data": "live"})
        assert [e.id for e in s.wait_events(1)] == live
    assert gw.wait_slots(0) == 0


def test_since_last_gives_latest_of_each_topic(gw: Gateway) -> None:
    a, b, empty = new_topic("a"), new_topic("b"), new_topic("empty")
    ids = pub(gw, [{"topic": a, "data": "a1"}, {"topic": a, "data": "a2"}, {"topic": b, "data": "b1"},
                   {"topic": a, "data": "a3"}, {"topic": b, "data": "b2", "event": "px"}])
    with gw.stream(path(a, b, empty, since="last")) as s:
        assert s.status == 200
        evs = s.wait_events(2)
        quiet(s, 2)
        assert sorted((e.id, e.data, e.event) for e in evs) == sorted([(ids[3], "a3", "message"), (ids[4], "b2", "px")])
        live = pub(gw, {"topic": empty, "data": "e1"})
        evs = s.wait_events(3)
        assert (evs[2].id, evs[2].data) == (live[0], "e1")
    assert gw.wait_slots(0) == 0


def test_since_earliest_gives_all_retained(gw: Gateway) -> None:
    a, b = new_topic("a"), new_topic("b")
    msgs = [{"topic": (a, b)[i % 3 == 0], "data": f"{i}"} for i in range(12)]
    ids = pub(gw, msgs)
    with gw.stream(path(a, b, since="earliest")) as s:
        assert s.status == 200
        evs = s.wait_events(12)
        quiet(s, 12)
        for t in (a, b):
            want = [(i, m["data"]) for i, m in zip(ids, msgs, strict=True) if m["topic"] == t]
            got_ids = {i for i, m in zip(ids, msgs, strict=True) if m["topic"] == t}
            assert [(e.id, e.data) for e in evs if e.id in got_ids] == want
        live = pub(gw, {"topic": a, "data": "live"})
        assert s.wait_events(13)[12].id == live[0]
        quiet(s, 13)
    assert gw.wait_slots(0) == 0


@pytest.mark.parametrize("since", ["earliest", "last"])
def test_last_event_id_wins_over_since(gw: Gateway, since: str) -> None:
    t = new_topic()
    ids = pub(gw, [{"topic": t, "data": str(i)} for i in range(5)])
    with gw.stream(path(t, since=since), {"Last-Event-ID": ids[1]}) as s:
        assert s.status == 200
        evs = s.wait_events(3)
        quiet(s, 3)
        assert [e.id for e in evs] == ids[2:]
    with gw.stream(path(t, since=since, last_event_id=ids[3])) as s:
        assert s.status == 200
        evs = s.wait_events(1)
        quiet(s, 1)
        assert [e.id for e in evs] == ids[4:]
    assert gw.wait_slots(0) == 0


# -- reset ------------------------------------------------------------------------------------------


def _assert_reset(ev: Ev, topics: list[str]) -> None:
    assert ev.event == "ssegw.reset"
    obj = json.loads(ev.data)
    assert set(obj) == {"topics"}
    assert sorted(obj["topics"]) == sorted(topics)
    assert len(obj["topics"]) == len(set(obj["topics"]))


def test_reset_when_history_no_longer_covers(gw_hist3: Gateway) -> None:
    g = gw_hist3
    t = new_topic()
    ids = pub(g, [{"topic": t, "data": str(i)} for i in range(10)])
    with g.stream(path(t), {"Last-Event-ID": ids[0]}) as s:
        assert s.status == 200
        evs = s.wait_events(1)
        quiet(s, 1)  # no replay after the reset
        _assert_reset(evs[0], [t])
        assert evs[0].id == "" or evs[0].id not in ids
        live = pub(g, {"topic": t, "data": "live"})
        evs = s.wait_events(2)
        quiet(s, 2)
        assert (evs[1].id, evs[1].data, evs[1].event) == (live[0], "live", "message")
    assert g.wait_slots(0) == 0


def test_no_reset_when_history_still_covers(gw_hist3: Gateway) -> None:
    g = gw_hist3
    t = new_topic()
    ids = pub(g, [{"topic": t, "data": str(i)} for i in range(10)])
    # 3 events after ids[6] are kept: covered (trimming keeps never fewer than history_size)
    with g.stream(path(t), {"Last-Event-ID": ids[6]}) as s:
        assert s.status == 200
        evs = s.wait_events(3)
        quiet(s, 3)
        assert [e.id for e in evs] == ids[7:]
    assert g.wait_slots(0) == 0


def test_reset_lists_only_uncovered_topics_then_replays_the_rest(gw_hist3: Gateway) -> None:
    g = gw_hist3
    a, b = new_topic("a"), new_topic("b")
    first = pub(g, {"topic": a, "data": "a0"})[0]
    pub(g, [{"topic": a, "data": f"a{i}"} for i in range(1, 10)])
    b_ids = pub(g, [{"topic": b, "data": "b1"}, {"topic": b, "data": "b2"}])
    with g.stream(path(a, b), {"Last-Event-ID": first}) as s:
        assert s.status == 200
        evs = s.wait_events(3)
        quiet(s, 3)
        _assert_reset(evs[0], [a])  # first thing on the stream, before any replay
        assert [e.id for e in evs[1:]] == b_ids
        live = pub(g, [{"topic": a, "data": "a-live"}, {"topic": b, "data": "b-live"}])
        evs = s.wait_events(5)
        quiet(s, 5)
        assert [e.id for e in evs[3:]] == live
    assert g.wait_slots(0) == 0


@pytest.mark.parametrize("foreign", ["zzzz-5", "zzzz-0", "0-1", "abcdefgh-99999999"])
def test_reset_for_id_from_unknown_epoch(gw: Gateway, foreign: str) -> None:
    a, b = new_topic("a"), new_topic("b")
    pub(gw, [{"topic": a, "data": "old-a"}, {"topic": b, "data": "old-b"}])
    with gw.stream(path(a, b), {"Last-Event-ID": foreign}) as s:
        assert s.status == 200
        evs = s.wait_events(1)
        quiet(s, 1)
        _assert_reset(evs[0], [a, b])
        live = pub(gw, {"topic": b, "data": "live"})
        assert [e.id for e in s.wait_events(2)[1:]] == live
    assert gw.wait_slots(0) == 0


def test_reset_for_id_issued_by_another_gateway(gw: Gateway, gw_hist3: Gateway) -> None:
    t = new_topic()
    other = pub(gw_hist3, {"topic": t, "data": "elsewhere"})[0]
    pub(gw, [{"topic": t, "data": str(i)} for i in range(3)])
    with gw.stream(path(t), {"Last-Event-ID": other}) as s:
        assert s.status == 200
        evs = s.wait_events(1)
        quiet(s, 1)
        _assert_reset(evs[0], [t])
    assert gw.wait_slots(0) == 0
    assert gw_hist3.wait_slots(0) == 0


def test_reset_after_history_ttl(gateway) -> None:  # noqa: ANN001
    g = gateway("--history-ttl", "1s", "--heartbeat-interval", "1s", "--flush-interval", "10ms")
    t = new_topic()
    ids = pub(g, [{"topic": t, "data": "1"}, {"topic": t, "data": "2"}])
    with g.stream(path(t), {"Last-Event-ID": ids[0]}) as s:  # within the ttl: replayed
        assert s.status == 200
        assert [e.id for e in s.wait_events(1)] == ids[1:]
    time.sleep(2.3)
    with g.stream(path(t), {"Last-Event-ID": ids[0]}) as s:
        assert s.status == 200
        evs = s.wait_events(1)
        quiet(s, 1)
        _assert_reset(evs[0], [t])
        live = pub(g, {"topic": t, "data": "3"})
        assert [e.id for e in s.wait_events(2)[1:]] == live
    assert g.wait_slots(0) == 0


def test_no_silent_gap_right_after_history_ttl(gateway) -> None:  # noqa: ANN001
    """Regression: coverage was checked before expired events were trimmed (they were only
    trimmed by the periodic sweep), so a resume between expiry and the next sweep got neither
    the missed event nor ssegw.reset."""
    g = gateway("--history-ttl", "1s", "--heartbeat-interval", "5s", "--flush-interval", "10ms")

    def topics_with_history() -> int:
        return int(g.stats()["broker"]["topics_with_history"])

    # find the phase of the periodic history sweep: the moment a probe topic is forgotten
    pub(g, {"topic": new_topic("probe"), "data": "p"})
    deadline = time.monotonic() + 5
    while topics_with_history() != 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    swept = time.monotonic()
    time.sleep(0.3)
    t = new_topic()
    ids = pub(g, [{"topic": t, "data": "1"}, {"topic": t, "data": "2"}])
    # both events are past the 1s ttl at +1.3s; the next sweeps run at about +1.0s and +2.0s
    time.sleep(max(0.0, swept + 1.6 - time.monotonic()))
    with g.stream(path(t), {"Last-Event-ID": ids[0]}) as s:
        assert s.status == 200
        evs = s.wait_events(1, timeout=1)
        # either the missed event is still replayed, or a reset says it is gone: never nothing
        assert evs, "silent gap: neither the missed event nor ssegw.reset"
        assert evs[0].id == ids[1] or evs[0].event == "ssegw.reset"
    assert g.wait_slots(0) == 0


def test_no_duplicate_for_stream_opened_before_flush(gateway) -> None:  # noqa: ANN001
    """Regression: a stream opened between a publish and its (delayed) flush got the event
    from the replay and again from the flush."""
    # flush_interval 1s and >64 subscribers make the gateway hold a flush back for up to 1s
    g = gateway("--flush-interval", "1s", "--heartbeat-interval", "5s")
    t = new_topic()
    subs = [g.stream(path(t)) for _ in range(65)]
    try:
        first = pub(g, {"topic": t, "data": "x1"})[0]
        second = pub(g, {"topic": t, "data": "x2"})[0]
        with g.stream(path(t), {"Last-Event-ID": first}) as s, g.stream(path(t, since="last")) as s2:
            evs = s.wait_events(2, timeout=2)
            evs2 = s2.wait_events(2, timeout=0.2)
            assert [e.id for e in evs] == [second]
            assert [e.id for e in evs2] == [second]
    finally:
        for x in subs:
            x.close()
    assert g.wait_slots(0) == 0


# -- framing -------------------------------------------------------------------------------------


def test_http10_client_gets_close_delimited_stream(gw: Gateway) -> None:
    t = new_topic()
    s = Stream(gw.port, path(t), None, 5, http10=True)
    with s:
        assert s.status == 200
        assert "transfer-encoding" not in s.headers
        assert "content-length" not in s.headers
        assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert not s.chunked
        ids = pub(gw, [{"topic": t, "data": "a\nb"}, {"topic": t, "data": {"k": 1}, "event": "e"}])
        evs = s.wait_events(2)
        assert [(e.id, e.data, e.event) for e in evs] == [(ids[0], "a\nb", "message"), (ids[1], '{"k":1}', "e")]
        body = bytes(s.body)
        # no chunk-size lines: the body is SSE text from its first byte
        assert body.startswith((b":", b"retry:")), body[:40]
        assert b"\r\n" not in body
        assert s.parser.retries == [3000]
    assert gw.wait_slots(0) == 0


def _strict_dechunk(data: bytes) -> tuple[bytes, bytes]:
    """Parse complete chunks strictly; returns (payload, incomplete rest).  Fails on a last
    chunk (the stream must still be open), bad sizes or bad framing."""
    out = bytearray()
    pos = 0
    while True:
        i = data.find(b"\r\n", pos)
        if i < 0:
            return bytes(out), data[pos:]
        size_text = data[pos:i]
        assert size_text and all(c in b"0123456789abcdefABCDEF" for c in size_text), size_text
        size = int(size_text, 16)
        assert size > 0, "an empty chunk ended the stream early"
        if len(data) < i + 2 + size + 2:
            return bytes(out), data[pos:]
        out += data[i + 2:i + 2 + size]
        assert data[i + 2 + size:i + 4 + size] == b"\r\n", "bad chunk framing"
        pos = i + 4 + size


def test_http11_stream_is_validly_chunked(gw: Gateway) -> None:
    t = new_topic()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(f"GET {path(t)} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
        buf = b""
        deadline = time.monotonic() + 3
        while b"\r\n\r\n" not in buf and time.monotonic() < deadline:
            buf += sock.recv(65536)
        head, _, rest = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"\r\ntransfer-encoding: chunked" in head.lower()
        ids = []
        for i in range(5):
            ids += pub(gw, [{"topic": t, "data": f"line1-{i}\nline2-{i}"}] * (i + 1))
        p = Parser()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            payload, incomplete = _strict_dechunk(rest)
            p = Parser()
            p.feed(payload.decode("utf-8"))
            if len(p.events) >= len(ids) and not incomplete:
                break
            r, _, _ = select.select([sock], [], [], 0.1)
            if r:
                chunk = sock.recv(65536)
                assert chunk, "stream closed"
                rest += chunk
        payload, incomplete = _strict_dechunk(rest)
        assert incomplete == b""
        assert [e.id for e in p.events] == ids
        assert p.retries == [3000]
    assert gw.wait_slots(0) == 0


def test_refusals_answer_before_any_stream_byte(gw: Gateway) -> None:
    r = request(gw.port, "GET", path("bad topic"))
    assert_response_error(r, 400, "bad_topic")
    assert b"retry:" not in r.body and b"text/event-stream" not in r.raw_head
    assert gw.wait_slots(0) == 0
