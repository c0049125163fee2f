"""The SERE vLLM plugin (sere/vllm/plugin.py): config, routing hook, metrics, and real engines.

Fast tests drive the hook with vLLM's own router classes (no engine). Engine tests: a bad config
fails at engine start naming the field, a sidecar missing a layer fails the model load, and the
README's OpenAI server command (default compiled mode) completes and its /metrics carries the
workers' `sere_*` series. The policies in real compiled and eager engines are tested in
tests/test_vllm_compiled.py. Set SERE_TEST_MODEL to use another checkpoint directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import vllm

from sere.vllm import metrics  # noqa: E402
from sere.vllm import plugin  # noqa: E402
from sere.config import SereConfig  # noqa: E402
from sere.reference import oea_reference, reroute_reference, sere_err_reference, xshare_reference  # noqa: E402
from sere.sidecars import SIDECAR_NAME, load_sidecar, save_sidecar  # noqa: E402

from vllm_common import MODEL_DIR, PROMPTS, REPO, model_dir  # noqa: E402, F401 (a fixture)

MAX_TOKENS = 12
ENGINE_KW = dict(  # vLLM's default mode: compiled (the engines of this file fail before compiling)
    gpu_memory_utilization=0.3,
    max_model_len=512,
    max_num_seqs=8,
    seed=0,
    # NOTE: tests switch policies inside one engine; a prefix cache would reuse KV computed
    # under the previous policy.
    enable_prefix_caching=False,
)
E, K = 64, 8


# ---------------------------------------------------------------- fast: version and config


def test_version_check_accepts_the_supported_version():
    plugin.check_vllm_version("0.32.0")
    plugin.check_vllm_version("0.32.0+cpu")
    assert vllm.__version__.split("+")[0] == plugin.SUPPORTED_VLLM_VERSION


@pytest.mark.parametrize("version", ["0.31.2", "0.32.1", "0.33.0", "0.32.0rc1"])
def test_version_check_refuses_other_versions(version):
    with pytest.raises(RuntimeError, match=rf"vLLM {version} is not supported.*exactly vLLM 0\.32\.0"):
        plugin.check_vllm_version(version)


def test_register_refuses_a_patched_vllm_version(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(RuntimeError, match="VLLM_PLUGINS"):
        plugin.register()


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"policy": "bogus"}, "policy"),
        ({"num_primary": 0}, "num_primary"),
        ({"threshold": 1.5}, "threshold"),
        ({"scope": "node"}, "scope"),
        ({"num_primray": 2}, "num_primray"),  # a typo is an unknown field, not a silent default
        ('{"policy": "sere",', "JSON|Expecting"),
    ],
)
def test_parse_config_names_the_bad_field(raw, field):
    with pytest.raises(ValueError, match=field):
        plugin.parse_config(raw, "hf_overrides['sere']")


def test_config_sources_hf_overrides_then_env(monkeypatch):
    def vllm_config(overrides):
        return SimpleNamespace(model_config=SimpleNamespace(hf_overrides=overrides))

    monkeypatch.delenv(plugin.ENV_CONFIG, raising=False)
    assert plugin.config_from_vllm(vllm_config({})) is None
    monkeypatch.setenv(plugin.ENV_CONFIG, '{"policy": "oea", "num_primary": 3}')
    cfg, source = plugin.config_from_vllm(vllm_config({}))
    assert (cfg.policy, cfg.num_primary, source) == ("oea", 3, "env")
    cfg, source = plugin.config_from_vllm(vllm_config({"sere": {"policy": "topk"}}))
    assert (cfg.policy, source) == ("topk", "hf_overrides")


def test_weight_loader_leaves_the_sidecar_out(tmp_path):
    plugin.register()
    from vllm.model_executor.model_loader import default_loader

    files = [str(tmp_path / name) for name in ("model.safetensors", SIDECAR_NAME, "sere_similarity.cka.safetensors")]
    kept = default_loader.filter_duplicate_safetensors_files(files, str(tmp_path), "model.safetensors.index.json")
    assert kept == files[:1]


# ---------------------------------------------------------------- fast: the hook on vLLM's routers


def _similarity(seed: int = 0) -> torch.Tensor:
    sim = torch.rand(E, E, generator=torch.Generator().manual_seed(seed))
    sim = (sim + sim.T) / 2
    return sim.fill_diagonal_(1.0)  # [E, E]


def _hooked(router, policy="sere", num_primary=2, sim=None, **cfg):
    sim = _similarity() if sim is None else sim
    hook = plugin.RoutingHook(
        router._compute_routing,
        cfg=SereConfig(policy=policy, num_primary=num_primary, **cfg),
        layer=0,
        layer_name=f"test.layers.0.{policy}.{id(router)}",
        num_experts=E,
        top_k=K,
        similarity=lambda layer, c: (sim, c.threshold),
        scoring_func=getattr(router, "scoring_func", "softmax"),
        device="cpu",
    )
    original = router._compute_routing
    router._compute_routing = hook
    return hook, original


def _routers():
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    bias = torch.randn(E, generator=torch.Generator().manual_seed(3)) * 0.1

    def custom(hidden_states, gating_output, topk, renormalize):  # e.g. Llama-4 style sigmoid top-k
        values, ids = torch.topk(gating_output, topk, dim=-1)
        return torch.sigmoid(values.float()), ids.to(torch.int32)

    return {
        "softmax": CPURouter(top_k=K, global_num_experts=E, renormalize=True),
        "softmax_no_renorm": CPURouter(top_k=K, global_num_experts=E, renormalize=False),
        "grouped_softmax": CPURouter(
            top_k=K, global_num_experts=E, use_grouped_topk=True, num_expert_group=8, topk_group=4
        ),
        # DeepSeek-V3 style: sigmoid scores, correction bias steers selection, grouped top-k
        "grouped_sigmoid_biased": CPURouter(
            top_k=K, global_num_experts=E, use_grouped_topk=True, num_expert_group=8, topk_group=4,
            scoring_func="sigmoid", e_score_correction_bias=bias, routed_scaling_factor=2.5,
        ),
        "custom_sigmoid": CPURouter(top_k=K, global_num_experts=E, custom_routing_function=custom),
    }


def _sorted_by_weight(weights, ids):
    order = torch.argsort(weights, dim=1, descending=True, stable=True)
    return weights.gather(1, order), ids.gather(1, order).contiguous()


@pytest.mark.parametrize("kind", list(_routers()))
def test_hook_post_processes_every_router_kind(kind):
    router = _routers()[kind]
    hidden = torch.randn(16, 32)
    logits = torch.randn(16, E, generator=torch.Generator().manual_seed(1))  # [T, E]
    own_weights, own_ids = router.select_experts(hidden, logits)  # the router alone
    sim = _similarity()
    _hooked(router, sim=sim)
    weights, ids = router.select_experts(hidden, logits)  # [T, K] each

    sorted_weights, sorted_ids = _sorted_by_weight(own_weights, own_ids)
    expected_ids, _ = reroute_reference(sorted_ids, sorted_weights, sim, 2)
    assert torch.equal(ids, expected_ids)
    assert torch.equal(weights, sorted_weights)  # weights are never changed, only slot order
    assert ids.dtype == own_ids.dtype == torch.int32 and ids.is_contiguous()
    assert not torch.equal(torch.sort(ids).values, torch.sort(own_ids).values), "SERE changed nothing"
    assert ids.unique().numel() < own_ids.unique().numel()


def test_hook_topk_returns_the_router_output_itself():
    router = _routers()["softmax"]
    hidden, logits = torch.randn(8, 32), torch.randn(8, E)
    own_weights, own_ids = router.select_experts(hidden, logits)
    hook, _ = _hooked(router, policy="topk")
    weights, ids = router.select_experts(hidden, logits)
    assert torch.equal(weights, own_weights) and torch.equal(ids, own_ids)
    values = hook.stats.values()
    assert values[0] == 1 and values[3] == values[4] == own_ids.unique().numel()


def test_hook_oea_matches_the_reference():
    router = _routers()["softmax"]
    hidden, logits = torch.randn(16, 32), torch.randn(16, E)
    own_weights, own_ids = router.select_experts(hidden, logits)
    _hooked(router, policy="oea", num_primary=3)
    weights, ids = router.select_experts(hidden, logits)
    sorted_weights, sorted_ids = _sorted_by_weight(own_weights, own_ids)
    expected_ids, expected_weights = oea_reference(sorted_ids, sorted_weights, logits.softmax(-1), 3)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights)


@pytest.mark.parametrize("kind", ["softmax", "grouped_sigmoid_biased"])
@pytest.mark.parametrize("knobs", [
    dict(tolerance=0.6, renormalize=True),
    dict(tolerance=0.6, renormalize=True, refill=True),
    dict(tolerance=0.6, renormalize=True, refill=True, num_primary=1, keep_cost=0.0, max_distinct=12),
], ids=["plain", "refill", "budget-refill"])
def test_hook_sere_err_matches_the_reference(kind, knobs):
    router = _routers()[kind]
    hidden, logits = torch.randn(16, 32), torch.randn(16, E, generator=torch.Generator().manual_seed(2))
    own_weights, own_ids = router.select_experts(hidden, logits)
    error = torch.rand(E, E, generator=torch.Generator().manual_seed(4)) * 1.5  # [E, E]
    error.fill_diagonal_(0.0)
    knobs = {"num_primary": 2, **knobs}
    _hooked(router, policy="sere-err", sim=error, **knobs)
    weights, ids = router.select_experts(hidden, logits)
    sorted_weights, sorted_ids = _sorted_by_weight(own_weights, own_ids)
    scores = plugin.router_scores(logits, getattr(router, "scoring_func", "softmax"), E)
    expected_ids, expected_weights = sere_err_reference(
        sorted_ids, sorted_weights, error, knobs["num_primary"], knobs["tolerance"],
        knobs.get("keep_cost", float("inf")), knobs.get("max_distinct"), knobs["renormalize"],
        router_scores=scores if knobs.get("refill") else None,
    )
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights)
    assert ids.unique().numel() < own_ids.unique().numel()


@pytest.mark.parametrize("kind", ["softmax", "softmax_no_renorm", "grouped_sigmoid_biased"])
@pytest.mark.parametrize("num_primary, budget", [(1, 12), (2, 20)])
def test_hook_xshare_matches_the_reference(kind, num_primary, budget):
    router = _routers()[kind]
    hidden, logits = torch.randn(16, 32), torch.randn(16, E, generator=torch.Generator().manual_seed(5))
    own_weights, own_ids = router.select_experts(hidden, logits)
    hook, _ = _hooked(router, policy="xshare", num_primary=num_primary, max_distinct=budget)
    weights, ids = router.select_experts(hidden, logits)
    sorted_weights, sorted_ids = _sorted_by_weight(own_weights, own_ids)
    scores = plugin.router_scores(logits, getattr(router, "scoring_func", "softmax"), E)
    expected_ids, expected_weights = xshare_reference(sorted_ids, sorted_weights, scores, num_primary, budget)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights)
    distinct_before, distinct_after = hook.stats.values()[3:5]
    assert distinct_after == ids.unique().numel() <= max(budget, 16 * num_primary) < distinct_before


def test_sere_err_refuses_a_similarity_sidecar(tmp_path):
    sim = _similarity()
    save_sidecar(tmp_path / "s.safetensors", {0: sim}, metric="cosine", num_tokens=1, model_id="m", num_experts=E)
    with pytest.raises(ValueError, match="policy 'sere-err' needs a substitution_error sidecar"):
        plugin._sidecar(tmp_path / "s.safetensors", E, SereConfig(policy="sere-err"))


def test_hook_leaves_prefill_alone_and_counts_it():
    router = _routers()["softmax"]
    hidden, logits = torch.randn(40, 32), torch.randn(40, E)
    own_weights, own_ids = router.select_experts(hidden, logits)
    hook, _ = _hooked(router, max_decode_tokens=32)
    weights, ids = router.select_experts(hidden, logits)  # 40 tokens > 32: prefill
    assert torch.equal(ids, own_ids) and torch.equal(weights, own_weights)
    router.select_experts(hidden[:4], logits[:4])  # a decode step
    steps, skipped, tokens = hook.stats.values()[:3]
    assert (steps, skipped, tokens) == (1, 1, 4)


def test_hook_ignores_padding_rows_in_the_primary_set():
    from vllm.forward_context import get_forward_context, override_forward_context

    router = _routers()["softmax"]
    hidden, logits = torch.randn(6, 32), torch.randn(6, E)
    own_weights, own_ids = router.select_experts(hidden, logits)
    sim = _similarity()
    hook, _ = _hooked(router, sim=sim)
    padding = torch.tensor([False, False, False, False, True, True])
    context = SimpleNamespace(is_padding=padding)
    with override_forward_context(context):
        assert get_forward_context() is context
        ids = router.select_experts(hidden, logits)[1]
    sorted_weights, sorted_ids = _sorted_by_weight(own_weights, own_ids)
    real_primary = torch.zeros(E, dtype=torch.bool)
    real_primary[sorted_ids[:4, :2].reshape(-1).long()] = True
    expected, _ = reroute_reference(sorted_ids, sorted_weights, sim, 2, primary=real_primary)
    assert torch.equal(ids, expected)


def test_configure_switches_policy_and_checks_the_model():
    router = _routers()["softmax"]
    hook, _ = _hooked(router, policy="topk")
    hook.configure(SereConfig(policy="sere", num_primary=3, threshold=0.4))
    assert (hook.cfg.policy, hook.cfg.num_primary, hook.route.threshold) == ("sere", 3, 0.4)
    assert torch.equal(hook.matrix, _similarity())  # loaded into the persistent buffer
    with pytest.raises(ValueError, match="num_primary=8"):
        hook.configure(SereConfig(policy="sere", num_primary=8))


def test_metrics_snapshot_and_prometheus_series():
    from prometheus_client import REGISTRY

    router = _routers()["softmax"]
    hook, _ = _hooked(router)
    for seed in range(3):
        logits = torch.randn(8, E, generator=torch.Generator().manual_seed(seed))
        router.select_experts(torch.randn(8, 32), logits)
    metrics.flush()
    entry = next(e for e in metrics.snapshot()["layers"] if e["layer_name"] == hook.layer_name)
    assert entry["steps"] == 3 and entry["tokens"] == 24
    assert entry["distinct_experts_after"] < entry["distinct_experts_before"]
    assert entry["rerouted_slots"] > 0
    labels = {"layer": "0", "policy": "sere", "rank": "0"}
    assert REGISTRY.get_sample_value("sere_rerouted_slots_total", labels) >= entry["rerouted_slots"]
    assert REGISTRY.get_sample_value("sere_distinct_experts", {**labels, "stage": "after"}) > 0


# ---------------------------------------------------------------- slow: engine start
# The policies in real engines (compiled and eager) are in tests/test_vllm_compiled.py.


@pytest.fixture(scope="module")
def num_moe_layers(model_dir) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_experts_per_tok"] == K and config.get("num_experts", config.get("num_local_experts")) == E
    return config["num_hidden_layers"]  # every decoder layer of the tiny Qwen3-MoE is an MoE layer


@pytest.fixture(scope="module")
def narrow_sidecar(model_dir, tmp_path_factory) -> Path:
    """A copy of the model's sidecar that lacks its last layer, and one made for 32 experts."""
    sidecar = load_sidecar(model_dir, num_experts=E)
    out = tmp_path_factory.mktemp("sidecars")
    last = max(sidecar.matrices)
    save_sidecar(out / "missing_layer.safetensors", {i: m for i, m in sidecar.matrices.items() if i != last},
                 metric=sidecar.metric, num_tokens=0, model_id="test", num_experts=E)
    save_sidecar(out / "other_model.safetensors", {i: torch.eye(32) for i in sidecar.matrices},
                 metric="cosine", num_tokens=0, model_id="other-model", num_experts=32)
    return out


