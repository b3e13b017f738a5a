"""Configuration: defaults < TOML file < ``SSEGW_*`` environment < command-line flags.

Strategy (docs/api.md "Configuration"):
- What each key is called, its kind, its check and how its value is parsed and written lives in
  one declarative table in :mod:`ssegw.config_keys`; this module owns the frozen result
  (:class:`Config`, :class:`AuthConfig`, :class:`TopicRule`, whose fields carry the defaults),
  the layering of the sources, the cross-checks between keys, and :func:`render`.  Every name
  the rest of the gateway needs is importable from here.
- Everything is parsed and validated exactly once, in :func:`load` / :func:`load_file`, into
  frozen dataclasses; the rest of the gateway only reads plain typed values (durations are
  float seconds, sizes int bytes, networks ``ipaddress`` objects, patterns compiled
  :class:`~ssegw.core.topics.Pattern`) and never re-validates.  A later source replaces a key's
  value entirely (lists are not merged).
- Every failure is a :class:`ConfigError` naming the dotted key at fault.
- Unknown keys in the file are errors (with a "did you mean" hint); unknown ``SSEGW_*``
  variables only log a warning on the ``ssegw.config`` logger.  Variables starting with
  ``SSEGW__`` (double underscore) are reserved for the gateway's own processes and ignored.
- :func:`render` writes the effective config back as TOML that :func:`load_file` accepts
  (secrets masked as ``"***"``), which is what ``ssegw check-config`` prints.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config_keys import (
    _AUTH,
    _KEYS,
    _TOP,
    _TOPIC_KEYS,
    ENV_PREFIX,
    ConfigError,
    IPNetwork,
    _fail,
    _Key,
    _render_value,
    _show,
    _toml_str,
    _value,
    parse_bool,
    parse_duration,
    parse_size,
    parse_upstream_url,
    route_header,
)
from .config_keys import _toml_duration as _toml_duration  # re-exported: tests round-trip it
from .core.topics import Pattern
from .policy.limits import unmap_network

__all__ = [
    "AuthConfig",
    "Config",
    "ConfigError",
    "RouteRule",
    "TopicRule",
    "add_arguments",
    "load",
    "load_file",
    "parse_bool",
    "parse_duration",
    "parse_size",
    "render",
]

log = logging.getLogger("ssegw.config")

# Reserved for variables the gateway sets for its own child processes: never warned about.
_ENV_INTERNAL_PREFIX = "SSEGW__"
_ENV_CONFIG = "SSEGW_CONFIG"
_MASK = "***"


# --------------------------------------------------------------------------------------------
# The frozen result


@dataclass(frozen=True, slots=True)
class TopicRule:
    """A ``[[topics]]`` entry: per-pattern overrides; ``None`` means "use the top-level value"."""

    pattern: Pattern
    slow_consumer: str | None = None
    history_size: int | None = None
    history_ttl: float | None = None
    max_keys: int | None = None

    # Pattern has identity equality; compare rules by the pattern's text instead so two loads
    # of the same file give equal Configs (useful to detect "nothing changed" on reload).
    def _ident(self) -> tuple[object, ...]:
        return (self.pattern.source, self.slow_consumer, self.history_size, self.history_ttl, self.max_keys)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TopicRule):
            return NotImplemented
        return self._ident() == other._ident()

    def __hash__(self) -> int:
        return hash(self._ident())


#: The keys of a ``[[routes]]`` table, by mode.
_ROUTE_KEYS = {
    "shared": ("mode", "topics", "upstream", "headers", "linger"),
    "proxy": ("mode", "path", "upstream", "headers"),
}
#: Paths of the public listener a proxy route's prefix must not shadow.
_OWN_PATHS = ("/events", "/publish")
#: Header names whose values check-config masks (they carry credentials).
_SECRET_HEADER = re.compile(r"(?i)authorization|cookie|.*(token|key|secret|password).*")


@dataclass(frozen=True, slots=True)
class RouteRule:
    """A ``[[routes]]`` entry (docs/api.md "Upstream routes").  ``mode`` "shared": ``topics``
    is set, ``upstream`` holds ``{topic}``; "proxy": ``path`` is the prefix, ``upstream``
    holds ``{path}``.  ``headers`` are sent upstream as given."""

    mode: str
    upstream: str
    topics: Pattern | None = None
    path: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    linger: float = 30.0

    def _ident(self) -> tuple[object, ...]:
        return (self.mode, self.upstream, self.topics.source if self.topics else None, self.path,
                self.headers, self.linger)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RouteRule):
            return NotImplemented
        return self._ident() == other._ident()

    def __hash__(self) -> int:
        return hash(self._ident())

    def __repr__(self) -> str:  # header values may be credentials
        what = f"topics={self.topics.source!r}" if self.topics else f"path={self.path!r}"
        return f"RouteRule({self.mode}, {what}, upstream={self.upstream!r}, headers=<{len(self.headers)}>)"


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """The ``[auth]`` table.  ``jwt_public_key`` is the PEM *text*; the path it came from is
    ``jwt_public_key_path``."""

    jwt_algorithm: str = "HS256"
    jwt_secret: str = ""
    jwt_public_key: str = ""
    jwt_public_key_path: str = ""
    audience: str = ""
    issuer: str = ""
    leeway: float = 0.0
    cookie: str = "ssegw_token"
    publish_keys: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key or self.publish_keys)

    def __repr__(self) -> str:  # never let a secret reach a log line
        return (
            f"AuthConfig(jwt_algorithm={self.jwt_algorithm!r}, "
            f"jwt_secret={_MASK if self.jwt_secret else ''!r}, "
            f"jwt_public_key_path={self.jwt_public_key_path!r}, "
            f"audience={self.audience!r}, issuer={self.issuer!r}, leeway={self.leeway!r}, "
            f"cookie={self.cookie!r}, publish_keys=<{len(self.publish_keys)} keys>)"
        )


@dataclass(frozen=True, slots=True)
class Config:
    """The validated, effective configuration.  ``Config()`` is the all-defaults config."""

    host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 8081
    workers: int = 1
    redis: str = ""
    #: None = "auto": 1 on a Redis shard that has a replica, else 0 (resolved by the broker)
    redis_wait_replicas: int | None = None
    redis_wait_timeout: float = 1.0
    flush_interval: float = 0.015
    heartbeat_interval: float = 15.0
    retry: float = 3.0
    head_timeout: float = 10.0
    max_head_size: int = 16384
    max_body: int = 1024 * 1024
    max_batch: int = 1000
    max_topics_per_conn: int = 32
    max_buffer: int = 256 * 1024
    slow_consumer: str = "drop"
    slow_grace: float = 5.0
    max_lifetime: float = 0.0
    drain_timeout: float = 10.0
    worker_timeout: float = 30.0
    history_size: int = 1000
    history_ttl: float = 3600.0
    max_keys: int = 10_000
    backlog: int = 4096
    max_connections: int = 100000
    max_conns_per_ip: int = 0
    conn_rate: float = 0.0
    conn_burst: int = 20
    ip_allow: tuple[IPNetwork, ...] = ()
    ip_deny: tuple[IPNetwork, ...] = ()
    trusted_proxies: tuple[IPNetwork, ...] = ()
    proxy_protocol: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    tls_min_version: str = "1.2"
    tls_ciphers: str = ""
    cors_origins: tuple[str, ...] = ()
    cors_credentials: bool = False
    log_level: str = "info"
    log_format: str = "text"
    access_log: bool = True
    access_log_sample: float = 1.0
    demo: bool = False
    auth: AuthConfig = field(default_factory=AuthConfig)
    topics: tuple[TopicRule, ...] = ()
    routes: tuple[RouteRule, ...] = ()

    def shared_route(self, topic: str) -> RouteRule | None:
        """The shared ``[[routes]]`` entry whose ``topics`` match ``topic`` (at most one:
        overlapping routes are a configuration error), or None."""
        for r in self.routes:
            if r.topics is not None and r.topics.matches(topic):
                return r
        return None

    def proxy_route(self, path: str) -> RouteRule | None:
        """The proxy ``[[routes]]`` entry whose ``path`` prefixes ``path``, or None."""
        for r in self.routes:
            if r.mode == "proxy" and path.startswith(r.path):
                return r
        return None

    def topic_settings(self, topic: str) -> tuple[str, int, float]:
        """``(slow_consumer, history_size, history_ttl)`` for ``topic``: the first matching
        ``[[topics]]`` rule's overrides, the top-level values for the rest."""
        for rule in self.topics:
            if rule.pattern.matches(topic):
                return (
                    self.slow_consumer if rule.slow_consumer is None else rule.slow_consumer,
                    self.history_size if rule.history_size is None else rule.history_size,
                    self.history_ttl if rule.history_ttl is None else rule.history_ttl,
                )
        return (self.slow_consumer, self.history_size, self.history_ttl)

    def topic_max_keys(self, topic: str) -> int:
        """``max_keys`` for ``topic``: the first matching ``[[topics]]`` rule's override, else
        the top-level value (as :meth:`topic_settings`)."""
        for rule in self.topics:
            if rule.pattern.matches(topic):
                return self.max_keys if rule.max_keys is None else rule.max_keys
        return self.max_keys


