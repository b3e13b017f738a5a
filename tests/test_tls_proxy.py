"""TLS on the public listener and the PROXY protocol, end to end: a real gateway, raw sockets,
Python's ssl client with a throw-away CA.

- TLS: streams and publishes over TLS; a plain-HTTP or garbage client, and one that never
  completes its handshake, are closed and counted; SIGHUP serves the new certificate.
- PROXY protocol (``proxy_protocol = true``, v1 and v2): the address the header carries is the
  client for ``ip_deny``, ``max_conns_per_ip`` and the access line; untrusted peers, malformed
  and late headers are closed and counted; a header cut over two sends, the balancer's LOCAL
  health check, and PROXY before TLS all work.
"""

from __future__ import annotations

import datetime
import ipaddress
import signal
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import Gateway, Stream, read_head, recv_all, wait_until

from ssegw.core.proxyproto import V2_SIGNATURE

# -- certificates -------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(tmp: Path) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("ssegw test CA")).issuer_name(_name("ssegw test CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = tmp / "ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_leaf(tmp: Path, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, tag: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(f"localhost {tag}")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = tmp / f"cert-{tag}.pem", tmp / f"key-{tag}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pki")
    ca_path, ca_key, ca = make_ca(tmp)
    a_cert, a_key = make_leaf(tmp, ca_key, ca, "a")
    b_cert, b_key = make_leaf(tmp, ca_key, ca, "b")
    return {"ca": ca_path, "a_cert": a_cert, "a_key": a_key, "b_cert": b_cert, "b_key": b_key}


