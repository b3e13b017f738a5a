"""Authentication and topic authorization: (headers, keys, now) -> Principal or error.

Strategy (docs/api.md "Auth"):
- One JWT algorithm is fixed by configuration and it is the *only* one ``jwt.decode`` accepts,
  so ``alg: none`` and RS/HS confusion (an HS256 token "signed" with our RSA public key) are
  refused by PyJWT's algorithm allow-list before any key is used.  Asymmetric keys are parsed
  once at construction, so a bad PEM is a configuration error, not a per-request 401.
- PyJWT checks ``exp``/``nbf``/``iat`` against the wall clock; this package is sans-I/O and
  takes ``now`` from the caller, so those three checks are switched off in PyJWT and redone
  here against ``now`` with the same leeway rules.  ``exp`` is optional; when present it must
  be a finite number and ends up in ``Principal.exp`` so the server can close the stream then.
- ``aud``/``iss`` are checked (and required) only when configured.
- Permissions come from ``{"ssegw": {"subscribe": [...], "publish": [...]}}`` and are compiled
  with :class:`ssegw.core.topics.Pattern`; a missing list grants nothing.
- Static publisher keys are compared with ``hmac.compare_digest`` against *every* key (no early
  exit), so timing reveals neither which key nor how much of it matched.
- Token text never goes into an error detail: details are fixed sentences plus topic names.
- Every failure is an :class:`Unauthorized` (401) or :class:`Forbidden` (403); hostile token
  text can raise nothing else (property-tested).
- Every failure carries a ``reason`` from a small fixed set (``metrics.AUTH_REASONS``:
  missing, malformed, bad_signature, bad_key, algorithm, expired, not_yet_valid, bad_claims,
  topic_denied, publish_denied, not_loopback) for ``ssegw_auth_failures_total``.
"""

from __future__ import annotations

import hmac
import math

import jwt

from ssegw.core.errors import Forbidden, Unauthorized
from ssegw.core.topics import Pattern, any_match, compile_patterns

__all__ = ["Authenticator", "Principal"]

# The JWS algorithms PyJWT verifies with a public key; HS* use the shared secret instead.
_ASYMMETRIC_PREFIXES = ("RS", "ES", "PS", "Ed")


#: Verified tokens remembered (Authenticator.verify), and the longest one remembered.
VERIFIED_TOKENS = 4096
VERIFIED_TOKEN_MAX_LEN = 2048


class Principal:
    """Who a verified token speaks for and which topics it may touch."""

    __slots__ = ("exp", "publish", "sub", "subscribe")

    def __init__(
        self,
        sub: str | None = None,
        subscribe: tuple[Pattern, ...] = (),
        publish: tuple[Pattern, ...] = (),
        exp: float | None = None,
    ) -> None:
        self.sub = sub
        self.subscribe = subscribe
        self.publish = publish
        self.exp = exp  # unix seconds, or None when the token has no exp

    def can_subscribe(self, topic: str) -> bool:
        return any_match(self.subscribe, topic, self.sub)

    def can_publish(self, topic: str) -> bool:
        return any_match(self.publish, topic, self.sub)

    def __repr__(self) -> str:
        subs = [p.source for p in self.subscribe]
        pubs = [p.source for p in self.publish]
        return f"Principal(sub={self.sub!r}, subscribe={subs}, publish={pubs}, exp={self.exp})"


def _bearer(authorization: str | None) -> str | None:
    """The credentials of an ``Authorization: Bearer X`` header (RFC 6750 2.1), else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    value = value.strip()
    return value or None


def _cookie(header: str | None, name: str) -> str | None:
    """The first non-empty value of cookie ``name`` in a Cookie header (RFC 6265 5.4), else None.

    A plain split rather than ``http.cookies.SimpleCookie``: SimpleCookie raises on some
    inputs and silently drops every cookie after the first one it dislikes, so one bad
    third-party cookie would hide ours.  Pairs without ``=`` are skipped; a value with an
    unbalanced quote is treated as absent.
    """
    if not header or not name:
        return None
    for pair in header.split(";"):
        key, sep, value = pair.partition("=")
        if not sep or key.strip() != name:
            continue
        value = value.strip()
        if value.startswith('"') or value.endswith('"'):
            if len(value) < 2 or not (value.startswith('"') and value.endswith('"')):
                continue
            value = value[1:-1]
        if value:
            return value
    return None


def _numeric_claim(payload: dict[str, object], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 2) as float; None when absent; 401 when not a number.

    ``json`` accepts NaN/Infinity and bools are ints in Python, so both are refused
    explicitly: a NaN ``exp`` would otherwise never expire.
    """
    if name not in payload:
        return None
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Unauthorized(f"bad {name} claim", reason="bad_claims")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise Unauthorized(f"bad {name} claim", reason="bad_claims")
    return number


