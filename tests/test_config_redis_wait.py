"""Config keys ``redis_wait_replicas`` and ``redis_wait_timeout`` (docs/api.md "Redis
failover", "Configuration"): file, env and flag spellings, their checks, ``check-config``
output and round trip, and the values handed to the Redis broker."""

from __future__ import annotations

import os
import tomllib

import pytest
from test_config import load_args
from test_config import write as write  # a fixture, used by name

from ssegw.cli import main as cli_main
from ssegw.cli import make_broker
from ssegw.config import Config, ConfigError, load_file, render


def test_defaults_are_auto_and_one_second():
    c = load_args([])
    assert c.redis_wait_replicas is None  # auto: the broker decides per shard
    assert c.redis_wait_timeout == 1.0
    assert Config().redis_wait_replicas is None


@pytest.mark.parametrize(("raw", "want"), [("0", 0), ("1", 1), ("3", 3), ("auto", None), (" AUTO ", None)])
def test_wait_replicas_from_env_and_flag(raw, want):
    assert load_args([], {"SSEGW_REDIS_WAIT_REPLICAS": raw}).redis_wait_replicas == want
    assert load_args(["--redis-wait-replicas", raw]).redis_wait_replicas == want


def test_wait_settings_from_file_and_precedence(write):
    path = write('redis_wait_replicas = 2\nredis_wait_timeout = "250ms"\n')
    c = load_file(path, environ={})
    assert (c.redis_wait_replicas, c.redis_wait_timeout) == (2, 0.25)
    assert load_file(write('redis_wait_replicas = "auto"\n'), environ={}).redis_wait_replicas is None
    env = {"SSEGW_REDIS_WAIT_REPLICAS": "0", "SSEGW_REDIS_WAIT_TIMEOUT": "2s"}
    c = load_args(["--config", path], env)
    assert (c.redis_wait_replicas, c.redis_wait_timeout) == (0, 2.0)  # env over file
    c = load_args(["--config", path, "--redis-wait-replicas", "auto", "--redis-wait-timeout", "3"], env)
    assert (c.redis_wait_replicas, c.redis_wait_timeout) == (None, 3.0)  # flags over env


@pytest.mark.parametrize(
    ("source", "raw", "needle"),
    [
        ("env", "-1", "must be >= 0"),
        ("env", "one", "expected an integer or \"auto\""),
        ("env", "1.5", "expected an integer or \"auto\""),
        ("file", "true", "expected an integer or \"auto\""),
        ("file", "1.0", "expected an integer or \"auto\""),
        ("file", '"2"', "expected an integer or \"auto\""),  # a TOML string must be "auto"
    ],
)
def test_wait_replicas_rejects(write, source, raw, needle):
    with pytest.raises(ConfigError) as e:
        if source == "env":
            load_args([], {"SSEGW_REDIS_WAIT_REPLICAS": raw})
        else:
            load_file(write(f"redis_wait_replicas = {raw}\n"), environ={})
    assert e.value.key == "redis_wait_replicas"
    assert str(e.value).startswith("redis_wait_replicas: ") and needle in str(e.value)


@pytest.mark.parametrize("raw", ["0", "0s", "-1s", "5s", "4.5", "abc"])
def test_wait_timeout_rejects(raw):
    with pytest.raises(ConfigError) as e:
        load_args([f"--redis-wait-timeout={raw}"])
    assert e.value.key == "redis_wait_timeout"
    assert "flag --redis-wait-timeout" in str(e.value)


def test_wait_timeout_upper_bound_is_accepted():
    assert load_args(["--redis-wait-timeout", "4s"]).redis_wait_timeout == 4.0
    assert load_args(["--redis-wait-timeout", "1ms"]).redis_wait_timeout == 0.001


def test_render_round_trips(write):
    for c in (Config(), Config(redis_wait_replicas=0, redis_wait_timeout=0.25),
              Config(redis_wait_replicas=2, redis_wait_timeout=4.0)):
        text = render(c)
        assert load_file(write(text, "r.toml"), environ={}) == c
    assert 'redis_wait_replicas = "auto"' in render(Config())
    assert 'redis_wait_timeout = "1s"' in render(Config())


def test_check_config_prints_them(write, monkeypatch, capsys):
    for name in list(os.environ):
        if name.startswith("SSEGW_"):
            monkeypatch.delenv(name)
    path = write('redis = "redis://127.0.0.1:6379/0"\nredis_wait_timeout = "500ms"\n')
    assert cli_main(["check-config", path]) == 0
    out = tomllib.loads(capsys.readouterr().out)
    assert out["redis_wait_replicas"] == "auto" and out["redis_wait_timeout"] == "500ms"
    monkeypatch.setenv("SSEGW_REDIS_WAIT_REPLICAS", "0")
    assert cli_main(["check-config", path]) == 0
    assert tomllib.loads(capsys.readouterr().out)["redis_wait_replicas"] == 0
    monkeypatch.setenv("SSEGW_REDIS_WAIT_REPLICAS", "-2")
    assert cli_main(["check-config", path]) == 2
    err = capsys.readouterr().err
    assert "config error: redis_wait_replicas:" in err and "SSEGW_REDIS_WAIT_REPLICAS" in err


def test_help_names_the_flags(capsys):
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--redis-wait-replicas N|auto" in out and "--redis-wait-timeout DURATION" in out


def test_broker_gets_the_settings():
    b = make_broker(Config(redis="redis://127.0.0.1:1/0", redis_wait_replicas=2, redis_wait_timeout=0.25))
    assert (b._wait_replicas, b._wait_timeout_ms) == (2, 250)  # type: ignore[attr-defined]
    b = make_broker(Config(redis="redis://127.0.0.1:1/0"))
    assert (b._wait_replicas, b._wait_timeout_ms) == (None, 1000)  # type: ignore[attr-defined]
