"""Tests for ssegw.policy.auth: token extraction, JWT verification, topic authorization."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from ssegw.core.errors import Forbidden, ProtocolError, Unauthorized
from ssegw.policy import auth as auth_mod
from ssegw.policy.auth import Authenticator, Principal

SECRET = "s3cret-that-is-long-enough-for-hs256-0123456789"
NOW = 1_700_000_000.0

# Every detail verify() may produce: fixed sentences, so nothing of the token can leak.
VERIFY_DETAILS = {
    "missing token",
    "token verification is not configured",
    "token algorithm not allowed",
    "bad token signature",
    "token audience mismatch",
    "token issuer mismatch",
    "malformed token",
    "token expired",
    "token not yet valid",
    "bad exp claim",
    "bad nbf claim",
    "bad iat claim",
    "bad sub claim",
    "bad ssegw claim",
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs_token(payload: object, secret: str | bytes = SECRET, header: dict | None = None) -> str:
    """Sign by hand so tests can produce what PyJWT's encoder refuses to (NaN, PEM secrets)."""
    head = _b64(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(payload).encode())
    key = secret.encode() if isinstance(secret, str) else secret
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def claims(subscribe=None, publish=None, **extra) -> dict:
    grants = {}
    if subscribe is not None:
        grants["subscribe"] = subscribe
    if publish is not None:
        grants["publish"] = publish
    return {"ssegw": grants, **extra}


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, pem.decode()


@pytest.fixture(scope="module")
def ec_keys() -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, pem.decode()


@pytest.fixture
def hs() -> Authenticator:
    return Authenticator(algorithm="HS256", secret=SECRET)


def detail_of(exc_info: pytest.ExceptionInfo) -> str:
    return exc_info.value.detail


# --- happy paths --------------------------------------------------------------------------


def test_hs256_happy_path(hs: Authenticator) -> None:
    tok = jwt.encode(claims(["prices.*"], ["news.>"], sub="alice", exp=NOW + 60), SECRET, "HS256")
    p = hs.verify(tok, NOW)
    assert isinstance(p, Principal)
    assert p.sub == "alice"
    assert p.exp == NOW + 60
    assert [x.source for x in p.subscribe] == ["prices.*"]
    assert p.can_subscribe("prices.AAPL") and not p.can_subscribe("news.x")
    assert p.can_publish("news.x.y") and not p.can_publish("prices.AAPL")
    assert hs.enabled


def test_rs256_happy_path(rsa_keys) -> None:
    key, pem = rsa_keys
    a = Authenticator(algorithm="RS256", public_key=pem)
    tok = jwt.encode(claims([">"]), key, "RS256")
    p = a.verify(tok, NOW)
    assert p.exp is None and p.sub is None
    assert p.can_subscribe("anything.at.all")


def test_es256_happy_path(ec_keys) -> None:
    key, pem = ec_keys
    a = Authenticator(algorithm="ES256", public_key=pem)
    tok = jwt.encode(claims(["a"], sub="s", exp=NOW + 1), key, "ES256")
    assert a.verify(tok, NOW).can_subscribe("a")


def test_wrong_key_is_bad_signature(rsa_keys) -> None:
    _, pem = rsa_keys
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    a = Authenticator(algorithm="RS256", public_key=pem)
    with pytest.raises(Unauthorized) as ei:
        a.verify(jwt.encode(claims([">"]), other, "RS256"), NOW)
    assert detail_of(ei) == "bad token signature"
    with pytest.raises(Unauthorized):
        Authenticator(algorithm="HS256", secret="x" * 40).verify(jwt.encode({}, SECRET, "HS256"), NOW)


# --- algorithm attacks --------------------------------------------------------------------


