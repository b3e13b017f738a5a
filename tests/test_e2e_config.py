"""End-to-end tests of configuration (docs/api.md "Configuration"): ``ssegw check-config`` and
``ssegw serve`` run as real subprocesses, and precedence observed on a running gateway."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path
from urllib.parse import urlencode

import pytest
from harness import ROOT, Gateway

SECRET = "s3cr3t-" + uuid.uuid4().hex
PUBKEY = "pk-" + uuid.uuid4().hex


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SSEGW_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ssegw", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout)


def run_many(cases: list[tuple[list[str], dict[str, str]]], timeout: float = 20) -> list[tuple[int, str, str]]:
    """Run several ``python -m ssegw`` processes at once; (returncode, stdout, stderr) each."""
    procs = []
    for args, env in cases:
        e = {k: v for k, v in os.environ.items() if not k.startswith("SSEGW_")}
        e.update(env)
        procs.append(subprocess.Popen([sys.executable, "-m", "ssegw", *args], cwd=ROOT, env=e, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    for p in procs:
        o, err = p.communicate(timeout=timeout)
        out.append((p.returncode, o, err))
    return out


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / f"cfg-{uuid.uuid4().hex[:8]}.toml"
    p.write_text(text)
    return str(p)


def path(*topics: str) -> str:
    return "/events?" + urlencode([("topic", t) for t in topics])


def assert_error_body(status: int, body: bytes, want: int) -> None:
    assert status == want, body
    obj = json.loads(body)
    assert set(obj) == {"error", "detail"} and all(isinstance(v, str) and v for v in obj.values())


VALID = f"""
heartbeat_interval = "30s"
max_body = "64KiB"
history_ttl = 90
cors_origins = ["https://a.example"]

[auth]
jwt_secret = "{SECRET}"
publish_keys = ["{PUBKEY}"]

