"""Logs: ``log_format`` text/json, the access line of every finished request and stream,
sampling, journald priority prefixes, and no secret in any line."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time

import jwt
import pytest
from harness import Gateway, wait_until

from ssegw import logs

pytestmark = pytest.mark.timeout(60)

SECRET = "LOGSECRET-hs256-0123456789-abcdefghijklmnop"
PUBLISH_KEY = "LOGPUBKEY-static-7f3a9c"
# A token signed with another key: refused, and must not show in the log either.
BAD_TOKEN = jwt.encode({"sub": "LOGBADSUB", "ssegw": {"subscribe": [">"]}}, "LOGWRONGKEY-0123456789-0123456789-xx",
                       algorithm="HS256")
MARKERS = ("LOGSECRET", "LOGPUBKEY", "LOGWRONGKEY", "LOGQUERYTOKEN", "LOGCOOKIE", "LOGBEARER")


def token(**extra: object) -> str:
    claims = {"sub": "LOGSUB", "ssegw": {"subscribe": [">"], "publish": [">"]}}
    claims.update(extra)
    return jwt.encode(claims, SECRET, algorithm="HS256")


def json_lines(g: Gateway) -> list[dict]:
    out = []
    for line in list(g.log):
        line = line.strip()
        if line:
            out.append(json.loads(line))  # every line is one JSON object
    return out


def access(g: Gateway, **want: object) -> list[dict]:
    return [r for r in json_lines(g) if r.get("logger") == "ssegw.access"
            and all(r.get(k) == v for k, v in want.items())]


def assert_clean(g: Gateway, *extra: str) -> None:
    text = "".join(g.log)
    for m in (*MARKERS, *extra):
        assert m not in text, f"{m!r} in the log"


@pytest.fixture(scope="module")
def jg():
    g = Gateway("--log-format", "json", "--log-level", "debug", "--heartbeat-interval", "1s",
                "--flush-interval", "10ms", "--drain-timeout", "1s", "--max-lifetime", "1s",
                "--auth-jwt-secret", SECRET, "--auth-publish-keys", PUBLISH_KEY)
    g.start()
    yield g
    g.stop()


def test_json_lines_and_request_access(jg: Gateway):
    r = jg.publish({"topic": "logs.a", "data": "x"}, {"Authorization": f"Bearer {PUBLISH_KEY}"})
    assert r.status == 200, r
    r = jg.request("GET", "/nope?token=LOGQUERYTOKEN-1")
    assert r.status == 404
    assert wait_until(lambda: access(jg, status=404) and access(jg, path="/publish"))
    recs = json_lines(jg)
    start = [r for r in recs if "serving on" in r["msg"]]
    assert start and start[0]["level"] == "info" and start[0]["logger"] == "ssegw"
    assert start[0]["ts"].endswith("Z") and "T" in start[0]["ts"]
    pub = access(jg, path="/publish")[0]
    assert pub["msg"] == "request" and pub["kind"] == "request"
    assert pub["method"] == "POST" and pub["status"] == 200 and pub["ip"] == "127.0.0.1"
    assert pub["bytes_out"] > 0 and pub["duration_ms"] >= 0
    nf = access(jg, status=404)[0]
    assert nf["path"] == "/nope" and nf["error"] == "not_found", nf
    assert_clean(jg)


def test_refused_auth_is_logged_without_token(jg: Gateway):
    hdrs = {"Authorization": f"Bearer LOGBEARER-{BAD_TOKEN}", "Cookie": "ssegw_token=LOGCOOKIE-abc; x=1"}
    with jg.stream(f"/events?topic=logs.b&token=LOGQUERYTOKEN-{BAD_TOKEN}", hdrs) as s:
        assert s.status == 401
    r = jg.publish({"topic": "logs.b", "data": "x"}, {"Authorization": "Bearer LOGPUBKEY-wrong"})
    assert r.status in (401, 403)
    assert wait_until(lambda: len(access(jg, path="/events", status=401)) >= 1
                      and access(jg, path="/publish", status=r.status))
    line = access(jg, path="/events", status=401)[0]
    assert line["method"] == "GET" and line["error"]
    assert_clean(jg, BAD_TOKEN, BAD_TOKEN.split(".")[2])


def test_stream_line_close_reasons(jg: Gateway):
    tok = token()
    # Closed by the client.
    with jg.stream("/events?topic=logs.c&topic=logs.d", {"Authorization": f"Bearer {tok}"}) as s:
        assert s.status == 200
        r = jg.publish([{"topic": "logs.c", "data": "1"}, {"topic": "logs.d", "data": "2"}],
                       {"Authorization": f"Bearer {PUBLISH_KEY}"})
        assert r.status == 200
        s.wait_events(2)
    assert wait_until(lambda: access(jg, kind="stream", close="client_closed", topic_names="logs.c,logs.d"))
    line = access(jg, kind="stream", close="client_closed", topic_names="logs.c,logs.d")[0]
    assert line["status"] == 200 and line["topics"] == 2 and line["duration_s"] >= 0
    assert line["events"] == 2
    assert line["bytes_out"] > 100  # head, retry, two events
    # Ended by max_lifetime (1s), with the query-string token.
    with jg.stream(f"/events?topic=logs.e&token={tok}") as s:
        assert s.status == 200
        assert s.wait_closed(5)
    assert wait_until(lambda: access(jg, kind="stream", close="lifetime", topic_names="logs.e"))
    line = access(jg, kind="stream", close="lifetime", topic_names="logs.e")[0]
    assert 1.0 <= line["duration_s"] < 3
    assert_clean(jg, tok, tok.split(".")[2])


def test_token_expiry_close_reason(jg: Gateway):
    tok = token(exp=int(time.time()) + 2)
    with jg.stream("/events?topic=logs.x", {"Cookie": f"ssegw_token={tok}"}) as s:
        assert s.status == 200
        assert s.wait_closed(5)
    # max_lifetime is 1s..1.1s, the token 1..2s: either ends it; both are our closes.
    assert wait_until(lambda: [r for r in access(jg, kind="stream", topic_names="logs.x")
                               if r["close"] in ("token_expired", "lifetime")])
    assert_clean(jg, tok, tok.split(".")[2])


def test_sample_zero_keeps_errors_text_format():
    g = Gateway("--access-log-sample", "0", "--flush-interval", "10ms")
    g.start()
    try:
        assert g.publish({"topic": "s.a", "data": "x"}).status == 200
        assert g.request("GET", "/nope").status == 404
        assert wait_until(lambda: any("ssegw.access" in line and "status=404" in line for line in g.log))
        lines = [line for line in g.log if "ssegw.access" in line]
        assert len(lines) == 1, lines
        assert " INFO ssegw.access: request kind=request method=GET path=/nope status=404 " in lines[0]
        assert lines[0][:4].isdigit()  # text: our timestamp first
    finally:
        g.stop()


def test_access_log_off():
    g = Gateway("--no-access-log")
    g.start()
    try:
        assert g.request("GET", "/nope").status == 404
        assert g.request("GET", "/healthz", admin=True).status == 200
        time.sleep(0.2)
        assert not [line for line in g.log if "ssegw.access" in line]
    finally:
        g.stop()


# -- journald (the formatter, with a fake environment) ------------------------------------------


def _record(level: int, msg: str, **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("ssegw.x", level, __file__, 1, msg, None, None)
    if fields:
        rec.fields = fields  # type: ignore[attr-defined]
    return rec


def test_journald_detection(tmp_path):
    f = open(tmp_path / "err", "w")  # noqa: SIM115 (closed below)
    try:
        st = os.fstat(f.fileno())
        assert logs.under_journald({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f)
        assert not logs.under_journald({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f)
        assert not logs.under_journald({"JOURNAL_STREAM": "garbage"}, f)
        assert not logs.under_journald({}, f)
        assert not logs.under_journald({"JOURNAL_STREAM": "1:2"}, io.StringIO())
    finally:
        f.close()


def test_journald_text_has_priority_and_no_timestamp():
    fmt = logs.formatter("text", journald=True)
    assert fmt.format(_record(logging.INFO, "hello")) == "<6>INFO ssegw.x: hello"
    assert fmt.format(_record(logging.WARNING, "w")).startswith("<4>WARNING ")
    assert fmt.format(_record(logging.ERROR, "e")).startswith("<3>ERROR ")
    assert fmt.format(_record(logging.CRITICAL, "c")).startswith("<3>")
    assert fmt.format(_record(logging.DEBUG, "d")).startswith("<7>DEBUG ")
    try:
        raise ValueError("boom")
    except ValueError:
        rec = _record(logging.ERROR, "failed")
        rec.exc_info = sys.exc_info()
    lines = fmt.format(rec).splitlines()
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)


def test_json_under_journald_has_no_prefix():
    out = logs.formatter("json", journald=True).format(_record(logging.ERROR, "m", a=1, b="x y"))
    obj = json.loads(out)
    assert obj["level"] == "error" and obj["msg"] == "m" and obj["a"] == 1 and obj["b"] == "x y"
    assert obj["ts"].endswith("Z")


def test_setup_under_journald_end_to_end(tmp_path):
    path = tmp_path / "err"
    with open(path, "w") as f:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        root = logging.getLogger()
        level = root.level
        h = logs.setup("text", "info", env, f)
        try:
            logging.getLogger("ssegw.access").info("request", extra={"fields": {"status": 404, "path": "/a b"}})
        finally:
            root.removeHandler(h)
            root.setLevel(level)
    assert path.read_text() == '<6>INFO ssegw.access: request status=404 path="/a b"\n'


def test_journald_gateway(tmp_path):
    """A real gateway whose stderr is the file JOURNAL_STREAM names: every line carries a
    priority and no timestamp of ours."""
    path = tmp_path / "err"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSEGW_")}
    with open(path, "w") as f:
        st = os.fstat(f.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen([sys.executable, "-m", "ssegw", "serve", "--port", "0", "--admin-port", "0"],
                                stderr=f, stdout=subprocess.DEVNULL, env=env)
    try:
        assert wait_until(lambda: "serving on" in path.read_text(), 15)
    finally:
        proc.terminate()
        proc.wait(20)
    lines = path.read_text().splitlines()
    assert lines and all(line[:1] == "<" and line[2:3] == ">" for line in lines), lines
    assert any(line.startswith("<6>INFO ssegw: ssegw ") for line in lines), lines


# -- the protocol's access lines, with a fake transport (tests/test_protocol_unit.py) ----------


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [r.fields for r in caplog.records if r.name == "ssegw.access"]  # type: ignore[attr-defined]


def _stream(caplog: pytest.LogCaptureFixture):  # noqa: ANN202
    from test_protocol_unit import connect, feed, get, streamer

    caplog.set_level(logging.INFO, "ssegw.access")
    p, t, w = connect(handler=streamer)
    feed(p, [get("/events?topic=a&token=LOGQUERYTOKEN")])
    assert not _lines(caplog)  # nothing when a stream starts
    return p, t


@pytest.mark.parametrize(("end", "reason"), [
    (lambda p: p.end_stream(b"", "lifetime"), "lifetime"),
    (lambda p: p.abort("slow_buffer"), "slow_buffer"),
    (lambda p: p.abort(), "error"),
    (lambda p: p.close(), "server"),
    (lambda p: p.eof_received(), "client_closed"),
    (lambda p: p.connection_lost(None), "client_closed"),
    (lambda p: p.connection_lost(TimeoutError()), "dead_peer"),
    (lambda p: p.connection_lost(ConnectionResetError()), "client_reset"),
    (lambda p: p.data_received(b"x" * (70 * 1024)), "protocol_error"),
])
def test_stream_close_reason_unit(caplog, end, reason):  # noqa: ANN001
    p, t = _stream(caplog)
    end(p)
    p.connection_lost(None)  # the transport reports it lost after our close: no second line
    lines = _lines(caplog)
    assert len(lines) == 1, lines
    assert lines[0]["kind"] == "stream" and lines[0]["close"] == reason and lines[0]["status"] == 200
    assert "LOGQUERYTOKEN" not in repr(caplog.records)


def test_sampling_unit(caplog):
    from test_protocol_unit import connect, feed, get

    from ssegw.core.errors import BadRequest
    from ssegw.server import access as access_mod

    def handler(p, req, body):  # noqa: ANN001, ANN202
        if req.target.startswith(b"/bad"):
            raise BadRequest("no")
        if req.target.startswith(b"/bug"):
            raise RuntimeError("a bug of ours")
        p.respond(200, b"{}")

    caplog.set_level(logging.INFO, "ssegw.access")
    access_mod.configure_access(True, 0.0)
    try:
        p, t, w = connect(handler=handler)
        feed(p, [get("/ok?token=LOGQUERYTOKEN"), get("/bad?token=LOGQUERYTOKEN")])
        lines = _lines(caplog)
        assert [(x["path"], x["status"]) for x in lines] == [("/bad", 400)]
        access_mod.configure_access(True, 1.0)
        feed(p, [get("/ok?token=LOGQUERYTOKEN")])
        assert [(x["path"], x["status"]) for x in _lines(caplog)] == [("/bad", 400), ("/ok", 200)]
        access_mod.configure_access(False, 1.0)
        feed(p, [get("/bad")])
        assert len(_lines(caplog)) == 2
        # The 500 path: the exception log and the access line name the path only.
        access_mod.configure_access(True, 1.0)
        p, t, w = connect(handler=handler)
        feed(p, [get("/bug?token=LOGQUERYTOKEN")])
        assert [(x["path"], x["status"], x.get("error")) for x in _lines(caplog)][-1] == ("/bug", 500, "internal")
        assert "handler failed for GET /bug" in caplog.text
    finally:
        access_mod.configure_access(True, 1.0)
    assert "LOGQUERYTOKEN" not in caplog.text
    assert "LOGQUERYTOKEN" not in repr([r.__dict__ for r in caplog.records])


def test_reload_drain_close_reason_text():
    """SIGHUP in one process: the old generation's streams end with close=drain (text format)."""
    import signal

    g = Gateway("--drain-timeout", "1s", "--heartbeat-interval", "1s")
    g.start()
    try:
        with g.stream("/events?topic=d.a&token=LOGQUERYTOKEN-x") as s:
            assert s.status == 200
            g.send(signal.SIGHUP)
            assert s.wait_closed(10)
        assert wait_until(lambda: any("ssegw.access: stream " in line and " close=drain " in line for line in g.log), 5)
        line = next(line for line in g.log if "ssegw.access: stream " in line)
        assert " topics=1 topic_names=d.a " in line and " status=200 " in line
        assert_clean(g)
    finally:
        g.stop()


