"""The vLLM routing hook's per-layer routing captured in a CUDA graph, replayed on new router outputs.

vLLM on GPUs records the routing once per batch size and replays it on whatever the router writes
into the same buffers. For every policy of `sere.policy.POLICIES` (plus sere / sere-err variants):
capture on static buffers, copy NEW router outputs and sidecar matrices (NaN entries too) in,
replay; the result must equal an eager call on the same inputs (ids and statistics exactly,
weights to float tolerance) and the plain loops of tests/oracle.py (xshare: the loops of
`sere.reference.xshare_reference`), docs/spec.md §3-§11. Two levels: `layer_step`, the steps of
`sere::route_layer` through the policy layer (`primary_set` without padding rows, router scores,
`route`); and `RoutingHook` with its op itself, eager and under torch.compile(fullgraph=True),
with a stand-in router and `vllm.forward_context` (vLLM is absent on the GPU machine).

That machine has no pydantic either (/work/shared/ENVIRONMENT.md, CUDA): `plain_config` gives
SereConfig's fields and defaults, read from sere/config.py's source; tests/test_device_check.py
checks on CPU that each case is a valid SereConfig with these values. Marker `gpu`.
Shapes: T tokens, K top-k slots, E experts.
"""

from __future__ import annotations

import ast
import math
import types
from pathlib import Path

import oracle
import pytest
import torch

from sere import policy, reference

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
E, K = 128, 8  # Qwen3-30B-A3B's routed experts and top-k
TOKEN_COUNTS = (1, 5, 64, 256, 300)  # 256 = max_decode_tokens (default); 300: left alone (§10)
CONFIG_SOURCE = Path(__file__).resolve().parents[1] / "sere" / "config.py"
WEIGHT_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
# Fields a policy cannot run without (SereConfig refuses it otherwise).
REQUIRED = {"xshare": {"max_distinct": 24}}


def config_defaults(source: Path = CONFIG_SOURCE) -> dict:
    """SereConfig's field defaults, read from its class body (`name: type = value` or
    `= Field(default=value, ...)`), without importing pydantic."""
    tree = ast.parse(source.read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SereConfig").body
    defaults = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)) or node.value is None:
            continue
        value = node.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "Field":
            value = next((k.value for k in value.keywords if k.arg == "default"), value.args[0] if value.args else None)
            if value is None:
                raise ValueError(f"{source}: SereConfig.{node.target.id} has no literal default")
        defaults[node.target.id] = ast.literal_eval(value)
    return defaults


class PlainConfig(types.SimpleNamespace):
    """SereConfig's fields as attributes, and the two methods the hook calls."""

    def check_model(self, top_k: int, num_experts: int) -> None:
        """Validated on CPU instead (tests/test_device_check.py builds each case as a SereConfig)."""

    def at(self, step_tokens: int) -> "PlainConfig":
        return self  # a single policy (no `sere tune` schedule)


def plain_config(**overrides) -> PlainConfig:
    """SereConfig(**overrides) as a PlainConfig (unknown fields are an error)."""
    defaults = config_defaults()
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"{unknown} are not SereConfig fields ({sorted(defaults)})")
    return PlainConfig(**{**defaults, **overrides})


def policy_cases() -> list[tuple[str, dict]]:
    """(name, SereConfig overrides): each policy of POLICIES, then sere and sere-err variants."""
    cases = [(name, {"policy": name} if name == "topk" else
              {"policy": name, "num_primary": 2, **REQUIRED.get(name, {})}) for name in policy.POLICIES]
    err = {"policy": "sere-err", "num_primary": 2}
    return cases + [
        ("sere-threshold", {"policy": "sere", "num_primary": 3, "threshold": 0.55}),
        ("sere-err-keep", {**err, "tolerance": 0.6, "keep_cost": 0.02}),
        ("sere-err-refill", {**err, "tolerance": 0.6, "refill": True, "renormalize": True}),
        ("sere-err-max-distinct", {**err, "keep_cost": 0.0, "max_distinct": 20}),
        ("sere-err-refill-max-distinct", {**err, "tolerance": 0.6, "keep_cost": 0.01, "max_distinct": 20,
                                          "refill": True}),
    ]


