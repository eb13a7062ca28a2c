"""Every error leaves the API as `{"error": {type, message, param, ...}}`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gemma_batch.errors import AppError, FieldError, InvalidRequest


def _param(loc: tuple[int | str, ...]) -> str:
    # ("body", "items", 3, "prompt") -> "items[3].prompt"
    text = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "body"


def _message(error: dict[str, object]) -> str:
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


async def _app_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [FieldError(_param(tuple(e["loc"])), _message(e)) for e in exc.errors()]
    return await _app_error(request, InvalidRequest(errors))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