def test_every_slow_consumer_verdict_has_a_close_reason():
    from ssegw.server.context import DROP_REASONS

    # core/fanout.py's plan ("buffer"), worker._liveness ("buffer", "stall", "dead_peer")
    assert DROP_REASONS == {"buffer": "slow_buffer", "stall": "slow_stall", "dead_peer": "dead_peer"}


# -- buffered lines and the record-less access path (logs.info_fields) -----------------------


FIXED_NOW = 1_700_000_000.0625


def _lines_both_ways(tmp_path, monkeypatch, fmt, journald, ways, write):  # noqa: ANN001, ANN202
    """What the gateway's own handler writes for ``write(way, handler)`` in each of ``ways``
    (``fmt``, journald or not), ours the only handler and the clock fixed; by way."""
    monkeypatch.setattr(logging.time, "time", lambda: FIXED_NOW)  # LogRecord.created
    monkeypatch.setattr(logs.time, "time", lambda: FIXED_NOW)
    monkeypatch.setattr(logging.time, "time_ns", lambda: 1_700_000_000_062_500_000)
    out = {}
    root = logging.getLogger()
    level = root.level
    saved = [h for h in root.handlers if not isinstance(h, logs._Handler)]
    for h in saved:  # caplog & co: the fast path is taken only when ours is the only handler
        root.removeHandler(h)
    try:
        for way in ways:
            path = tmp_path / way
            with open(path, "w") as f:
                st = os.fstat(f.fileno())
                env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"} if journald else {}
                h = logs.setup(fmt, "info", env, f)
                logs.buffer_lines(True)
                try:
                    with monkeypatch.context() as m:
                        write(way, h, m)
                    logs.flush()
                finally:
                    logs.buffer_lines(False)
                    root.removeHandler(h)
            out[way] = path.read_text()
    finally:
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)
    return out


