"""The service end to end: a real local Ray cluster, the Serve app of deploy/app.py with a real
vLLM engine (the bundled tiny MoE, SERE on), real HTTP through the official `openai` client.

One module-scoped cluster + app (engine start ~1 min on 2 cores); the whole file runs in ~3 min.
Set SERE_TEST_MODEL to serve another checkpoint directory (with its similarity sidecar).
"""

from __future__ import annotations

import glob
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.environ.get("SERE_TEST_MODEL", os.path.join(REPO, "models", "tiny-moe"))
MODEL_ID = "tiny-moe"
API_KEY = "test-key-123"
MAX_MODEL_LEN = 512
READY_TIMEOUT_S = 300
GPU_PRESETS = sorted(glob.glob(os.path.join(REPO, "deploy", "configs", "*.yaml")))

pytestmark = pytest.mark.slow

for _name, _value in {
    "RAY_AUTH_MODE": "disabled",  # token auth breaks later CLI/API calls
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Serve kills a proxy not ready within 5 s (Ray 2.60's default); starting a process on a loaded
    # 2-core machine can take longer, and `serve.start` then fails with ActorDiedError.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
}.items():
    os.environ.setdefault(_name, _value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(**overrides) -> dict:
    args = {
        "model_path": MODEL,
        "served_model_name": MODEL_ID,
        "sere": {"policy": "sere", "num_primary": 2},
        "engine": {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 16, "kv_cache_gib": 0.25},
        "placement": {"bundles": [{"CPU": 0.5}]},
        # max_surge_percent 100: a rollout starts the new engine before the old one stops.
        "replica": {"num_cpus": 0.25, "max_surge_percent": 100,
                    "env_vars": {"SERE_RAY_METRICS_INTERVAL_S": "1"}},
        "ingress": {"num_cpus": 0.1, "api_key": API_KEY},
    }
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def service():
    """(base_url, metrics_url) of the running app; the cluster is stopped afterwards."""
    import ray
    from ray import serve

    from deploy.app import build_app

    http_port, metrics_port = _free_port(), _free_port()
    # address="local": always a cluster of its own, even when scripts/serve.sh has one running.
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             _metrics_export_port=metrics_port, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port, "request_timeout_s": 120})
        start = time.monotonic()
        serve.run(build_app(app_args()), name="sere", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{http_port}"
        _wait_healthy(base, start + READY_TIMEOUT_S)
        yield base, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_healthy(base: str, deadline: float) -> None:
    import httpx

    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(base + "/health", timeout=15)
            if last.status_code == 200:
                return
        except httpx.HTTPError as error:
            last = error
        time.sleep(2)
    raise TimeoutError(f"{base}/health not ready in time (last: {last!r})")


@pytest.fixture(scope="module")
def client(service):
    import openai

    return openai.OpenAI(base_url=service[0] + "/v1", api_key=API_KEY, timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def http(service):
    import httpx

    with httpx.Client(base_url=service[0], timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def _still_serving(client) -> None:
    reply = client.completions.create(model=MODEL_ID, prompt="def main():", max_tokens=2)
    assert reply.choices[0].text is not None


# ------------------------------------------------------------------------------- endpoints


def test_model_list(client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_completion(client):
    reply = client.completions.create(model=MODEL_ID, prompt="import os\n", max_tokens=8,
                                      temperature=0)
    assert isinstance(reply.choices[0].text, str)
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_chat(client):
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "def fibonacci(n):"}],
        max_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.prompt_tokens > 0


def test_chat_streaming(client):
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "class Stack:"}],
        max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert len(chunks) >= 2
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(text, str)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop") or any(
        c.choices and c.choices[0].finish_reason for c in chunks)


def test_completion_streaming_is_server_sent_events(http):
    body = {"model": MODEL_ID, "prompt": "for i in range(", "max_tokens": 6, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 3


def test_concurrent_requests_are_batched_and_all_answered(client):
    def one(i):
        return client.completions.create(model=MODEL_ID, prompt=f"x = {i}\n", max_tokens=12)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(8)))
    assert all(r.usage.completion_tokens >= 1 for r in replies)


def test_health_needs_no_key(service):
    import httpx

    response = httpx.get(service[0] + "/health", timeout=30)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "models": [MODEL_ID]}


# ----------------------------------------------------------------------- SERE in the engine


