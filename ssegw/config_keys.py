"""The configuration keys: each key's name, kind and check, and how a value is read and written.

Strategy (CONTRACT.md "Configuration"); :mod:`ssegw.config` layers the sources over this table
and builds the frozen :class:`~ssegw.config.Config`.  Import the public names (``ConfigError``,
``parse_duration``, ``parse_size``, ``parse_bool``) from :mod:`ssegw.config`; this module is its
implementation, split off along the seam between "what a key is" and "where its value came from".
- One declarative table, ``_KEYS``, describes every key once: its dotted name (``port``,
  ``auth.jwt_secret``), its kind (str, int, float, bool, duration, size, list, ...) and its
  range check.  Defaults live only on the :class:`~ssegw.config.Config` /
  :class:`~ssegw.config.AuthConfig` dataclass fields (``ssegw.config._default``); flag names
  (``--a-b``, ``--auth-jwt-secret``) and environment names (``SSEGW_A_B``,
  ``SSEGW_AUTH_JWT_SECRET``) are derived from the dotted name, so the three sources can never
  disagree about what exists.
- Each source is typed differently: TOML values must already have the right TOML type (an
  int for an int, an array for a list; an int given as ``8080.5`` or a bool is an error),
  while environment variables and flags are text and are parsed (``true/1/yes/on``,
  comma-separated lists, ``250ms``, ``256KiB``).
- Every failure is a :class:`ConfigError` whose ``key`` is the dotted key (``max_body``,
  ``auth.jwt_algorithm``, ``topics[0].pattern``, ``config`` for the file itself) and whose
  message starts with it; secrets are never echoed back in a message.
- :func:`_render_value` writes a value back in the syntax :func:`_convert` reads from TOML, so a
  rendered config loads back to the same values.
- No I/O and no logging here: reading files and warning about unknown variables is
  :mod:`ssegw.config`'s job.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ENV_PREFIX = "SSEGW_"


class ConfigError(Exception):
    """An invalid configuration; ``key`` is the dotted key at fault, the message names it."""

    def __init__(self, key: str, message: str | None = None) -> None:
        if message is None:
            message = f"{key}: invalid value"
        super().__init__(message)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Invalid(Exception):
    """Internal: a value is wrong; the caller adds the key and the source."""


# --------------------------------------------------------------------------------------------
# Value syntax


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_DURATION_RE = re.compile(rf"({_NUMBER})[ \t]*(ms|s|m|h)?", re.ASCII)
_DURATION_MULT = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_RE = re.compile(r"([0-9]+)[ \t]*([A-Za-z]*)", re.ASCII)
_SIZE_MULT = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}
_INT_RE = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT_RE = re.compile(_NUMBER, re.ASCII)
_BOOLS = {
    "true": True, "1": True, "yes": True, "on": True,
    "false": False, "0": False, "no": False, "off": False,
}  # fmt: skip


def _duration(value: object) -> float:
    bad = f"expected a duration like 250ms, 15s, 5m, 1h or a number of seconds, got {_show(value)}"
    if isinstance(value, bool):
        raise _Invalid(bad)
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            raise _Invalid(f"duration {_show(value)} is too large") from None
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip())
        if m is None:
            raise _Invalid(bad)
        number = float(m[1])
        # Divide for ms rather than multiply by 0.001 so "15ms" is exactly the float 0.015.
        seconds = number / 1000 if m[2] == "ms" else number * _DURATION_MULT[m[2]]
    else:
        raise _Invalid(bad)
    if not math.isfinite(seconds):
        raise _Invalid(f"duration {_show(value)} is not a finite number")
    if seconds < 0:
        raise _Invalid(f"duration must not be negative, got {_show(value)}")
    return seconds if seconds != 0 else 0.0  # no -0.0


def _size(value: object) -> int:
    bad = f"expected a size like 512, 256KiB, 1MiB or a number of bytes, got {_show(value)}"
    if isinstance(value, bool):
        raise _Invalid(bad)
    if isinstance(value, int):
        if value < 0:
            raise _Invalid(f"size must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise _Invalid(bad)
    m = _SIZE_RE.fullmatch(value.strip())
    if m is None or m[2].lower() not in _SIZE_MULT:
        raise _Invalid(bad)
    try:
        number = int(m[1])
    except ValueError:  # more digits than int() accepts
        raise _Invalid(f"size {_show(value)} is too large") from None
    return number * _SIZE_MULT[m[2].lower()]


def _bool_text(value: str) -> bool:
    try:
        return _BOOLS[value.strip().lower()]
    except KeyError:
        raise _Invalid(
            f"expected true/false, 1/0, yes/no or on/off, got {_show(value)}"
        ) from None


def parse_duration(value: object, key: str = "duration") -> float:
    """Seconds from a number or ``"250ms"``/``"15s"``/``"5m"``/``"1h"``/``"2.5"``.

    Raises :class:`ConfigError` naming ``key`` for anything else (negative, NaN, infinite,
    wrong type or syntax)."""
    try:
        return _duration(value)
    except _Invalid as exc:
        raise ConfigError(key, f"{key}: {exc}") from None


def parse_size(value: object, key: str = "size") -> int:
    """Bytes from an int or ``"512"``/``"512B"``/``"256KiB"``/``"1MiB"``/``"1GiB"``/``"1KB"``
    /``"1MB"``/``"1GB"`` (KiB = 1024, KB = 1000; units case-insensitive).

    Raises :class:`ConfigError` naming ``key`` for anything else."""
    try:
        return _size(value)
    except _Invalid as exc:
        raise ConfigError(key, f"{key}: {exc}") from None


def parse_bool(value: object, key: str = "bool") -> bool:
    """A bool, or text ``true/false``, ``1/0``, ``yes/no``, ``on/off`` (case-insensitive)."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ConfigError(key, f"{key}: expected true or false, got {_show(value)}")
    try:
        return _bool_text(value)
    except _Invalid as exc:
        raise ConfigError(key, f"{key}: {exc}") from None