@pytest.mark.parametrize("fmt,journald", [("text", False), ("text", True), ("json", False)])
def test_info_fields_writes_the_line_logging_would(tmp_path, monkeypatch, fmt, journald):
    """The record-less path of an access line writes exactly what logging's own path writes
    (same formatter, same clock reading)."""
    fields = {"kind": "request", "method": "POST", "path": "/a b", "status": 200, "duration_ms": 0.125,
              "bytes_out": 108, "ip": "127.0.0.1", "q": 'x"y', "e": ""}

    def write(way, h, m):  # noqa: ANN001, ANN202
        if way == "logging":
            logging.getLogger("ssegw.access").info("request", extra={"fields": fields})
        else:
            m.setattr(logging.Logger, "makeRecord", None)  # no LogRecord on this path
            logs.info_fields(logging.getLogger("ssegw.access"), "request", fields)
        assert h.pending  # buffered, not written yet

    out = _lines_both_ways(tmp_path, monkeypatch, fmt, journald, ("logging", "fast"), write)
    assert out["fast"] == out["logging"] and out["fast"].count("\n") == 1, out


@pytest.mark.parametrize("fmt,journald", [("text", False), ("text", True), ("json", False)])
def test_access_lines_made_from_a_cut_line_are_the_lines_logging_writes(tmp_path, monkeypatch, fmt, journald):
    """access.request_line makes each line from pieces of one cut per key (logs.info_numbers):
    for every key and number, the same bytes as logging's own path, which sees the fields."""
    from ssegw.server import access

    calls = [(b"POST", b"/publish", 200, 0.000123, 117, "127.0.0.1", "", False),
             (b"POST", b"/publish", 200, 1.5, 99, "127.0.0.1", "", False),  # same key, new numbers
             (b"POST", b"/publish", 200, 0.0, 0, "127.0.0.1", "", False),
             (b"GET", b"/events?topic=a&token=SECRET", 401, 0.0123456, 80, "10.0.0.1", "bad_token", False),
             (b"GET", b"/a b" + b"x" * 300 + b"?token=SECRET", 404, 12.25, 5, "::1", "not_found", False),
             (None, None, 503, 0.002, 100, "127.0.0.2", "draining", True),
             (b"POST", b"/publish", 200, 0.000123, 117, "127.0.0.1", "", False)]  # first key again
    cuts = []

    def write(way, h, m):  # noqa: ANN001, ANN202
        if way == "logging":  # what logging writes: the same fields, through a record
            m.setattr(logs, "_direct", lambda logger: None)
        else:
            m.setattr(logging.Logger, "makeRecord", None)  # no record on this path
        for c in calls:
            access.request_line(*c)
        if way == "cut":
            cuts.append(len(h.formatter.templates))

    out = _lines_both_ways(tmp_path, monkeypatch, fmt, journald, ("logging", "cut"), write)
    assert cuts == [4]  # one cut per key
    lines = out["cut"].splitlines()
    assert out["cut"] == out["logging"] and len(lines) == len(calls), out
    assert "SECRET" not in out["cut"]
    assert ("duration_ms=1500.0 bytes_out=99 " in lines[1]) if fmt == "text" else ('"duration_ms":1500.0,"bytes_out":99,' in lines[1])