@pytest.mark.parametrize(
    "sere, message",
    [
        ({"policy": "bogus"}, r"policy: .*'bogus' is unknown"),
        ({"policy": "sere", "num_primary": 8}, r"num_primary=8 must be smaller than the model's top_k=8"),
        ({"policy": "sere", "mystery": 1}, r"mystery: Extra inputs are not permitted"),
        ({"policy": "oea", "layer_num_primary": {"9": 1}}, r"layer_num_primary names layer\(s\) \[9\]"),
        ({"policy": "oea", "layer_num_primary": {"1": 8}}, r"layer_num_primary\[1\]=8 must be smaller .* top_k=8"),
        ({"policy": "sere", "similarity_path": "/nonexistent/sim.safetensors"}, r"sidecar not found"),
        ({"policy": "sere", "similarity_path": "{dir}/other_model.safetensors"}, r"32 experts.*has 64"),
    ],
)
def test_bad_config_fails_at_engine_start_naming_the_field(model_dir, narrow_sidecar, sere, message):
    from vllm import LLM

    sere = {k: v.format(dir=narrow_sidecar) if isinstance(v, str) else v for k, v in sere.items()}
    start = time.monotonic()
    with pytest.raises(ValueError, match=message):
        LLM(model=str(model_dir), hf_overrides={"sere": sere}, **ENGINE_KW)
    assert time.monotonic() - start < 60  # before any worker starts


