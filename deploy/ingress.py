"""The HTTP front: Ray Serve LLM's OpenAI ingress plus an API-key check and a health route.

Ray Serve LLM's `OpenAiIngress` serves `/v1/models`, `/v1/completions`, `/v1/chat/completions`
(SSE when `stream=true`). Its builders create the FastAPI app themselves and offer no hook for
authentication, so this module builds the same app (`init()` keeps Ray's error, CORS, metrics and
request-id middleware) and adds, outermost, a bearer-key check; `/health` asks every model
deployment's engine whether it is alive.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray.llm._internal.serve.core.ingress.ingress import (
    DEFAULT_ENDPOINTS,
    OpenAiIngress,
    init,
    make_fastapi_ingress,
)
from starlette.responses import JSONResponse

from deploy.args import API_KEY_ENV

__all__ = ["HEALTH_PATH", "SereIngress", "make_ingress_cls"]

logger = logging.getLogger("ray.serve")

HEALTH_PATH = "/health"
# Paths a load balancer or probe reaches without a key.
_OPEN_PATHS = frozenset({HEALTH_PATH})
_HEALTH_TIMEOUT_S = 10.0


def _error(status_code: int, message: str, type_: str) -> JSONResponse:
    # The OpenAI error shape, so the official clients raise their typed errors.
    body = {"error": {"message": message, "type": type_, "param": None, "code": status_code}}
    return JSONResponse(status_code=status_code, content=body)


class ApiKeyMiddleware:
    """Rejects HTTP requests without `Authorization: Bearer <key>` (401), in constant time."""

    def __init__(self, app, *, key_holder: "SereIngress"):
        self.app = app
        self.key_holder = key_holder

    async def __call__(self, scope, receive, send):
        key = self.key_holder.api_key if self.key_holder is not None else None
        if (
            key is None
            or scope["type"] != "http"
            or scope.get("method") == "OPTIONS"  # CORS preflight carries no credentials
            or scope.get("path") in _OPEN_PATHS
        ):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), key):
            response = _error(401, "Missing or invalid API key (send 'Authorization: Bearer <key>')",
                              "AuthenticationError")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class SereIngress(OpenAiIngress):
    """`OpenAiIngress` with an optional API key and `GET /health`."""

    def __init__(self, llm_deployments, model_cards, *, api_key: str | None = None,
                 lora_paths=None, **kwargs):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        key = api_key or os.environ.get(API_KEY_ENV) or None
        self.api_key = key.strip() if key else None
        _KEY_HOLDER["ingress"] = self
        logger.info("sere ingress: models=%s, api key %s", sorted(model_cards),
                    "required" if self.api_key else "not required")

    async def health(self) -> JSONResponse:
        """200 when every model's engine answers its health check, else 503 naming the model."""
        failed = {}
        for model_id, handle in self._default_serve_handles.items():
            try:
                await asyncio.wait_for(handle.check_health.remote(), _HEALTH_TIMEOUT_S)
            except Exception as error:  # noqa: BLE001 - any failure means unhealthy
                failed[model_id] = f"{type(error).__name__}: {error}"[:300]
        if failed:
            return JSONResponse(status_code=503, content={"status": "unhealthy", "failed": failed})
        return JSONResponse(content={"status": "ok", "models": sorted(self._model_cards)})


# The middleware is built by FastAPI before the replica constructs the ingress object, so it reads
# the key through this per-process holder (one ingress class per replica process).
_KEY_HOLDER: dict[str, SereIngress] = {}


class _HolderProxy:
    @property
    def api_key(self) -> str | None:
        ingress = _KEY_HOLDER.get("ingress")
        return ingress.api_key if ingress is not None else None


async def _http_exception_as_openai_error(request, exc: StarletteHTTPException) -> JSONResponse:
    # Ray's ingress raises plain HTTPExceptions (e.g. 404 for an unknown model), which FastAPI
    # would render as {"detail": ...}; clients expect the OpenAI error object.
    return _error(exc.status_code, str(exc.detail), "NotFoundError" if exc.status_code == 404
                  else "invalid_request_error")


def make_ingress_cls():
    """The Serve ingress class: Ray's OpenAI routes + `/health` + the API-key middleware."""
    app: FastAPI = init()
    app.add_exception_handler(StarletteHTTPException, _http_exception_as_openai_error)
    app.add_middleware(ApiKeyMiddleware, key_holder=_HolderProxy())
    endpoints = dict(DEFAULT_ENDPOINTS)
    endpoints["health"] = lambda fastapi_app: fastapi_app.get(HEALTH_PATH)
    return make_fastapi_ingress(SereIngress, endpoint_map=endpoints, app=app)
