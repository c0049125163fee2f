"""ASGI guards in front of the OpenAI routes: the API key, the body-size limit, exposure warnings.

The key is compared in constant time (`hmac.compare_digest` over bytes), read from the app args,
a file or the environment, and never logged, echoed or put in an error message.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from typing import Callable

from starlette.responses import JSONResponse

from deploy.args import API_KEY_ENV, API_KEY_FILE_ENV

__all__ = [
    "ApiKeyMiddleware",
    "BodySizeLimitMiddleware",
    "error_response",
    "is_loopback",
    "load_api_key",
    "warn_if_exposed",
]

logger = logging.getLogger("ray.serve")


def error_response(status_code: int, message: str, type_: str,
                   retry_after_s: int | None = None) -> JSONResponse:
    """The OpenAI error shape, so the official clients raise their typed errors."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": status_code}}
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse(status_code=status_code, content=body, headers=headers)


def load_api_key(explicit: str | None, path: str | None) -> str | None:
    """The key from (in order) the args, the args' file, $SERE_API_KEY_FILE, $SERE_API_KEY.

    A named key file that is missing or empty is an error naming the file (no silent open API).
    """
    if explicit:
        return explicit.strip()
    path = path or os.environ.get(API_KEY_FILE_ENV) or None
    if path:
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as error:
            raise ValueError(f"api key file {path!r} cannot be read: {error.strerror}") from None
        if not key:
            raise ValueError(f"api key file {path!r} is empty")
        return key
    key = os.environ.get(API_KEY_ENV, "").strip()
    return key or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume reachable from elsewhere


def warn_if_exposed(host: str | None, has_key: bool) -> bool:
    """Log a loud warning when the HTTP service listens beyond loopback without a key."""
    if host is None or is_loopback(host) or has_key:
        return False
    logger.warning("!" * 78)
    logger.warning("SERE SERVICE IS OPEN: Serve listens on %s (not loopback) and no API key is set."
                   " Anyone who can reach this host can use the model. Set ingress.api_key_file or "
                   "$%s, or bind http_options.host to 127.0.0.1.", host, API_KEY_FILE_ENV)
    logger.warning("!" * 78)
    return True


class ApiKeyMiddleware:
    """Rejects HTTP requests without `Authorization: Bearer <key>` (401), in constant time.

    `get_key` is called per request (the middleware is built before the ingress object that
    holds the key); it returns None for an open endpoint.
    """

    def __init__(self, app, *, get_key: Callable[[], "str | None"], open_paths: frozenset[str]):
        self.app = app
        self.get_key = get_key
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        key = self.get_key()
        if (
            key is None
            or scope["type"] != "http"
            or scope.get("method") == "OPTIONS"  # CORS preflight carries no credentials
            or _app_path(scope) in self.open_paths
        ):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # Bytes on both sides: compare_digest on str raises for non-ASCII input.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key.encode()):
            response = error_response(
                401, "Missing or invalid API key (send 'Authorization: Bearer <key>')",
                "AuthenticationError")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _app_path(scope) -> str:
    """The request path inside the app: Ray Serve passes the full path (e.g. "/off/health" for an
    app at route prefix "/off") with the prefix as `root_path`."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class BodySizeLimitMiddleware:
    """Answers 413 to a request body over `max_bytes`, by Content-Length or while it streams in."""

    def __init__(self, app, *, get_limit: Callable[[], int]):
        self.app = app
        self.get_limit = get_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.get_limit()
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(limit, scope, receive, send)
        body, more = [], True
        size = 0
        while more:  # read it here so an over-long chunked body is refused before parsing
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            size += len(message.get("body", b""))
            if size > limit:
                return await self._too_large(limit, scope, receive, send)
            body.append(message)
            more = message.get("more_body", False)
        return await self.app(scope, _replay(body, then=receive), send)

    @staticmethod
    async def _too_large(limit, scope, receive, send):
        response = error_response(
            413, f"Request body is larger than the limit of {limit} bytes (ingress.max_body_bytes)",
            "invalid_request_error")
        return await response(scope, receive, send)


def _replay(messages: list, then=None):
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