@pytest.mark.slow
def test_sidecar_missing_a_layer_fails_the_model_load(model_dir, narrow_sidecar, num_moe_layers, capfd):
    from vllm import LLM

    path = narrow_sidecar / "missing_layer.safetensors"
    with pytest.raises(RuntimeError, match="initialization failed"):
        LLM(model=str(model_dir), hf_overrides={"sere": {"policy": "sere", "similarity_path": str(path)}},
            **ENGINE_KW)
    captured = capfd.readouterr()  # the worker's log: its own process, the same stdout/stderr
    log = captured.out + captured.err
    assert f"no similarity matrix for layer {num_moe_layers - 1}" in log and str(path) in log


# ---------------------------------------------------------------- slow: the README's OpenAI server + /metrics

# The command users run (README), as written; the test only adds a loopback host and port.
README_COMMAND = (
    "VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python -m vllm.entrypoints.openai.api_server --model models/tiny-moe "
    """--max-model-len 1024 --hf-overrides '{"sere": {"policy": "sere", "num_primary": 4}}'"""
)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def api_server(model_dir, tmp_path_factory):
    """The README command (default compiled mode, no PROMETHEUS_MULTIPROC_DIR), killed at the end."""
    import shlex

    assert model_dir == REPO / "models" / "tiny-moe", "the README command names models/tiny-moe"
    assert README_COMMAND in (REPO / "README.md").read_text(), "the README no longer shows this command"
    words = shlex.split(README_COMMAND)
    env = {k: v for k, v in os.environ.items()
           if k not in (plugin.ENV_CONFIG, plugin.ENV_RECORD, "PROMETHEUS_MULTIPROC_DIR", "SERE_METRICS_DIR")}
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    env["SERE_METRICS_INTERVAL_S"] = "0"  # export after every step: the test scrapes right away
    port = _free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    proc = subprocess.Popen(words + ["--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"API server exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"API server did not become healthy in 300 s:\n{log.read()[-4000:]}")
                time.sleep(1)
        yield base
    finally:
        os.killpg(proc.pid, 15)  # the server, its engine core and workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)
        log.close()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


@pytest.mark.slow
def test_readme_api_server_completes_and_exports_sere_series(api_server, num_moe_layers):
    reply = _post(f"{api_server}/v1/completions",
                  {"model": "models/tiny-moe", "prompt": PROMPTS[:3], "max_tokens": 8, "temperature": 0})
    assert len(reply["choices"]) == 3 and all(choice["text"] for choice in reply["choices"])
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{api_server}/metrics", timeout=30) as response:
        text = response.read().decode()
    series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("sere_"):
                labels = sample.labels
                series[(sample.name, labels.get("layer"), labels.get("policy"), labels.get("stage"))] = sample.value
    for layer in map(str, range(num_moe_layers)):
        assert series[("sere_steps_total", layer, "sere", None)] >= 8
        assert series[("sere_tokens_total", layer, "sere", None)] >= 3 * 8
        assert series[("sere_rerouted_slots_total", layer, "sere", None)] > 0
        before = series[("sere_distinct_experts_before_total", layer, "sere", None)]
        assert series[("sere_distinct_experts_after_total", layer, "sere", None)] < before
        assert 0 < series[("sere_distinct_experts", layer, "sere", "after")] <= 64
    assert "vllm:num_requests_running" in text  # vLLM's own series are still there
