"""Fast checks (no Ray cluster) of the ingress's guards and retry rules: API key sources, the
body-size limit, the exposure warning, the derived shutdown timeout, and `deploy.resilience`
driven by hand-made fake handle responses whose failures are scripted per attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from fastapi import Request

from deploy.args import API_KEY_ENV, API_KEY_FILE_ENV, parse_args

TINY = {"model_path": "models/tiny-moe"}


# ------------------------------------------------------------------------------ API key


def test_api_key_sources_in_order(tmp_path, monkeypatch):
    from deploy.http_guards import load_api_key

    key_file = tmp_path / "key"
    key_file.write_text(" from-file\n")
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert load_api_key("from-args", None) == "from-args"
    assert load_api_key(None, str(key_file)) == "from-file"
    monkeypatch.setenv(API_KEY_FILE_ENV, str(key_file))
    assert load_api_key(None, None) == "from-file"
    monkeypatch.delenv(API_KEY_FILE_ENV)
    assert load_api_key(None, None) == "from-env"
    monkeypatch.delenv(API_KEY_ENV)
    assert load_api_key(None, None) is None


def test_a_named_key_file_that_is_missing_or_empty_is_an_error(tmp_path):
    from deploy.http_guards import load_api_key

    with pytest.raises(ValueError, match="nope.txt"):
        load_api_key(None, str(tmp_path / "nope.txt"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_api_key(None, str(tmp_path / "empty"))


def test_key_in_args_and_key_file_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        parse_args({**TINY, "ingress": {"api_key": "k", "api_key_file": "/k"}})


@pytest.mark.parametrize("host, has_key, warns", [
    ("127.0.0.1", False, False), ("localhost", False, False), ("::1", False, False),
    ("0.0.0.0", False, True), ("10.1.2.3", False, True), ("0.0.0.0", True, False),
])
def test_binding_beyond_loopback_without_a_key_warns(host, has_key, warns, caplog):
    from deploy.http_guards import warn_if_exposed

    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert warn_if_exposed(host, has_key) is warns
    assert ("SERE SERVICE IS OPEN" in caplog.text) is warns


# --------------------------------------------------------------------------- body size


@pytest.fixture
def limited_app():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from deploy.http_guards import BodySizeLimitMiddleware

    app = FastAPI()
    app.add_middleware(BodySizeLimitMiddleware, get_limit=lambda: 1000)

    @app.post("/echo")
    async def echo(request: Request):
        return {"size": len(await request.body())}

    return TestClient(app)


def test_body_over_the_limit_gets_413_by_content_length(limited_app):
    response = limited_app.post("/echo", content=b"x" * 1001)
    assert response.status_code == 413
    assert "1000 bytes" in response.json()["error"]["message"]


def test_chunked_body_over_the_limit_gets_413(limited_app):
    def chunks():
        for _ in range(5):
            yield b"y" * 300

    response = limited_app.post("/echo", content=chunks())
    assert response.status_code == 413


def test_body_within_the_limit_arrives_whole(limited_app):
    assert limited_app.post("/echo", content=b"z" * 1000).json() == {"size": 1000}


# ------------------------------------------------------------------- shutdown timeout


def test_shutdown_timeout_covers_the_longest_request_unless_set():
    from deploy.app import build_llm_config

    derived = parse_args({**TINY, "ingress": {"request_timeout_s": 40}})
    assert derived.shutdown_timeout_s() == 55  # 40 s request + 15 s margin
    config = build_llm_config(derived).deployment_config
    assert config["graceful_shutdown_timeout_s"] == 55
    fixed = parse_args({**TINY, "replica": {"graceful_shutdown_timeout_s": 7}})
    assert fixed.shutdown_timeout_s() == 7


# ----------------------------------------------------------------- retries (fake handle)


class FakeResponse:
    """A handle response: `outcome` is an exception to raise, a list of items, or "never"
    (no replica ever takes it)."""

    def __init__(self, outcome):
        self.outcome = outcome
        self.cancelled = False
        self._items = list(outcome) if isinstance(outcome, list) else []

    async def _fetch_future_result_async(self):
        if self.outcome == "never":
            await asyncio.sleep(3600)
        return self

    async def __anext__(self):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        if not self._items:
            raise StopAsyncIteration
        item = self._items.pop(0)
        if isinstance(item, BaseException):
            raise item
        if item == "hang":
            await asyncio.sleep(3600)
        return item

    def cancel(self):
        self.cancelled = True


def _policy(**overrides):
    from deploy.resilience import RetryPolicy

    values = dict(request_timeout_s=5, unavailable_wait_s=2, max_attempts=3, retry_after_s=5)
    values.update(overrides)
    return RetryPolicy(**values)


def _run(outcomes, **policy):
    """(result or exception, number of calls, responses) of call_with_retries over `outcomes`."""
    from deploy.resilience import call_with_retries

    made = []

    def call():
        made.append(FakeResponse(outcomes[min(len(made), len(outcomes) - 1)]))
        return made[-1]

    async def main():
        deadline = asyncio.get_running_loop().time() + _policy(**policy).request_timeout_s
        try:
            return await call_with_retries(call, _policy(**policy), "m", deadline)
        except Exception as error:  # noqa: BLE001 - returned for the assertions
            return error

    return asyncio.run(main()), len(made), made


def _error_response(code):
    from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse

    return ErrorResponse(error=ErrorInfo(message=f"boom {code}", type="x", code=code))


def test_a_failure_before_output_is_retried_until_it_succeeds():
    result, calls, made = _run([RuntimeError("replica died"), RuntimeError("again"), ["ok"]])
    assert calls == 3 and result[0] == "ok"
    assert made[0].cancelled and made[1].cancelled and not made[2].cancelled


def test_failures_beyond_the_attempts_give_503_naming_the_last_error():
    from deploy.resilience import ServiceUnavailable

    result, calls, _ = _run([RuntimeError("engine gone")])
    assert isinstance(result, ServiceUnavailable) and result.status_code == 503
    assert calls == 3 and "engine gone" in result.message


def test_no_replica_taking_the_request_gives_503_after_the_wait():
    from deploy.resilience import ServiceUnavailable

    start = time.monotonic()
    result, calls, made = _run(["never"], unavailable_wait_s=0.3)
    assert isinstance(result, ServiceUnavailable) and result.status_code == 503
    assert 0.3 <= time.monotonic() - start < 2 and calls == 1 and made[0].cancelled


def test_a_full_queue_gives_503_at_once():
    from ray.serve.exceptions import BackPressureError

    from deploy.resilience import ServiceUnavailable

    result, calls, _ = _run([BackPressureError(num_queued_requests=9, max_queued_requests=8)])
    assert isinstance(result, ServiceUnavailable) and "overloaded" in result.message
    assert calls == 1


def test_client_errors_are_returned_not_retried():
    result, calls, _ = _run([[_error_response(400)]])
    assert calls == 1 and result[0].error.code == 400


@pytest.mark.parametrize("first", [
    lambda: _error_response(500),
    lambda: ['data: {"error": {"message": "EngineCore died", "code": 500}}\n\n'],
])
def test_engine_errors_before_output_are_retried(first):
    result, calls, _ = _run([[first()], [first()], ["fine"]])
    assert calls == 3 and result[0] == "fine"


def test_an_engine_slower_than_the_request_timeout_gives_408():
    from deploy.resilience import ServiceUnavailable

    result, _, made = _run([["hang"]], request_timeout_s=0.3)
    assert isinstance(result, ServiceUnavailable) and result.status_code == 408
    assert made[0].cancelled


def _collect(first, rest, timeout_s=5.0):
    from deploy.resilience import guarded_stream

    async def main():
        deadline = asyncio.get_running_loop().time() + timeout_s
        return [packet async for packet in guarded_stream(first, FakeResponse(rest), deadline)]

    return asyncio.run(main())


def test_a_whole_stream_ends_with_done():
    packets = _collect(["data: a\n\n"], [["data: b\n\n"]])
    assert packets == ["data: a\n\n", "data: b\n\n", "data: [DONE]\n\n"]


@pytest.mark.parametrize("failure, code", [(RuntimeError("actor died"), 503), ("hang", 408)])
def test_a_stream_cut_after_its_first_chunk_ends_with_an_error_event(failure, code):
    packets = _collect(["data: a\n\n"], [["data: b\n\n"], failure], timeout_s=0.5)
    assert packets[:2] == ["data: a\n\n", "data: b\n\n"] and len(packets) == 3
    event = json.loads(packets[2][len("data: "):])
    assert event["error"]["code"] == code and event["error"]["message"]


def test_both_deployments_surge_and_drain_the_longest_request():
    """A changed config restarts the ingress too: it must surge and drain like the engine."""
    from deploy.app import build_ingress_deployment, build_llm_config

    args = {**TINY, "ingress": {"request_timeout_s": 30, "resources": {"head": 0.01}},
            "replica": {"max_surge_percent": 100}}
    ingress = build_ingress_deployment(args)
    config = ingress._deployment_config
    assert (config.max_surge_percent, config.graceful_shutdown_timeout_s) == (100, 45)
    assert ingress.ray_actor_options["resources"] == {"head": 0.01}
    engine = build_llm_config(args).deployment_config
    assert (engine["max_surge_percent"], engine["graceful_shutdown_timeout_s"]) == (100, 45)