def test_alg_none_refused(hs: Authenticator) -> None:
    tok = jwt.encode(claims([">"]), None, algorithm="none")
    with pytest.raises(Unauthorized) as ei:
        hs.verify(tok, NOW)
    assert detail_of(ei) == "token algorithm not allowed"
    # Hand-made variants: "None", and an unsigned token with a trailing dot.
    head = _b64(json.dumps({"alg": "None"}).encode())
    body = _b64(json.dumps(claims([">"])).encode())
    for forged in (f"{head}.{body}.", f"{head}.{body}"):
        with pytest.raises(Unauthorized):
            hs.verify(forged, NOW)


def test_rs256_public_key_as_hmac_secret_refused(rsa_keys) -> None:
    _, pem = rsa_keys
    a = Authenticator(algorithm="RS256", public_key=pem)
    forged = hs_token(claims([">"], [">"]), secret=pem)
    with pytest.raises(Unauthorized) as ei:
        a.verify(forged, NOW)
    assert detail_of(ei) == "token algorithm not allowed"
    with pytest.raises(Unauthorized):
        a.authorize_publish(f"Bearer {forged}", ["x"], NOW, peer_is_loopback=True)


def test_constructor_rejects_bad_config(rsa_keys) -> None:
    _, pem = rsa_keys
    for bad in ("none", "NONE", "", "HS999"):
        with pytest.raises(ValueError):
            Authenticator(algorithm=bad, secret=SECRET)
    with pytest.raises(ValueError):  # a PEM handed to an HMAC algorithm
        Authenticator(algorithm="HS256", public_key=pem)
    with pytest.raises(ValueError):
        Authenticator(algorithm="RS256", secret=SECRET)
    with pytest.raises(ValueError) as ei:
        Authenticator(algorithm="RS256", public_key="-----BEGIN PUBLIC KEY-----\nnope\n")
    assert "nope" not in str(ei.value)
    with pytest.raises(ValueError):
        Authenticator(algorithm="HS256", secret=SECRET, leeway=-1)


def test_es256_refuses_rs256_token(rsa_keys, ec_keys) -> None:
    rkey, _ = rsa_keys
    _, epem = ec_keys
    a = Authenticator(algorithm="ES256", public_key=epem)
    with pytest.raises(Unauthorized) as ei:
        a.verify(jwt.encode(claims([">"]), rkey, "RS256"), NOW)
    assert detail_of(ei) == "token algorithm not allowed"


# --- time ---------------------------------------------------------------------------------


def test_expiry_uses_now_argument(hs: Authenticator) -> None:
    # exp far in the past of the real clock: only the `now` argument decides.
    tok = jwt.encode(claims([">"], exp=1000), SECRET, "HS256")
    assert hs.verify(tok, 999.5).exp == 1000
    for now in (1000, 1000.1, NOW):
        with pytest.raises(Unauthorized) as ei:
            hs.verify(tok, now)
        assert detail_of(ei) == "token expired"
    # and exp far in the future of the real clock expires when `now` says so
    far = jwt.encode(claims([">"], exp=4_000_000_000), SECRET, "HS256")
    with pytest.raises(Unauthorized):
        hs.verify(far, 4_000_000_001)


def test_leeway() -> None:
    a = Authenticator(algorithm="HS256", secret=SECRET, leeway=5)
    tok = jwt.encode(claims([">"], exp=1000), SECRET, "HS256")
    assert a.verify(tok, 1004.9).exp == 1000
    with pytest.raises(Unauthorized):
        a.verify(tok, 1005)
    nbf = jwt.encode(claims([">"], nbf=2000, iat=2000), SECRET, "HS256")
    assert a.verify(nbf, 1995)
    with pytest.raises(Unauthorized) as ei:
        a.verify(nbf, 1994.9)
    assert detail_of(ei) == "token not yet valid"


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["1000", True, None, float("nan"), float("inf"), [1], 10**400])
def test_bad_numeric_claims(hs: Authenticator, claim: str, value: object) -> None:
    with pytest.raises(Unauthorized):
        hs.verify(hs_token(claims([">"], **{claim: value})), NOW)


# --- aud / iss ----------------------------------------------------------------------------


