"""Fast checks of the Serve app's typed args, configs and API-key middleware (no Ray cluster).

The configs are parsed exactly as `serve deploy` would: the YAML's `applications[].args` through
`deploy.args.AppArgs`, then into Ray Serve LLM's `LLMConfig` and vLLM's engine-argument schema.
Building the deployment graph needs a Ray runtime: that part is in tests/test_serve.py.
"""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from deploy.args import AppArgs, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE_CONFIG = os.path.join(REPO, "serve_config.yaml")
GPU_PRESETS = sorted(glob.glob(os.path.join(REPO, "deploy", "configs", "*.yaml")))
TINY = {"model_path": "models/tiny-moe"}


def _apps(path: str) -> list[dict]:
    with open(path) as f:
        config = yaml.safe_load(f)
    return config["applications"]


def test_serve_config_is_the_tiny_model_on_cpu_with_sere():
    (app,) = _apps(SERVE_CONFIG)
    assert app["import_path"] == "deploy.app:build_app"
    args = parse_args(app["args"])
    assert args.engine.device == "cpu"
    assert args.sere is not None and (args.sere.policy, args.sere.schedule) == ("tuned", None)
    assert args.model_path == "models/tiny-moe"
    assert os.path.isfile(os.path.join(REPO, args.model_path, "sere_schedule.json"))
    # Fits a 2-core machine: engine bundle + replica actor + ingress below 2 CPUs.
    cpus = sum(b.get("CPU", 0) for b in args.placement.bundles)
    assert cpus + args.replica.num_cpus + args.ingress.num_cpus <= 1.0


@pytest.mark.parametrize("path", GPU_PRESETS, ids=os.path.basename)
def test_gpu_preset_is_dp_attention_plus_ep_over_16_gpus(path):
    (app,) = _apps(path)
    assert app["import_path"] == "deploy.app:build_app"
    args = parse_args(app["args"])
    engine = args.engine
    assert engine.device == "gpu"
    assert engine.data_parallel_size * engine.tensor_parallel_size == 16  # 2 nodes x 8 GPUs
    assert engine.enable_expert_parallel and engine.all2all_backend == "deepep_low_latency"
    assert args.sere is not None and args.sere.scope == "ep_group"
    assert all(b.get("GPU") == 1 for b in args.placement.bundles)


@pytest.mark.parametrize("path", [SERVE_CONFIG, *GPU_PRESETS], ids=os.path.basename)
def test_config_maps_onto_ray_llm_and_vllm_engine_args(path):
    from deploy.app import build_llm_config

    (app,) = _apps(path)
    llm_config = build_llm_config(app["args"])
    # Raises on any engine kwarg that vLLM's AsyncEngineArgs does not know.
    engine_config = llm_config.get_engine_config()
    kwargs = engine_config.get_initialization_kwargs()
    assert kwargs["hf_overrides"]["sere"]["policy"] == app["args"]["sere"]["policy"]
    assert kwargs["served_model_name"] == [app["args"]["served_model_name"]]
    gpu = app["args"]["engine"]["device"] == "gpu"
    assert kwargs["distributed_executor_backend"] == ("ray" if gpu else "mp")
    if gpu:
        assert kwargs["data_parallel_size"] == 16
        assert kwargs["all2all_backend"] == "deepep_low_latency"
    else:
        assert kwargs["kv_cache_memory_bytes"] == int(0.5 * (1 << 30))


def test_sere_off_sends_no_override():
    from deploy.app import build_llm_config

    llm_config = build_llm_config(TINY)
    assert "hf_overrides" not in llm_config.engine_kwargs