def client_ctx(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class TLSStream(Stream):
    """``harness.Stream`` over a TLS socket (reads what the TLS layer already holds first)."""

    def __init__(self, port: int, path: str, ctx: ssl.SSLContext, headers: dict[str, str] | None = None,
                 timeout: float = 10.0, prefix: bytes = b"") -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if prefix:
            raw.sendall(prefix)
        sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.open(sock, "localhost", port, path, headers, timeout)

    def pump(self, timeout: float) -> bool:
        if not self.closed and isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            self._consume(self.sock.recv(65536))
            return True
        return super().pump(timeout)


def tls_request(port: int, ctx: ssl.SSLContext, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, bytes, ssl.SSLSocket]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    h = {"Host": "localhost", "Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
    s.sendall(f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(f"{k}: {v}\r\n".encode() for k, v in h.items())
              + b"\r\n" + body)
    buf = bytearray()
    status, hdrs, _ = read_head(s, buf, 10)
    data = recv_all(s, buf, int(hdrs.get("content-length", 0)), 10)
    return status, data, s


def closed_without_answer(port: int, data: bytes, timeout: float = 10.0, source: str = "127.0.0.1") -> bool:
    """Send ``data``; True when the gateway closes the connection and never answers HTTP."""
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    got = b""
    try:
        if data:
            s.sendall(data)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    finally:
        s.close()
    return not got.startswith(b"HTTP/")


def refused(g: Gateway, reason: str) -> float:
    return g.metrics().get(f'ssegw_refused_total{{reason="{reason}"}}', 0.0)


# -- TLS ----------------------------------------------------------------------------------


def test_streams_and_publishes_over_tls(pki: dict[str, Path]) -> None:
    ctx = client_ctx(pki["ca"])
    with Gateway("--tls-cert", str(pki["a_cert"]), "--tls-key", str(pki["a_key"]), "--flush-interval", "10ms") as g:
        with TLSStream(g.port, "/events?topic=tls.a", ctx) as st:
            assert st.status == 200 and st.sock.selected_alpn_protocol() == "http/1.1"
            for i in range(3):
                status, body, s = tls_request(g.port, ctx, "POST", "/publish",
                                              f'{{"topic":"tls.a","data":"m{i}"}}'.encode(),
                                              {"Content-Type": "application/json"})
                s.close()
                assert status == 200, body
            assert [e.data for e in st.wait_events(3)] == ["m0", "m1", "m2"]


def test_tls_min_version(pki: dict[str, Path]) -> None:
    with Gateway("--tls-cert", str(pki["a_cert"]), "--tls-key", str(pki["a_key"]), "--tls-min-version", "1.3") as g:
        old = client_ctx(pki["ca"])
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            tls_request(g.port, old, "GET", "/nope")
        status, _, s = tls_request(g.port, client_ctx(pki["ca"]), "GET", "/nope")
        assert status == 404 and s.version() == "TLSv1.3"
        s.close()


def test_non_tls_clients_are_closed_and_counted(pki: dict[str, Path]) -> None:
    with Gateway("--tls-cert", str(pki["a_cert"]), "--tls-key", str(pki["a_key"]), "--head-timeout", "1s") as g:
        assert closed_without_answer(g.port, b"GET /events?topic=x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert closed_without_answer(g.port, b"\x16\x03\x01\x00\x05garbage-after-a-record-header" * 3)
        t0 = time.monotonic()
        assert closed_without_answer(g.port, b"")  # never starts its handshake
        assert time.monotonic() - t0 < 5
        assert wait_until(lambda: refused(g, "tls_handshake") >= 3, 5), g.metrics()
        ctx = client_ctx(pki["ca"])
        with TLSStream(g.port, "/events?topic=x", ctx) as st:  # still serving
            assert st.status == 200
        assert g.proc is not None and g.proc.poll() is None


def test_sighup_serves_the_new_certificate(pki: dict[str, Path], tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(pki["a_cert"].read_bytes())
    key.write_bytes(pki["a_key"].read_bytes())
    ctx = client_ctx(pki["ca"])

    def served_cn() -> str:
        _, _, s = tls_request(g.port, ctx, "GET", "/nope")
        der = s.getpeercert(binary_form=True)
        s.close()
        assert der is not None
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()

    with Gateway("--tls-cert", str(cert), "--tls-key", str(key), "--drain-timeout", "1s") as g:
        assert served_cn() == "CN=localhost a"
        st = TLSStream(g.port, "/events?topic=hup", ctx)
        cert.write_bytes(pki["b_cert"].read_bytes())
        key.write_bytes(pki["b_key"].read_bytes())
        g.send(signal.SIGHUP)
        assert wait_until(lambda: served_cn() == "CN=localhost b", 10)
        st.close()


def test_a_bad_certificate_is_a_configuration_error(pki: dict[str, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_text(f'tls_cert = "{pki["a_cert"]}"\ntls_key = "{pki["b_key"]}"\n')  # a key of another cert
    r = subprocess.run([sys.executable, "-m", "ssegw", "check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "tls_cert" in r.stderr, r.stderr
    half = tmp_path / "half.toml"
    half.write_text(f'tls_cert = "{pki["a_cert"]}"\n')
    r = subprocess.run([sys.executable, "-m", "ssegw", "check-config", str(half)], capture_output=True, text=True)
    assert r.returncode != 0 and "tls_key" in r.stderr, r.stderr


# -- PROXY protocol --------------------------------------------------------------------------


def v1(src: str, dst: str = "", sport: int = 40000, dport: int = 8080) -> bytes:
    fam = "TCP4" if ipaddress.ip_address(src).version == 4 else "TCP6"
    dst = dst or ("127.0.0.1" if fam == "TCP4" else "::1")
    return f"PROXY {fam} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str | None, dst: str = "127.0.0.1", sport: int = 40000, dport: int = 8080) -> bytes:
    if src is None:  # LOCAL
        return V2_SIGNATURE + b"\x20\x00\x00\x00"
    body = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


class ProxiedStream(Stream):
    """A stream whose connection starts with ``header`` (sent in ``cut`` pieces)."""

    def __init__(self, port: int, path: str, header: bytes, cuts: int = 1, source: str = "127.0.0.1",
                 timeout: float = 10.0) -> None:
        sock = socket.socket()
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        step = max(1, len(header) // cuts)
        for i in range(0, len(header), step):
            sock.sendall(header[i:i + step])
            time.sleep(0.05)
        self.open(sock, "127.0.0.1", port, path, None, timeout)


PROXY_CONFIG = """
proxy_protocol = true
trusted_proxies = ["127.0.0.1/32"]
ip_deny = ["192.0.2.66/32"]
max_conns_per_ip = 1
head_timeout = "1s"
flush_interval = "10ms"
"""


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    g = Gateway(config=PROXY_CONFIG, tmp_path=tmp_path_factory.mktemp("proxied")).start()
    yield g
    g.stop()


@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_the_carried_address_is_the_client(proxied: Gateway, make) -> None:  # noqa: ANN001
    g = proxied
    # ip_deny names the carried client, not the balancer that connects.
    denied = ProxiedStream(g.port, "/events?topic=pp", make("192.0.2.66"))
    assert denied.status == 403
    # max_conns_per_ip = 1 counts per carried client: a second from the same client is
    # refused, one from another client is not (all come from the same balancer address).
    first = ProxiedStream(g.port, "/events?topic=pp", make("192.0.2.10"))
    assert first.status == 200
    second = ProxiedStream(g.port, "/events?topic=pp", make("192.0.2.10"))
    assert second.status == 429
    other = ProxiedStream(g.port, "/events?topic=pp", make("2001:db8::10") if make is v1 else make("192.0.2.11"))
    assert other.status == 200
    # The access line names the client.
    first.close()
    assert wait_until(lambda: any("kind=stream" in ln and "ip=192.0.2.10" in ln for ln in g.log), 5)
    other.close()


def test_a_header_cut_over_several_sends_and_a_local_health_check(proxied: Gateway) -> None:
    g = proxied
    st = ProxiedStream(g.port, "/events?topic=pp.cut", v1("192.0.2.20"), cuts=4)
    assert st.status == 200
    st.close()
    st = ProxiedStream(g.port, "/events?topic=pp.cut", v2("192.0.2.21"), cuts=5)
    assert st.status == 200
    st.close()
    # LOCAL (the balancer's own check): served as the balancer's connection.
    hc = ProxiedStream(g.port, "/nope", v2(None))
    assert hc.status == 404


def test_untrusted_malformed_and_late_headers_are_closed_and_counted(proxied: Gateway) -> None:
    g = proxied
    before = {r: refused(g, r) for r in ("proxy_untrusted", "proxy_header")}
    req = b"GET /events?topic=pp HTTP/1.1\r\nHost: a\r\n\r\n"
    # A peer outside trusted_proxies, even with a well-formed header.
    assert closed_without_answer(g.port, v1("192.0.2.30") + req, source="127.0.0.2")
    # No header at all, a garbled one, a bare-LF one, an oversized v1 line.
    for bad in (req, b"PROXY TCP4 192.0.2.300 127.0.0.1 1 2\r\n" + req,
                b"PROXY TCP4 192.0.2.30 127.0.0.1 1 2\n" + req, b"PROXY " + b"9" * 200 + b"\r\n",
                V2_SIGNATURE + b"\x21\x11\x00\x02xx" + req):
        assert closed_without_answer(g.port, bad), bad
    # Half a header, then nothing: closed at head_timeout (1 s), not kept.
    t0 = time.monotonic()
    assert closed_without_answer(g.port, b"PROXY TCP4 192.0.2.3")
    assert 0.5 < time.monotonic() - t0 < 5
    assert wait_until(lambda: refused(g, "proxy_untrusted") - before["proxy_untrusted"] == 1
                      and refused(g, "proxy_header") - before["proxy_header"] == 6, 5), g.metrics()
    ok = ProxiedStream(g.port, "/events?topic=pp", v1("192.0.2.31"))
    assert ok.status == 200  # still serving
    ok.close()


def test_proxy_protocol_before_tls(pki: dict[str, Path], tmp_path: Path) -> None:
    config = PROXY_CONFIG + f'tls_cert = "{pki["a_cert"]}"\ntls_key = "{pki["a_key"]}"\n'
    with Gateway(config=config, tmp_path=tmp_path) as g:
        ctx = client_ctx(pki["ca"])
        st = TLSStream(g.port, "/events?topic=pp.tls", ctx, prefix=v2("192.0.2.66"))
        assert st.status == 403  # ip_deny read the carried address, through TLS
        st = TLSStream(g.port, "/events?topic=pp.tls", ctx, prefix=v1("192.0.2.40"))
        assert st.status == 200
        st.close()
        assert wait_until(lambda: any("kind=stream" in ln and "ip=192.0.2.40" in ln for ln in g.log), 5)
