"""The service end to end: a real local Ray cluster, the Serve app of deploy/app.py with a real
vLLM engine (the bundled tiny MoE, SERE on), real HTTP through the official `openai` client.

The app is deployed as `serve deploy` does it (a config applied to the controller, which builds
`deploy.app:build_app` from the args). One module-scoped cluster + app (engine start ~1 min on
2 cores); the last tests roll out new configs and kill the engine under load (~5 min).
Set SERE_TEST_MODEL to serve another checkpoint directory (with its similarity sidecar).
"""

from __future__ import annotations

import glob
import os
import re
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.environ.get("SERE_TEST_MODEL", os.path.join(REPO, "models", "tiny-moe"))
MODEL_ID = "tiny-moe"
API_KEY = "test-key-123"
# The ingress reads the key from this file (a key in the args would show in `serve config`).
KEY_FILE = os.path.join(tempfile.gettempdir(), f"sere-test-api-key-{os.getpid()}")
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
        # eager: these tests are about serving, and an eager engine starts in seconds, not a minute
        # (compiled mode is tested in tests/test_vllm_compiled.py and is what serve_config.yaml runs)
        "engine": {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 16, "kv_cache_gib": 0.25, "enforce_eager": True},
        "placement": {"bundles": [{"CPU": 0.5}]},
        # max_surge_percent 100: a rollout starts the new engine before the old one stops.
        "replica": {"num_cpus": 0.25, "max_surge_percent": 100,
                    "env_vars": {"SERE_RAY_METRICS_INTERVAL_S": "1"}},
        "ingress": {"num_cpus": 0.1, "api_key_file": KEY_FILE},
    }
    args.update(overrides)
    return args


