"""Every failure the API reports, in OpenAI's error body: `{"error": {"message", "type", "param",
"code"}}`, with the status a client can act on: 400 names the field at fault, 401 asks for the key,
404 names what is not there, 429 and 503 say when to retry (`Retry-After`), 500 is a server fault.

The message is one line that starts with the field, as moeforge's command-line errors do
(`temperature: Input should be a finite number`), and `param` carries the field alone for programs.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from moeforge.errors import first_line
from moeforge.serve.async_engine import EngineFailed, EngineUnavailable
from moeforge.serve.requests import EngineFull, RequestError

RETRY_AFTER_FULL_S = 1
"""what a 429 (the queue is full) tells the client to wait"""
RETRY_AFTER_DRAINING_S = 5
"""what a 503 (the server is shutting down) tells the client to wait, for another replica"""


class APIError(Exception):
    """An answer other than 200, raised anywhere in a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind, self.code, self.retry_after_s = kind, code, retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def event(self) -> str:
        """The error as the last server-sent event of a stream whose headers (200) are already sent."""
        return f"data: {json.dumps(self.body())}\n\n"


def bad_field(field: str, message: str) -> APIError:
    return APIError(400, f"{field}: {message}", param=field)


def api_error(err: BaseException, rename: dict[str, str] | None = None) -> APIError:
    """The API's answer to an error the engine layer raised; `rename` maps an engine field name to the
    one the client sent (chat's `top_logprobs` is the engine's `logprobs`)."""
    if isinstance(err, RequestError):
        field = (rename or {}).get(err.field, err.field)
        return bad_field(field, str(err).split(": ", 1)[-1])
    if isinstance(err, EngineFull):
        return APIError(429, str(err), kind="rate_limit_error", code="queue_full", retry_after_s=RETRY_AFTER_FULL_S)
    if isinstance(err, EngineUnavailable):
        return APIError(
            503, str(err), kind="service_unavailable", code="draining", retry_after_s=RETRY_AFTER_DRAINING_S
        )
    if isinstance(err, EngineFailed):
        return APIError(500, str(err), kind="server_error", code="engine_failed")
    return APIError(500, f"internal error: {type(err).__name__}: {first_line(err)}", kind="server_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


async def _api_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, APIError)
    return err.response()


async def _validation_error(request: Request, err: Exception) -> JSONResponse:
    """The first problem pydantic found, as one line naming the field (FastAPI's default is a 422
    with a list; OpenAI answers 400)."""
    assert isinstance(err, RequestValidationError)
    problem = err.errors()[0]
    if problem["type"] == "json_invalid":
        reason = problem.get("ctx", {}).get("error", problem["msg"])
        return APIError(400, f"malformed JSON: {reason}").response()
    field = field_path(problem["loc"])
    if problem["type"] == "extra_forbidden":
        return bad_field(field, "unknown field (or one moeforge does not implement)").response()
    if field == "":
        return APIError(400, f"request body: {problem['msg']}").response()
    message = problem["msg"].removeprefix("Value error, ")
    return bad_field(field, message).response()


def field_path(loc: tuple) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; union members pydantic tried
    ('body', 'prompt', 'str') are dropped, since the client wrote none of them."""
    path = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _UNION_MEMBER_NAMES or "[" in str(part):
            break
        else:
            path += f".{part}" if path else str(part)
    return path


_UNION_MEMBER_NAMES = {"str", "int", "float", "bool", "list", "dict", "function-after"}


async def _http_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, HTTPException)
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return APIError(err.status_code, f"{request.url.path}: {err.detail}", kind=kind).response()


async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    """A bug: one line to the client (Starlette re-raises it after, and uvicorn logs its traceback)."""
    return api_error(err).response()
