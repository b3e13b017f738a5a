"""Real front ends (nginx, HAProxy, Caddy from Debian's packages) in front of a real gateway.

The shipped recipes (``ssegw print-proxy``, canonical copies in ``deploy/proxy/``) are started as
they are, with only what a test host must change: the listening address (a free loopback port
below 32768), the gateway's ports, and a throwaway certificate.  Each change is a literal
replacement that must find its text, so a recipe that drifts breaks the test instead of being
silently tested in some other shape.  Everything a server writes (pid, logs, temp files, Caddy's
storage) stays in the test's temporary directory, and each server is stopped by its PID.

- ``make_certs``: a self-signed CA and a server certificate for ``localhost`` / ``127.0.0.1``
  (``cryptography``), plus the server key's SPKI hash for Chromium's
  ``--ignore-certificate-errors-spki-list``.
- ``Frontend``: one proxy process rendered from a recipe; ``start`` waits for a TLS handshake.
- ``TLSStream``: the harness's raw SSE client over TLS (HTTP/1.1 by ALPN), from a chosen source
  address, so that the gateway's view of the client address can be checked.
- ``DirectStream`` / ``publish``: straight to the gateway, with a PROXY v1 header first when the
  gateway expects one.
- ``start_stack``: a gateway and one recipe's proxy in front of it (``Stack``); the ``haproxy``
  recipe (``send-proxy-v2``) is skipped while the gateway does not know ``proxy_protocol``.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import ipaddress
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import ROOT, Gateway, Response, Stream, read_head, recv_all

# Ports below the ephemeral range (20000-32000), so no outgoing connection holds them.
from redis_harness import free_port

from ssegw.packaged import print_proxy

#: The address test clients connect from (the proxy connects to the gateway from 127.0.0.1).
CLIENT_IP = "127.0.0.5"
TLS_NAME = "localhost"

BINARIES = {"nginx": "nginx", "haproxy": "haproxy", "haproxy-xff": "haproxy", "caddy": "caddy"}
#: The gateway behind every test proxy: it trusts the proxy (127.0.0.1), and drains fast.
GATEWAY_CONFIG = """\
trusted_proxies = ["127.0.0.1/32"]
flush_interval = "10ms"
drain_timeout = "1s"
retry = "1s"
"""


def binary(kind: str) -> str | None:
    """The path of the server a recipe needs (Debian puts nginx in /usr/sbin), or None."""
    name = BINARIES[kind]
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


# -- certificates ------------------------------------------------------------------------


@dataclass
class Certs:
    ca: Path  # CA certificate (PEM): what clients trust
    cert: Path  # server certificate followed by the CA (PEM chain)
    key: Path  # server key (PEM)
    bundle: Path  # chain and key in one file (HAProxy's "crt")
    spki: str  # base64 SHA-256 of the server key's SubjectPublicKeyInfo (Chromium's pin)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


def make_certs(d: Path) -> Certs:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ssegw test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(TLS_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_pem = ca.public_bytes(pem)
    chain = cert.public_bytes(pem) + ca_pem
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    out = Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "bundle.pem",
                base64.b64encode(hashlib.sha256(spki).digest()).decode())
    out.ca.write_bytes(ca_pem)
    out.cert.write_bytes(chain)
    out.key.write_bytes(key_pem)
    out.bundle.write_bytes(chain + key_pem)
    return out


# -- ports and recipes -------------------------------------------------------------------


def sub(text: str, old: str, new: str) -> str:
    """Replace ``old`` (which must be in the recipe) with ``new``."""
    assert old in text, f"the recipe no longer contains {old!r}"
    return text.replace(old, new)


def render(kind: str, port: int, gw_port: int, admin_port: int, certs: Certs, text: str | None = None) -> str:
    """The shipped recipe (or ``text``, a variant of it) with the test host's addresses, ports and
    certificate."""
    text = print_proxy(kind) if text is None else text
    if kind == "nginx":
        text = sub(text, "listen 443 ", f"listen 127.0.0.1:{port} ")
        text = re.sub(r"^\s*listen \[::\]:443 .*\n", "", text, count=1, flags=re.M)
        text = sub(text, "server 127.0.0.1:8080;", f"server 127.0.0.1:{gw_port};")
        text = sub(text, "/etc/ssl/certs/sse.example.com.pem", str(certs.cert))
        text = sub(text, "/etc/ssl/private/sse.example.com.key", str(certs.key))
    elif kind in ("haproxy", "haproxy-xff"):
        text = sub(text, "bind :443 ssl crt /etc/haproxy/certs/sse.example.com.pem",
                   f"bind 127.0.0.1:{port} ssl crt {certs.bundle}")
        text = sub(text, "server gw1 127.0.0.1:8080 ", f"server gw1 127.0.0.1:{gw_port} ")
        text = sub(text, "check port 8081", f"check port {admin_port}")
    elif kind == "caddy":
        text = sub(text, "sse.example.com {", f"https://{TLS_NAME}:{port} {{\n\tbind 127.0.0.1\n"
                   f"\ttls {certs.cert} {certs.key}")
        text = sub(text, "reverse_proxy 127.0.0.1:8080 {", f"reverse_proxy 127.0.0.1:{gw_port} {{")
    else:
        raise ValueError(kind)
    return text


class Frontend:
    """One proxy server process built from a shipped recipe."""

    def __init__(self, kind: str, d: Path, gw_port: int, admin_port: int, certs: Certs) -> None:
        self.kind = kind
        self.dir = d
        self.gw_port = gw_port
        self.admin_port = admin_port
        self.certs = certs
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = d / "server.log"
        #: the recipe's text, when a test changes more than the addresses (None: as shipped)
        self.recipe: str | None = None

    def _command(self) -> tuple[list[str], dict[str, str]]:
        exe = binary(self.kind)
        assert exe is not None
        d = self.dir
        env = dict(os.environ)
        site = render(self.kind, self.port, self.gw_port, self.admin_port, self.certs, self.recipe)
        if self.kind == "nginx":
            (d / "ssegw.conf").write_text(site)
            for t in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (d / t).mkdir(exist_ok=True)
            # Debian's nginx.conf in miniature, with gzip on for every type: the recipe's own
            # "gzip off" is what keeps events uncompressed.
            (d / "nginx.conf").write_text(f"""\
