"""Calling the engine deployment so that no request is lost to a replica that stops or dies.

Ray Serve's handle queues a request until some replica takes it, without limit, and a replica
that dies under a request fails it with a Ray error that FastAPI renders as a bare 500. Here:

- a request that failed before anything reached the client (a plain request, or a stream before
  its first chunk) is sent again, to whichever replica the router picks next, up to
  `max_attempts` times and within `unavailable_wait_s` in total; generation has no side effects,
  so this is safe;
- a request no replica takes within `unavailable_wait_s` (none ready, all full), or one that kept
  failing, gets 503 with `Retry-After`, and a Serve queue that is full (`max_queued_requests`)
  gets 503 at once;
- a stream cut after its first chunk ends with an OpenAI-style error event (`data: {"error":...}`)
  and the response closes; no stream outlives `request_timeout_s`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Callable

from fastapi import HTTPException
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ErrorResponse,
    OpenAIHTTPException,
)
from ray.llm._internal.serve.core.ingress.utils import _apply_openai_json_format
from ray.serve.exceptions import BackPressureError

__all__ = ["RetryPolicy", "ServiceUnavailable", "call_with_retries", "guarded_stream"]

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class RetryPolicy:
    request_timeout_s: float
    unavailable_wait_s: float
    max_attempts: int
    retry_after_s: int


class ServiceUnavailable(Exception):
    """No engine could take or finish the request in time: 503 (or 408) with Retry-After."""

    def __init__(self, message: str, status_code: int = 503):
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class _NoReplicaTookIt(Exception):
    pass


def _first_error(item: Any) -> "tuple[int, str] | None":
    """(code, message) when the engine's first output is an error, else None.

    Non-streaming errors arrive as `ErrorResponse`; a stream that failed before its first token
    arrives as a batch of SSE strings whose first one is `data: {"error": {...}}`.
    """
    first = item[0] if isinstance(item, list) and item else item
    if isinstance(first, ErrorResponse):
        return int(first.error.code), first.error.message
    if isinstance(first, str) and first.startswith('data: {"error"'):
        try:
            error = json.loads(first[len("data: "):].strip())["error"]
            return int(error.get("code") or 500), str(error.get("message"))
        except (ValueError, KeyError, TypeError):
            return 500, first[:300]
    return None


async def _first_item(response, assign_by: float, deadline: float) -> Any:
    """The response's first item; `_NoReplicaTookIt` when no replica took it by `assign_by`."""
    loop = asyncio.get_running_loop()
    # Ray 2.60: the handle resolves this future once a replica has accepted the request (the
    # router queues it until then, without limit). Private API: pin Ray.
    assigned = asyncio.ensure_future(response._fetch_future_result_async())
    try:
        await asyncio.wait_for(asyncio.shield(assigned), max(0.0, assign_by - loop.time()))
    except asyncio.TimeoutError:
        response.cancel()
        assigned.cancel()
        raise _NoReplicaTookIt() from None
    try:
        return await asyncio.wait_for(response.__anext__(), max(0.0, deadline - loop.time()))
    except asyncio.TimeoutError:
        response.cancel()
        raise ServiceUnavailable("Request timed out: the engine did not answer within the "
                                 "request timeout (ingress.request_timeout_s)", 408) from None


_CLIENT_ERRORS = (HTTPException, OpenAIHTTPException)


async def call_with_retries(call: Callable[[], Any], policy: RetryPolicy, model_id: str,
                            deadline: float) -> "tuple[Any, Any]":
    """(first item, response) of `call()`, retried while nothing was sent to the client.

    An engine error with a 4xx code is the client's: returned as is, never retried.
    """
    loop = asyncio.get_running_loop()
    wait_until = min(loop.time() + policy.unavailable_wait_s, deadline)
    last = "none"
    for attempt in range(1, policy.max_attempts + 1):
        response = call()
        try:
            first = await _first_item(response, wait_until, deadline)
        except _NoReplicaTookIt:
            raise ServiceUnavailable(
                f"No replica of model '{model_id}' took the request within "
                f"{policy.unavailable_wait_s:g} s (none ready or all busy; last error: {last})"
            ) from None
        except BackPressureError:
            raise ServiceUnavailable(f"Model '{model_id}' is overloaded: its request queue is "
                                     "full (replica.max_queued_requests)") from None
        except (asyncio.CancelledError, *_CLIENT_ERRORS, ServiceUnavailable):
            response.cancel()
            raise
        except Exception as error:  # noqa: BLE001 - a replica or engine failure: retry
            last = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        else:
            error = _first_error(first)
            if error is None or error[0] < 500:
                return first, response
            last = f"engine error {error[0]}: {error[1][:200]}"
        response.cancel()
        logger.warning("sere ingress: attempt %d/%d for model %s failed before any output (%s)",
                       attempt, policy.max_attempts, model_id, last)
        if attempt == policy.max_attempts or loop.time() >= wait_until:
            break
        await asyncio.sleep(min(0.5 * attempt, max(0.0, wait_until - loop.time())))
    raise ServiceUnavailable(f"Model '{model_id}' could not serve the request "
                             f"({attempt} attempt(s); last error: {last})")


def _error_event(code: int, message: str, type_: str) -> str:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\n"


async def guarded_stream(first: Any, response, deadline: float) -> AsyncGenerator[str, None]:
    """The SSE stream: `first`, then the rest; a failure or the deadline ends it with an error."""
    loop = asyncio.get_running_loop()
    done_sent = finished = False
    item = first
    try:
        while True:
            packet = _apply_openai_json_format(item)
            done_sent = done_sent or packet.strip().endswith("data: [DONE]")
            yield packet
            try:
                item = await asyncio.wait_for(response.__anext__(), max(0.0, deadline - loop.time()))
            except StopAsyncIteration:
                break
        finished = True
        if not done_sent:
            yield "data: [DONE]\n\n"
    except asyncio.TimeoutError:
        yield _error_event(408, "Request timed out mid-stream (ingress.request_timeout_s)",
                           "timeout_error")
    except asyncio.CancelledError:
        raise
    except Exception as error:  # noqa: BLE001 - the client must see an end, not a hang
        logger.warning("sere ingress: stream cut after its first chunk: %s: %s",
                       type(error).__name__, str(error)[:300])
        yield _error_event(503, "The engine serving this stream failed; the output is "
                           "incomplete. Retry the request.", "ServiceUnavailableError")
    finally:
        if not finished:  # the client left, the deadline passed or the replica failed
            response.cancel()