[[topics]]
pattern = "prices.>"
slow_consumer = "conflate"
"""


# -- check-config ---------------------------------------------------------------------------------


def test_check_config_valid_prints_effective_config_masked(tmp_path: Path) -> None:
    cfg = write(tmp_path, VALID)
    r = run("check-config", cfg)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for secret in (SECRET, PUBKEY):
        assert secret not in out and secret not in r.stderr
    data = tomllib.loads(out)  # the effective config is printed as TOML
    assert data["heartbeat_interval"] in ("30s", 30, 30.0)
    assert data["max_body"] in (65536, "64KiB")
    assert data["history_ttl"] in ("90s", "1m30s", 90, 90.0)
    assert data["cors_origins"] == ["https://a.example"]
    # defaults are part of the effective config
    assert data["max_topics_per_conn"] == 32
    assert data["history_size"] == 1000
    masked = data["auth"].get("jwt_secret")
    assert masked is None or (isinstance(masked, str) and masked and not any(c.isalnum() for c in masked))
    assert data["topics"][0]["pattern"] == "prices.>"
    # what it prints is itself a valid config
    again = run("check-config", write(tmp_path, out))
    assert again.returncode == 0, again.stderr


def test_check_config_applies_environment_and_masks_env_secrets(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'heartbeat_interval = "30s"\n')
    r = run("check-config", cfg, env={"SSEGW_HEARTBEAT_INTERVAL": "2s", "SSEGW_AUTH_JWT_SECRET": SECRET})
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout and SECRET not in r.stderr
    assert tomllib.loads(r.stdout)["heartbeat_interval"] in ("2s", 2, 2.0)


UNKNOWN_KEYS = [
    ('heartbeat_intervall = "1s"\n', "heartbeat_intervall"),
    ("no_such_key = 1\n", "no_such_key"),
    ('[auth]\nsecretz = "x"\n', "secretz"),
    ('[[topics]]\npattern = "a.*"\nhistory_sise = 3\n', "history_sise"),
]
BAD_VALUES = [
    ('heartbeat_interval = "1 fortnight"\n', "heartbeat_interval"),
    ('history_ttl = "-5s"\n', "history_ttl"),
    ('drain_timeout = "10 parsecs"\n', "drain_timeout"),
    ('max_body = "12 parsecs"\n', "max_body"),
    ('max_buffer = "lots"\n', "max_buffer"),
    ("max_head_size = -1\n", "max_head_size"),
    ('[auth]\nleeway = "soon"\n', "leeway"),
]


@pytest.mark.parametrize("cases", [UNKNOWN_KEYS, BAD_VALUES], ids=["unknown-key", "bad-duration-or-size"])
def test_check_config_errors_name_the_key(tmp_path: Path, cases: list[tuple[str, str]]) -> None:
    results = run_many([(["check-config", write(tmp_path, text)], {}) for text, _ in cases])
    for (text, key), (rc, out, err) in zip(cases, results, strict=True):
        assert rc != 0, text
        assert key in err, (text, err)
        assert out == "", text


def test_check_config_secret_not_echoed_in_errors(tmp_path: Path) -> None:
    r = run("check-config", write(tmp_path, f'[auth]\njwt_secret = "{SECRET}"\njwt_algorithm = "RS256"\n'))
    assert r.returncode != 0
    assert SECRET not in r.stderr and SECRET not in r.stdout


def test_check_config_unreadable_or_invalid_file(tmp_path: Path) -> None:
    missing = run("check-config", str(tmp_path / "nope.toml"))
    assert missing.returncode != 0 and "nope.toml" in missing.stderr
    broken = run("check-config", write(tmp_path, "port = = 1\n"))
    assert broken.returncode != 0 and broken.stderr


# -- serve: flags, env, startup failures -------------------------------------------------------------


def test_serve_unknown_flag_is_named() -> None:
    r = run("serve", "--no-such-flag", "--port", "0", "--admin-port", "0")
    assert r.returncode != 0
    assert "--no-such-flag" in r.stderr
    assert "serving on" not in r.stderr


def test_serve_bad_flag_or_env_value_is_named() -> None:
    cases = [
        (["--heartbeat-interval", "soon"], {}, "heartbeat_interval"),
        (["--max-body", "12parsecs"], {}, "max_body"),
        ([], {"SSEGW_MAX_BODY": "huge"}, "max_body"),
        ([], {"SSEGW_HISTORY_TTL": "forever"}, "history_ttl"),
    ]
    results = run_many([(["serve", "--port", "0", "--admin-port", "0", *args], env) for args, env, _ in cases])
    for (args, env, key), (rc, _, err) in zip(cases, results, strict=True):
        assert rc != 0, (args, env)
        assert key in err, (args, env, err)
        assert "serving on" not in err


def test_workers_without_redis_fails_at_startup(tmp_path: Path) -> None:
    base = ["serve", "--port", "0", "--admin-port", "0"]
    cases = [
        (base + ["--workers", "2"], {}),
        (base, {"SSEGW_WORKERS": "2"}),
        (base + ["--config", write(tmp_path, "workers = 2\n")], {}),
    ]
    t0 = time.monotonic()
    results = run_many(cases)
    assert time.monotonic() - t0 < 15  # fails at once, does not serve
    for case, (rc, _, err) in zip(cases, results, strict=True):
        assert rc != 0, case
        assert "workers" in err, (case, err)
        assert "redis" in err.lower(), (case, err)
        assert "serving on" not in err


def test_unknown_env_var_is_a_warning_not_an_error(gateway) -> None:  # noqa: ANN001
    g = gateway("--heartbeat-interval", "1s", env={"SSEGW_FOO": "bar", "SSEGW_HEARTBEAT_INTERVALL": "2s"})
    log = "".join(g.log)
    warn = [ln for ln in g.log if "SSEGW_FOO" in ln]
    assert warn, log
    assert any("warn" in ln.lower() for ln in warn), warn
    assert any("SSEGW_HEARTBEAT_INTERVALL" in ln for ln in g.log), log
    r = g.request("GET", "/healthz", admin=True)
    assert r.status == 200
    with g.stream(path("cfg.unknown-env")) as s:
        assert s.status == 200
    assert g.wait_slots(0) == 0


# -- precedence on a running gateway ----------------------------------------------------------------


def _heartbeat_times(s, duration: float) -> list[float]:  # noqa: ANN001
    out: list[float] = []
    base = len(s.parser.comments)
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline and not s.closed:
        s.pump(min(0.02, max(0.0, deadline - time.monotonic())))
        while len(out) < len(s.parser.comments) - base:
            out.append(time.monotonic())
    return out


def test_precedence_flag_over_env_over_file(gateway) -> None:  # noqa: ANN001
    config = 'heartbeat_interval = "30s"\nmax_topics_per_conn = 1\nmax_batch = 2\nflush_interval = "10ms"\n'
    g = gateway("--max-topics-per-conn", "3", config=config,
                env={"SSEGW_HEARTBEAT_INTERVAL": "1s", "SSEGW_MAX_TOPICS_PER_CONN": "2"})
    # max_batch only in the file: the file is applied
    ok = g.publish([{"topic": "cfg.a", "data": 1}, {"topic": "cfg.a", "data": 2}])
    assert ok.status == 200, ok
    big = g.publish([{"topic": "cfg.a", "data": i} for i in range(3)])
    assert_error_body(big.status, big.body, 413)
    # max_topics_per_conn: flag 3 wins over env 2 and file 1
    with g.stream(path("cfg.a", "cfg.b", "cfg.c")) as s:
        assert s.status == 200
        # heartbeat_interval: env 1s wins over file 30s
        opened = time.monotonic()
        times = _heartbeat_times(s, 2.4)
        assert len(times) >= 2, s.parser.comments
        assert times[0] - opened <= 1.4
    refused = g.stream(path("cfg.a", "cfg.b", "cfg.c", "cfg.d"))
    refused.close()
    assert_error_body(refused.status, refused.error_body, 400)
    assert g.wait_slots(0) == 0


def test_precedence_env_over_file(gateway) -> None:  # noqa: ANN001
    g = gateway(config='max_topics_per_conn = 1\nmax_batch = 1\nheartbeat_interval = "1s"\n',
                env={"SSEGW_MAX_TOPICS_PER_CONN": "2"})
    with g.stream(path("cfg.a", "cfg.b")) as s:
        assert s.status == 200
        # heartbeat_interval from the file alone is applied (the control for the test above)
        opened = time.monotonic()
        times = _heartbeat_times(s, 1.4)
        assert times and times[0] - opened <= 1.4, s.parser.comments
    refused = g.stream(path("cfg.a", "cfg.b", "cfg.c"))
    refused.close()
    assert_error_body(refused.status, refused.error_body, 400)
    big = g.publish([{"topic": "cfg.a", "data": 1}, {"topic": "cfg.a", "data": 2}])
    assert_error_body(big.status, big.body, 413)  # max_batch = 1 from the file
    assert g.wait_slots(0) == 0


def test_backlog_key_sets_the_listen_backlog() -> None:
    """``backlog`` is the public listener's listen() backlog (``ss`` shows it as Send-Q)."""
    import shutil
    import subprocess

    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2)")
    with Gateway("--backlog", "123") as g:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{g.port}"], capture_output=True, text=True, check=True).stdout
        fields = out.split()
        assert fields and fields[2] == "123", out


def test_a_port_in_use_is_named() -> None:
    """Starting on a port another process holds fails at once, naming the address."""

    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "ssegw", "serve", "--host", "127.0.0.1", "--port", str(port),
                            "--admin-port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert f"127.0.0.1:{port}" in r.stderr and "in use" in r.stderr, r.stderr
