"""Tests for ssegw.config: syntax, precedence, errors naming keys, topics, auth, render."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import textwrap
import tomllib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st

from ssegw import config as cfgmod
from ssegw.cli import main as cli_main
from ssegw.config import (
    AuthConfig,
    Config,
    ConfigError,
    TopicRule,
    add_arguments,
    load,
    load_file,
    parse_bool,
    parse_duration,
    parse_size,
    render,
)

# --------------------------------------------------------------------------------------------
# helpers


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssegw")
    add_arguments(p)
    return p


def load_args(argv: list[str], environ: dict[str, str] | None = None) -> Config:
    return load(parser().parse_args(argv), environ or {})


@pytest.fixture
def write(tmp_path):
    def _write(text: str, name: str = "ssegw.toml") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return str(path)

    return _write


def from_toml(write, text: str, environ: dict[str, str] | None = None) -> Config:
    return load_file(write(text), environ=environ or {})


def pem_public_key(kind: str = "rsa") -> str:
    if kind == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
    return (
        private.public_key()
        .public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        .decode("ascii")
    )


@pytest.fixture(scope="module")
def rsa_pem() -> str:
    return pem_public_key("rsa")


@pytest.fixture
def pem_file(tmp_path, rsa_pem) -> str:
    path = tmp_path / "jwt.pub.pem"
    path.write_text(rsa_pem, encoding="ascii")
    return str(path)


# --------------------------------------------------------------------------------------------
# defaults


def test_defaults():
    c = load_args([])
    assert c == Config()
    assert (c.host, c.port, c.admin_host, c.admin_port) == ("127.0.0.1", 8080, "127.0.0.1", 8081)
    assert c.workers == 1
    assert c.redis == ""
    assert c.flush_interval == 0.015
    assert c.heartbeat_interval == 15.0
    assert c.retry == 3.0
    assert c.head_timeout == 10.0
    assert c.max_head_size == 16384
    assert c.max_body == 1024 * 1024
    assert c.max_batch == 1000
    assert c.max_topics_per_conn == 32
    assert c.max_buffer == 256 * 1024
    assert c.slow_consumer == "drop"
    assert c.slow_grace == 5.0
    assert c.max_lifetime == 0.0
    assert c.drain_timeout == 10.0
    assert c.history_size == 1000
    assert c.history_ttl == 3600.0
    assert c.max_connections == 100000
    assert c.max_conns_per_ip == 0
    assert c.conn_rate == 0.0
    assert c.conn_burst == 20
    assert c.ip_allow == c.ip_deny == c.trusted_proxies == ()
    assert c.cors_origins == ()
    assert c.cors_credentials is False
    assert c.log_level == "info"
    assert c.demo is False
    assert c.topics == ()
    a = c.auth
    assert a == AuthConfig()
    assert a.jwt_algorithm == "HS256"
    assert a.jwt_secret == a.jwt_public_key == a.jwt_public_key_path == ""
    assert a.audience == a.issuer == ""
    assert a.leeway == 0.0
    assert a.cookie == "ssegw_token"
    assert a.publish_keys == ()
    assert a.enabled is False


def test_config_is_frozen():
    c = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.auth.jwt_secret = "x"  # type: ignore[misc]


def test_all_flags_default_to_none():
    ns = parser().parse_args([])
    for name, value in vars(ns).items():
        assert value is None, name


def test_flag_and_env_names():
    p = parser()
    ns = p.parse_args(
        ["--max-conns-per-ip", "3", "--auth-jwt-secret", "s", "--no-demo", "--cors-credentials"]
    )
    assert ns.max_conns_per_ip == "3"
    assert ns.auth_jwt_secret == "s"
    assert ns.demo is False
    assert ns.cors_credentials is True
    c = load(ns, {"SSEGW_AUTH_AUDIENCE": "aud", "SSEGW_HISTORY_TTL": "5m"})
    assert c.max_conns_per_ip == 3
    assert c.auth.jwt_secret == "s"
    assert c.auth.audience == "aud"
    assert c.history_ttl == 300.0


def test_unknown_flag_is_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--max-bufer", "1"])


# --------------------------------------------------------------------------------------------
# value syntax


@pytest.mark.parametrize(
    "text, seconds",
    [
        (0, 0.0),
        (15, 15.0),
        (2.5, 2.5),
        ("250ms", 0.25),
        ("15ms", 0.015),
        ("15s", 15.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2.5", 2.5),
        ("0", 0.0),
        (" 1.5h ", 5400.0),
        ("10 s", 10.0),
        ("-0", 0.0),
    ],
)
def test_parse_duration_forms(text, seconds):
    assert parse_duration(text) == seconds
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    "bad", ["", "fast", "15 sec", "1d", "ms", "-1s", "-2", "nan", "inf", "1e999", True, None, [1]]
)
def test_parse_duration_rejects(bad):
    with pytest.raises(ConfigError) as exc:
        parse_duration(bad, "retry")
    assert exc.value.key == "retry"
    assert str(exc.value).startswith("retry:")


@pytest.mark.parametrize(
    "text, size",
    [
        (0, 0),
        (512, 512),
        ("512", 512),
        ("512B", 512),
        ("256KiB", 256 * 1024),
        ("1MiB", 1024 * 1024),
        ("1GiB", 1024**3),
        ("2KB", 2000),
        ("3MB", 3_000_000),
        ("1GB", 1_000_000_000),
        ("1mib", 1024 * 1024),
        (" 4 KiB ", 4096),
    ],
)
def test_parse_size_forms(text, size):
    assert parse_size(text) == size
    assert type(parse_size(text)) is int


@pytest.mark.parametrize("bad", ["", "lots", "1.5MiB", "1TiB", "-1", "KiB", 1.0, -5, True, None])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError) as exc:
        parse_size(bad, "max_body")
    assert exc.value.key == "max_body"


@pytest.mark.parametrize(
    "text, value",
    [
        ("true", True), ("1", True), ("yes", True), ("on", True), ("TRUE", True),
        ("false", False), ("0", False), ("no", False), ("off", False), ("Off", False),
    ],
)  # fmt: skip
def test_bool_text_forms(text, value):
    assert parse_bool(text) is value
    assert load_args([], {"SSEGW_DEMO": text}).demo is value
    assert load_args([], {"SSEGW_CORS_CREDENTIALS": text}).cors_credentials is value


def test_bool_flags_are_boolean_optional():
    assert load_args(["--demo"]).demo is True
    assert load_args(["--no-demo"], {"SSEGW_DEMO": "yes"}).demo is False
    assert load_args(["--cors-credentials"]).cors_credentials is True


def test_duration_and_size_from_each_source(write):
    path = write(
        """
        retry = "250ms"
        heartbeat_interval = 20
        drain_timeout = 2.5
        history_ttl = "1h"
        max_body = "2MiB"
        max_buffer = 65536
        max_head_size = "8KiB"
        """
    )
    c = load_file(path, environ={})
    assert (c.retry, c.heartbeat_interval, c.drain_timeout, c.history_ttl) == (
        0.25,
        20.0,
        2.5,
        3600.0,
    )
    assert (c.max_body, c.max_buffer, c.max_head_size) == (2 * 1024 * 1024, 65536, 8192)
    c = load_args(["--retry", "1.5", "--max-body", "1000"], {"SSEGW_MAX_LIFETIME": "5m"})
    assert (c.retry, c.max_body, c.max_lifetime) == (1.5, 1000, 300.0)
    assert isinstance(c.retry, float)


def test_lists_from_each_source(write):
    c = load_args(
        ["--ip-allow", "10.0.0.0/8, 192.168.1.7", "--cors-origins", "https://a.example,*"],
        {"SSEGW_TRUSTED_PROXIES": "::1,127.0.0.1", "SSEGW_AUTH_PUBLISH_KEYS": "k1,k2"},
    )
    assert c.ip_allow == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
    )
    assert c.trusted_proxies == (ipaddress.ip_network("::1"), ipaddress.ip_network("127.0.0.1"))
    assert c.cors_origins == ("https://a.example", "*")
    assert c.auth.publish_keys == ("k1", "k2")
    # empty string = empty list (overrides the file)
    path = write('ip_deny = ["10.1.2.3/8"]\n')
    assert load_file(path, environ={}).ip_deny == (ipaddress.ip_network("10.0.0.0/8"),)
    assert load_file(path, environ={"SSEGW_IP_DENY": ""}).ip_deny == ()
    # TOML arrays
    c = from_toml(write, 'cors_origins = ["http://localhost:3000"]\nip_allow = []\n')
    assert c.cors_origins == ("http://localhost:3000",)
    assert c.ip_allow == ()


def test_string_for_list_in_toml_is_error(write):
    with pytest.raises(ConfigError) as exc:
        from_toml(write, 'ip_allow = "10.0.0.0/8"\n')
    assert exc.value.key == "ip_allow"
    assert "array" in str(exc.value)


def test_log_level_case_insensitive_stored_lowercase():
    assert load_args(["--log-level", "DEBUG"]).log_level == "debug"
    assert load_args([], {"SSEGW_LOG_LEVEL": "Warning"}).log_level == "warning"


def test_choice_normalisation(write):
    c = from_toml(write, 'slow_consumer = "Conflate"\n[auth]\njwt_algorithm = "hs256"\n')
    assert c.slow_consumer == "conflate"
    assert c.auth.jwt_algorithm == "HS256"


def test_ints_and_floats(write):
    c = from_toml(write, "port = 0\nworkers = 0\nconn_rate = 5\nconn_burst = 1\n")
    assert (c.port, c.workers, c.conn_rate, c.conn_burst) == (0, 0, 5.0, 1)
    assert isinstance(c.conn_rate, float)
    assert load_args(["--conn-rate", "0.5"]).conn_rate == 0.5


# --------------------------------------------------------------------------------------------
# precedence


def test_precedence_flags_over_env_over_file_over_defaults(write):
    path = write(
        """
        port = 1001
        admin_port = 2001
        workers = 4
        redis = "redis://file:6379/0"
        """
    )
    env = {"SSEGW_CONFIG": path, "SSEGW_ADMIN_PORT": "2002", "SSEGW_WORKERS": "5"}
    c = load_args(["--workers", "6"], env)
    assert c.port == 1001  # file over default
    assert c.admin_port == 2002  # env over file
    assert c.workers == 6  # flag over env over file
    assert c.redis == "redis://file:6379/0"
    assert c.max_batch == 1000  # default


def test_config_flag_wins_over_ssegw_config_env(write):
    a = write("port = 1111\n", "a.toml")
    b = write("port = 2222\n", "b.toml")
    assert load_args(["--config", a], {"SSEGW_CONFIG": b}).port == 1111
    assert load_args([], {"SSEGW_CONFIG": b}).port == 2222


def test_auth_precedence(write):
    path = write('[auth]\njwt_secret = "file"\naudience = "file"\nissuer = "file"\n')
    c = load_args(
        ["--config", path, "--auth-issuer", "flag"],
        {"SSEGW_AUTH_AUDIENCE": "env", "SSEGW_AUTH_ISSUER": "env"},
    )
    assert (c.auth.jwt_secret, c.auth.audience, c.auth.issuer) == ("file", "env", "flag")
    assert c.auth.enabled


def test_load_ignores_missing_namespace_attributes():
    c = load(argparse.Namespace(), {"SSEGW_PORT": "9"})
    assert c.port == 9


def test_slow_grace_precedence(write):
    assert load_args([]).slow_grace == 5.0
    path = write('slow_grace = "250ms"\n')
    assert load_args(["--config", path]).slow_grace == 0.25  # file over default
    c = load_args(["--config", path], {"SSEGW_SLOW_GRACE": "2"})
    assert c.slow_grace == 2.0 and isinstance(c.slow_grace, float)  # env over file
    c = load_args(["--config", path, "--slow-grace", "1m"], {"SSEGW_SLOW_GRACE": "2"})
    assert c.slow_grace == 60.0  # flag over env over file
    assert from_toml(write, "slow_grace = 3\n").slow_grace == 3.0
    assert isinstance(from_toml(write, "slow_grace = 3\n").slow_grace, float)


# --------------------------------------------------------------------------------------------
# unknown keys


def test_unknown_top_level_key(write):
    with pytest.raises(ConfigError) as exc:
        from_toml(write, "max_bufer = 1\n")
    assert exc.value.key == "max_bufer"
    assert "unknown key 'max_bufer'" in str(exc.value)
    assert "max_buffer" in str(exc.value)  # did-you-mean


def test_unknown_auth_key(write):
    with pytest.raises(ConfigError) as exc:
        from_toml(write, "[auth]\nfoo = 1\n")
    assert exc.value.key == "auth.foo"
    assert "auth.foo" in str(exc.value)


def test_auth_key_at_top_level_hints_table(write):
    with pytest.raises(ConfigError) as exc:
        from_toml(write, 'jwt_secret = "x"\n')
    assert exc.value.key == "jwt_secret"
    assert "[auth]" in str(exc.value)


def test_unknown_topics_key(write):
    text = """
        [[topics]]
        pattern = "a.>"
        [[topics]]
        pattern = "b.>"
        bar = 1
        """
    with pytest.raises(ConfigError) as exc:
        from_toml(write, text)
    assert exc.value.key == "topics[1].bar"
    assert "topics[1].bar" in str(exc.value)


def test_unknown_env_var_warns_but_loads(caplog):
    with caplog.at_level(logging.WARNING, logger="ssegw.config"):
        c = load_args([], {"SSEGW_MAX_BUFER": "1", "SSEGW_PORT": "9000", "OTHER": "x"})
    assert c.port == 9000
    msgs = [r.getMessage() for r in caplog.records if r.name == "ssegw.config"]
    assert any("SSEGW_MAX_BUFER" in m for m in msgs)
    assert not any("SSEGW_PORT" in m.split("(")[0] for m in msgs)
    assert not any("OTHER" in m for m in msgs)


def test_internal_env_vars_are_not_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="ssegw.config"):
        load_args([], {"SSEGW__WORKER_ID": "3", "SSEGW_CONFIG": ""})
    assert not [r for r in caplog.records if r.name == "ssegw.config"]


def test_bad_toml_and_missing_file(write, tmp_path):
    with pytest.raises(ConfigError) as exc:
        from_toml(write, "port = = 1\n")
    assert exc.value.key == "config"
    with pytest.raises(ConfigError) as exc:
        load_file(str(tmp_path / "nope.toml"), environ={})
    assert exc.value.key == "config"
    with pytest.raises(ConfigError) as exc:
        load_args(["--config", str(tmp_path / "nope.toml")])
    assert exc.value.key == "config"
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'host = "\xe9"\n')
    with pytest.raises(ConfigError) as exc:
        load_file(str(bad), environ={})
    assert exc.value.key == "config"


def test_wrong_table_shapes(write):
    with pytest.raises(ConfigError) as exc:
        from_toml(write, 'auth = "x"\n')
    assert exc.value.key == "auth"
    with pytest.raises(ConfigError) as exc:
        from_toml(write, '[topics]\npattern = "a"\n')
    assert exc.value.key == "topics"


# --------------------------------------------------------------------------------------------
# bad values name the key


@pytest.mark.parametrize(
    "toml, key",
    [
        ("port = 8080.5", "port"),
        ("port = true", "port"),
        ('port = "8080"', "port"),
        ("port = 70000", "port"),
        ("port = -1", "port"),
        ("admin_port = 65536", "admin_port"),
        ("workers = -1", "workers"),
        ("workers = 1.0", "workers"),
        ('redis = "http://localhost"', "redis"),
        ("redis = 6379", "redis"),
        ("host = 1", "host"),
        ('host = ""', "host"),
        ('flush_interval = "2s"', "flush_interval"),
        ("flush_interval = -0.1", "flush_interval"),
        ("heartbeat_interval = 0", "heartbeat_interval"),
        ('retry = "0ms"', "retry"),
        ("retry = true", "retry"),
        ('head_timeout = "soon"', "head_timeout"),
        ("max_head_size = 1023", "max_head_size"),
        ('max_head_size = "2MiB"', "max_head_size"),
        ('max_body = "lots"', "max_body"),
        ("max_body = 0", "max_body"),
        ("max_body = 1.5", "max_body"),
        ("max_batch = 0", "max_batch"),
        ("max_topics_per_conn = 0", "max_topics_per_conn"),
        ('max_buffer = "1KiB"', "max_buffer"),
        ('slow_consumer = "block"', "slow_consumer"),
        ("slow_grace = 0", "slow_grace"),
        ('slow_grace = "0ms"', "slow_grace"),
        ("slow_grace = -1", "slow_grace"),
        ('slow_grace = "abc"', "slow_grace"),
        ("slow_grace = true", "slow_grace"),
        ("slow_grace = inf", "slow_grace"),
        ('max_lifetime = "-1s"', "max_lifetime"),
        ("drain_timeout = nan", "drain_timeout"),
        ("history_size = -1", "history_size"),
        ("history_ttl = inf", "history_ttl"),
        ("max_connections = -1", "max_connections"),
        ("max_conns_per_ip = -1", "max_conns_per_ip"),
        ("conn_rate = -1", "conn_rate"),
        ("conn_rate = nan", "conn_rate"),
        ('conn_rate = "5"', "conn_rate"),
        ("conn_burst = 0", "conn_burst"),
        ('ip_allow = ["10.0.0.0/33"]', "ip_allow"),
        ('ip_deny = ["not-an-ip"]', "ip_deny"),
        ("trusted_proxies = [1]", "trusted_proxies"),
        ('cors_origins = ["a.example"]', "cors_origins"),
        ('cors_origins = ["https://a.example/path"]', "cors_origins"),
        ('cors_credentials = "yes"', "cors_credentials"),
        ('log_level = "verbose"', "log_level"),
        ("demo = 1", "demo"),
        ('[auth]\njwt_algorithm = "none"', "auth.jwt_algorithm"),
        ('[auth]\njwt_algorithm = "PS256"', "auth.jwt_algorithm"),
        ("[auth]\njwt_secret = 5", "auth.jwt_secret"),
        ('[auth]\nleeway = "a while"', "auth.leeway"),
        ('[auth]\ncookie = "a b"', "auth.cookie"),
        ('[auth]\ncookie = ""', "auth.cookie"),
        ('[auth]\npublish_keys = "k"', "auth.publish_keys"),
        ('[auth]\npublish_keys = [""]', "auth.publish_keys"),
        ("[auth]\naudience = []", "auth.audience"),
    ],
)
def test_bad_file_values_name_the_key(write, toml, key):
    with pytest.raises(ConfigError) as exc:
        from_toml(write, toml + "\n")
    assert exc.value.key == key
    assert str(exc.value).startswith(f"{key}:")


def test_error_message_format(write):
    with pytest.raises(ConfigError) as exc:
        from_toml(write, 'max_body = "lots"\n')
    assert str(exc.value).startswith("max_body: expected a size like")
    assert "'lots'" in str(exc.value)


@pytest.mark.parametrize(
    "env, key",
    [
        ("SSEGW_PORT=80x", "port"),
        ("SSEGW_PORT=8080.5", "port"),
        ("SSEGW_PORT=", "port"),
        ("SSEGW_WORKERS=-3", "workers"),
        ("SSEGW_DEMO=maybe", "demo"),
        ("SSEGW_CONN_RATE=fast", "conn_rate"),
        ("SSEGW_CONN_RATE=inf", "conn_rate"),
        ("SSEGW_MAX_BODY=1.5MiB", "max_body"),
        ("SSEGW_RETRY=3x", "retry"),
        ("SSEGW_SLOW_GRACE=-1", "slow_grace"),
        ("SSEGW_SLOW_GRACE=0", "slow_grace"),
        ("SSEGW_SLOW_GRACE=abc", "slow_grace"),
        ("SSEGW_SLOW_GRACE=", "slow_grace"),
        ("SSEGW_IP_ALLOW=10.0.0.0/8,bogus", "ip_allow"),
        ("SSEGW_AUTH_LEEWAY=-1", "auth.leeway"),
        ("SSEGW_AUTH_JWT_ALGORITHM=HS512", "auth.jwt_algorithm"),
    ],
)
def test_bad_env_values_name_the_key_and_variable(env, key):
    name, _, value = env.partition("=")
    with pytest.raises(ConfigError) as exc:
        load_args([], {name: value})
    assert exc.value.key == key
    assert str(exc.value).startswith(f"{key}:")
    assert name in str(exc.value)


def test_bad_flag_value_names_the_key_and_flag():
    with pytest.raises(ConfigError) as exc:
        load_args(["--max-batch", "many"])
    assert exc.value.key == "max_batch"
    assert "--max-batch" in str(exc.value)


@pytest.mark.parametrize("bad", ["-1", "0", "0s", "abc", "5x"])
def test_bad_slow_grace_flag_names_the_key_and_flag(bad):
    with pytest.raises(ConfigError) as exc:
        load_args([f"--slow-grace={bad}"], {"SSEGW_SLOW_GRACE": "1s"})  # a bad flag is not skipped
    assert exc.value.key == "slow_grace"
    assert str(exc.value).startswith("slow_grace:")
    assert "--slow-grace" in str(exc.value)


def test_secrets_are_not_echoed_in_errors(write):
    with pytest.raises(ConfigError) as exc:
        from_toml(write, '[auth]\npublish_keys = ["topsecret", 42]\n')
    assert exc.value.key == "auth.publish_keys"
    assert "topsecret" not in str(exc.value)
    assert "42" not in str(exc.value)


def test_same_port_on_same_host_is_error():
    with pytest.raises(ConfigError) as exc:
        load_args(["--admin-port", "8080"])
    assert exc.value.key == "admin_port"
    # different hosts or port 0 are fine
    assert load_args(["--admin-port", "8080", "--admin-host", "10.0.0.1"]).admin_port == 8080
    assert load_args(["--port", "0", "--admin-port", "0"]).port == 0


# --------------------------------------------------------------------------------------------
# topics


TOPICS = """
    history_size = 50
    history_ttl = "10m"
    slow_consumer = "drop"

    [[topics]]
    pattern = "prices.*"
    slow_consumer = "conflate"
    history_size = 1

    [[topics]]
    pattern = "prices.>"
    history_ttl = "30s"

    [[topics]]
    pattern = "chat.>"
    history_size = 0
    history_ttl = 0
