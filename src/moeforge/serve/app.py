"""The FastAPI application: the routes, one gate in front of them (API key, answers counted for
/metrics), and the engine thread started and stopped with the app.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (and /v1/models/{id}),
GET /health (never behind the key: load balancers probe it), GET /metrics.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from moeforge.serve.api_errors import APIError, install_error_handlers
from moeforge.serve.chat import create_chat_completion
from moeforge.serve.completions import create_completion
from moeforge.serve.generation import Served, check_model
from moeforge.serve.metrics import CONTENT_TYPE, ServerMetrics
from moeforge.serve.protocol import ChatCompletionRequest, CompletionRequest

OPEN_PATHS = ("/health",)
"""answered without the API key"""


def build_app(served: Served, api_key: str | None = None) -> FastAPI:
    """The API over `served` (its engine thread is started and stopped with the app's lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served.engine.start()
        try:
            yield
        finally:
            served.engine.stop()

    app = FastAPI(title="moeforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(served.engine)
    install_error_handlers(app)
    app.add_middleware(Gate, api_key=api_key, metrics=metrics)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(served, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(served, body, request)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        check_model(served, name)
        return _model_card(served)

    @app.get("/health")
    async def health() -> Response:
        engine = served.engine
        if engine.failure is not None:
            return JSONResponse({"status": "failed", "error": str(engine.failure)}, status_code=503)
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    return app


def _model_card(served: Served) -> dict:
    return {
        "id": served.model_name,
        "object": "model",
        "created": served.created,
        "owned_by": "moeforge",
        "max_model_len": served.max_context,
    }


class Gate:
    """ASGI middleware in front of every route: without `Authorization: Bearer <api_key>` (when a key
    is set) anything but /health is a 401; every answer's status is counted for /metrics. A plain
    ASGI wrapper, not Starlette's BaseHTTPMiddleware, so that streamed answers pass through untouched
    and a client's disconnect still reaches them."""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app = app
        self._key = None if api_key is None else f"Bearer {api_key}".encode()
        self._metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        answered = False

        async def counted(message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
                self._metrics.count(path, message["status"])
            await send(message)

        if self._key is not None and path not in OPEN_PATHS and not self._authorized(scope):
            refusal = APIError(
                401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
            await refusal.response()(scope, receive, counted)
            return
        try:
            await self.app(scope, receive, counted)
        except Exception:  # a bug: Starlette's outermost middleware answers 500 after this
            if not answered:
                self._metrics.count(path, 500)
            raise
        if not answered:  # the handler gave up on a client that had left
            self._metrics.count(path, 499)

    def _authorized(self, scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self._key)
