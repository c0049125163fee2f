"""The HTTP front: Ray Serve LLM's OpenAI ingress, made safe to roll out and to lose engines behind.

Ray Serve LLM's `OpenAiIngress` serves `/v1/models`, `/v1/completions`, `/v1/chat/completions`
(SSE when `stream=true`). Its builders create the FastAPI app themselves and offer no hook for
authentication, so this module builds the same app (`init()` keeps Ray's error, CORS, metrics and
request-id middleware) and adds, outermost, a bearer-key check and a body-size limit
(`deploy.http_guards`). Completions and chats go through `deploy.resilience`: retried while
nothing was sent, 503 + Retry-After when no engine can take them, streams that end with an error
event instead of breaking. `/health` asks every model deployment's engine whether it is alive.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    ErrorResponse,
    OpenAIHTTPException,
)
from ray.llm._internal.serve.core.ingress.ingress import (
    DEFAULT_ENDPOINTS,
    OpenAiIngress,
    init,
    make_fastapi_ingress,
)
from ray.llm._internal.serve.core.ingress.utils import (
    NON_STREAMING_RESPONSE_TYPES,
    _sanitize_chat_completion_request,
)
from ray.llm._internal.serve.core.protocol import RawRequestInfo
from ray.serve._private.http_util import session_id_from_headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from deploy.args import IngressArgs
from deploy.http_guards import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    error_response,
    load_api_key,
    warn_if_exposed,
)
from deploy.resilience import RetryPolicy, ServiceUnavailable, call_with_retries, guarded_stream

__all__ = ["HEALTH_PATH", "ApiKeyMiddleware", "SereIngress", "make_ingress_cls"]

logger = logging.getLogger("ray.serve")

HEALTH_PATH = "/health"
# Paths a load balancer or probe reaches without a key.
_OPEN_PATHS = frozenset({HEALTH_PATH})
_HEALTH_TIMEOUT_S = 10.0
# IngressArgs' request-handling fields, as passed to SereIngress(settings=...).
DEFAULT_SETTINGS: dict[str, Any] = IngressArgs().model_dump(include={
    "request_timeout_s", "unavailable_wait_s", "max_attempts", "retry_after_s",
    "max_body_bytes", "api_key_file"})


class SereIngress(OpenAiIngress):
    """`OpenAiIngress` with an optional API key, retries, honest status codes and `GET /health`.

    `settings` holds `deploy.args.IngressArgs`' request-handling fields (DEFAULT_SETTINGS keys).
    """

    def __init__(self, llm_deployments, model_cards, *, api_key: str | None = None,
                 settings: dict[str, Any] | None = None, lora_paths=None, **kwargs):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.api_key = load_api_key(api_key, self.settings["api_key_file"])
        self.policy = RetryPolicy(**{name: self.settings[name] for name in (
            "request_timeout_s", "unavailable_wait_s", "max_attempts", "retry_after_s")})
        _HOLDER["ingress"] = self
        logger.info("sere ingress: models=%s, api key %s", sorted(model_cards),
                    "required" if self.api_key else "not required")
        warn_if_exposed(_serve_http_host(), self.api_key is not None)

    async def _process_llm_request(self, body, call_method: str, raw_request=None) -> Response:
        """Ray's version, with retries before the first token and no bare 500 (module doc)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.request_timeout_s
        model_id = await self._get_model_id(body.model)
        handle = self._get_configured_serve_handle(model_id)
        if raw_request is not None:
            session_id = session_id_from_headers(raw_request.headers)
            if session_id:
                handle = handle.options(session_id=session_id)
        if isinstance(body, ChatCompletionRequest):
            body = _sanitize_chat_completion_request(body)
        info = RawRequestInfo.from_starlette_request(raw_request) if raw_request else None
        method = getattr(handle, call_method)
        try:
            first, response = await call_with_retries(
                lambda: method.remote(body, info), self.policy, model_id, deadline)
        except ServiceUnavailable as error:
            return error_response(error.status_code, error.message, "ServiceUnavailableError"
                                  if error.status_code == 503 else "timeout_error",
                                  self.policy.retry_after_s)
        chunk = first[0] if isinstance(first, list) and first else first
        if isinstance(chunk, ErrorResponse):
            raise OpenAIHTTPException(message=chunk.error.message, status_code=chunk.error.code,
                                      type=chunk.error.type)
        if isinstance(chunk, NON_STREAMING_RESPONSE_TYPES):
            return JSONResponse(content=chunk.model_dump())
        return StreamingResponse(guarded_stream(first, response, deadline),
                                 media_type="text/event-stream")

    async def health(self) -> JSONResponse:
        """200 when every model's engine answers its health check, else 503 naming the model."""
        failed = {}
        for model_id, handle in self._default_serve_handles.items():
            try:
                await asyncio.wait_for(handle.check_health.remote(), _HEALTH_TIMEOUT_S)
            except Exception as error:  # noqa: BLE001 - any failure means unhealthy
                failed[model_id] = f"{type(error).__name__}: {error}"[:300]
        if failed:
            return JSONResponse(status_code=503, content={"status": "unhealthy", "failed": failed},
                                headers={"Retry-After": str(self.policy.retry_after_s)})
        return JSONResponse(content={"status": "ok", "models": sorted(self._model_cards)})


def _serve_http_host() -> str | None:
    """The host Serve's HTTP proxies bind (None when it cannot be read, e.g. outside Serve)."""
    import ray

    if not ray.is_initialized():  # e.g. constructed in a unit test: never start or join a cluster
        return None
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return client.http_config.host if client is not None else None
    except Exception:  # noqa: BLE001 - only feeds a warning
        return None


# The middleware is built by FastAPI before the replica constructs the ingress object, so it reads
# the key and limits through this per-process holder (one ingress class per replica process).
_HOLDER: dict[str, SereIngress] = {}


def _current_key() -> str | None:
    ingress = _HOLDER.get("ingress")
    return ingress.api_key if ingress is not None else None


def _current_body_limit() -> int:
    ingress = _HOLDER.get("ingress")
    return (ingress.settings if ingress is not None else DEFAULT_SETTINGS)["max_body_bytes"]


async def _http_exception_as_openai_error(request, exc: StarletteHTTPException) -> JSONResponse:
    # Ray's ingress raises plain HTTPExceptions (e.g. 404 for an unknown model) and Starlette
    # answers unknown paths / wrong methods with them, which FastAPI would render as
    # {"detail": ...}; clients expect the OpenAI error object.
    message = str(exc.detail)
    if exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    elif exc.status_code == 404 and message == "Not Found":
        message = f"No route {request.url.path} (see /v1/models, /v1/completions, " \
                  "/v1/chat/completions)"
    return error_response(exc.status_code, message,
                          "NotFoundError" if exc.status_code == 404 else "invalid_request_error")


def make_ingress_cls():
    """The Serve ingress class: Ray's OpenAI routes + `/health` + the key and size guards."""
    app: FastAPI = init()
    app.add_exception_handler(StarletteHTTPException, _http_exception_as_openai_error)
    app.add_middleware(BodySizeLimitMiddleware, get_limit=_current_body_limit)
    app.add_middleware(ApiKeyMiddleware, get_key=_current_key, open_paths=_OPEN_PATHS)
    endpoints = dict(DEFAULT_ENDPOINTS)
    endpoints["health"] = lambda fastapi_app: fastapi_app.get(HEALTH_PATH)
    return make_fastapi_ingress(SereIngress, endpoint_map=endpoints, app=app)