user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    gzip on;
    gzip_types *;
    gzip_min_length 1;
    include {d}/ssegw.conf;
}}
""")
            return [exe, "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf"),
                    "-g", "daemon off;"], env
        if self.kind in ("haproxy", "haproxy-xff"):
            (d / "ssegw.cfg").write_text(site)
            # The part of Debian's haproxy.cfg the recipe leaves to it, minus chroot, user and
            # the stats socket (nothing outside the temporary directory).
            (d / "global.cfg").write_text("global\n    maxconn 1000\n")
            return [exe, "-db", "-f", str(d / "global.cfg"), "-f", str(d / "ssegw.cfg")], env
        # Caddy: a global block for a test host (no admin endpoint, no ACME, no port-80
        # redirects, no HTTP/3, storage in the temporary directory, a short shutdown grace).
        (d / "Caddyfile").write_text(f"""\
{{
\tadmin off
\tauto_https disable_redirects
\tskip_install_trust
\tgrace_period 1s
\tstorage file_system {d / "storage"}
\tservers {{
\t\tprotocols h1 h2
\t}}
}}

{site}""")
        env.update(HOME=str(d), XDG_DATA_HOME=str(d / "data"), XDG_CONFIG_HOME=str(d / "config"))
        return [exe, "run", "--config", str(d / "Caddyfile"), "--adapter", "caddyfile"], env

    def start(self, timeout: float = 10.0) -> Frontend:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cmd, env = self._command()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw, \
                        self.certs.client_context().wrap_socket(raw, server_hostname=TLS_NAME):
                    return self
            except (OSError, ssl.SSLError):
                time.sleep(0.05)
        log = self.log.read_text(errors="replace")
        self.stop()
        raise RuntimeError(f"{self.kind} did not start on port {self.port}:\n{log}")

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def stream(self, path: str, headers: dict[str, str] | None = None, source: str = CLIENT_IP,
               timeout: float = 10.0) -> TLSStream:
        return TLSStream(self.port, path, self.certs.client_context(), headers, source, timeout)


# -- clients -----------------------------------------------------------------------------


class TLSStream(Stream):
    """``harness.Stream`` over TLS to a front end, connecting from ``source``."""

    def __init__(self, port: int, path: str, ctx: ssl.SSLContext, headers: dict[str, str] | None = None,
                 source: str = CLIENT_IP, timeout: float = 10.0) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        sock = ctx.wrap_socket(raw, server_hostname=TLS_NAME)
        self.open(sock, TLS_NAME, port, path, headers, timeout)

    def has_pending(self) -> bool:
        return not self.closed and self.sock.pending() > 0

    def pump(self, timeout: float) -> bool:
        # Decrypted bytes may already wait inside the SSL object, where select() cannot see them.
        if self.closed:
            return False
        if not self.has_pending():
            r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            if not r:
                return False
        self.sock.settimeout(max(0.05, timeout))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:  # readable, but only part of a TLS record so far
            return False
        except OSError:  # reset, or a TLS alert/close_notify
            data = b""
        if not data:
            self.closed = True
            return False
        self._consume(data)
        return True


def proxy_v1(dst_port: int, src: str = "127.0.0.1") -> bytes:
    """A PROXY protocol v1 header naming ``src`` as the client (for a gateway that expects one)."""
    return f"PROXY TCP4 {src} 127.0.0.1 {random.randrange(40000, 60000)} {dst_port}\r\n".encode()


class DirectStream(Stream):
    """``harness.Stream`` straight to the gateway, a PROXY header first when ``proxied``."""

    def __init__(self, port: int, path: str, proxied: bool, headers: dict[str, str] | None = None,
                 timeout: float = 10.0) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if proxied:
            sock.sendall(proxy_v1(port))
        self.open(sock, "127.0.0.1", port, path, headers, timeout)

    def has_pending(self) -> bool:
        return False


def publish(port: int, msgs: object, proxied: bool, timeout: float = 10.0) -> Response:
    """POST /publish straight to the gateway (a PROXY header first when ``proxied``)."""
    body = json.dumps(msgs).encode()
    req = (f"POST /publish HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall((proxy_v1(port) if proxied else b"") + req)
        buf = bytearray()
        status, hdrs, raw = read_head(s, buf, timeout)
        data = recv_all(s, buf, int(hdrs.get("content-length", 0)), timeout)
    return Response(status, hdrs, data, raw)


def arrivals(streams: list[Stream], before: list[int], timeout: float) -> list[float | None]:
    """When each stream got past ``before[i]`` events (monotonic seconds), reading all at once."""
    times: list[float | None] = [None] * len(streams)
    deadline = time.monotonic() + timeout
    while any(t is None for t in times) and time.monotonic() < deadline:
        waiting = [s for s, t in zip(streams, times, strict=True) if t is None and not s.closed]
        if not waiting:
            break
        ready = [s for s in waiting if getattr(s, "has_pending", lambda: False)()]
        if not ready:
            r, _, _ = select.select([s.sock for s in waiting], [], [], max(0.0, deadline - time.monotonic()))
            ready = [s for s in waiting if s.sock in r]
        for s in ready:
            s.pump(0.2)
        now = time.monotonic()
        for i, s in enumerate(streams):
            if times[i] is None and len(s.events) > before[i]:
                times[i] = now
    return times


# -- a gateway with a proxy in front ------------------------------------------------------


@functools.cache
def proxy_protocol_known() -> bool:
    """Whether this gateway accepts ``proxy_protocol = true`` (``check-config`` exits 0)."""
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "proxy_protocol.toml"
        cfg.write_text('proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\n')
        r = subprocess.run([sys.executable, "-m", "ssegw", "check-config", str(cfg)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    return r.returncode == 0


def require(kind: str) -> None:
    if binary(kind) is None:
        pytest.skip(f"{BINARIES[kind]} is not installed (apt-get install -y {BINARIES[kind]}; .ci/run does)")
    if kind == "haproxy" and not proxy_protocol_known():
        pytest.skip("the gateway does not know the proxy_protocol key yet (check-config refuses it): "
                    "the send-proxy-v2 recipe is tested once it does; haproxy-xff covers HAProxy meanwhile")


@dataclass
class Stack:
    kind: str
    gw: Gateway
    fe: Frontend

    @property
    def proxy_protocol(self) -> bool:
        return self.kind == "haproxy"

    def publish(self, msgs: object) -> list[str]:
        r = publish(self.gw.port, msgs, self.proxy_protocol)
        assert r.status == 200, r
        return r.json()["ids"]

    def direct(self, path: str) -> DirectStream:
        return DirectStream(self.gw.port, path, self.proxy_protocol)

    def via(self, path: str, headers: dict[str, str] | None = None, source: str = CLIENT_IP) -> TLSStream:
        s = self.fe.stream(path, headers, source)
        assert s.status == 200, (s.status, s.error_body)
        return s

    def stop(self) -> None:
        try:
            self.fe.stop()
        finally:
            self.gw.stop(timeout=20)


def start_stack(kind: str, d: Path, certs: Certs, heartbeat: str = "1s", recipe: str | None = None,
                extra: str = "") -> Stack:
    """The gateway (GATEWAY_CONFIG, the heartbeat, ``extra`` config lines) and ``kind``'s proxy
    from ``recipe`` (default: as shipped) in front of it; skips when the proxy cannot run."""
    require(kind)
    config = GATEWAY_CONFIG + f'heartbeat_interval = "{heartbeat}"\n' + \
        ("proxy_protocol = true\n" if kind == "haproxy" else "") + extra
    gw = Gateway(config=config, tmp_path=d).start()
    try:
        fe = Frontend(kind, d / kind, gw.port, gw.admin_port, certs)
        if recipe is not None:
            fe.recipe = recipe
        fe.start()
    except BaseException:
        gw.kill()
        raise
    return Stack(kind, gw, fe)