def test_audience_and_issuer() -> None:
    a = Authenticator(algorithm="HS256", secret=SECRET, audience="ssegw", issuer="https://issuer.example")
    good = {"aud": "ssegw", "iss": "https://issuer.example"}
    assert a.verify(jwt.encode(claims([">"], **good), SECRET, "HS256"), NOW)
    listed = {**good, "aud": ["other", "ssegw"]}
    assert a.verify(jwt.encode(claims([">"], **listed), SECRET, "HS256"), NOW)
    cases = [
        ({**good, "aud": "other"}, "token audience mismatch"),
        ({"iss": good["iss"]}, "token audience mismatch"),
        ({**good, "iss": "https://issuer.example.evil"}, "token issuer mismatch"),
        ({**good, "iss": "issuer"}, "token issuer mismatch"),
        ({"aud": "ssegw"}, "token issuer mismatch"),
    ]
    for payload, want in cases:
        with pytest.raises(Unauthorized) as ei:
            a.verify(jwt.encode(claims([">"], **payload), SECRET, "HS256"), NOW)
        assert detail_of(ei) == want, payload


def test_aud_iss_ignored_when_not_configured(hs: Authenticator) -> None:
    tok = jwt.encode(claims([">"], aud="whatever", iss="anyone"), SECRET, "HS256")
    assert hs.verify(tok, NOW)


# --- malformed input ----------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token(hs: Authenticator, token: str | None) -> None:
    with pytest.raises(Unauthorized) as ei:
        hs.verify(token, NOW)
    assert detail_of(ei) == "missing token"
    with pytest.raises(Unauthorized):
        hs.authorize_subscribe(token, ["a"], NOW)


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9..", "\ud800.x.y", "é.é.é"])
def test_garbage_token(hs: Authenticator, token: str) -> None:
    with pytest.raises(Unauthorized) as ei:
        hs.verify(token, NOW)
    assert detail_of(ei) in VERIFY_DETAILS


@pytest.mark.parametrize(
    "grants",
    [
        "prices.*",
        ["ok"],  # not a dict, see below
        {"subscribe": "prices.*"},
        {"subscribe": ["a.>.b"]},
        {"subscribe": [1]},
        {"subscribe": [""]},
        {"publish": {"x": 1}},
        {"publish": ["bad seg"]},
    ],
)
def test_bad_ssegw_claim(hs: Authenticator, grants: object) -> None:
    with pytest.raises(Unauthorized) as ei:
        hs.verify(jwt.encode({"ssegw": grants}, SECRET, "HS256"), NOW)
    assert detail_of(ei) == "bad ssegw claim"


def test_bad_sub_claim(hs: Authenticator) -> None:
    with pytest.raises(Unauthorized):
        hs.verify(hs_token(claims([">"], sub=42)), NOW)


def test_missing_lists_allow_nothing(hs: Authenticator) -> None:
    for payload in ({}, {"ssegw": {}}, claims(["a"])):
        p = hs.verify(jwt.encode(payload, SECRET, "HS256"), NOW)
        assert not p.can_publish("a")
        assert not p.can_subscribe("b")


def test_publish_keys_only_refuses_every_jwt() -> None:
    a = Authenticator(algorithm="HS256", publish_keys=("k" * 32,))
    assert a.enabled
    with pytest.raises(Unauthorized):
        a.verify(jwt.encode(claims([">"]), SECRET, "HS256"), NOW)


# --- token extraction ---------------------------------------------------------------------


def test_token_precedence(hs: Authenticator) -> None:
    cookie = "ssegw_token=C"
    assert hs.token_from("Bearer H", "Q", cookie) == "H"
    assert hs.token_from("bearer  H ", "Q", cookie) == "H"
    assert hs.token_from("BEARER H", None, None) == "H"
    assert hs.token_from("Basic dXNlcjpwdw==", "Q", cookie) == "Q"
    assert hs.token_from("Bearer", "Q", cookie) == "Q"
    assert hs.token_from(None, "Q", cookie) == "Q"
    assert hs.token_from(None, "", cookie) == "C"
    assert hs.token_from(None, None, cookie) == "C"
    assert hs.token_from(None, None, None) is None
    assert hs.token_from("", "", "") is None