# --------------------------------------------------------------------------------------------
# The key table


def _between(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}, got {v}"


def _at_least(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be >= {lo}, got {v}"


def _above(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v > lo else f"must be > {lo}, got {v}"


def _replicas(v: int | None) -> str | None:
    return None if v is None or v >= 0 else f"must be >= 0 or \"auto\", got {v}"


#: WAIT must answer inside the Redis client's socket timeout (5 s, ``COMMAND_TIMEOUT`` in
#: ``ssegw/broker/redis_layout.py``), or a publish that waited would read as a lost reply.
_WAIT_TIMEOUT_MAX = 4.0


def _wait_timeout(v: float) -> str | None:
    if 0 < v <= _WAIT_TIMEOUT_MAX:
        return None
    return f"must be > 0 and at most {_WAIT_TIMEOUT_MAX:g}s (below the 5s Redis command timeout), got {v}"


def _nonempty(v: str) -> str | None:
    return None if v else "must not be empty"


SENTINEL_SCHEME = "redis+sentinel://"
_SENTINEL_ADDR_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._\-]+):([0-9]{1,5})", re.ASCII)
_SENTINEL_SERVICE_RE = re.compile(r"[A-Za-z0-9._\-]+", re.ASCII)


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str]:
    """``redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE`` -> (sentinel addresses, service name).

    The one owner of this syntax (config validation and the Redis broker both call it).  A
    host is a name, an IPv4 address or a bracketed IPv6 address; every port is explicit (no
    guessed 26379).  No user, password, database number or query: the primary is asked for
    with none and used as database 0 (a secured setup is not supported yet).

    Raises:
        ValueError: the URL is not of that form; the message says what is wrong.
    """
    if not url.startswith(SENTINEL_SCHEME):
        raise ValueError(f"expected {SENTINEL_SCHEME}HOST:PORT[,HOST:PORT...]/SERVICE")
    rest = url[len(SENTINEL_SCHEME):]
    hosts, sep, service = rest.partition("/")
    if "@" in hosts or "?" in rest or "#" in rest:
        raise ValueError("a user, password, query or fragment is not supported in a sentinel URL")
    if not sep or not _SENTINEL_SERVICE_RE.fullmatch(service):
        raise ValueError("expected /SERVICE (the Sentinel master name: letters, digits, '.', '_', '-') "
                         "after the sentinel addresses")
    addrs: list[tuple[str, int]] = []
    for part in hosts.split(","):
        m = _SENTINEL_ADDR_RE.fullmatch(part)
        if m is None:
            raise ValueError(f"each sentinel must be HOST:PORT, not {_show(part)}")
        port = int(m.group(2))
        if not 0 < port < 65536:
            raise ValueError(f"sentinel port {port} is out of range (1..65535)")
        addrs.append((m.group(1).strip("[]"), port))
    return addrs, service


