"""Every error the gateway reports, as one hierarchy.

Each class carries the HTTP status, the machine-readable ``type`` and whether a
client may retry. Routes turn any of them into ``{"error": {"type", "message"}}``
with the headers :meth:`GatewayError.headers` gives; flights turn them into an
SSE ``error`` event with ``retryable``.

An error that repeating the request cannot cure (a refused request, a
provider that refuses our credentials) says so with ``x-should-retry:
false``, the header the official OpenAI and Anthropic SDKs obey over their
own status rules (they would otherwise retry a 502).

::

    GatewayError                      500 internal_error
    ├── BadRequest                    400 invalid_request
    │   └── ProviderNotConfigured     400 provider_not_configured
    ├── Unauthorized                  401 unauthorized        (WWW-Authenticate: Bearer)
    ├── Forbidden                     403 forbidden
    ├── NotFound                      404 not_found
    ├── PayloadTooLarge               413 payload_too_large
    ├── UnsupportedMediaType          415 unsupported_media_type
    ├── IdempotencyKeyReused          422 idempotency_key_reused
    ├── LimitExceeded                 429 rate_limited        (an org's limit; Retry-After)
    ├── RequestTimeout                408 request_timeout     (a body too slow to arrive)
    ├── QueueFull                     503 queue_full          (Retry-After)
    ├── StoreError                    503 store_error         (retryable: a write failed)
    ├── ShuttingDown                  503 shutting_down       (retryable)
    ├── LeaderLost                    503 leader_lost         (retryable: another instance led it and vanished)
    ├── RegistryUnavailable           503 registry_unavailable (retryable: Redis does not answer)
    ├── NoListeners                   499 cancelled           (flight aborted)
    └── UpstreamError                 502 upstream_error      (retryable)
        ├── ProviderAuthError         502 provider_auth       (upstream 401, 403)
        ├── UpstreamBadRequest        400 invalid_request     (upstream 400, 422)
        ├── UpstreamNotFound          404 model_not_found     (upstream 404)
        ├── UpstreamPayloadTooLarge   413 payload_too_large   (upstream 413)
        ├── RateLimited               429 rate_limited        (Retry-After)
        ├── UpstreamTimeout           504 upstream_timeout    (retryable)
        └── UpstreamProtocolError     502 upstream_protocol
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadRequest",
    "Forbidden",
    "GatewayError",
    "IdempotencyKeyReused",
    "LeaderLost",
    "LimitExceeded",
    "NoListeners",
    "NotFound",
    "PayloadTooLarge",
    "ProviderAuthError",
    "ProviderNotConfigured",
    "QueueFull",
    "RateLimited",
    "RegistryUnavailable",
    "RequestTimeout",
    "ShuttingDown",
    "StoreError",
    "Unauthorized",
    "UnsupportedMediaType",
    "UpstreamBadRequest",
    "UpstreamError",
    "UpstreamNotFound",
    "UpstreamPayloadTooLarge",
    "UpstreamProtocolError",
    "UpstreamTimeout",
]


class GatewayError(Exception):
    status: int = 500
    type: str = "internal_error"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        type: str | None = None,
        status: int | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        param: str | None = None,
        limit: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if type is not None:
            self.type = type
        if status is not None:
            self.status = status
        if retryable is not None:
            self.retryable = retryable
        self.retry_after = retry_after
        self.param = param
        #: the name of the limit a request went over (``rpm``, ``max_body_bytes``...), if so
        self.limit = limit

    def to_dict(self) -> dict[str, Any]:
        """The ``error`` object of the JSON body and of the SSE ``error`` event."""
        body: dict[str, Any] = {
            "type": self.type,
            "message": self.message,
            "retryable": self.retryable,
        }
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        if self.limit is not None:
            body["limit"] = self.limit
        return body

    @property
    def should_retry(self) -> bool | None:
        """False when the same request can only fail again: a 4xx that is not
        retryable, or an upstream's refusal (whatever our status says); None
        leaves it to the status (a 500 of our own may pass)."""
        if self.retryable:
            return None
        if 400 <= self.status < 500 or isinstance(self, UpstreamError):
            return False
        return None

    def headers(self) -> dict[str, str]:
        """The response headers every surface sends with this error."""
        headers: dict[str, str] = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        if self.should_retry is False:
            headers["x-should-retry"] = "false"
        return headers


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request"


class ProviderNotConfigured(BadRequest):
    type = "provider_not_configured"


class Unauthorized(GatewayError):
    status = 401
    type = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "WWW-Authenticate": "Bearer"}


class Forbidden(GatewayError):
    status = 403
    type = "forbidden"


class NotFound(GatewayError):
    status = 404
    type = "not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "payload_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "unsupported_media_type"


class IdempotencyKeyReused(GatewayError):
    """An ``Idempotency-Key`` sent again with another thread or body."""

    status = 422
    type = "idempotency_key_reused"


class LimitExceeded(GatewayError):
    """An org went over one of its limits (``limit`` names it); ``retry_after`` says when
    it is likely under it again."""

    status = 429
    type = "rate_limited"
    retryable = True


class RequestTimeout(GatewayError):
    status = 408
    type = "request_timeout"
    retryable = True


class QueueFull(GatewayError):
    status = 503
    type = "queue_full"
    retryable = True


class StoreError(GatewayError):
    """The store could not write what the answer needs (the disk is full, say); nothing of
    the failed write is kept, and the same request may succeed later."""

    status = 503
    type = "store_error"
    retryable = True


class ShuttingDown(GatewayError):
    status = 503
    type = "shutting_down"
    retryable = True


class LeaderLost(GatewayError):
    """The instance that led the flight stopped renewing its lease (it died or lost Redis)."""

    status = 503
    type = "leader_lost"
    retryable = True


class RegistryUnavailable(GatewayError):
    """The shared flight registry (Redis) did not answer."""

    status = 503
    type = "registry_unavailable"
    retryable = True


class NoListeners(GatewayError):
    """The flight was aborted because its last listener left."""

    status = 499
    type = "cancelled"
    retryable = True


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    retryable = True


class ProviderAuthError(UpstreamError):
    type = "provider_auth"
    retryable = False


class UpstreamBadRequest(UpstreamError):
    """The upstream refused the request as malformed (400, or 422 from validating servers)."""

    status = 400
    type = "invalid_request"
    retryable = False


class UpstreamNotFound(UpstreamError):
    """The upstream does not know the model (or the path: a wrong base URL reads the same)."""

    status = 404
    type = "model_not_found"
    retryable = False


class UpstreamPayloadTooLarge(UpstreamError):
    """The upstream refused the request's size."""

    status = 413
    type = "payload_too_large"
    retryable = False


class RateLimited(UpstreamError):
    status = 429
    type = "rate_limited"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    type = "upstream_protocol"