"""


def test_topic_rules_and_settings(write):
    c = from_toml(write, TOPICS)
    assert len(c.topics) == 3
    assert all(isinstance(r, TopicRule) for r in c.topics)
    assert c.topics[0].pattern.source == "prices.*"
    assert c.topics[0].history_ttl is None
    assert c.topics[1].slow_consumer is None
    # first matching rule wins; unset fields fall back to top-level
    assert c.topic_settings("prices.AAPL") == ("conflate", 1, 600.0)
    assert c.topic_settings("prices.AAPL.x") == ("drop", 50, 30.0)
    assert c.topic_settings("chat.room.1") == ("drop", 0, 0.0)
    assert c.topic_settings("prices") == ("drop", 50, 600.0)
    assert c.topic_settings("other") == ("drop", 50, 600.0)
    assert Config().topic_settings("x") == ("drop", 1000, 3600.0)


def test_topic_rule_patterns_keep_env_top_level(write):
    c = from_toml(write, TOPICS, {"SSEGW_HISTORY_SIZE": "7"})
    assert c.topic_settings("other")[1] == 7
    assert c.topic_settings("prices.AAPL")[1] == 1


def test_two_loads_compare_equal(write):
    path = write(TOPICS)
    assert load_file(path, environ={}) == load_file(path, environ={})


@pytest.mark.parametrize(
    "entry, key",
    [
        ('pattern = "a.>.b"', "topics[0].pattern"),
        ('pattern = ""', "topics[0].pattern"),
        ('pattern = "a b"', "topics[0].pattern"),
        ("pattern = 5", "topics[0].pattern"),
        ('pattern = "user.{sub}"', "topics[0].pattern"),
        ('slow_consumer = "drop"', "topics[0].pattern"),
        ('pattern = "a"\nslow_consumer = "block"', "topics[0].slow_consumer"),
        ('pattern = "a"\nhistory_size = -1', "topics[0].history_size"),
        ('pattern = "a"\nhistory_size = 1.5', "topics[0].history_size"),
        ('pattern = "a"\nhistory_ttl = "-1s"', "topics[0].history_ttl"),
    ],
)
def test_bad_topic_rules(write, entry, key):
    with pytest.raises(ConfigError) as exc:
        from_toml(write, "[[topics]]\n" + entry + "\n")
    assert exc.value.key == key
    assert str(exc.value).startswith(f"{key}:")


def test_second_topic_error_is_indexed(write):
    with pytest.raises(ConfigError) as exc:
        from_toml(write, '[[topics]]\npattern = "a"\n[[topics]]\npattern = "b.>.c"\n')
    assert exc.value.key == "topics[1].pattern"


# --------------------------------------------------------------------------------------------
# auth


def test_auth_enabled():
    assert not AuthConfig().enabled
    assert AuthConfig(jwt_secret="s").enabled
    assert AuthConfig(jwt_algorithm="RS256", jwt_public_key="PEM").enabled
    assert AuthConfig(publish_keys=("k",)).enabled


def test_public_key_read_from_pem_file(write, pem_file, rsa_pem):
    c = from_toml(write, f'[auth]\njwt_algorithm = "RS256"\njwt_public_key = "{pem_file}"\n')
    assert c.auth.jwt_public_key == rsa_pem
    assert c.auth.jwt_public_key_path == pem_file
    assert c.auth.enabled
    # also from env / flag
    c = load_args(["--auth-jwt-algorithm", "RS256"], {"SSEGW_AUTH_JWT_PUBLIC_KEY": pem_file})
    assert c.auth.jwt_public_key == rsa_pem


def test_es256_public_key(tmp_path):
    path = tmp_path / "ec.pem"
    path.write_text(pem_public_key("ec"))
    c = load_args(["--auth-jwt-algorithm", "ES256", "--auth-jwt-public-key", str(path)])
    assert "BEGIN PUBLIC KEY" in c.auth.jwt_public_key


def test_public_key_unreadable_or_not_pem(tmp_path):
    missing = str(tmp_path / "missing.pem")
    notpem = tmp_path / "notpem.pem"
    notpem.write_text("hello\n")
    binary = tmp_path / "bin.pem"
    binary.write_bytes(b"\xff\x00-----BEGIN ")
    private = tmp_path / "private.pem"
    private.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    for path in (missing, str(notpem), str(binary), str(private)):
        with pytest.raises(ConfigError) as exc:
            load_args(["--auth-jwt-algorithm", "RS256", "--auth-jwt-public-key", path])
        assert exc.value.key == "auth.jwt_public_key"
        assert str(exc.value).startswith("auth.jwt_public_key:")


def test_auth_cross_checks(pem_file):
    # HS256 with a public key but no secret
    with pytest.raises(ConfigError) as exc:
        load_args(["--auth-jwt-public-key", pem_file])
    assert exc.value.key == "auth.jwt_algorithm"
    # RS256 / ES256 with a secret but no public key
    for alg in ("RS256", "ES256"):
        with pytest.raises(ConfigError) as exc:
            load_args(["--auth-jwt-algorithm", alg, "--auth-jwt-secret", "hunter2"])
        assert exc.value.key == "auth.jwt_algorithm"
        assert "hunter2" not in str(exc.value)
    # both set is ambiguous too (the authenticator refuses it)
    with pytest.raises(ConfigError) as exc:
        load_args(["--auth-jwt-secret", "s", "--auth-jwt-public-key", pem_file])
    assert exc.value.key == "auth.jwt_algorithm"
    # valid combinations
    assert load_args(["--auth-jwt-secret", "s"]).auth.enabled
    c = load_args(["--auth-jwt-algorithm", "RS256", "--auth-jwt-public-key", pem_file])
    assert c.auth.enabled
    assert load_args(["--auth-jwt-algorithm", "RS256"]).auth.enabled is False
    assert load_args([], {"SSEGW_AUTH_PUBLISH_KEYS": "k"}).auth.enabled


def test_auth_repr_masks_secrets():
    a = AuthConfig(jwt_secret="hunter2", publish_keys=("pk-secret",))
    assert "hunter2" not in repr(a)
    assert "pk-secret" not in repr(a)
    assert "hunter2" not in repr(Config(auth=a))


# --------------------------------------------------------------------------------------------
# render


FULL = """
host = "0.0.0.0"
port = 9000
admin_port = 9001
workers = 0
redis = "redis://localhost:6379/0"
flush_interval = "5ms"
heartbeat_interval = 30
retry = 1.5
head_timeout = "1m"
max_head_size = "8KiB"
max_body = "2MiB"
max_batch = 10
max_topics_per_conn = 4
max_buffer = 65536
slow_consumer = "conflate"
slow_grace = "750ms"
max_lifetime = "1h"
drain_timeout = 0.0015
history_size = 10
history_ttl = "90s"
max_connections = 0
max_conns_per_ip = 5
conn_rate = 2.5
conn_burst = 3
ip_allow = ["10.0.0.0/8", "::1"]
ip_deny = ["10.1.0.0/16"]
trusted_proxies = ["127.0.0.1"]
cors_origins = ["https://a.example", "http://localhost:3000"]
cors_credentials = true
log_level = "WARNING"
demo = true