def test_cookie_parsing() -> None:
    a = Authenticator(algorithm="HS256", secret=SECRET, cookie="tok")
    assert a.cookie == "tok"
    assert a.token_from(None, None, "a=1; tok=abc.def.ghi; b=2") == "abc.def.ghi"
    assert a.token_from(None, None, 'tok="quoted"') == "quoted"
    assert a.token_from(None, None, "xtok=1; tokx=2") is None
    assert a.token_from(None, None, "tok=; tok=second") == "second"
    assert a.token_from(None, None, "ssegw_token=other") is None
    assert a.token_from(None, None, 'bad"cookie; {{;; tok=v') == "v"


@pytest.mark.parametrize("header", ["tok", 'tok="unbalanced', ";;;", "=", "tok\x00=", "\ud800", '"="', 'tok="'])
def test_malformed_cookie_header_gives_none(header: str) -> None:
    a = Authenticator(algorithm="HS256", secret=SECRET, cookie="tok")
    assert a.token_from(None, None, header) is None


# --- subscribe authorization --------------------------------------------------------------


def _principal(hs: Authenticator, subscribe: list[str], sub: str | None = None) -> Principal:
    extra = {"sub": sub} if sub is not None else {}
    return hs.verify(jwt.encode(claims(subscribe, **extra), SECRET, "HS256"), NOW)


def test_contract_pattern_examples(hs: Authenticator) -> None:
    p = _principal(hs, ["prices.*"])
    assert p.can_subscribe("prices.AAPL")
    assert not p.can_subscribe("prices")
    assert not p.can_subscribe("prices.AAPL.x")
    everything = _principal(hs, [">"])
    for topic in ("a", "a.b", "x.y.z", "user:1@host/p"):
        assert everything.can_subscribe(topic)


def test_tail_and_sub_patterns(hs: Authenticator) -> None:
    p = _principal(hs, ["news.>", "user.{sub}.>", "room.{sub}"], sub="alice")
    assert p.can_subscribe("news.a") and p.can_subscribe("news.a.b")
    assert not p.can_subscribe("news")
    assert p.can_subscribe("user.alice.inbox") and not p.can_subscribe("user.bob.inbox")
    assert not p.can_subscribe("user.alice")
    assert p.can_subscribe("room.alice") and not p.can_subscribe("room.bob")
    # no sub: {sub} matches nothing
    assert not _principal(hs, ["room.{sub}"]).can_subscribe("room.alice")
    # a sub with a dot cannot reach further than one segment
    assert not _principal(hs, ["room.{sub}"], sub="a.b").can_subscribe("room.a.b")
    assert not _principal(hs, ["room.{sub}"], sub="*").can_subscribe("room.alice")


def test_authorize_subscribe(hs: Authenticator) -> None:
    tok = jwt.encode(claims(["prices.*"], exp=NOW + 10), SECRET, "HS256")
    p = hs.authorize_subscribe(tok, ["prices.A", "prices.B"], NOW)
    assert p is not None and p.exp == NOW + 10
    with pytest.raises(Forbidden) as ei:
        hs.authorize_subscribe(tok, ["prices.A", "news.x", "other"], NOW)
    assert detail_of(ei) == "topic 'news.x' not allowed by token"
    assert ei.value.status_hint == 403
    off = Authenticator(algorithm="HS256")
    assert not off.enabled
    assert off.authorize_subscribe(None, ["anything"], NOW) is None


# --- publish authorization ----------------------------------------------------------------


def test_publish_disabled_loopback_only() -> None:
    off = Authenticator(algorithm="HS256")
    off.authorize_publish(None, ["a"], NOW, peer_is_loopback=True)
    with pytest.raises(Forbidden) as ei:
        off.authorize_publish("Bearer whatever", ["a"], NOW, peer_is_loopback=False)
    assert detail_of(ei) == "publishing without auth is allowed only from loopback"


