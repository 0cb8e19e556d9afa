"""Error bodies: one JSON shape for every answer that is not 200, and the handlers that make them.

`{"error": "<slug>", "detail": "<message>"}`; validation errors (422) list the fields at fault:
`{"error": "validation", "detail": [{"field": "body.k", "message": "...", "type": "..."}]}`;
500s carry only an id that the server log holds with the traceback.
"""

from __future__ import annotations

from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtlrec.errors import DataError
from mtlrec.serve.schemas import ErrorResponse
from mtlrec.serve.service import ServeError

_SLUGS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          413: "payload_too_large", 415: "unsupported_media_type", 422: "validation", 429: "rate_limited",
          503: "unavailable"}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Unreadable body or Content-Length"},
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "Unknown item"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    422: {"model": ErrorResponse, "description": "Invalid request: `detail` names each field at fault"},
    429: {"model": ErrorResponse, "description": "Rate limit, or too many failed authentications (see Retry-After)"},
    500: {"model": ErrorResponse, "description": "Internal error: `id` identifies it in the server log"},
}


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc) or "body"


def _validation(items: list[dict[str, str]]) -> JSONResponse:
    return JSONResponse({"error": "validation", "detail": items}, status_code=422)


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    items = []
    for error in cast(RequestValidationError, exc).errors():
        message = "malformed JSON" if error.get("type") == "json_invalid" else str(error.get("msg", "invalid"))
        loc = error.get("loc", ())
        if error.get("type") == "json_invalid":
            loc = ("body",)
        items.append({"field": _field(loc), "message": message, "type": str(error.get("type", "value_error"))})
    return _validation(items)


async def on_serve_error(request: Request, exc: Exception) -> JSONResponse:
    error = cast(ServeError, exc)
    if error.status == 422:
        return _validation([{"field": error.field or "body", "message": error.message, "type": "value_error"}])
    return JSONResponse({"error": _SLUGS.get(error.status, "error"), "detail": error.message}, status_code=error.status)


async def on_data_error(request: Request, exc: Exception) -> JSONResponse:
    return _validation([{"field": "body", "message": str(exc), "type": "value_error"}])


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    error = cast(StarletteHTTPException, exc)
    return JSONResponse({"error": _SLUGS.get(error.status_code, "error"), "detail": str(error.detail)},
                        status_code=error.status_code, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ServeError, on_serve_error)
    app.add_exception_handler(DataError, on_data_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
