"""The verification package's exceptions. Each carries the HTTP status and the stable
problem ``type`` it is answered with (RFC 9457); :mod:`clinic_voice.http` maps them in one place.
"""

from __future__ import annotations

from typing import Any

PROBLEM_BASE = "https://clinic-voice.example/problems/"


class VerificationError(Exception):
    """Base class: something the API answers with a problem document."""

    status: int = 400
    slug: str = "bad-request"
    title: str = "Bad request"
    retry_after_s: int | None = None  # sent as Retry-After when set
    # A fault of the data whose cause was logged once where it was found (a record or a
    # message that does not open, a file that would not go): the boundary logs each answer
    # at DEBUG only, not one error line a request.
    logged_at_source: bool = False

    def __init__(self, detail: str = "", **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra

    @property
    def type_uri(self) -> str:
        return PROBLEM_BASE + self.slug

    @property
    def headers(self) -> dict[str, str]:
        """Header fields the answer carries besides ``Retry-After``."""
        return {}


class BadBody(VerificationError):
    """A body that cannot be read as sent: its Content-Encoding does not decode, or it is cut
    short. (The base class's 400 ``bad-request``.)"""


class UnsupportedCoding(VerificationError):
    """A body in a ``Content-Encoding`` the service does not decode (RFC 9110 15.5.16: 415,
    with ``Accept-Encoding`` naming those it does)."""

    status = 415
    slug = "unsupported-media-type"
    title = "Content-Encoding not accepted"

    @property
    def headers(self) -> dict[str, str]:
        return {"Accept-Encoding": ", ".join(self.extra.get("accepted", ()))}


class BodyTimeout(VerificationError):
    status = 408
    slug = "request-timeout"
    title = "The request body did not arrive in time"


class InvalidRequest(VerificationError):
    status = 422
    slug = "invalid-request"
    title = "The request is not valid"


class InvalidNumber(VerificationError):
    status = 422
    slug = "invalid-number"
    title = "The phone number is not valid"


class NumberRefused(VerificationError):
    status = 403
    slug = "number-refused"
    title = "The service does not send to this number"


class KeyNotAllowed(VerificationError):
    """A right key on a route it does not serve: verification keys never read the clinic's
    call records, and call-record keys serve nothing else."""

    status = 403
    slug = "key-not-allowed"
    title = "This API key may not use this route"


class ChannelUnavailable(VerificationError):
    status = 422
    slug = "channel-unavailable"
    title = "A requested channel is not configured on this service"


class NoChannelConfigured(VerificationError):
    status = 503
    slug = "no-channel"
    title = "No delivery channel is configured"


class NotFound(VerificationError):
    status = 404
    slug = "not-found"
    title = "Not found"


class NotPending(VerificationError):
    status = 409
    slug = "not-pending"
    title = "The verification is no longer pending"

    def __init__(self, detail: str = "", *, status: str = "") -> None:
        # ``status`` is the verification's; in the problem document ``status`` is the HTTP
        # code (RFC 9457 3.1.3), so the verification's goes out as ``verification_status``.
        if status:
            super().__init__(detail, verification_status=status)
        else:
            super().__init__(detail)


class NotOnChannel(VerificationError):
    """A ``/fallback`` whose ``from`` is not the verification's current channel: the client
    acted on an old read (the service moved on since, or another request did). ``channel``
    names the current one (None once the plan is used up)."""

    status = 409
    slug = "not-on-channel"
    title = "The verification is not on that channel"

    def __init__(self, detail: str, *, channel: str | None) -> None:
        super().__init__(detail, channel=channel)


class NoChannelLeft(VerificationError):
    status = 409
    slug = "no-channel-left"
    title = "Every channel of the plan has been used"


class IdempotencyConflict(VerificationError):
    status = 422
    slug = "idempotency-key-reused"
    title = "The Idempotency-Key was used with another request body"


class RetryLater(VerificationError):
    """A problem the same request may get past later: ``retry_after`` in the body and the
    ``Retry-After`` header, in whole seconds."""

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail, retry_after=max(1, retry_after_s))
        self.retry_after_s = max(1, retry_after_s)


class IdempotencyInProgress(RetryLater):
    status = 409
    slug = "idempotency-key-in-progress"
    title = "A request with this Idempotency-Key is still being made"


class RateLimited(RetryLater):
    status = 429
    slug = "rate-limited"
    title = "Too many requests"


class StoreUnavailable(VerificationError):
    """Redis cannot be reached, or refuses the write (full, read-only): fail closed (never
    approve, never send).

    ``cause`` (redis-py's text: a socket path, a host and port) is for the log only. The
    client, who may not even hold a right key (a wrong key is counted in Redis), gets the
    same detail for every cause.
    """

    status = 503
    slug = "store-unavailable"
    title = "The service's store is unavailable"

    def __init__(self, cause: str = "") -> None:
        super().__init__("the service's store cannot be used just now; try again shortly")
        self.cause = cause or self.detail

    def __str__(self) -> str:
        return self.cause


class Conflict(Exception):
    """A concurrent writer changed the record first (internal: the store retries)."""