def test_publish_keys_use_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = ("k1" * 16, "k2" * 16, "k3" * 16)
    a = Authenticator(algorithm="HS256", publish_keys=keys)
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(x: bytes, y: bytes) -> bool:
        calls.append((x, y))
        return real(x, y)

    monkeypatch.setattr(auth_mod.hmac, "compare_digest", spy)
    a.authorize_publish(f"Bearer {keys[0]}", ["any.topic", "x"], NOW, peer_is_loopback=False)
    assert len(calls) == 3  # every key compared, no early exit
    a.authorize_publish(f"bearer {keys[2]}", ["z"], NOW, peer_is_loopback=False)
    with pytest.raises(Unauthorized) as ei:
        a.authorize_publish("Bearer k1k1", ["x"], NOW, peer_is_loopback=True)
    assert "k1k1" not in detail_of(ei)
    with pytest.raises(Unauthorized):  # non-ASCII must not crash compare_digest
        a.authorize_publish("Bearer ключ\ud800", ["x"], NOW, peer_is_loopback=True)
    with pytest.raises(Unauthorized) as ei:
        a.authorize_publish(None, ["x"], NOW, peer_is_loopback=True)
    assert detail_of(ei) == "missing token"


def test_publish_with_jwt() -> None:
    a = Authenticator(algorithm="HS256", secret=SECRET, publish_keys=("p" * 32,))
    tok = jwt.encode(claims(publish=["orders.{sub}.>"], sub="shop"), SECRET, "HS256")
    a.authorize_publish(f"Bearer {tok}", ["orders.shop.1", "orders.shop.2"], NOW, False)
    with pytest.raises(Forbidden) as ei:
        a.authorize_publish(f"Bearer {tok}", ["orders.shop.1", "orders.evil.1"], NOW, False)
    assert detail_of(ei) == "topic 'orders.evil.1' not allowed by token"
    sub_only = jwt.encode(claims(subscribe=[">"]), SECRET, "HS256")
    with pytest.raises(Forbidden):
        a.authorize_publish(f"Bearer {sub_only}", ["a"], NOW, True)
    for bad in (None, "", "Basic " + tok, tok):  # only a Bearer header counts
        with pytest.raises(Unauthorized):
            a.authorize_publish(bad, ["a"], NOW, True)
    expired = jwt.encode(claims(publish=[">"], exp=NOW - 1), SECRET, "HS256")
    with pytest.raises(Unauthorized):
        a.authorize_publish(f"Bearer {expired}", ["a"], NOW, True)


# --- no token text in errors --------------------------------------------------------------


def test_token_never_in_error_details(rsa_keys) -> None:
    key, pem = rsa_keys
    hs_auth = Authenticator(algorithm="HS256", secret=SECRET, audience="aud", issuer="iss", publish_keys=("x" * 32,))
    rs_auth = Authenticator(algorithm="RS256", public_key=pem)
    base = {"aud": "aud", "iss": "iss"}
    tokens = [
        jwt.encode(claims(["a"], exp=1, **base), SECRET, "HS256"),
        jwt.encode(claims(["a"], **{**base, "aud": "zz"}), SECRET, "HS256"),
        jwt.encode(claims(["a"], **{**base, "iss": "zz"}), SECRET, "HS256"),
        jwt.encode(claims("nope", **base), SECRET, "HS256"),
        jwt.encode(claims(["a"], **base), "y" * 40, "HS256"),
        jwt.encode(claims(["a"], **base), None, "none"),
        jwt.encode(claims(["a"], **base), key, "RS256"),
        hs_token(claims([">"]), secret=pem),
        "not-a-token-" * 5,
    ]
    seen = 0
    for tok in tokens:
        for call in (
            lambda t: hs_auth.verify(t, NOW),
            lambda t: rs_auth.verify(t, NOW),
            lambda t: hs_auth.authorize_subscribe(t, ["b"], NOW),
            lambda t: hs_auth.authorize_publish(f"Bearer {t}", ["b"], NOW, False),
        ):
            try:
                call(tok)
            except ProtocolError as exc:
                seen += 1
                for part in [tok, *tok.split(".")]:
                    if len(part) >= 8:
                        assert part not in exc.detail
                        assert part not in str(exc) and part not in repr(exc.args)
    assert seen >= len(tokens) * 3