def test_sere_reroutes_inside_the_served_engine(client, service):
    from ray import serve

    handle = serve.get_deployment_handle(f"SereLLMServer:{MODEL_ID}", app_name="sere")
    handle.collective_rpc.remote("sere_reset_stats").result(timeout_s=30)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.completions.create(
            model=MODEL_ID, prompt=f"def f{i}(x):", max_tokens=16, temperature=0), range(8)))
    (snapshot,) = handle.collective_rpc.remote("sere_stats").result(timeout_s=30)
    layers = snapshot["layers"]
    assert layers and all(layer["policy"] == "sere" for layer in layers)
    steps = sum(layer["steps"] for layer in layers)
    before = sum(layer["distinct_experts_before"] for layer in layers)
    after = sum(layer["distinct_experts_after"] for layer in layers)
    assert steps > 0
    assert after < before  # fewer distinct experts read per decode step
    assert sum(layer["rerouted_slots"] for layer in layers) > 0


def _metric_total(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_prometheus_metrics_include_sere_and_vllm(client, service):
    import httpx

    client.completions.create(model=MODEL_ID, prompt="while True:", max_tokens=8)
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = httpx.get(service[1], timeout=10).text
        if _metric_total(text, "ray_sere_steps_total", model_id=MODEL_ID) > 0:
            break
        time.sleep(3)
    assert _metric_total(text, "ray_sere_steps_total", model_id=MODEL_ID, policy="sere") > 0
    assert _metric_total(text, "ray_sere_distinct_experts_after_total", model_id=MODEL_ID) > 0
    assert re.search(r'^ray_sere_distinct_experts\{.*stage="after"', text, re.M)
    assert re.search(r"^ray_vllm_", text, re.M)  # the engine's own series


# ------------------------------------------------------------------------------ bad input

BAD_REQUESTS = {
    "malformed_json": ("/v1/chat/completions", b'{"model": "tiny-moe", "messages": [', 400),
    "unknown_model": ("/v1/chat/completions",
                      {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
    "negative_max_tokens": ("/v1/completions", {"model": MODEL_ID, "prompt": "a", "max_tokens": -5}, 400),
    "huge_max_tokens": ("/v1/completions", {"model": MODEL_ID, "prompt": "a", "max_tokens": 10**9}, 400),
    "prompt_longer_than_context": ("/v1/completions",
                                   {"model": MODEL_ID, "prompt": "hello world " * 3 * MAX_MODEL_LEN,
                                    "max_tokens": 4}, 400),
    "messages_not_a_list": ("/v1/chat/completions", {"model": MODEL_ID, "messages": "hi"}, 400),
    "temperature_not_a_number": ("/v1/completions",
                                 {"model": MODEL_ID, "prompt": "a", "temperature": "hot"}, 400),
    "missing_messages": ("/v1/chat/completions", {"model": MODEL_ID}, 400),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_4xx_with_a_message_and_service_keeps_serving(http, client, case):
    path, body, status = BAD_REQUESTS[case]
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    _still_serving(client)


def test_openai_client_raises_typed_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError, match="nope"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=-1)


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_api_key_required(service, key):
    import httpx
    import openai

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(service[0] + "/v1/models", headers=headers, timeout=30)
    assert response.status_code == 401
    assert "API key" in response.json()["error"]["message"]
    if key:  # the openai client refuses to send no key at all
        bad = openai.OpenAI(base_url=service[0] + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL_ID, prompt="x", max_tokens=1)


# ---------------------------------------------------------------------------- GPU presets


@pytest.mark.parametrize("path", GPU_PRESETS, ids=os.path.basename)
def test_gpu_preset_builds_a_dp_ep_app(service, path):
    """Builds (does not deploy) each GPU preset's app graph on the running Ray runtime."""
    import yaml

    from deploy.app import build_app

    with open(path) as f:
        (spec,) = yaml.safe_load(f)["applications"]
    app = build_app(spec["args"])
    ingress = app._bound_deployment
    assert ingress.name == "SereIngress"
    (server,) = ingress.init_kwargs["llm_deployments"].values()
    deployment = server._bound_deployment
    assert deployment.name.startswith("SereDPServer:")
    config = deployment._deployment_config
    assert config.gang_scheduling_config.gang_size == 16
    assert config.autoscaling_config.min_replicas == 16  # one DP group of 16 ranks
    bundles = deployment._replica_config.placement_group_bundles
    assert bundles[0]["GPU"] == 1


# ------------------------------------------------- rollout and faults (last: they restart engines)


class _Load:
    """Background clients sending completions back to back; records (start, end, outcome)."""

    def __init__(self, base_url: str, workers: int = 3):
        import threading

        import openai

        self.client = openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, timeout=150,
                                    max_retries=0)
        self.events: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(workers)]

    def _run(self, i: int) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                self.client.completions.create(model=MODEL_ID, prompt=f"def g{i}():", max_tokens=8)
                outcome = "ok"
            except Exception as error:  # noqa: BLE001 - recorded and asserted on
                outcome = f"{type(error).__name__}:{getattr(error, 'status_code', '')}"
                time.sleep(0.5)
            self.events.append((start, time.monotonic(), outcome))

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=200)
        assert not any(thread.is_alive() for thread in self._threads), "a request hung"


