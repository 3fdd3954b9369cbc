"""OpenAI-style error bodies, {"error": {"message", "type", "param", "code"}}, for every error the server
returns: its own (`APIError`), request validation, routing (404/405) and body parsing errors."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         499: "invalid_request_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _printable(text: str | None) -> str | None:
    """Text that always encodes as UTF-8 (a lone surrogate from a request becomes its escape)."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": _printable(message), "type": TYPES.get(status, "invalid_request_error"),
                      "param": _printable(param), "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status,
                        headers=err.headers)


def http_error(status: int, detail: Any, cause: BaseException | None, method: str, path: str) -> APIError:
    """The APIError for a framework error (starlette's HTTPException): routing, body parsing."""
    if status == 404:
        return APIError(404, f"no such endpoint: {method} {path}", code="not_found")
    if status == 405:
        return APIError(405, f"method {method} is not allowed on {path}", code="method_not_allowed")
    if status == 400 and cause is not None:  # FastAPI could not parse the body
        if isinstance(cause, UnicodeDecodeError):
            return APIError(400, "the request body is not valid UTF-8")
        if isinstance(cause, RecursionError):
            return APIError(400, "the request body is nested too deeply")
        return APIError(400, f"the request body is not valid JSON: {cause}")
    return APIError(status, detail if isinstance(detail, str) else json.dumps(detail, default=str))
