"""Every error leaves the API as `{"error": {type, message, param, code, ...}}`.

The OpenAI-compatible routes (everything under /v1 but /v1/jobs, unknown routes included) answer
as OpenAI does, so its clients raise the exception a script expects: 400 (not 422) for a bad
request, 404 `model_not_found` for an unknown model, and OpenAI's `type` for each status. The
native /v1/jobs routes keep their documented statuses and types.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from gemma_batch.errors import AppError, FieldError, InvalidRequest

log = logging.getLogger(__name__)

NATIVE = "/v1/jobs"


def _param(loc: tuple[int | str, ...]) -> str:
    # ("body", "items", 3, "prompt") -> "items[3].prompt"
    text = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "body"


def _message(error: dict[str, object]) -> str:
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _openai_route(request: Request) -> bool:
    path = request.url.path
    return path.startswith("/v1/") and not (path == NATIVE or path.startswith(NATIVE + "/"))


def _openai_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    if status == 429:
        return "requests"
    return "invalid_request_error"


def _response(request: Request, exc: AppError) -> JSONResponse:
    body, status = exc.body(), exc.status_code
    if _openai_route(request):
        if status == 422:
            status = 400
        if exc.code == "model_not_found":
            status = 404
        error = body["error"]
        assert isinstance(error, dict)
        error["type"] = _openai_type(status)
        if status == 429 and error["code"] is None:
            error["code"] = "rate_limit_exceeded"
    return JSONResponse(body, status_code=status, headers=exc.headers)


async def _app_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    return _response(request, exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [FieldError(_param(tuple(e["loc"])), _message(e)) for e in exc.errors()]
    return _response(request, InvalidRequest(errors))


class _HttpError(AppError):
    """Starlette's own errors (unknown route or method, unreadable body), in the same shape."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status_code = status
        if status == 404:
            self.type = "not_found_error"


class _ServerError(AppError):
    status_code = 500
    type = "server_error"


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code in (404, 405):
        message = f"Invalid URL ({request.method} {request.url.path})"
    else:
        message = str(exc.detail)
    return _response(request, _HttpError(message, exc.status_code))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The details stay in the log: they may name hosts, files or another tenant's data.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _response(request, _ServerError("the server had an error processing the request"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