def _redis_url(v: str) -> str | None:
    if not v or v.startswith(("redis://", "rediss://", "unix://")):
        return None
    if v.startswith(SENTINEL_SCHEME):
        try:
            parse_sentinel_url(v)
        except ValueError as e:
            # A URL with a user part may carry a password: never echo it.
            return f"{e}" if "@" in v else f"{e}, got {_show(v)}"
        return None
    return (f"expected a URL starting with redis://, rediss://, unix:// or "
            f"{SENTINEL_SCHEME}HOST:PORT[,HOST:PORT...]/SERVICE, got {_show(v)}")


_COOKIE_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", re.ASCII)


def _cookie_name(v: str) -> str | None:
    if _COOKIE_NAME_RE.fullmatch(v):
        return None
    return f"expected a cookie name (RFC 6265 token characters), got {_show(v)}"


_ORIGIN_RE = re.compile(
    r"https?://(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?", re.ASCII
)


def _origin(item: str) -> str:
    if item == "*":
        return item
    if _ORIGIN_RE.fullmatch(item):
        return item.lower()  # browsers send the Origin header's scheme and host in lowercase
    raise _Invalid(
        f"expected '*' or an origin like 'https://a.example' (scheme, host and optional port, "
        f"no path), got {_show(item)}"
    )