CASES = policy_cases()
CASE_IDS = [name for name, _ in CASES]


def router_outputs(seed: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([T, E] logits, [T, K] renormalised softmax top-k weights, [T, K] int32 ids) on the GPU,
    slots shuffled per token (a router may return them unsorted). Popular experts, as trained
    routers have, so that tokens share experts."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, E, generator=gen) + 1.5 * torch.randn(E, generator=gen)  # [T, E]
    weights, ids = logits.softmax(-1).topk(K, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    order = torch.rand(num_tokens, K, generator=gen).argsort(dim=1)  # [T, K]
    return logits.to(DEVICE), weights.gather(1, order).to(DEVICE), ids.gather(1, order).to(torch.int32).to(DEVICE)


def sidecar(kind: str | None, seed: int, with_nan: bool) -> torch.Tensor:
    """[E, E] float32 matrix of `kind` on the GPU (zeros for policies that read none); `with_nan`:
    about 2% NaN entries and one all-NaN row (§6, §9: such an expert is never substituted)."""
    gen = torch.Generator().manual_seed(seed)
    if kind is None:
        matrix = torch.zeros(E, E)
    elif kind == "similarity":
        vectors = torch.nn.functional.normalize(torch.randn(E, 16, generator=gen), dim=1)
        matrix = ((vectors @ vectors.T + 1) / 2).fill_diagonal_(1.0)  # cosine rescaled to [0, 1]
    elif kind == "substitution_error":
        matrix = (torch.rand(E, E, generator=gen) * 1.2).fill_diagonal_(0.0)
    else:
        raise ValueError(f"matrix kind {kind!r}: add a generator for it to tests/test_gpu_route_capture.py")
    if with_nan:
        matrix[torch.rand(E, E, generator=gen) < 0.02] = math.nan
        matrix[int(torch.randint(E, (1,), generator=gen))] = math.nan
    return matrix.to(DEVICE)


def padding_rows(num_tokens: int) -> torch.Tensor:
    """[T] bool: the last two rows of a call of >= 5 tokens are padding (CUDA-graph batch padding)."""
    return torch.arange(num_tokens, device=DEVICE) >= (num_tokens - 2 if num_tokens >= 5 else num_tokens)


def expected(cfg, logits, weights, ids, matrix, padding) -> tuple[list, list, list]:
    """The loop oracle's (ids, weights, [6] stats) for one call, P from the real rows' top-S."""
    primary = None
    if cfg.policy != "topk":
        rows = oracle.sort_slots(ids, weights)[0]
        real = [row for row, pad in zip(rows, padding.tolist()) if not pad]
        members = {e for row in real for e in row[: cfg.num_primary]}
        primary = [e in members for e in range(E)]
    scores = logits.float().softmax(-1).cpu()  # [T, E] the softmax router's scores
    if cfg.policy != "xshare" or not 0 < len(ids) <= cfg.max_decode_tokens:
        want_ids, want_w, want_stats, _ = oracle.route(
            cfg, ids, weights, num_experts=E, matrix=matrix.cpu(), threshold=cfg.threshold,
            router_scores=scores, primary=primary)
        return want_ids, want_w, want_stats
    rows, row_w = oracle.sort_slots(ids, weights)
    new_ids, new_w = reference.xshare_reference(torch.tensor(rows), torch.tensor(row_w), scores, cfg.num_primary,
                                                cfg.max_distinct, torch.tensor(primary))
    outcome = oracle.Outcome(new_ids.tolist(), new_w.tolist(), 0, int((new_w == 0).sum()))  # dropped: unfilled
    return outcome.ids, outcome.weights, oracle.stats(rows, outcome, {e for e in range(E) if primary[e]})


def assert_same(case: str, got: tuple, want: tuple) -> None:
    """(ids, weights, stats) equal: ids and stats exactly, weights to float tolerance."""
    got_ids, got_w, got_stats = (torch.as_tensor(x).cpu() for x in got)
    want_ids, want_w, want_stats = (torch.as_tensor(x).cpu() for x in want)
    assert got_ids.long().tolist() == want_ids.long().tolist(), f"{case}: ids"
    assert got_stats.tolist() == want_stats.tolist(), f"{case}: stats {got_stats.tolist()} != {want_stats.tolist()}"
    torch.testing.assert_close(got_w.float(), want_w.float(), **WEIGHT_TOLERANCE, msg=lambda m: f"{case}: {m}")


def capture(step, warmups: int = 2):
    """(graph, outputs) of `step()` captured in a CUDA graph after warm-up runs on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graphs recommends
        for _ in range(warmups):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def layer_step(cfg, logits, weights, ids, matrix, padding) -> policy.Routed:
    """What `sere::route_layer` does for one call, without its accumulator (sere/vllm/routing.py)."""
    num_tokens = ids.shape[0]
    primary = None
    if 0 < num_tokens <= cfg.max_decode_tokens and cfg.policy != "topk":
        primary = policy.primary_set(cfg, ids, weights, E, padding)  # [E]
    scores = policy.router_scores(logits, "softmax", E) if policy.needs_router_scores(cfg) else None  # [T, E]
    return policy.route(cfg, ids, weights, num_experts=E, matrix=matrix if policy.matrix_kind(cfg) else None,
                        threshold=cfg.threshold, router_scores=scores, primary=primary)


def new_inputs(cfg, seed: int, num_tokens: int) -> list[tuple[str, list[torch.Tensor]]]:
    """(label, [logits, weights, ids, matrix, padding]) for two fresh router outputs, then NaNs
    in the matrix (policies that read one)."""
    kind = policy.matrix_kind(cfg)
    sets = [(f"seed {s}", [*router_outputs(s, num_tokens), sidecar(kind, s, False), padding_rows(num_tokens)])
            for s in (seed + 1, seed + 2)]
    if kind is not None:
        sets.append(("NaN matrix", [*router_outputs(seed + 3, num_tokens), sidecar(kind, seed + 3, True),
                                    padding_rows(num_tokens)]))
    return sets


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("name, overrides", CASES, ids=CASE_IDS)
def test_policy_layer_replays_like_eager(name, overrides, num_tokens):
    cfg = plain_config(**overrides)
    static = [*router_outputs(0, num_tokens), sidecar(policy.matrix_kind(cfg), 0, False), padding_rows(num_tokens)]
    graph, routed = capture(lambda: layer_step(cfg, *static))
    for label, inputs in new_inputs(cfg, num_tokens, num_tokens):
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        replayed = [t.clone() for t in routed[:3]]
        eager = layer_step(cfg, *[t.clone() for t in inputs])
        case = f"{name} T={num_tokens} {label}"
        assert routed.rerouted == eager.rerouted == (cfg.policy != "topk" and num_tokens <= cfg.max_decode_tokens)
        assert_same(f"{case}: replay vs eager", replayed, eager[:3])
        assert_same(f"{case}: replay vs loop oracle", replayed, expected(cfg, *inputs))


class ForwardContext(types.SimpleNamespace):
    """Stands in for the module `vllm.forward_context` (absent on the GPU machine): the current
    forward pass's padding rows `is_padding` [T] bool, as `route_layer` reads them."""

    def is_forward_context_available(self) -> bool:
        return True

    def get_forward_context(self) -> "ForwardContext":
        return self


def stand_in_router(hidden_states, router_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's softmax top-k router with renormalisation: ([T, K] float32 weights, [T, K] int32 ids)."""
    weights, ids = router_logits.float().softmax(-1).topk(K, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)


def routing_module():
    """sere.vllm.routing, imported here: on the GPU machine it must import without pydantic or vLLM."""
    try:
        from sere.vllm import routing
    except ImportError as exc:
        raise AssertionError(
            f"sere.vllm.routing needs {exc.name!r} at import, absent on the GPU machine: its module-level "
            "imports must need neither pydantic nor vLLM (SereConfig only under TYPE_CHECKING)"
        ) from exc
    return routing


def hook_counts(cfg, logits, matrix, padding) -> tuple[list, list, list]:
    """The oracle's (ids, weights, accumulator increments) for one hook call on `logits`."""
    weights, ids = stand_in_router(None, logits)
    num_tokens = ids.shape[0]
    if not 0 < num_tokens <= cfg.max_decode_tokens:  # left alone: the router's own output (§10)
        return ids.tolist(), weights.tolist(), [0, 1, 0] + [0] * len(policy.STAT_FIELDS)
    want_ids, want_w, want_stats = expected(cfg, logits, weights, ids, matrix, padding)
    return want_ids, want_w, [1, 0, int((~padding).sum())] + want_stats


def check_hook_case(hook, hook_fn, cfg, case: str, num_tokens: int, padding) -> None:
    """Capture `hook_fn` on static logits under `cfg`, replay on new logits and matrices."""
    static_logits = router_outputs(0, num_tokens)[0]
    graph, (weights, ids) = capture(lambda: hook_fn(None, static_logits))
    for label, (logits, _, _, matrix, _) in new_inputs(cfg, 10 + num_tokens, num_tokens):
        static_logits.copy_(logits)
        hook.matrix.copy_(matrix)  # in place, as LayerRoute.configure does
        before = hook.acc.clone()
        graph.replay()
        torch.cuda.synchronize()
        replayed = (ids.clone(), weights.clone(), hook.acc - before)
        name = f"{case} T={num_tokens} {label}"
        before = hook.acc.clone()
        eager_weights, eager_ids = hook(None, logits.clone())  # the hook called eagerly
        assert_same(f"{name}: replay vs eager hook", replayed, (eager_ids, eager_weights, hook.acc - before))
        assert_same(f"{name}: replay vs loop oracle", replayed, hook_counts(cfg, logits, matrix, padding))
    del graph


@pytest.mark.parametrize("compiled", (False, True), ids=("hook", "compiled-hook"))
@pytest.mark.parametrize("num_tokens", (8, 300))  # decode-sized; over max_decode_tokens (left alone)
def test_routing_hook_replays_like_eager(monkeypatch, compiled, num_tokens):
    """One hook per layer, as vLLM has: configured for each case in turn (between steps), each
    configuration captured in its own graph (vLLM captures after configuring), replayed on new
    router logits; compiled once (torch.compile fullgraph, as vLLM does) without recompiling."""
    routing = routing_module()
    from sere.vllm import metrics

    monkeypatch.delenv(routing.ENV_RECORD, raising=False)
    padding = padding_rows(num_tokens)
    monkeypatch.setattr(routing, "_forward_context", ForwardContext(is_padding=padding))
    matrices = {kind: sidecar(kind, 0, False) for kind in ("similarity", "substitution_error")}
    layer_name = f"gpu_capture.layers.{int(compiled)}.{num_tokens}"
    hook = routing.RoutingHook(
        stand_in_router, cfg=plain_config(policy="topk"), layer=0, layer_name=layer_name, num_experts=E,
        top_k=K, similarity=lambda layer, cfg: (matrices[policy.matrix_kind(cfg)], cfg.threshold),
        scoring_func="softmax", device=DEVICE,
    )
    hook_fn = torch.compile(lambda hidden, logits: hook(hidden, logits), fullgraph=True,
                            backend="aot_eager") if compiled else hook
    try:
        for index, (name, overrides) in enumerate(CASES):
            cfg = plain_config(**overrides)
            hook.configure(cfg)
            with torch._dynamo.config.patch(error_on_recompile=index > 0):
                check_hook_case(hook, hook_fn, cfg, name, num_tokens, padding)
    finally:
        routing.LAYERS.pop(layer_name, None)
        metrics.LAYERS.pop(layer_name, None)