# --- property tests -----------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
_claim_values = st.fixed_dictionaries(
    {},
    optional={
        "exp": _json | st.floats() | st.integers(),
        "nbf": _json,
        "iat": _json,
        "sub": _json | st.text(),
        "aud": _json,
        "ssegw": _json
        | st.fixed_dictionaries({}, optional={"subscribe": st.lists(st.text(max_size=12)), "publish": _json}),
    },
)


@settings(max_examples=300)
@given(st.one_of(st.none(), st.text()), st.one_of(st.none(), st.text()), st.one_of(st.none(), st.text()))
def test_token_from_arbitrary_text(auth_h: str | None, query: str | None, cookie: str | None) -> None:
    a = Authenticator(algorithm="HS256", secret=SECRET)
    got = a.token_from(auth_h, query, cookie)
    assert got is None or (isinstance(got, str) and got)


@settings(max_examples=300)
@given(st.text())
def test_verify_arbitrary_text(token: str) -> None:
    a = Authenticator(algorithm="HS256", secret=SECRET)
    try:
        a.verify(token, NOW)
    except ProtocolError as exc:
        assert isinstance(exc, Unauthorized)
        assert exc.detail in VERIFY_DETAILS


@settings(max_examples=300)
@given(_claim_values | _json)
def test_verify_arbitrary_signed_payloads(payload: object) -> None:
    a = Authenticator(algorithm="HS256", secret=SECRET)
    try:
        p = a.verify(hs_token(payload), NOW)
    except ProtocolError as exc:
        assert exc.detail in VERIFY_DETAILS
    else:
        assert p.sub is None or isinstance(p.sub, str)
        p.can_subscribe("a.b")
        p.can_publish("a.b")


# -- the verified-token cache ----------------------------------------------------------------


def test_a_remembered_token_is_still_checked_against_the_clock() -> None:
    a = Authenticator(algorithm="HS256", secret=SECRET)
    tok = hs_token(claims(subscribe=["t"], exp=1_000_100, nbf=1_000_000))
    assert a.authorize_subscribe(tok, ["t"], 1_000_050) is not None  # verified and remembered
    with pytest.raises(Unauthorized, match="expired"):
        a.authorize_subscribe(tok, ["t"], 1_000_200)
    with pytest.raises(Unauthorized, match="not yet valid"):
        a.authorize_subscribe(tok, ["t"], 999_000)
    with pytest.raises(Forbidden):
        a.authorize_subscribe(tok, ["u"], 1_000_050)  # claims still apply to a remembered token


def test_a_refused_token_is_never_remembered() -> None:
    a = Authenticator(algorithm="HS256", secret=SECRET)
    bad = hs_token(claims(subscribe=["t"]), secret="another-secret-that-is-long-enough-0123456789")
    for _ in range(2):
        with pytest.raises(Unauthorized, match="signature"):
            a.authorize_subscribe(bad, ["t"], 1_000_000)


def test_a_new_authenticator_does_not_know_tokens_of_an_old_key() -> None:
    """A reload builds a new Authenticator: a token signed with the old secret fails."""
    tok = hs_token(claims(subscribe=["t"]))
    assert Authenticator(algorithm="HS256", secret=SECRET).authorize_subscribe(tok, ["t"], 1_000_000)
    rotated = Authenticator(algorithm="HS256", secret="rotated-secret-that-is-long-enough-0123456789")
    with pytest.raises(Unauthorized):
        rotated.authorize_subscribe(tok, ["t"], 1_000_000)
