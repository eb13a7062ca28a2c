"""One error hierarchy; the API turns each into `{"error": {...}}` with its status code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FieldError:
    """One problem with one field: `param` names where (e.g. `items[3].prompt`)."""

    param: str
    message: str


class AppError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None  # a stable, machine-readable name of the error, where it has one
    headers: dict[str, str] = {}

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "type": self.type,
                "message": self.message,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(AppError):
    """Input that fails validation; carries every field problem found, not just the first."""

    status_code = 422

    def __init__(self, errors: list[FieldError]) -> None:
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{first.param}: {first.message}{more}", first.param)
        self.errors = errors

    def body(self) -> dict[str, object]:
        body = super().body()
        body["error"]["errors"] = [  # type: ignore[index]
            {"param": e.param, "message": e.message} for e in self.errors
        ]
        return body


class Unauthorized(AppError):
    """No API key, or one that is unknown or revoked; the message never says which."""

    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"
    headers = {"WWW-Authenticate": "Bearer"}

    def __init__(self) -> None:
        super().__init__(
            "a valid API key is needed: send `Authorization: Bearer <key>` "
            "(an operator makes one with `gemma-batch keys create --tenant NAME`)",
            "authorization",
        )


class NotFound(AppError):
    status_code = 404
    type = "not_found_error"


class Conflict(AppError):
    status_code = 409
    type = "conflict_error"


class PayloadTooLarge(AppError):
    status_code = 413
    type = "payload_too_large"


class TooManyQueued(AppError):
    """The tenant already has as many items waiting as it may; it can submit when they finish."""

    status_code = 429
    type = "rate_limit_error"

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(
            f"{queued} of this tenant's items are queued or running, and this job's would take "
            f"them over the limit of {limit}; submit again when some have finished",
            "items",
        )
        self.queued, self.limit = queued, limit

    def body(self) -> dict[str, object]:
        body = super().body()
        body["error"] |= {"queued": self.queued, "limit": self.limit}  # type: ignore[operator]
        return body


class IdempotencyKeyReused(AppError):
    """An Idempotency-Key sent again with a different request: a client bug, never a retry."""

    status_code = 422
    code = "idempotency_key_reused"

    def __init__(self) -> None:
        super().__init__(
            "this Idempotency-Key was used for a different request; a retry must send the same "
            "request, and a new request needs a new key",
            "Idempotency-Key",
        )


class ServiceUnavailable(AppError):
    status_code = 503
    type = "service_unavailable"


class ModelNotPrepared(AppError):
    """A worker or the API asked for a model that is not in the local model cache."""

    status_code = 404
    code = "model_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(
            f"model '{name}' is not prepared on this machine: "
            f"run `gemma-batch model prepare {name}`",
            "model",
        )