class Authenticator:
    """Verifies tokens and answers "may this request touch these topics?".

    Args:
        algorithm: the one JWS algorithm accepted (``HS256``, ``RS256``, ``ES256``, ...).
        secret: HMAC secret for ``HS*``.
        public_key: PEM text of the verification key for ``RS*``/``ES*``/``PS*``/``EdDSA``.
        audience, issuer: required ``aud``/``iss`` values; empty means not checked.
        leeway: seconds of clock skew tolerated on ``exp``/``nbf``/``iat``.
        cookie: name of the cookie that may carry the token.
        publish_keys: static keys accepted as ``Authorization: Bearer KEY`` on ``/publish``.

    Raises:
        ValueError: unknown or ``none`` algorithm, a key of the wrong kind for the algorithm,
            an unparsable PEM, or a negative leeway.
    """

    def __init__(
        self,
        *,
        algorithm: str,
        secret: str = "",
        public_key: str = "",
        audience: str = "",
        issuer: str = "",
        leeway: float = 0.0,
        cookie: str = "ssegw_token",
        publish_keys: tuple[str, ...] = (),
    ) -> None:
        if not algorithm or algorithm.lower() == "none":
            raise ValueError("auth algorithm must be set and must not be 'none'")
        try:
            alg_obj = jwt.get_algorithm_by_name(algorithm)
        except NotImplementedError:
            raise ValueError(f"unsupported JWT algorithm {algorithm!r}") from None
        asymmetric = algorithm.startswith(_ASYMMETRIC_PREFIXES)
        if asymmetric and secret:
            raise ValueError(f"{algorithm} verifies with a public key, not a secret")
        if not asymmetric and public_key:
            raise ValueError(f"{algorithm} verifies with a shared secret, not a public key")
        if not math.isfinite(leeway) or leeway < 0:
            raise ValueError("auth leeway must be a finite number >= 0")
        self._key: object = None
        if asymmetric and public_key:
            try:
                self._key = alg_obj.prepare_key(public_key)
            except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
                # Name the problem, not the key material.
                raise ValueError(f"auth public key is not a valid {algorithm} key") from exc
        elif secret:
            self._key = secret
        self.algorithm = algorithm
        self.audience = audience
        self.issuer = issuer
        self.leeway = float(leeway)
        self.cookie = cookie
        self._publish_keys = tuple(k.encode("utf-8") for k in publish_keys if k)
        self.enabled = bool(self._key is not None or self._publish_keys)
        # Tokens whose signature (and aud/iss) checked out, with their payload.  A publisher
        # sends the same token with every request, and a reconnect storm brings the same
        # tokens back: verifying an HS256 token costs ~50-100 us with PyJWT, a dict lookup
        # ~50 ns.  Time claims (exp/nbf/iat) are checked again on every use against the
        # caller's clock; only verified tokens are kept, bounded in number and size; a
        # reload builds a new Authenticator (a rotated key never sees an old entry).
        self._verified: dict[str, dict[str, object]] = {}

    def token_from(
        self,
        authorization: str | None,
        query_token: str | None,
        cookie_header: str | None,
    ) -> str | None:
        """The request's token: Bearer header, else ``token`` query parameter, else cookie."""
        token = _bearer(authorization)
        if token:
            return token
        if query_token:
            return query_token
        return _cookie(cookie_header, self.cookie)

    def verify(self, token: str | None, now: float) -> Principal:
        """Verify ``token`` at unix time ``now`` and return its :class:`Principal`.

        Raises:
            Unauthorized: missing, malformed, badly signed, expired, not yet valid, wrong
                ``aud``/``iss``/``alg``, or an ``ssegw`` claim that is not lists of patterns.
        """
        if not token:
            raise Unauthorized("missing token", reason="missing")
        if self._key is None:
            # Only publish keys are configured: no JWT can ever be valid.
            raise Unauthorized("token verification is not configured", reason="bad_key")
        payload = self._verified.get(token)
        if payload is None:
            payload = self._decode(token)
            if len(token) <= VERIFIED_TOKEN_MAX_LEN:
                if len(self._verified) >= VERIFIED_TOKENS:
                    self._verified.clear()
                self._verified[token] = payload
        return self._principal(payload, now)

    def _decode(self, token: str) -> dict[str, object]:
        """Check ``token``'s signature, algorithm and ``aud``/``iss``; its payload.

        Raises:
            Unauthorized: see :meth:`verify`.
        """
        options = {
            "verify_exp": False,  # redone below against the caller's `now`
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": bool(self.audience),
            "verify_iss": bool(self.issuer),
        }
        try:
            payload = jwt.decode(
                token,
                self._key,  # type: ignore[arg-type]
                algorithms=[self.algorithm],
                options=options,  # type: ignore[arg-type]
                audience=self.audience or None,
                issuer=self.issuer or None,
            )
        except jwt.InvalidAlgorithmError:
            raise Unauthorized("token algorithm not allowed", reason="algorithm") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("bad token signature", reason="bad_signature") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError, jwt.MissingRequiredClaimError) as exc:
            # MissingRequiredClaimError is raised only for aud/iss, when they are configured.
            aud = isinstance(exc, jwt.InvalidAudienceError) or getattr(exc, "claim", "") == "aud"
            raise Unauthorized(f"token {'audience' if aud else 'issuer'} mismatch", reason="bad_claims") from None
        except jwt.PyJWTError:
            # DecodeError, InvalidKeyError, bad sub/jti types...: the token is malformed.
            raise Unauthorized("malformed token", reason="malformed") from None
        except (ValueError, TypeError, OverflowError, RecursionError):
            # Hostile text can reach PyJWT's internals: lone surrogates fail str.encode
            # (UnicodeError is a ValueError), deeply nested JSON exhausts the recursion limit,
            # huge integers exceed int parsing limits.  All mean "not a token we accept".
            raise Unauthorized("malformed token", reason="malformed") from None
        return payload

    def _principal(self, payload: dict[str, object], now: float) -> Principal:
        leeway = self.leeway
        exp = _numeric_claim(payload, "exp")
        if exp is not None and exp <= now - leeway:  # PyJWT's rule, with our clock
            raise Unauthorized("token expired", reason="expired")
        for name in ("nbf", "iat"):
            start = _numeric_claim(payload, name)
            if start is not None and start > now + leeway:
                raise Unauthorized("token not yet valid", reason="not_yet_valid")
        sub = payload.get("sub")
        if sub is not None and not isinstance(sub, str):
            raise Unauthorized("bad sub claim", reason="bad_claims")
        claim = payload.get("ssegw", {})
        if not isinstance(claim, dict):
            raise Unauthorized("bad ssegw claim", reason="bad_claims")
        try:
            subscribe = compile_patterns(claim.get("subscribe", []))
            publish = compile_patterns(claim.get("publish", []))
        except ValueError:
            raise Unauthorized("bad ssegw claim", reason="bad_claims") from None
        return Principal(sub or None, subscribe, publish, exp)

    def authorize_subscribe(self, token: str | None, topics: list[str], now: float) -> Principal | None:
        """Check a subscription; None when auth is off.

        Raises:
            Unauthorized: see :meth:`verify`.
            Forbidden: naming the first topic the token does not allow.
        """
        if not self.enabled:
            return None
        principal = self.verify(token, now)
        for topic in topics:
            if not principal.can_subscribe(topic):
                raise Forbidden(f"topic {topic!r} not allowed by token", reason="topic_denied")
        return principal

    def authorize_publish(
        self,
        authorization: str | None,
        topics: list[str],
        now: float,
        peer_is_loopback: bool,
    ) -> None:
        """Check a publish request.  Only the Authorization header counts (no query/cookie,
        so a browser cannot be tricked into publishing with its ambient cookie).

        Raises:
            Forbidden: auth off and the peer is not loopback, or a topic the token does not allow.
            Unauthorized: auth on and no/invalid credentials.
        """
        if not self.enabled:
            if peer_is_loopback:
                return
            raise Forbidden("publishing without auth is allowed only from loopback", reason="not_loopback")
        token = _bearer(authorization)
        if not token:
            raise Unauthorized("missing token", reason="missing")
        if self._publish_keys:
            offered = token.encode("utf-8", "surrogatepass")
            matched = False
            for key in self._publish_keys:  # no early exit: constant work per request
                matched |= hmac.compare_digest(offered, key)
            if matched:
                return
        principal = self.verify(token, now)
        for topic in topics:
            if not principal.can_publish(topic):
                raise Forbidden(f"topic {topic!r} not allowed by token", reason="publish_denied")