@pytest.mark.parametrize(
    "args, field, value",
    [
        ({"engine": {"max_model_len": -1}}, "engine.max_model_len", "-1"),
        ({"engine": {"max_model_lenn": 512}}, "engine.max_model_lenn", "512"),
        ({"sere": {"num_primary": 0}}, "sere.num_primary", "0"),
        ({"sere": {"policy": "fastest"}}, "sere.policy", "'fastest'"),
        ({"sere": {"threshold": 1.5}}, "sere.threshold", "1.5"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling", "min_replicas=3"),
        ({"placement": {"bundles": [{"CPU": -1}]}}, "placement.bundles", "-1"),
        ({"engine": {"tensor_parallel_size": 2}}, "args", "tensor_parallel_size=2"),
        ({"engine": {"device": "gpu"}}, "args", "'gpu'"),
        ({"engine": {"all2all_backend": "deepep_low_latency", "enable_expert_parallel": True}},
         "engine", "'deepep_low_latency'"),
        ({"engine": {"extra": {"model": "x"}}}, "engine.extra", "'model'"),
        ({"model_path": "s3://bucket/model"}, "model_path", "'s3://bucket/model'"),
        ({"served_model_name": "has space"}, "served_model_name", "'has space'"),
    ],
)
def test_bad_args_name_the_field_and_the_value(args, field, value):
    with pytest.raises(ValueError) as info:
        parse_args({**TINY, **args})
    message = str(info.value)
    assert field in message and value in message, message


def test_api_key_is_never_echoed_in_errors():
    with pytest.raises(ValueError) as info:
        parse_args({**TINY, "ingress": {"api_key": "   "}})
    assert "ingress.api_key=***" in str(info.value)


def test_parse_args_accepts_a_model_instance():
    args = AppArgs(model_path="models/tiny-moe")
    assert parse_args(args) is args


def test_relative_model_path_resolves_against_the_base_dir_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny-moe").mkdir(parents=True)
    monkeypatch.chdir("/")
    local = parse_args({**TINY, "base_dir": str(tmp_path)})
    assert local.resolved_model_path() == str(tmp_path / "models" / "tiny-moe")
    assert AppArgs.model_fields["base_dir"].default is None  # None = the repository root
    assert parse_args({"model_path": "Qwen/Qwen3-30B-A3B"}).resolved_model_path() == (
        "Qwen/Qwen3-30B-A3B"
    )
    custom = parse_args({"model_path": "./m", "base_dir": str(tmp_path)})
    assert custom.resolved_model_path() == str(tmp_path / "m")


# ------------------------------------------------------------------------ API-key middleware


@pytest.fixture
def keyed_app():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from deploy.http_guards import ApiKeyMiddleware

    app = FastAPI()
    app.add_middleware(ApiKeyMiddleware, get_key=lambda: "s3cret", open_paths=frozenset({"/health"}))

    @app.get("/v1/models")
    def models():
        return {"data": []}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    return TestClient(app)


@pytest.mark.parametrize("header", [None, "Bearer wrong", "s3cret", "Basic s3cret", "Bearer ",
                                    "Bearer s3cr\u00e9t".encode(), "Bearer s3cret2"])
def test_api_key_rejects_missing_or_wrong_key_with_401(keyed_app, header):
    headers = {"Authorization": header} if header is not None else {}
    response = keyed_app.get("/v1/models", headers=headers)
    assert response.status_code == 401
    assert "API key" in response.json()["error"]["message"]


def test_api_key_accepts_the_key_and_leaves_health_open(keyed_app):
    assert keyed_app.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert keyed_app.get("/v1/models", headers={"authorization": "bearer s3cret"}).status_code == 200
    assert keyed_app.get("/health").status_code == 200


@pytest.mark.parametrize("path, root_path, opened", [
    ("/off/health", "/off", True),        # Ray Serve: full path, the app's route prefix as root_path
    ("/health", "", True),
    ("/off/v1/models", "/off", False),
    ("/offhealth", "/off", False),        # not under the prefix: the whole path is checked
    ("/other/health", "/off", False),
])
def test_api_key_open_paths_are_inside_the_apps_route_prefix(path, root_path, opened):
    import asyncio

    from deploy.http_guards import ApiKeyMiddleware

    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    guard = ApiKeyMiddleware(app, get_key=lambda: "s3cret", open_paths=frozenset({"/health"}))
    scope = {"type": "http", "method": "GET", "path": path, "root_path": root_path, "headers": []}
    asyncio.run(guard(scope, receive, send))
    assert bool(reached) == opened
    if not opened:
        assert sent[0]["status"] == 401


# ------------------------------------------------------------------------- cluster configs


def test_gpu_cluster_launcher_config_matches_rays_schema():
    import json

    import jsonschema
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        schema = json.load(f)
    with open(os.path.join(REPO, "cluster", "gpu-cluster.yaml")) as f:
        config = yaml.safe_load(f)
    jsonschema.validate(config, schema)
    gpu_nodes = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert sum(t["min_workers"] * t["resources"]["GPU"] for t in gpu_nodes) == 16


def test_rayservice_embeds_the_qwen3_preset_verbatim():
    with open(os.path.join(REPO, "cluster", "rayservice.yaml")) as f:
        service = yaml.safe_load(f)
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    with open(os.path.join(REPO, "deploy", "configs", "qwen3-30b-a3b-dp16-ep.yaml")) as f:
        assert embedded == yaml.safe_load(f)
    (workers,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert workers["replicas"] * gpus == 16
    parse_args(embedded["applications"][0]["args"])


@pytest.mark.parametrize("script", ["cluster/start_local_cluster.sh", "scripts/serve.sh"])
def test_shell_scripts_parse(script):
    import subprocess

    subprocess.run(["bash", "-n", os.path.join(REPO, script)], check=True)


def test_ingress_key_comes_from_args_else_the_environment(monkeypatch):
    from deploy.args import API_KEY_ENV
    from deploy.ingress import SereIngress

    monkeypatch.setenv(API_KEY_ENV, " from-env ")
    assert SereIngress({}, {}).api_key == "from-env"
    assert SereIngress({}, {}, api_key="from-args").api_key == "from-args"
    monkeypatch.delenv(API_KEY_ENV)
    assert SereIngress({}, {}).api_key is None