def _network(item: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(item.strip(), strict=False)
    except ValueError:
        raise _Invalid(f"{_show(item)} is not an IP address or CIDR network") from None


def _publish_key(item: str) -> str:
    if not item:
        raise _Invalid("a publish key must not be empty")
    return item


@dataclass(frozen=True, slots=True)
class _Key:
    name: str  # dotted: "port", "auth.jwt_secret"
    kind: str  # str int auto_int float bool duration size choice list
    help: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] = ()  # for kind "choice"; the stored spelling
    item: Callable[[str], Any] | None = None  # for kind "list": str -> item, raises _Invalid
    secret: bool = False

    @property
    def short(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def dest(self) -> str:
        return self.name.replace(".", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


_SLOW = ("drop", "conflate")

_KEYS: tuple[_Key, ...] = (
    _Key("host", "str", "public listener address", _nonempty),
    _Key("port", "int", "public listener port (0 = any free port)", _between(0, 65535)),
    _Key("admin_host", "str", "admin listener address", _nonempty),
    _Key("admin_port", "int", "admin listener port", _between(0, 65535)),
    _Key("workers", "int", "worker processes (0 = one per CPU)", _at_least(0)),
    _Key("redis", "str", "Redis URL for clustering (empty = embedded broker)", _redis_url),
    _Key(
        "redis_wait_replicas",
        "auto_int",
        "replicas a publish must reach before its 200 (auto = 1 when the shard has a replica, else 0)",
        _replicas,
    ),
    _Key("redis_wait_timeout", "duration", "how long a publish waits for those replicas (then 504)", _wait_timeout),
    _Key("flush_interval", "duration", "output coalescing delay", _between(0, 1)),
    _Key("heartbeat_interval", "duration", "heartbeat after this much silence", _above(0)),
    _Key("retry", "duration", "SSE reconnect hint sent to clients", _above(0)),
    _Key("head_timeout", "duration", "time allowed to send the request head", _above(0)),
    _Key("max_head_size", "size", "largest request head", _between(1024, 1024 * 1024)),
    _Key("max_body", "size", "largest /publish body", _above(0)),
    _Key("max_batch", "int", "most messages in one /publish batch", _at_least(1)),
    _Key("max_topics_per_conn", "int", "most topics on one stream", _at_least(1)),
    _Key("max_buffer", "size", "pending output per connection", _at_least(4096)),
    _Key("slow_consumer", "choice", "slow consumer policy: drop or conflate", choices=_SLOW),
    _Key(
        "slow_grace",
        "duration",
        "how long a connection's pending output may stay above max_buffer (or make no progress) "
        "before it counts as a slow consumer",
        _above(0),
    ),
    _Key("max_lifetime", "duration", "close streams after this long (0 = off)"),
    _Key("drain_timeout", "duration", "spread stream closes over this on shutdown"),
    _Key(
        "worker_timeout",
        "duration",
        "a worker whose event loop has not answered the supervisor for this long is killed and replaced",
        _above(0),
    ),
    _Key("history_size", "int", "events kept per topic", _at_least(0)),
    _Key("history_ttl", "duration", "max age of kept events (0 = no age limit)"),
    _Key("max_keys", "int", "keys whose newest event is kept per topic for since=snapshot and compacted "
         "resumes; the least recently updated is evicted first (0 = none)", _at_least(0)),
    _Key("backlog", "int", "listen() backlog of the public listener; the kernel caps it at net.core.somaxconn "
         "(the shipped sysctl drop-in sets 8192)", _at_least(1)),
    _Key("max_connections", "int", "open public connections per host (idle, mid-request, keep-alive, streaming), split evenly over the workers (0 = unlimited)", _at_least(0)),
    _Key("max_conns_per_ip", "int", "open connections per client IP, per worker (0 = unlimited)", _at_least(0)),
    _Key("conn_rate", "float", "new connections per second per IP (0 = off)", _at_least(0)),
    _Key("conn_burst", "int", "burst for conn_rate", _at_least(1)),
    _Key("ip_allow", "list", "client networks allowed (empty = all)", item=_network),
    _Key("ip_deny", "list", "client networks denied (wins over ip_allow)", item=_network),
    _Key("trusted_proxies", "list", "proxies whose X-Forwarded-For (and PROXY protocol header) is trusted", item=_network),
    _Key("proxy_protocol", "bool", "every public connection starts with a PROXY protocol v1 or v2 header, "
         "taken only from trusted_proxies peers (others are closed)"),
    _Key("tls_cert", "str", "PEM file with the public listener's certificate chain (TLS on when set; "
         "reloaded on SIGHUP)"),
    _Key("tls_key", "str", "PEM file with the private key of tls_cert"),
    _Key("tls_min_version", "choice", "oldest TLS version served: 1.2 or 1.3", choices=("1.2", "1.3")),
    _Key("tls_ciphers", "str", "OpenSSL cipher list for TLS 1.2 (empty = Python's default; TLS 1.3 suites are "
         "OpenSSL's)"),
    _Key("cors_origins", "list", "allowed CORS origins ('*' or https://host)", item=_origin),
    _Key("cors_credentials", "bool", "send Access-Control-Allow-Credentials"),
    _Key(
        "log_level",
        "choice",
        "debug, info, warning or error",
        choices=("debug", "info", "warning", "error"),
    ),
    _Key("log_format", "choice", "log lines as text or json (one JSON object per line)", choices=("text", "json")),
    _Key("access_log", "bool", "one access line per finished request or stream (logger ssegw.access)"),
    _Key("access_log_sample", "float", "fraction of successful requests/streams given an access line "
         "(errors, status >= 400, always are)", _between(0.0, 1.0)),
    _Key("demo", "bool", "serve the demo page at /"),
    _Key(
        "auth.jwt_algorithm",
        "choice",
        "JWT algorithm: HS256, RS256 or ES256",
        choices=("HS256", "RS256", "ES256"),
    ),
    _Key("auth.jwt_secret", "str", "HS256 shared secret", secret=True),
    _Key("auth.jwt_public_key", "str", "PEM file with the RS256/ES256 public key"),
    _Key("auth.audience", "str", "required JWT aud (empty = not checked)"),
    _Key("auth.issuer", "str", "required JWT iss (empty = not checked)"),
    _Key("auth.leeway", "duration", "clock skew tolerated on exp/nbf/iat"),
    _Key("auth.cookie", "str", "cookie that may carry the token", _cookie_name),
    _Key(
        "auth.publish_keys",
        "list",
        "static keys accepted as Bearer on /publish",
        item=_publish_key,
        secret=True,
    ),
)

_TOP = {k.name: k for k in _KEYS if "." not in k.name}
_AUTH = {k.short: k for k in _KEYS if k.name.startswith("auth.")}
_TOPIC_KEYS = ("pattern", "slow_consumer", "history_size", "history_ttl", "max_keys")


# --------------------------------------------------------------------------------------------
# Conversion


def _text_ok(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid("is not valid Unicode text") from None
    return s


def _convert(key: _Key, raw: object, text: bool) -> Any:
    """Turn one raw value into the key's type.  ``text``: it came from env/flags, so strings
    are parsed; otherwise (TOML) the value must already have the right type."""
    kind = key.kind
    if kind == "str":
        if not isinstance(raw, str):
            raise _Invalid(f"expected a string, got {'a value' if key.secret else _show(raw)}")
        return _text_ok(raw)
    if kind == "choice":
        if not isinstance(raw, str):
            raise _Invalid(f"expected one of {', '.join(key.choices)}, got {_show(raw)}")
        for choice in key.choices:
            if raw.strip().lower() == choice.lower():
                return choice
        raise _Invalid(f"expected one of {', '.join(key.choices)}, got {_show(raw)}")
    if kind == "int":
        if isinstance(raw, str) and text:
            if _INT_RE.fullmatch(raw.strip()) is None:
                raise _Invalid(f"expected an integer, got {_show(raw)}")
            try:
                return int(raw.strip())
            except ValueError:
                raise _Invalid(f"integer {_show(raw)} is too large") from None
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise _Invalid(f"expected an integer, got {_show(raw)}")
        return raw
    if kind == "auto_int":
        # An int, or "auto" (stored as None: the broker decides per Redis shard).
        if isinstance(raw, str) and raw.strip().lower() == "auto":
            return None
        try:
            return _convert(_Key(key.name, "int", key.help), raw, text)
        except _Invalid:
            raise _Invalid(f"expected an integer or \"auto\", got {_show(raw)}") from None
    if kind == "float":
        if isinstance(raw, str) and text:
            if _FLOAT_RE.fullmatch(raw.strip()) is None:
                raise _Invalid(f"expected a number, got {_show(raw)}")
            value = float(raw.strip())
        elif isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise _Invalid(f"expected a number, got {_show(raw)}")
        else:
            try:
                value = float(raw)
            except OverflowError:
                raise _Invalid(f"number {_show(raw)} is too large") from None
        if not math.isfinite(value):
            raise _Invalid(f"expected a finite number, got {_show(raw)}")
        return value
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and text:
            return _bool_text(raw)
        raise _Invalid(f"expected true or false, got {_show(raw)}")
    if kind == "duration":
        return _duration(raw)
    if kind == "size":
        return _size(raw)
    if kind == "list":
        if isinstance(raw, str):
            if not text:
                raise _Invalid(
                    "expected an array of strings like [\"a\", \"b\"], got a string"
                )
            items: list[object] = [p.strip() for p in raw.split(",")]
            items = [p for p in items if p]
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            raise _Invalid(f"expected an array of strings, got {_show(raw)}")
        out = []
        assert key.item is not None
        for i, item in enumerate(items):
            if not isinstance(item, str):
                shown = "a non-string" if key.secret else _show(item)
                raise _Invalid(f"item {i}: expected a string, got {shown}")
            try:
                out.append(key.item(_text_ok(item)))
            except _Invalid as exc:
                raise _Invalid(f"item {i}: {exc}") from None
        return tuple(out)
    raise AssertionError(kind)  # pragma: no cover


def _fail(label: str, detail: object, where: str | None) -> ConfigError:
    suffix = f" (from {where})" if where else ""
    return ConfigError(label, f"{label}: {detail}{suffix}")


def _value(key: _Key, raw: object, text: bool, where: str | None, label: str | None = None) -> Any:
    label = label or key.name
    try:
        value = _convert(key, raw, text)
    except _Invalid as exc:
        raise _fail(label, exc, where) from None
    if key.check is not None:
        problem = key.check(value)
        if problem:
            raise _fail(label, problem, where)
    return value


# --------------------------------------------------------------------------------------------
# Writing values back as TOML

_TOML_ESCAPES = {
    '"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r",
}  # fmt: skip


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_duration(seconds: float) -> str:
    if seconds == 0:
        return '"0s"'
    for unit, mult in (("h", 3600), ("m", 60), ("s", 1)):
        n = seconds / mult
        if abs(n) < 2**53 and n == int(n) and int(n) * mult == seconds:
            return f'"{int(n)}{unit}"'
    ms = round(seconds * 1000)
    if abs(ms) < 2**53 and ms / 1000 == seconds:
        return f'"{ms}ms"'
    return repr(float(seconds))


def _render_value(key: _Key, value: Any) -> str:
    if key.kind in ("str", "choice"):
        return _toml_str(value)
    if key.kind == "bool":
        return "true" if value else "false"
    if key.kind == "duration":
        return _toml_duration(value)
    if key.kind == "auto_int":
        return '"auto"' if value is None else str(int(value))
    if key.kind in ("int", "size"):
        return str(int(value))
    if key.kind == "float":
        return repr(float(value))
    if key.kind == "list":
        return "[" + ", ".join(_toml_str(str(item)) for item in value) + "]"
    raise AssertionError(key.kind)  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Upstream routes ([[routes]])

_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", re.ASCII)
#: Header names a route may not set: the gateway writes them itself (framing, resume), or
#: they are hop-by-hop (RFC 9110 section 7.6.1).
ROUTE_HEADERS_RESERVED = frozenset((
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer",
    "proxy-connection", "last-event-id", "accept",
))


def parse_upstream_url(url: str, placeholder: str) -> tuple[str, str, int, str]:
    """``http://HOST[:PORT]/PATH...`` with ``placeholder`` (``{topic}`` or ``{path}``) in its
    path or query -> (scheme, host, port, request-target template).

    The one owner of this syntax (config validation and the upstream client both call it).
    ``http`` and ``https`` only; no user or password (credentials go in ``headers``, which
    check-config masks), no fragment, the placeholder exactly once and not in the host.

    Raises:
        ValueError: the URL is not of that form; the message says what is wrong.
    """
    m = re.fullmatch(r"(?i)(https?)://([^/?#]*)([^#]*)", url)
    if m is None:
        scheme = url.partition("://")[0] if "://" in url else ""
        if scheme and scheme.lower() not in ("http", "https"):
            raise ValueError(f"scheme {scheme!r} is not supported: use http:// or https://")
        raise ValueError("expected an http:// or https:// URL without a #fragment")
    scheme, authority, target = m[1].lower(), m[2], m[3]
    if "@" in authority:
        raise ValueError("a user or password in the URL is not supported (send credentials with headers)")
    if placeholder in authority:
        raise ValueError(f"{placeholder} must be in the path or query, not in the host")
    hm = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._\-]+)(?::([0-9]{1,5}))?", authority, re.ASCII)
    if hm is None:
        raise ValueError(f"bad host {authority!r}")
    port = int(hm[2]) if hm[2] else (443 if scheme == "https" else 80)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range (1..65535)")
    if target.count(placeholder) != 1:
        raise ValueError(f"must contain {placeholder} exactly once")
    if not target.startswith("/"):
        target = "/" + target
    if any(c in target for c in " \r\n\t\0"):
        raise ValueError("the path must not contain spaces or control characters")
    return scheme, hm[1].strip("[]"), port, target


def route_header(name: object, value: object) -> tuple[str, str]:
    """One ``headers`` entry of a route, checked; raises ValueError naming the problem."""
    if not isinstance(name, str) or not _HEADER_NAME_RE.fullmatch(name):
        raise ValueError(f"{_show(name)} is not a header name (RFC 9110 token characters)")
    if name.lower() in ROUTE_HEADERS_RESERVED:
        raise ValueError(f"{name!r} is set by the gateway itself")
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string value")
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"{name}: value contains CR, LF or NUL")
    return name, value
