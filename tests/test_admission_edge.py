"""Admission edge cases a hostile client tries (docs/api.md "Admission and abuse control"):

- ``X-Forwarded-For`` split over several field lines is one list: a client that writes its own
  ``X-Forwarded-For: 127.0.0.1`` line before the proxy's line is still the address the proxy saw.
- ``cors_origins = ["*"]`` with ``cors_credentials = true`` is a configuration error.
- IPv4-mapped IPv6 entries (``::ffff:127.0.0.7/128``) in ``ip_deny``, ``ip_allow`` and
  ``trusted_proxies`` mean the IPv4 network; left as IPv6 they would match nothing.

The end-to-end cases run a real gateway and write the request bytes by hand (the harness's
dict of headers cannot repeat a field name); other loopback sources (127.0.0.7) are real
source addresses, which Linux allows on ``lo`` without setup.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from ipaddress import ip_network
from pathlib import Path

import pytest
from harness import ROOT, Gateway, read_head, recv_all

from ssegw.config import ConfigError, add_arguments, load, load_file
from ssegw.policy.limits import IPFilter, client_ip

pytestmark = pytest.mark.timeout(60)

PUBLISH_BODY = b'{"topic": "edge.t", "data": 1}'


def ask(port: int, method: str, path: str, fields: Sequence[tuple[str, str]] = (),
        body: bytes | None = None, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """One raw request from ``source``; fields are written in order, repeats allowed.  Returns
    the status and (for a non-stream answer) the body."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in fields]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(data)
        buf = bytearray()
        status, headers, _ = read_head(s, buf, 10)
        if "content-length" in headers:
            return status, recv_all(s, buf, int(headers["content-length"]), 10)
        return status, b""  # a stream: the head is the answer


def publish(port: int, fields: Sequence[tuple[str, str]], source: str = "127.0.0.1") -> tuple[int, bytes]:
    return ask(port, "POST", "/publish", fields, PUBLISH_BODY, source)


def subscribe(port: int, fields: Sequence[tuple[str, str]] = (), source: str = "127.0.0.1") -> int:
    return ask(port, "GET", "/events?topic=edge.t", [("Accept", "text/event-stream"), *fields],
               source=source)[0]


# -- 3. X-Forwarded-For over several field lines ------------------------------------------


@pytest.fixture
def proxied(gateway) -> Gateway:  # noqa: ANN001
    # No auth: publishing is open to loopback clients only, so a spoofed loopback client
    # publishes (200) and a remote one does not (403).
    return gateway(config='trusted_proxies = ["127.0.0.1/32"]\nip_deny = ["8.8.4.4/32"]\n')


def test_xff_second_line_is_read_for_publish(proxied: Gateway) -> None:
    # The client wrote the first line; the trusted proxy (our TCP peer) appended the second.
    status, body = publish(proxied.port, [("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-For", "8.8.8.8")])
    assert status == 403, body
    # The same list on one line, and one entry per line in the other order: the same client.
    assert publish(proxied.port, [("X-Forwarded-For", "127.0.0.1, 8.8.8.8")])[0] == 403
    assert publish(proxied.port, [("X-Forwarded-For", "8.8.8.8"), ("X-Forwarded-For", "127.0.0.1")])[0] == 403
    # A chain of trusted proxies only: the client is loopback, publishing is allowed.
    status, body = publish(proxied.port, [("X-Forwarded-For", "127.0.0.1"), ("x-forwarded-for", "127.0.0.1")])
    assert status == 200, body


def test_xff_second_line_is_read_for_stream_admission(proxied: Gateway) -> None:
    # 8.8.4.4 is denied; hiding it behind a first line that names a trusted proxy must not help.
    assert subscribe(proxied.port, [("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-For", "8.8.4.4")]) == 403
    assert subscribe(proxied.port, [("X-Forwarded-For", "8.8.4.4"), ("X-Forwarded-For", "127.0.0.1")]) == 403
    assert subscribe(proxied.port, [("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-For", "8.8.8.8")]) == 200


def test_xff_lines_joined_in_order_unit() -> None:
    trusted = (ip_network("127.0.0.1/32"),)
    # What the handler passes for two lines: both, in order, as one list.
    assert client_ip("127.0.0.1", "127.0.0.1, 8.8.8.8", trusted) == "8.8.8.8"
    assert client_ip("127.0.0.1", "8.8.8.8, 127.0.0.1", trusted) == "8.8.8.8"


# -- 5. cors_origins = ["*"] with cors_credentials = true -------------------------------------