[auth]
jwt_secret = "hunter2"
audience = "aud \\"quoted\\" \\\\ \\u00e9 \\t"
issuer = "iss"
leeway = "250ms"
cookie = "tok"
publish_keys = ["pk-one", "pk-two"]

[[topics]]
pattern = "prices.*"
slow_consumer = "drop"
history_size = 1

[[topics]]
pattern = "chat.>"
history_ttl = "10m"
"""


def test_render_round_trip_and_masking(write):
    original = from_toml(write, FULL)
    text = render(original)
    tomllib.loads(text)  # valid TOML
    assert "hunter2" not in text
    assert "pk-one" not in text and "pk-two" not in text
    back = load_file(write(text, "rendered.toml"), environ={})
    assert back.auth.jwt_secret == "***"
    assert back.auth.publish_keys == ("***", "***")
    unmasked = dataclasses.replace(
        back,
        auth=dataclasses.replace(
            back.auth, jwt_secret=original.auth.jwt_secret, publish_keys=original.auth.publish_keys
        ),
    )
    assert unmasked == original
    assert back.drain_timeout == 0.0015
    assert back.slow_grace == 0.75
    assert back.topic_settings("prices.X") == original.topic_settings("prices.X")
    # rendering is a fixed point once masked
    assert render(back) == text


def test_render_formats(write):
    text = render(Config())
    data = tomllib.loads(text)
    assert data["heartbeat_interval"] == "15s"
    assert data["flush_interval"] == "15ms"
    assert data["history_ttl"] == "1h"
    assert data["slow_grace"] == "5s"
    assert data["max_body"] == 1024 * 1024
    assert data["ip_allow"] == []
    assert data["auth"]["jwt_secret"] == ""
    assert data["auth"]["publish_keys"] == []
    assert "topics" not in data
    assert load_file(write(text), environ={}) == Config()


def test_render_round_trip_public_key(write, pem_file):
    c = from_toml(write, f'[auth]\njwt_algorithm = "ES256"\njwt_public_key = {pem_file!r}\n')
    text = render(c)
    assert "BEGIN" not in text  # the path, not the key
    assert load_file(write(text, "r.toml"), environ={}) == c


def test_render_round_trips_awkward_strings(write):
    weird = 'a"b\\c\n\x01\x7fé🙂'
    c = dataclasses.replace(Config(), host=weird, auth=AuthConfig(audience=weird))
    back = load_file(write(render(c)), environ={})
    assert back.host == weird
    assert back.auth.audience == weird


def test_check_config_prints_slow_grace(write, monkeypatch, capsys):
    for name in list(os.environ):
        if name.startswith("SSEGW_"):
            monkeypatch.delenv(name)
    path = write('slow_grace = "1500ms"\n')
    assert cli_main(["check-config", path]) == 0
    assert tomllib.loads(capsys.readouterr().out)["slow_grace"] == "1500ms"
    monkeypatch.setenv("SSEGW_SLOW_GRACE", "2s")  # check-config applies the environment
    assert cli_main(["check-config", path]) == 0
    assert tomllib.loads(capsys.readouterr().out)["slow_grace"] == "2s"
    monkeypatch.setenv("SSEGW_SLOW_GRACE", "abc")
    assert cli_main(["check-config", path]) == 2
    err = capsys.readouterr().err
    assert "config error: slow_grace:" in err and "SSEGW_SLOW_GRACE" in err


# --------------------------------------------------------------------------------------------
# properties


@given(st.text())
def test_parse_duration_never_crashes(text):
    try:
        value = parse_duration(text)
    except (ConfigError, ValueError):
        return
    assert isinstance(value, float) and value >= 0


@given(st.text())
def test_parse_size_never_crashes(text):
    try:
        value = parse_size(text)
    except (ConfigError, ValueError):
        return
    assert isinstance(value, int) and value >= 0


@given(st.text(alphabet="0123456789.eE+-mshKMGiBb \t", max_size=20))
def test_parse_duration_and_size_near_miss_text(text):
    for fn in (parse_duration, parse_size):
        try:
            fn(text)
        except (ConfigError, ValueError):
            pass


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False))
def test_duration_render_round_trip(seconds):
    text = cfgmod._toml_duration(seconds)
    assert parse_duration(tomllib.loads(f"x = {text}")["x"]) == seconds