def _deploy(args: dict) -> None:
    """`serve deploy` of the app with `args`: the config goes to the controller exactly as the
    dashboard's REST handler sends it (no dashboard needed), and Serve builds the app itself."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.parse_obj({"applications": [{
        "name": "sere", "route_prefix": "/", "import_path": "deploy.app:build_app", "args": args,
    }]})
    _get_global_client().deploy_apps(config)


@pytest.fixture(scope="module")
def service():
    """(base_url, metrics_url) of the running app; the cluster is stopped afterwards."""
    import ray
    from ray import serve

    with open(KEY_FILE, "w") as f:
        f.write(API_KEY + "\n")
    http_port, metrics_port = _free_port(), _free_port()
    # address="local": always a cluster of its own, even when scripts/serve.sh has one running.
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             _metrics_export_port=metrics_port, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port, "request_timeout_s": 120})
        start = time.monotonic()
        _deploy(app_args())
        base = f"http://127.0.0.1:{http_port}"
        _wait_healthy(base, start + READY_TIMEOUT_S)
        yield base, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        serve.shutdown()
        ray.shutdown()
        os.unlink(KEY_FILE)


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

_EIGHT_MB = b'{"model": "tiny-moe", "prompt": "' + b"x" * (8 << 20) + b'"}'
# case -> (method, path, body, status): every malformed class answers 4xx with a message.
BAD_REQUESTS = {
    "malformed_json": ("POST", "/v1/chat/completions", b'{"model": "tiny-moe", "messages": [', 400),
    "unknown_model": ("POST", "/v1/chat/completions",
                      {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
    "negative_max_tokens": ("POST", "/v1/completions",
                            {"model": MODEL_ID, "prompt": "a", "max_tokens": -5}, 400),
    "huge_max_tokens": ("POST", "/v1/completions",
                        {"model": MODEL_ID, "prompt": "a", "max_tokens": 10**9}, 400),
    "max_tokens_not_a_number": ("POST", "/v1/completions",
                                {"model": MODEL_ID, "prompt": "a", "max_tokens": "ten"}, 400),
    "prompt_longer_than_context": ("POST", "/v1/completions",
                                   {"model": MODEL_ID, "prompt": "hello world " * 3 * MAX_MODEL_LEN,
                                    "max_tokens": 4}, 400),
    "prompt_not_a_string": ("POST", "/v1/completions", {"model": MODEL_ID, "prompt": {"a": 1}}, 400),
    "messages_not_a_list": ("POST", "/v1/chat/completions", {"model": MODEL_ID, "messages": "hi"}, 400),
    "temperature_not_a_number": ("POST", "/v1/completions",
                                 {"model": MODEL_ID, "prompt": "a", "temperature": "hot"}, 400),
    "missing_messages": ("POST", "/v1/chat/completions", {"model": MODEL_ID}, 400),
    "huge_n": ("POST", "/v1/completions",
               {"model": MODEL_ID, "prompt": "a", "n": 10**6, "max_tokens": 1}, 400),
    "huge_logprobs": ("POST", "/v1/completions",
                      {"model": MODEL_ID, "prompt": "a", "logprobs": 10**6, "max_tokens": 1}, 400),
    "body_8_mb": ("POST", "/v1/completions", _EIGHT_MB, 413),
    "unknown_path": ("POST", "/v1/nothing-here", {"model": MODEL_ID}, 404),
    "wrong_method": ("GET", "/v1/completions", None, 405),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_4xx_with_a_message_and_service_keeps_serving(http, client, case):
    method, path, body, status = BAD_REQUESTS[case]
    if isinstance(body, bytes):
        response = http.request(method, path, content=body,
                                headers={"Content-Type": "application/json"})
    else:
        response = http.request(method, path, json=body)
    message = response.json()["error"]["message"]
    print(f"| {case} | {response.status_code} | {message[:110]} |")
    assert response.status_code == status, response.text[:500]
    assert message
    if case == "prompt_longer_than_context":
        assert str(MAX_MODEL_LEN) in message  # names the limit
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

LOAD_MAX_REQUESTS = 20_000  # per test: the loops are bounded in count as well as in time
LOAD_MAX_S = 600


class _Load:
    """Background clients on loopback sending requests back to back (`streams` of them streaming);
    records (start, end, status, Retry-After, error event) per request. A refused request waits
    0.5 s before the next one."""

    def __init__(self, base_url: str, workers: int = 3, streams: int = 0):
        import threading

        self.base_url = base_url
        self.events: list[tuple[float, float, object, str | None, str | None]] = []
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._threads = [threading.Thread(target=self._run, args=(i, i < streams), daemon=True)
                         for i in range(workers)]

    def _run(self, i: int, stream: bool) -> None:
        import httpx

        body = {"model": MODEL_ID, "prompt": f"def g{i}():", "max_tokens": 8, "stream": stream}
        with httpx.Client(base_url=self.base_url, timeout=150,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            while (not self._stop.is_set() and len(self.events) < LOAD_MAX_REQUESTS
                   and time.monotonic() - self._started < LOAD_MAX_S):
                start, error_event = time.monotonic(), None
                try:
                    with http.stream("POST", "/v1/completions", json=body) as response:
                        lines = [line for line in response.iter_lines() if line]
                        status, retry_after = response.status_code, response.headers.get("retry-after")
                    if stream and status == 200 and lines[-1] != "data: [DONE]":
                        error_event = lines[-1]
                except httpx.HTTPError as error:
                    status, retry_after = type(error).__name__, None
                self.events.append((start, time.monotonic(), status, retry_after, error_event))
                if status != 200:
                    time.sleep(0.5)

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=200)
        assert not any(thread.is_alive() for thread in self._threads), "a request hung"


def _served_num_primary() -> int:
    from ray import serve

    handle = serve.get_deployment_handle(f"SereLLMServer:{MODEL_ID}", app_name="sere")
    engine_kwargs = handle.llm_config.remote().result(timeout_s=30).engine_kwargs
    return engine_kwargs["hf_overrides"]["sere"]["num_primary"]


def _wait_rolled_out(num_primary: int, deadline: float) -> None:
    """Until one RUNNING engine replica is left and it serves `num_primary`."""
    from ray import serve

    while time.monotonic() < deadline:
        status = serve.status().applications["sere"]
        engine = status.deployments.get(f"SereLLMServer:{MODEL_ID}")  # absent while building
        if status.status == "RUNNING" and engine and engine.replica_states == {"RUNNING": 1}:
            if _served_num_primary() == num_primary:
                return
        time.sleep(2)
    raise TimeoutError(f"rollout to num_primary={num_primary} not done in time")


ROLLOUTS = (3, 1, 2)  # num_primary of each new config; the last one is the fixture's


def test_rollouts_of_changed_sere_configs_under_load_lose_no_request(service):
    """Three `serve deploy` rollouts of changed SERE args under continuous load: zero requests
    lost. Each rollout restarts both deployments (a changed config is a new code version):
    max_surge_percent 100 keeps the old engine and ingress serving until their replacements
    are up, and the graceful-shutdown timeout derived from the request timeout lets the old
    ones finish every request they hold (Ray's default 20 s cut a request queued behind the
    engine restart: a 500)."""
    with _Load(service[0]) as load:
        for num_primary in ROLLOUTS:
            time.sleep(2)
            _deploy(app_args(sere={"policy": "sere", "num_primary": num_primary}))
            _wait_rolled_out(num_primary, time.monotonic() + READY_TIMEOUT_S)
        time.sleep(3)
    statuses = [status for _, _, status, _, _ in load.events]
    print(f"rollouts: {len(ROLLOUTS)}, requests: {len(statuses)}, ok: {statuses.count(200)}, "
          f"slowest: {max(end - start for start, end, *_ in load.events):.1f} s")
    assert statuses.count(200) > 30 * len(ROLLOUTS)
    assert [s for s in statuses if s != 200] == []


def _engine_workers() -> list:
    """The vLLM worker processes under THIS test cluster's raylet (never anyone else's)."""
    import psutil
    import ray._private.worker as ray_worker

    raylet = ray_worker._global_node.all_processes["raylet"][0].process.pid
    return [p for p in psutil.Process(raylet).children(recursive=True)
            if "VLLM::Worker" in " ".join(p.cmdline())]


def test_killed_sole_engine_gives_503_with_retry_after_until_it_is_back(service):
    """SIGKILL the only engine's worker under load (plain and streaming requests): until Serve
    has replaced the replica every refused request is a 503 with Retry-After (no 500, no hang),
    a stream cut mid-way ends with an error event, and then requests succeed again."""
    import httpx

    (worker,) = _engine_workers()
    with _Load(service[0], workers=3, streams=1) as load:
        time.sleep(3)
        killed_at = time.monotonic()
        worker.kill()
        recovered = None
        while time.monotonic() < killed_at + READY_TIMEOUT_S and recovered is None:
            time.sleep(2)
            refused = [e for e in load.events if e[2] != 200 and e[0] >= killed_at]
            late_ok = [e[1] for e in load.events if e[2] == 200 and e[0] > killed_at + 1
                       and e[4] is None and refused and e[0] > max(r[0] for r in refused)]
            recovered = min(late_ok) - killed_at if late_ok else None
    assert recovered is not None, "no request succeeded after the engine was killed"
    after = [e for e in load.events if e[1] >= killed_at]
    refused = [(status, retry_after) for _, _, status, retry_after, _ in after if status != 200]
    cut_streams = [event for *_, event in after if event is not None]
    print(f"engine killed: recovered after {recovered:.0f} s; {len(after)} requests, "
          f"{len(refused)} refused, {len(cut_streams)} streams ended by an error event")
    assert refused and all(status == 503 and retry_after for status, retry_after in refused), refused
    assert all('"error"' in event for event in cut_streams), cut_streams
    assert max(end - start for start, end, *_ in load.events) < 130  # bounded, not hung
    assert httpx.get(service[0] + "/health", timeout=30).status_code == 200
    assert len(_engine_workers()) == 1  # a fresh engine