def _rollout_under_load(service, num_primary: int) -> list[str]:
    from ray import serve

    from deploy.app import build_app

    new_args = app_args(sere={"policy": "sere", "num_primary": num_primary})
    with _Load(service[0]) as load:
        time.sleep(3)
        serve.run(build_app(new_args), name="sere", route_prefix="/", blocking=False)
        time.sleep(3)
    handle = serve.get_deployment_handle(f"SereLLMServer:{MODEL_ID}", app_name="sere")
    engine_kwargs = handle.llm_config.remote().result(timeout_s=30).engine_kwargs
    assert engine_kwargs["hf_overrides"]["sere"]["num_primary"] == num_primary
    return [outcome for _, _, outcome in load.events]


def test_rollout_of_a_changed_sere_config_under_load(service):
    """`serve deploy` of new args (here num_primary 2 -> 3) under load: the old engine serves until
    the new one is ready (max_surge_percent 100), and the config changes.

    KNOWN BUG (open): requests still in flight on the old replicas when they stop are cut off
    with a 500 after ~20 s, the replicas' graceful_shutdown_timeout_s: 1-2 of ~140 requests in
    4 of 8 rollouts seen on the 2-core machine. Asserted here: no hang, only 500s, and at most
    5% of the requests lost; the goal stays 0."""
    outcomes = _rollout_under_load(service, 3)
    failures = [o for o in outcomes if o != "ok"]
    print(f"rollout: {outcomes.count('ok')} ok, failures {failures}")
    assert outcomes.count("ok") > 10
    assert all(o.endswith("500") for o in failures), failures
    assert len(failures) <= 0.05 * len(outcomes), failures


def _engine_workers() -> list:
    """The vLLM worker processes under THIS test cluster's raylet (never anyone else's)."""
    import psutil
    import ray._private.worker as ray_worker

    raylet = ray_worker._global_node.all_processes["raylet"][0].process.pid
    return [p for p in psutil.Process(raylet).children(recursive=True)
            if "VLLM::Worker" in " ".join(p.cmdline())]


def test_killed_engine_fails_requests_fast_and_the_replica_comes_back(service):
    """SIGKILL the engine's worker under load: requests fail with 5xx within the request timeout
    (none hangs), Serve's health check replaces the replica, and requests succeed again."""
    import httpx

    (worker,) = _engine_workers()
    with _Load(service[0]) as load:
        time.sleep(3)
        killed_at = time.monotonic()
        worker.kill()
        deadline = killed_at + READY_TIMEOUT_S
        recovered = None
        while time.monotonic() < deadline and recovered is None:
            time.sleep(2)
            late_ok = [end for start, end, o in load.events if o == "ok" and start > killed_at + 1]
            failed = [o for start, _, o in load.events if o != "ok" and start >= killed_at]
            if failed and late_ok:
                recovered = min(late_ok) - killed_at
    assert recovered is not None, "no request succeeded after the engine was killed"
    after = [(start, end, o) for start, end, o in load.events if start >= killed_at]
    failures = {o for _, _, o in after if o != "ok"}
    assert failures and all(o.endswith(("500", "502", "503", "504")) for o in failures), failures
    assert max(end - start for start, end, _ in load.events) < 150  # bounded, not hung
    assert httpx.get(service[0] + "/health", timeout=30).status_code == 200
    assert len(_engine_workers()) == 1  # a fresh engine