def test_a_cut_line_needs_each_number_once():
    fmt = logs.TextFormatter()
    with pytest.raises(ValueError):
        logs._cut(fmt, "x", "m", {"a": logs.HOLES[0]})
    with pytest.raises(ValueError):
        logs._cut(fmt, "x", "m", {"b": logs.HOLES[1], "a": logs.HOLES[0]})
    assert logs._cut(fmt, "x", "m", {"a": logs.HOLES[0], "k": "v", "b": logs.HOLES[1], "z": 1}) == (
        "INFO x: m a=", " k=v b=", " z=1")


def test_buffered_lines_keep_their_order_and_a_warning_is_written_at_once(tmp_path):
    root = logging.getLogger()
    level = root.level
    path = tmp_path / "err"
    with open(path, "w") as f:
        h = logs.setup("text", "info", {}, f)
        logs.buffer_lines(True)
        try:
            for i in range(3):
                logs.info_fields(logging.getLogger("ssegw.access"), "request", {"n": i})
            assert path.read_text() == ""  # access lines: nothing written yet
            logging.getLogger("ssegw.x").info("look")
            text = path.read_text()  # any other line at once, and before it what was pending
            assert [ln.split(": ", 1)[1] for ln in text.splitlines()] == ["request n=0", "request n=1", "request n=2", "look"]
            logging.getLogger("ssegw.access").warning("bad")  # an access WARNING: at once too
            assert path.read_text().endswith(": bad\n")
            logging.getLogger("ssegw.access").info("later")
            assert "later" not in path.read_text()
            logs.flush()
            assert path.read_text().endswith(": later\n")
            for i in range(2000):  # 64 KiB pending: written without waiting for a flush
                logs.info_fields(logging.getLogger("ssegw.access"), "request", {"pad": "x" * 40, "n": i})
            assert len(path.read_text()) >= logs.BUFFER_BYTES
        finally:
            logs.buffer_lines(False)  # writes the rest
            root.removeHandler(h)
            root.setLevel(level)
    assert path.read_text().rstrip("\n").endswith("n=1999")