def _run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSEGW_")}
    return subprocess.run([sys.executable, "-m", "ssegw", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


WILDCARD_CREDS = 'cors_origins = ["https://a.example", "*"]\ncors_credentials = true\n'


def test_cors_wildcard_with_credentials_check_config_fails(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(WILDCARD_CREDS)
    r = _run("check-config", str(path))
    assert r.returncode != 0, r.stdout
    assert "cors_credentials" in r.stderr and "cors_origins" in r.stderr, r.stderr
    # Either alone is fine.
    path.write_text('cors_origins = ["*"]\ncors_credentials = false\n')
    assert _run("check-config", str(path)).returncode == 0
    path.write_text('cors_origins = ["https://a.example"]\ncors_credentials = true\n')
    assert _run("check-config", str(path)).returncode == 0


def test_cors_wildcard_with_credentials_serve_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(WILDCARD_CREDS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSEGW_")}
    proc = subprocess.Popen([sys.executable, "-m", "ssegw", "serve", "--port", "0", "--admin-port", "0",
                             "--config", str(path)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail("serve started with cors_origins = ['*'] and cors_credentials = true:\n" + err)
    assert proc.returncode == 2, err
    assert "cors_credentials" in err and "cors_origins" in err, err
    assert "serving on" not in err


def _load(argv: list[str], environ: dict[str, str]):  # noqa: ANN202
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load(parser.parse_args(argv), environ)


@pytest.mark.parametrize(("argv", "environ"), [
    (["--cors-origins", "*", "--cors-credentials"], {}),
    (["--cors-credentials"], {"SSEGW_CORS_ORIGINS": "*"}),
    ([], {"SSEGW_CORS_ORIGINS": "https://a.example,*", "SSEGW_CORS_CREDENTIALS": "true"}),
])
def test_cors_wildcard_with_credentials_from_flags_or_env(argv: list[str], environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        _load(argv, environ)
    assert info.value.key == "cors_credentials"
    assert "cors_origins" in str(info.value)


# -- 6. IPv4-mapped IPv6 entries in the CIDR lists --------------------------------------------


def test_mapped_ip_deny_refuses_the_ipv4_client(gateway) -> None:  # noqa: ANN001
    g = gateway(config='ip_deny = ["::ffff:127.0.0.7/128"]\n')
    assert subscribe(g.port, source="127.0.0.7") == 403
    status, body = publish(g.port, [], source="127.0.0.7")
    assert status == 403 and b"ip_denied" in body, body
    # Neighbours are not caught by it.
    assert subscribe(g.port, source="127.0.0.8") == 200
    assert publish(g.port, [], source="127.0.0.1")[0] == 200


def test_mapped_ip_allow_admits_the_ipv4_network(gateway) -> None:  # noqa: ANN001
    g = gateway(config='ip_allow = ["::ffff:127.0.0.0/120"]\n')  # = 127.0.0.0/24
    assert subscribe(g.port, source="127.0.0.7") == 200
    assert publish(g.port, [], source="127.0.0.1")[0] == 200
    assert subscribe(g.port, source="127.0.1.7") == 403


def test_mapped_trusted_proxy_is_trusted(gateway) -> None:  # noqa: ANN001
    g = gateway(config='trusted_proxies = ["::ffff:127.0.0.1/128"]\n')
    # The peer 127.0.0.1 is the trusted proxy: the client is the remote 8.8.8.8, not loopback.
    status, body = publish(g.port, [("X-Forwarded-For", "8.8.8.8")])
    assert status == 403, body
    # Another loopback peer is not a trusted proxy: its X-Forwarded-For is ignored.
    assert publish(g.port, [("X-Forwarded-For", "8.8.8.8")], source="127.0.0.2")[0] == 200


def test_mapped_entries_check_config_shows_ipv4(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('ip_deny = ["::ffff:127.0.0.7/128", "::ffff:10.0.0.0/104", "::/0"]\n'
                    'ip_allow = ["::ffff:0:0/96"]\ntrusted_proxies = ["::ffff:127.0.0.1"]\n')
    cfg = load_file(str(path), environ={})
    assert cfg.ip_deny == (ip_network("127.0.0.7/32"), ip_network("10.0.0.0/8"), ip_network("::/0"))
    assert cfg.ip_allow == (ip_network("0.0.0.0/0"),)
    assert cfg.trusted_proxies == (ip_network("127.0.0.1/32"),)
    r = _run("check-config", str(path))
    assert r.returncode == 0, r.stderr
    assert 'ip_deny = ["127.0.0.7/32", "10.0.0.0/8", "::/0"]' in r.stdout, r.stdout


def test_mapped_networks_unit() -> None:
    f = IPFilter(deny=("::ffff:127.0.0.7/128", ip_network("::ffff:10.0.0.0/104")))
    for ip in ("127.0.0.7", "::ffff:127.0.0.7", "10.1.2.3", "::ffff:10.1.2.3"):
        assert not f.allowed(ip), ip
    assert f.allowed("127.0.0.8") and f.allowed("11.0.0.1")
    # A wide IPv6 network that merely contains the mapped range matches IPv6 clients only.
    wide = IPFilter(deny=("::/0",))
    assert wide.allowed("127.0.0.1") and not wide.allowed("::1")
    allow = IPFilter(allow=("::ffff:192.168.0.0/112",))
    assert allow.allowed("192.168.3.4") and allow.allowed("::ffff:192.168.3.4")
    assert not allow.allowed("192.169.0.1")
    trusted = ("::ffff:10.0.0.0/104",)
    assert client_ip("10.9.9.9", "6.6.6.6, 10.1.1.1", trusted) == "6.6.6.6"
    assert client_ip("::ffff:10.9.9.9", "::ffff:6.6.6.6", trusted) == "6.6.6.6"