_ENV_NAMES = {k.env for k in _KEYS} | {_ENV_CONFIG}


def _default(key: _Key) -> Any:
    if key.name == "auth.jwt_public_key":
        return AuthConfig.__dataclass_fields__["jwt_public_key_path"].default
    owner = AuthConfig if key.name.startswith("auth.") else Config
    return owner.__dataclass_fields__[key.short].default


def _unknown(label: str, name: str, known: list[str], hint: str = "") -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        hint = hint or f" (did you mean {close[0]!r}?)"
    return ConfigError(label, f"unknown key {label!r}{hint}")


def tls_context(cert: str, key: str, min_version: str = "1.2", ciphers: str = "") -> ssl.SSLContext:
    """The public listener's TLS context: the chain and key loaded now (a reload builds a new
    one), HTTP/1.1 offered by ALPN, no compression, no renegotiation.

    Raises:
        OSError: a file cannot be read.
        ssl.SSLError: not a certificate/key pair OpenSSL takes, or a bad cipher list.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if ciphers:
        ctx.set_ciphers(ciphers)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _read_pem(path: str, where: str | None) -> str:
    label = "auth.jwt_public_key"
    try:
        with open(path, "rb") as fh:
            data = fh.read(1024 * 1024 + 1)
    except OSError as exc:
        raise _fail(label, f"cannot read {path!r}: {exc.strerror or exc}", where) from None
    try:
        pem = data.decode("ascii")
    except UnicodeDecodeError:
        pem = ""
    if len(data) > 1024 * 1024 or "-----BEGIN " not in pem or "-----END " not in pem:
        raise _fail(label, f"{path!r} is not a PEM file (no -----BEGIN/-----END lines)", where)
    if "PRIVATE KEY-----" in pem:
        raise _fail(label, f"{path!r} holds a private key; give the public key only", where)
    return pem


# --------------------------------------------------------------------------------------------
# Loading


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        reason = exc.strerror or exc
        raise ConfigError("config", f"config: cannot read {path!r}: {reason}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"config: {path!r} is not valid TOML: {exc}") from None


def _warn_unknown_env(environ: Mapping[str, str]) -> None:
    for name in sorted(environ):
        if (
            name.startswith(ENV_PREFIX)
            and not name.startswith(_ENV_INTERNAL_PREFIX)
            and name not in _ENV_NAMES
        ):
            close = difflib.get_close_matches(name, sorted(_ENV_NAMES), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            log.warning("ignoring unknown environment variable %s%s", name, hint)


def _topic_rules(raw: object) -> tuple[TopicRule, ...]:
    if not isinstance(raw, list):
        raise ConfigError("topics", "topics: expected an array of tables ([[topics]] entries)")
    rules = []
    for i, entry in enumerate(raw):
        prefix = f"topics[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(prefix, f"{prefix}: expected a table ([[topics]] entry)")
        for name in entry:
            if name not in _TOPIC_KEYS:
                raise _unknown(f"{prefix}.{name}", name, list(_TOPIC_KEYS))
        label = f"{prefix}.pattern"
        if "pattern" not in entry:
            raise ConfigError(label, f"{label}: required key is missing")
        source = entry["pattern"]
        if not isinstance(source, str):
            raise ConfigError(label, f"{label}: expected a string, got {_show(source)}")
        try:
            pattern = Pattern(source)
        except ValueError as exc:
            raise ConfigError(label, f"{label}: {exc}") from None
        if pattern.has_sub:
            raise ConfigError(
                label, f"{label}: {{sub}} only makes sense in token claims, not in [[topics]]"
            )
        overrides: dict[str, Any] = {}
        for name in ("slow_consumer", "history_size", "history_ttl", "max_keys"):
            if name in entry:
                overrides[name] = _value(_TOP[name], entry[name], False, None, f"{prefix}.{name}")
        rules.append(TopicRule(pattern=pattern, **overrides))
    return tuple(rules)


def _patterns_overlap(a: Pattern, b: Pattern) -> bool:
    """Whether some topic name matches both ``a`` and ``b`` (segment by segment: ``*`` is
    any one segment, a final ``>`` any one or more)."""
    na, nb = len(a.segments), len(b.segments)
    if not a.tail and not b.tail and na != nb:
        return False
    if a.tail and not b.tail and nb <= na:
        return False
    if b.tail and not a.tail and na <= nb:
        return False
    for x, y in zip(a.segments, b.segments, strict=False):
        if x != "*" and y != "*" and x != y:
            return False
    return True


def _route_rules(raw: object) -> tuple[RouteRule, ...]:
    if not isinstance(raw, list):
        raise ConfigError("routes", "routes: expected an array of tables ([[routes]] entries)")
    rules: list[RouteRule] = []
    for i, entry in enumerate(raw):
        prefix = f"routes[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(prefix, f"{prefix}: expected a table ([[routes]] entry)")
        mode = entry.get("mode", "shared")
        if not isinstance(mode, str) or mode not in _ROUTE_KEYS:
            raise ConfigError(f"{prefix}.mode", f"{prefix}.mode: expected \"shared\" or \"proxy\", got {_show(mode)}")
        known = _ROUTE_KEYS[mode]
        for name in entry:
            if name not in known:
                other = "proxy" if mode == "shared" else "shared"
                hint = f" (it belongs to mode = \"{other}\")" if name in _ROUTE_KEYS[other] else ""
                raise _unknown(f"{prefix}.{name}", name, list(known), hint)
        label = f"{prefix}.upstream"
        if "upstream" not in entry:
            raise ConfigError(label, f"{label}: required key is missing")
        upstream = entry["upstream"]
        if not isinstance(upstream, str):
            raise ConfigError(label, f"{label}: expected a URL string, got {_show(upstream)}")
        try:
            parse_upstream_url(upstream, "{topic}" if mode == "shared" else "{path}")
        except ValueError as exc:
            raise ConfigError(label, f"{label}: {exc}, got {_show(upstream)}") from None
        headers: list[tuple[str, str]] = []
        hdrs = entry.get("headers", {})
        if not isinstance(hdrs, dict):
            raise ConfigError(f"{prefix}.headers", f"{prefix}.headers: expected a table of NAME = \"VALUE\"")
        for name, value in hdrs.items():
            try:
                headers.append(route_header(name, value))
            except ValueError as exc:
                raise ConfigError(f"{prefix}.headers", f"{prefix}.headers: {exc}") from None
        if mode == "shared":
            label = f"{prefix}.topics"
            source = entry.get("topics")
            if source is None:
                raise ConfigError(label, f"{label}: required key is missing (a topic pattern)")
            if not isinstance(source, str):
                raise ConfigError(label, f"{label}: expected a topic pattern string, got {_show(source)}")
            try:
                pattern = Pattern(source)
            except ValueError as exc:
                raise ConfigError(label, f"{label}: {exc}") from None
            if pattern.has_sub:
                raise ConfigError(label, f"{label}: {{sub}} only makes sense in token claims, not in [[routes]]")
            linger = _value(_TOP["history_ttl"], entry.get("linger", "30s"), False, None, f"{prefix}.linger")
            for j, prev in enumerate(rules):
                if prev.topics is not None and _patterns_overlap(prev.topics, pattern):
                    raise ConfigError(label, f"{label}: {source!r} overlaps routes[{j}].topics "
                                             f"{prev.topics.source!r} (a topic must have one upstream)")
            rules.append(RouteRule("shared", upstream, topics=pattern, headers=tuple(headers), linger=linger))
        else:
            label = f"{prefix}.path"
            path = entry.get("path")
            if path is None:
                raise ConfigError(label, f"{label}: required key is missing (a path prefix like \"/stream/\")")
            if not isinstance(path, str) or not path.startswith("/") or len(path) < 2 or any(
                    c in path for c in "?# \r\n\t\0"):
                raise ConfigError(label, f"{label}: expected a path prefix like \"/stream/\" (starts with /, "
                                         f"no query), got {_show(path)}")
            for own in _OWN_PATHS:
                if own.startswith(path) or path.startswith(own):
                    raise ConfigError(label, f"{label}: {path!r} would shadow the gateway's own {own}")
            for j, prev in enumerate(rules):
                if prev.mode == "proxy" and (prev.path.startswith(path) or path.startswith(prev.path)):
                    raise ConfigError(label, f"{label}: {path!r} overlaps routes[{j}].path {prev.path!r}")
            rules.append(RouteRule("proxy", upstream, path=path, headers=tuple(headers)))
    return tuple(rules)


def _build(
    data: Mapping[str, Any], environ: Mapping[str, str], flags: Mapping[str, Any]
) -> Config:
    # 1. The file's shape: unknown keys and wrongly typed tables.
    auth_data: Any = data.get("auth", {})
    if not isinstance(auth_data, dict):
        raise ConfigError("auth", "auth: expected a table ([auth])")
    for name in data:
        if name not in _TOP and name not in ("auth", "topics", "routes"):
            hint = " (it belongs in the [auth] table)" if name in _AUTH else ""
            raise _unknown(name, name, [*_TOP, "auth", "topics", "routes"], hint)
    for name in auth_data:
        if name not in _AUTH:
            raise _unknown(f"auth.{name}", name, list(_AUTH))

    # 2. Each key: default < file < env < flag.
    values: dict[str, Any] = {}
    origin: dict[str, str | None] = {}
    for key in _KEYS:
        table = auth_data if key.name.startswith("auth.") else data
        raw: object = None
        have, text, where = False, False, None
        if key.short in table:
            raw, have, text, where = table[key.short], True, False, None
        if key.env in environ:
            raw, have, text, where = environ[key.env], True, True, f"env {key.env}"
        if flags.get(key.dest) is not None:
            raw, have, text, where = flags[key.dest], True, True, f"flag {key.flag}"
        values[key.name] = _value(key, raw, text, where) if have else _default(key)
        origin[key.name] = where

    # 3. Cross-checks.
    if (
        values["port"]
        and values["port"] == values["admin_port"]
        and values["host"] == values["admin_host"]
    ):
        raise _fail("admin_port", f"must differ from port ({values['port']})", origin["admin_port"])
    if "*" in values["cors_origins"] and values["cors_credentials"]:
        # Browsers refuse "Access-Control-Allow-Origin: *" with credentials, so the only way to
        # honour both is to reflect every Origin (``null`` included): any site could then make
        # requests with the user's cookies.  Name the origins instead.
        where = origin["cors_credentials"] or origin["cors_origins"]
        raise _fail(
            "cors_credentials",
            "cors_credentials = true cannot be combined with cors_origins = ['*'] (it would let "
            "any site make credentialed requests); list the allowed origins instead",
            where,
        )
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        name = "tls_key" if values["tls_cert"] else "tls_cert"
        raise _fail(name, "tls_cert and tls_key go together (TLS needs both)", origin[name] or origin["tls_cert"])
    if values["tls_cert"]:
        try:
            tls_context(values["tls_cert"], values["tls_key"], values["tls_min_version"], values["tls_ciphers"])
        except (OSError, ssl.SSLError, ValueError) as exc:
            name = "tls_ciphers" if values["tls_ciphers"] and "cipher" in str(exc).lower() else "tls_cert"
            raise _fail(name, f"cannot use {values['tls_cert']!r} and {values['tls_key']!r}: {exc}",
                        origin[name] or origin["tls_cert"]) from None
    if values["proxy_protocol"] and not values["trusted_proxies"]:
        raise _fail("proxy_protocol", "proxy_protocol = true takes headers only from trusted_proxies, which is "
                    "empty: no connection could be served", origin["proxy_protocol"])
    # An IPv4-mapped entry (::ffff:10.0.0.0/104) means the IPv4 network; stored as such so
    # check-config shows what is matched.
    for name in ("ip_allow", "ip_deny", "trusted_proxies"):
        values[name] = tuple(unmap_network(net) for net in values[name])

    path = values["auth.jwt_public_key"]
    pem = _read_pem(path, origin["auth.jwt_public_key"]) if path else ""
    algorithm, secret = values["auth.jwt_algorithm"], values["auth.jwt_secret"]
    where = origin["auth.jwt_algorithm"]
    if algorithm == "HS256" and pem:
        detail = (
            "HS256 verifies with auth.jwt_secret, but auth.jwt_public_key is set "
            "(use RS256 or ES256 with a public key)"
        )
        if secret:
            detail = "HS256 verifies with auth.jwt_secret; do not also set auth.jwt_public_key"
        raise _fail("auth.jwt_algorithm", detail, where)
    if algorithm != "HS256" and secret:
        detail = (
            f"{algorithm} verifies with auth.jwt_public_key, which is not set; "
            "auth.jwt_secret is only for HS256"
        )
        if pem:
            detail = (
                f"{algorithm} verifies with auth.jwt_public_key; do not also set auth.jwt_secret"
            )
        raise _fail("auth.jwt_algorithm", detail, where)

    auth = AuthConfig(
        jwt_algorithm=algorithm,
        jwt_secret=secret,
        jwt_public_key=pem,
        jwt_public_key_path=path,
        audience=values["auth.audience"],
        issuer=values["auth.issuer"],
        leeway=values["auth.leeway"],
        cookie=values["auth.cookie"],
        publish_keys=values["auth.publish_keys"],
    )
    topics = _topic_rules(data.get("topics", []))
    routes = _route_rules(data.get("routes", []))
    return Config(**{name: values[name] for name in _TOP}, auth=auth, topics=topics, routes=routes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and one flag per key (``--max-body``, ``--auth-jwt-secret``, ...).

    Every flag defaults to None (not given) so :func:`load` can layer it over env and file.
    ``--demo/--no-demo`` and ``--cors-credentials/--no-cors-credentials`` are booleans;
    list flags take comma-separated values."""
    group = parser.add_argument_group("configuration (flags > SSEGW_* env > --config file)")
    group.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"TOML configuration file (env {_ENV_CONFIG})",
    )
    for key in _KEYS:
        default = _default(key)
        shown = ""
        if not key.secret and default not in ("", ()):
            shown = f"; default {_render_value(key, default)}"
        help_text = f"{key.help} (env {key.env}{shown})"
        if key.kind == "bool":
            group.add_argument(
                key.flag,
                dest=key.dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            metavar = {
                "duration": "DURATION",
                "size": "SIZE",
                "int": "N",
                "auto_int": "N|auto",
                "float": "NUM",
                "list": "A,B,...",
                "choice": "|".join(key.choices),
            }.get(key.kind, "TEXT")
            if key.short == "jwt_public_key":
                metavar = "PEM_FILE"
            group.add_argument(
                key.flag, dest=key.dest, metavar=metavar, default=None, help=help_text
            )


def load(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """The effective config: defaults < TOML file (``--config``, else ``$SSEGW_CONFIG``)
    < ``SSEGW_*`` environment < flags.  Raises :class:`ConfigError`."""
    env = os.environ if environ is None else environ
    path = getattr(args, "config", None) or env.get(_ENV_CONFIG) or None
    data = _read_toml(path) if path else {}
    flags = {key.dest: getattr(args, key.dest, None) for key in _KEYS}
    _warn_unknown_env(env)
    return _build(data, env, flags)


def load_file(path: str, *, environ: Mapping[str, str] | None = None) -> Config:
    """The config from ``path`` plus the ``SSEGW_*`` environment (no flags), as
    ``ssegw check-config FILE`` sees it.  Raises :class:`ConfigError`."""
    env = os.environ if environ is None else environ
    data = _read_toml(path)
    _warn_unknown_env(env)
    return _build(data, env, {})


# --------------------------------------------------------------------------------------------
# Rendering


def render(config: Config) -> str:
    """The effective config as TOML that :func:`load_file` accepts back; ``auth.jwt_secret``
    and ``auth.publish_keys`` are masked as ``"***"``."""
    lines = ["# ssegw effective configuration (secrets masked)"]
    for key in _KEYS:
        if key.name in _TOP:
            lines.append(f"{key.name} = {_render_value(key, getattr(config, key.name))}")
    auth = config.auth
    lines += ["", "[auth]"]
    for key in _KEYS:
        if not key.name.startswith("auth."):
            continue
        if key.short == "jwt_public_key":
            value: Any = auth.jwt_public_key_path
        else:
            value = getattr(auth, key.short)
        if key.short == "jwt_secret" and value:
            value = _MASK
        elif key.short == "publish_keys":
            value = tuple(_MASK for _ in value)
        lines.append(f"{key.short} = {_render_value(key, value)}")
    for rule in config.topics:
        lines += ["", "[[topics]]", f"pattern = {_toml_str(rule.pattern.source)}"]
        for name in ("slow_consumer", "history_size", "history_ttl", "max_keys"):
            value = getattr(rule, name)
            if value is not None:
                lines.append(f"{name} = {_render_value(_TOP[name], value)}")
    for route in config.routes:
        lines += ["", "[[routes]]", f"mode = {_toml_str(route.mode)}"]
        if route.topics is not None:
            lines.append(f"topics = {_toml_str(route.topics.source)}")
        else:
            lines.append(f"path = {_toml_str(route.path)}")
        lines.append(f"upstream = {_toml_str(route.upstream)}")
        if route.mode == "shared":
            lines.append(f"linger = {_render_value(_TOP['history_ttl'], route.linger)}")
        if route.headers:
            shown = ", ".join(f"{_toml_str(k)} = {_toml_str(_MASK if _SECRET_HEADER.fullmatch(k) else v)}"
                              for k, v in route.headers)
            lines.append(f"headers = {{ {shown} }}")
    return "\n".join(lines) + "\n"
