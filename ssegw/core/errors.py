"""One error hierarchy for everything a client or publisher can get wrong.

The core raises these; the protocol layer translates them, once, into a status code and
the JSON body ``{"error": CODE, "detail": TEXT}`` the contract promises.  ``code`` is a
short stable machine-readable string, ``detail`` a sentence naming the problem.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """A request we refuse.  ``status_hint`` is the HTTP status to answer with."""

    status_hint = 400
    code = "bad_request"
    #: Why, for the metrics: one of a small fixed set (``metrics.AUTH_REASONS``,
    #: ``metrics.REFUSED_REASONS``); "" when the raiser did not say.  Never shown to clients.
    reason = ""

    def __init__(
        self,
        detail: str,
        *,
        status_hint: int | None = None,
        code: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        reason: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if status_hint is not None:
            self.status_hint = status_hint
        if code is not None:
            self.code = code
        # Extra response headers the answer must carry (Allow, Retry-After, ...).
        self.headers = headers
        if reason is not None:
            self.reason = reason


class BadRequest(ProtocolError):
    status_hint = 400
    code = "bad_request"


class Unauthorized(ProtocolError):
    status_hint = 401
    code = "unauthorized"


class Forbidden(ProtocolError):
    status_hint = 403
    code = "forbidden"


class NotFound(ProtocolError):
    status_hint = 404
    code = "not_found"


class MethodNotAllowed(ProtocolError):
    status_hint = 405
    code = "method_not_allowed"


class PayloadTooLarge(ProtocolError):
    status_hint = 413
    code = "payload_too_large"


class UnsupportedMediaType(ProtocolError):
    status_hint = 415
    code = "unsupported_media_type"


class TooManyRequests(ProtocolError):
    status_hint = 429
    code = "too_many_requests"


class Unavailable(ProtocolError):
    status_hint = 503
    code = "unavailable"


class OutcomeUnknown(ProtocolError):
    """The upstream (Redis) may or may not have done what was asked: not a 503, which
    promises that nothing happened."""

    status_hint = 504
    code = "outcome_unknown"
