"""What TLS in the gateway costs: ``python bench/tlscost.py [--streams 2000 --rate 50 --duration 15]``.

Two runs on fresh gateways, plain and TLS (a throw-away ECDSA P-256 certificate, TLS 1.3,
``tls_cert``/``tls_key``), each:

1. ``--streams`` subscribers (one asyncio client process on core 1, each stream its own
   connection, TLS clients verifying against the throw-away CA) open streams on one topic;
   the gateway's RSS before and after gives the memory per idle stream;
2. ``--rate`` messages/s of ~100 bytes are published to that topic for ``--duration`` s; the
   gateway's CPU time (user + system, /proc) divided by the events it delivered gives the CPU
   per delivered event, and the clients count every event (a loss fails the run).

The gateway runs on core 0, everything else on core 1.  Prints one JSON line and appends it to
``bench/results/tlscost.jsonl``; tuning.md "TLS in the gateway or at the front end" quotes it.
Everything stops by itself; only processes started here are stopped, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import PYTHON, Server, emit, log, proc_cpu2  # noqa: E402

TOPIC = "tls.cost"


def make_cert(tmp: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False).sign(ca_key, hashes.SHA256()))
    paths = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


# -- the client process ------------------------------------------------------------------------


async def _clients(port: int, n: int, ca: str, run_s: float, out: str) -> None:
    ctx = None
    if ca:
        ctx = ssl.create_default_context(cafile=ca)
    counts = [0] * n
    opened = 0

    async def one(i: int) -> None:
        nonlocal opened
        src = f"127.0.{1 + i // 20000}.{1 + (i // 250) % 250}"
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, local_addr=(src, 0),
                                             server_hostname="127.0.0.1" if ctx else None)
        w.write(f"GET /events?topic={TOPIC} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
        await r.readuntil(b"\r\n\r\n")
        opened += 1
        while True:
            data = await r.read(65536)
            if not data:
                return
            counts[i] += data.count(b"\nid: ") + data.startswith(b"id: ")

    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(one(i)))
        if i % 100 == 99:
            await asyncio.sleep(0.05)
    t_end = time.monotonic() + run_s
    while time.monotonic() < t_end:
        Path(out).write_text(json.dumps({"opened": opened, "events": sum(counts), "min": min(counts)}))
        await asyncio.sleep(0.5)
    for t in tasks:
        t.cancel()


def client_main(argv: list[str]) -> None:
    port, n, ca, run_s, out = int(argv[0]), int(argv[1]), argv[2], float(argv[3]), argv[4]
    import uvloop

    uvloop.run(_clients(port, n, ca, run_s, out))


# -- the coordinator ----------------------------------------------------------------------------


def one_run(tls: bool, args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    extra = ["--max-conns-per-ip", "0"]
    ca = ""
    if tls:
        ca_p, cert, key = make_cert(tmp)
        ca = str(ca_p)
        extra += ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-min-version", "1.3"]
    srv = Server("0", extra).start()
    # The publisher speaks TLS when the listener does (one request per message, from core 1).
    out = tmp / f"clients-{tls}.json"
    try:
        time.sleep(1.0)
        rss0 = srv.rss()
        run_s = 240 + args.duration  # a bound: the client is stopped as soon as the run is over
        cl = subprocess.Popen(["taskset", "-c", "1", PYTHON, __file__, "--client", str(srv.port), str(args.streams),
                               ca, str(run_s), str(out)])
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if out.exists() and json.loads(out.read_text() or "{}").get("opened") == args.streams:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("streams did not open")
        time.sleep(2.0)
        rss1 = srv.rss()
        # One keep-alive publisher connection (TLS when the listener is).
        if tls:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", srv.port, timeout=10, context=ssl.create_default_context(cafile=ca))
        else:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        d0 = srv.stats()["events_delivered"]
        u0, s0 = proc_cpu2(srv.pid)
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < args.duration:
            body = json.dumps({"topic": TOPIC, "data": {"i": n, "pad": "x" * 80}}).encode()
            conn.request("POST", "/publish", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"publish answered {resp.status}")
            n += 1
            time.sleep(max(0.0, t0 + n / args.rate - time.monotonic()))
        conn.close()
        time.sleep(2.0)
        u1, s1 = proc_cpu2(srv.pid)
        d1 = srv.stats()["events_delivered"]
        want = n * args.streams
        deadline = time.monotonic() + 30  # the clients may still be decrypting
        while time.monotonic() < deadline and json.loads(out.read_text())["events"] < want:
            time.sleep(0.5)
        got = json.loads(out.read_text())
        cl.terminate()
        cl.wait(10)
        delivered = d1 - d0
        return {
            "tls": tls, "streams": args.streams, "published": n, "delivered": delivered,
            "client_events": got["events"], "lost": n * args.streams - got["events"],
            "rss_per_stream_b": round((rss1 - rss0) / args.streams),
            "cpu_user_s": round(u1 - u0, 3), "cpu_sys_s": round(s1 - s0, 3),
            "cpu_us_per_event": round((u1 - u0 + s1 - s0) / max(1, delivered) * 1e6, 3),
        }
    finally:
        srv.stop()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=50)
    ap.add_argument("--duration", type=float, default=15)
    args = ap.parse_args()
    os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory() as d:
        runs = [one_run(False, args, Path(d)), one_run(True, args, Path(d))]
    for r in runs:
        log(json.dumps(r))
    plain, tls = runs
    ok = all(r["lost"] == 0 for r in runs)
    emit("tlscost", {
        "ok": ok, "runs": runs,
        "ratio": {"rss_per_stream": round(tls["rss_per_stream_b"] / max(1, plain["rss_per_stream_b"]), 2),
                  "cpu_per_event": round(tls["cpu_us_per_event"] / max(1e-9, plain["cpu_us_per_event"]), 2)},
        "conditions": {"gateway_core": 0, "client_core": 1, "rate": args.rate, "duration_s": args.duration,
                       "tls": "1.3, ECDSA P-256", "loadavg": os.getloadavg()},
    })
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
