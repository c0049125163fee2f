"""The Hugging Face adapter on tiny random models of every supported family.

`tiny_moe` and `save_tiny_model` are also used by test_calibrate.py and test_evaluate.py.
"""

import pytest
import torch

import transformers

from sere.hf.moe import find_moe_blocks, routing_hook, run_expert, run_experts  # noqa: E402
from sere.config import SereConfig  # noqa: E402
import oracle  # noqa: E402  (tests/oracle.py: plain-loop oracles of the policies)

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3")
VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(family: str, num_experts: int = 8, top_k: int = 4):
    """A tiny config: hidden 32, 2 MoE layers (DeepSeek-V3: 3 layers, layer 0 dense)."""
    t = transformers
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(**COMMON, head_dim=16, moe_intermediate_size=16, num_experts=num_experts,
                                num_experts_per_tok=top_k, norm_topk_prob=True)
    if family == "qwen2_moe":
        return t.Qwen2MoeConfig(**COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                num_experts=num_experts, num_experts_per_tok=top_k)
    if family == "mixtral":  # intermediate 64 > hidden 32: CKA runs in output space
        return t.MixtralConfig(**COMMON, head_dim=16, intermediate_size=64, num_local_experts=num_experts,
                               num_experts_per_tok=top_k)
    if family == "olmoe":
        return t.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=num_experts, num_experts_per_tok=top_k)
    if family == "deepseek_v2":  # group-limited greedy top-k
        return t.DeepseekV2Config(**COMMON, **MLA, moe_intermediate_size=16, intermediate_size=64,
                                  n_routed_experts=num_experts, num_experts_per_tok=top_k, n_shared_experts=1,
                                  first_k_dense_replace=0, topk_method="group_limited_greedy", n_group=2,
                                  topk_group=1)
    if family == "deepseek_v3":  # sigmoid + bias + grouped top-k, first layer dense
        return t.DeepseekV3Config(**{**COMMON, "num_hidden_layers": 3}, **MLA, moe_intermediate_size=16,
                                  intermediate_size=64, n_routed_experts=num_experts, num_experts_per_tok=top_k,
                                  n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1)
    raise ValueError(family)


def tiny_moe(family: str = "qwen3_moe", seed: int = 0, **kwargs):
    """A tiny random model in eval mode with varied routing (router weights are not zero)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **kwargs)).eval()
    for block in find_moe_blocks(model):
        torch.nn.init.normal_(block.router.weight, std=0.5)
        torch.nn.init.normal_(block.experts.gate_up_proj, std=0.2)
        torch.nn.init.normal_(block.experts.down_proj, std=0.2)
        if hasattr(block.router, "e_score_correction_bias"):
            block.router.e_score_correction_bias.normal_(std=0.1)
    return model


def save_tiny_model(directory, family: str = "qwen3_moe", seed: int = 0, model=None):
    """Save a tiny model plus a byte-level BPE tokenizer (vocab <= VOCAB) into `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")
    assert len(fast) <= VOCAB
    model = model if model is not None else tiny_moe(family, seed)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


SAMPLE_TEXT = " ".join(
    f"def function_{i}(x, y):\n    return x * {i} + y  # the quick brown fox {i % 7}\n" for i in range(200)
)


def _ids(batch=3, seq=5, seed=1):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _capture_expert_ids(model):
    """Forward pre-hooks recording the topk_ids [T, K] that reach each experts module."""
    seen, handles = {}, []
    for b in find_moe_blocks(model):
        def hook(module, args, layer=b.layer_idx):
            seen[layer] = args[1].clone()
        handles.append(b.experts.register_forward_pre_hook(hook))
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_finds_blocks_with_decoder_layer_index(family):
    model = tiny_moe(family)
    blocks = find_moe_blocks(model)
    expected_layers = [1, 2] if family == "deepseek_v3" else [0, 1]
    assert [b.layer_idx for b in blocks] == expected_layers
    assert all(b.num_experts == 8 and b.top_k == 4 for b in blocks)
    assert blocks[0].score_fn == ("sigmoid" if family == "deepseek_v3" else "softmax")


@pytest.mark.parametrize("family", FAMILIES)
def test_run_expert_matches_the_models_own_expert_kernel(family):
    block = find_moe_blocks(tiny_moe(family))[0]
    x = torch.randn(7, 32)
    with torch.no_grad():
        for expert in (0, 5):
            ids = torch.full((7, 1), expert)  # every token to one expert, weight 1
            own = block.experts(x, ids, torch.ones(7, 1))  # [7, d]
            torch.testing.assert_close(run_expert(block, expert, x), own, rtol=1e-5, atol=1e-6)
        assert run_experts(block, x).shape == (8, 7, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_hook_changes_nothing_and_records_distinct_experts(family):
    model = tiny_moe(family)
    ids = _ids()
    with torch.no_grad():
        plain = model(ids).logits
        with routing_hook(model) as record:
            hooked = model(ids).logits
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)
    for calls in record.calls.values():
        ((num_tokens, before, after, changed),) = calls
        assert num_tokens == 15 and before == after and 1 <= before <= 8 and changed == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_sere_hook_reroutes_what_the_router_chose(family):
    """The ids reaching the experts are the loop oracle's SERE of the router's own choice, for
    softmax, sigmoid and grouped top-k routers alike, and they differ from it."""
    model = tiny_moe(family)
    blocks = find_moe_blocks(model)
    sims = {b.layer_idx: torch.rand(8, 8, generator=torch.Generator().manual_seed(b.layer_idx)) for b in blocks}
    router_out = {}
    handles = [b.router.register_forward_hook(
        lambda m, a, out, layer=b.layer_idx: router_out.__setitem__(layer, out)) for b in blocks]
    cfg = SereConfig(policy="sere", num_primary=1)
    with torch.no_grad(), routing_hook(model, cfg, matrices=sims) as record:
        seen, more = _capture_expert_ids(model)
        model(_ids(batch=1, seq=3))  # 3 tokens: the primary set cannot cover all 8 experts
    for h in handles + more:
        h.remove()
    for b in blocks:
        _, weights, ids = router_out[b.layer_idx]
        want_ids, _, want_stats, _ = oracle.route(cfg, ids, weights, num_experts=8, matrix=sims[b.layer_idx])
        assert seen[b.layer_idx].tolist() == want_ids
        assert not torch.equal(seen[b.layer_idx].sort(-1).values, ids.sort(-1).values)
        ((_, before, after, changed),) = record.calls[b.layer_idx]
        assert [before, after, changed] == [want_stats[0], want_stats[1], want_stats[3]]
        assert after < before and changed > 0


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_grouped_topk_router_is_rerouted_and_output_changes(family):
    """The published code's DeepSeek trap: grouped top-k bypassed re-routing. Not here."""
    model = tiny_moe(family)
    sims = {b.layer_idx: torch.ones(8, 8) for b in find_moe_blocks(model)}  # any non-primary -> lowest primary
    ids = _ids(batch=1, seq=3)
    with torch.no_grad():
        plain = model(ids).logits
        with routing_hook(model, SereConfig(policy="sere", num_primary=1), matrices=sims) as record:
            rerouted = model(ids).logits
    assert record.rerouted_slots() > 0
    assert all(c[2] < c[1] for calls in record.calls.values() for c in calls)
    assert not torch.allclose(plain, rerouted)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_oea_hook_matches_the_oracle_with_the_routers_scores(family):
    model = tiny_moe(family)
    blocks = find_moe_blocks(model)
    router_out = {}
    handles = [b.router.register_forward_hook(
        lambda m, a, out, layer=b.layer_idx: router_out.__setitem__(layer, out)) for b in blocks]
    cfg = SereConfig(policy="oea", num_primary=2)
    with torch.no_grad(), routing_hook(model, cfg) as record:
        seen, more = _capture_expert_ids(model)
        model(_ids())
    for h in handles + more:
        h.remove()
    b = blocks[0]
    logits, weights, ids = router_out[b.layer_idx]
    scores = logits.float().sigmoid() if family == "deepseek_v3" else logits.float().softmax(-1)
    want_ids, _, _, _ = oracle.route(cfg, ids, weights, num_experts=8, router_scores=scores)
    assert seen[b.layer_idx].tolist() == want_ids
    assert all(c[2] <= c[1] for calls in record.calls.values() for c in calls)


def test_max_tokens_leaves_prefill_alone():
    model = tiny_moe()
    sims = {b.layer_idx: torch.ones(8, 8) for b in find_moe_blocks(model)}
    with torch.no_grad():
        plain = model(_ids()).logits
        with routing_hook(model, SereConfig(policy="sere", num_primary=1, max_decode_tokens=4), matrices=sims) as record:
            hooked = model(_ids()).logits
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)
    assert record.rerouted_slots() == 0


def test_hooks_are_removed_on_exit():
    model = tiny_moe()
    sims = {b.layer_idx: torch.ones(8, 8) for b in find_moe_blocks(model)}
    with torch.no_grad():
        plain = model(_ids()).logits
        with routing_hook(model, SereConfig(policy="sere", num_primary=1), matrices=sims):
            pass
        torch.testing.assert_close(model(_ids()).logits, plain, rtol=0, atol=0)


def test_errors_are_clear():
    dense = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match="no MoE blocks"):
        find_moe_blocks(dense)
    model = tiny_moe()
    block = find_moe_blocks(model)[0]
    with pytest.raises(IndexError, match="expert_id=8"):
        run_expert(block, 8, torch.randn(2, 32))
    with pytest.raises(ValueError, match="num_primary=4 must be smaller than the model's top_k=4"):
        with routing_hook(model, SereConfig(policy="oea", num_primary=4)):
            pass
    with pytest.raises(ValueError, match="needs a similarity"):
        with routing_hook(model, SereConfig(policy="sere", num_primary=1)):
            pass
    with pytest.raises(ValueError, match="layer 0: similarity shape"):
        with routing_hook(model, SereConfig(policy="sere", num_primary=1), matrices={0: torch.eye(4), 1: torch.eye(4)}):
            pass
    with pytest.raises(ValueError, match="no similarity matrix for MoE layer 1"):
        with routing_hook(model, SereConfig(policy="sere", num_primary=1), matrices={0: torch.eye(8)}):
            pass
    with pytest.raises(ValueError, match="policy='fast' is unknown"):
        with routing_hook(model, SereConfig(policy="fast")):
            pass


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("params", [
    dict(tolerance=1.0),
    dict(tolerance=0.6, renormalize=True),
    dict(tolerance=0.8, keep_cost=0.05, max_distinct=3),
    dict(tolerance=0.5, keep_cost=0.05, refill=True, renormalize=True),
])
def test_sere_err_hook_matches_the_oracle_on_the_routers_choice(family, params):
    """sere-err through the hook: the ids and weights reaching the experts are the loop
    oracle's sere-err of the router's own output."""
    model = tiny_moe(family)
    blocks = find_moe_blocks(model)
    errors = {}
    for b in blocks:
        err = torch.rand(8, 8, generator=torch.Generator().manual_seed(10 + b.layer_idx)) * 1.2
        errors[b.layer_idx] = err.fill_diagonal_(0.0)
    router_out, seen_weights = {}, {}
    handles = [b.router.register_forward_hook(
        lambda m, a, out, layer=b.layer_idx: router_out.__setitem__(layer, out)) for b in blocks]
    handles += [b.experts.register_forward_pre_hook(
        lambda m, a, layer=b.layer_idx: seen_weights.__setitem__(layer, a[2].clone())) for b in blocks]
    cfg = SereConfig(policy="sere-err", num_primary=1, **params)
    with torch.no_grad(), routing_hook(model, cfg, matrices=errors) as record:
        seen, more = _capture_expert_ids(model)
        model(_ids(batch=1, seq=3))
    for h in handles + more:
        h.remove()
    changed_any = False
    for b in blocks:
        logits, weights, ids = router_out[b.layer_idx]
        scores = logits.float().sigmoid() if family == "deepseek_v3" else logits.float().softmax(-1)
        want_ids, want_weights, want_stats, _ = oracle.route(cfg, ids, weights, num_experts=8,
                                                             matrix=errors[b.layer_idx], router_scores=scores)
        assert seen[b.layer_idx].tolist() == want_ids
        torch.testing.assert_close(seen_weights[b.layer_idx], torch.tensor(want_weights, dtype=weights.dtype))
        ((_, before, after, changed),) = record.calls[b.layer_idx]
        assert [before, after, changed] == [want_stats[0], want_stats[1], want_stats[3]]
        assert after <= before
        changed_any |= changed > 0
    assert changed_any


def test_sere_err_hook_needs_error_matrices():
    model = tiny_moe()
    with pytest.raises(ValueError, match="substitution error"):
        with routing_hook(model, SereConfig(policy="sere-err", num_primary=1)):
            pass
    with pytest.raises(ValueError, match="substitution error shape"):
        with routing_hook(model, SereConfig(policy="sere-err", num_primary=1), matrices={0: torch.zeros(4, 4), 1: torch.zeros(4, 4)}):
            pass


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("policy, params", [
    ("topk", {}),
    ("oea", dict(num_primary=1)),
    ("sere-err", dict(num_primary=1, tolerance=0.6, renormalize=True)),
    ("sere-err", dict(num_primary=1, keep_cost=0.0, max_distinct=4, renormalize=True, refill=True)),
])
def test_lockstep_forward_equals_kv_cache_decoding(family, policy, params):
    """`lockstep_batch=B`: one causal forward over [B, L] re-routes each position's B tokens as
    one step, which is what L lock-step decode steps with a KV cache compute, step by step."""
    from transformers import DynamicCache

    model = tiny_moe(family)
    tables = {}
    if policy == "sere-err":
        tables["matrices"] = {b.layer_idx: torch.rand(8, 8, generator=torch.Generator().manual_seed(b.layer_idx))
                              .fill_diagonal_(0.0) * 1.2 for b in find_moe_blocks(model)}
    cfg = SereConfig(policy=policy, **params)
    batch = _ids(batch=4, seq=6)
    with torch.no_grad():
        with routing_hook(model, cfg, **tables) as stepwise:
            cache, logits = DynamicCache(config=model.config), []
            for t in range(batch.shape[1]):
                out = model(input_ids=batch[:, t : t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits.append(out.logits[:, -1])
        with routing_hook(model, cfg, lockstep_batch=4, **tables) as lockstep:
            forward = model(input_ids=batch).logits  # [B, L, V]
    torch.testing.assert_close(forward, torch.stack(logits, 1), atol=2e-5, rtol=1e-4)
    assert lockstep.calls == stepwise.calls  # per layer and step: tokens, distinct, re-routed
    if policy != "topk":
        assert lockstep.mean_distinct() < lockstep.mean_distinct(after=False)


def test_lockstep_batch_must_divide_the_tokens():
    model = tiny_moe()
    with pytest.raises(ValueError, match="lockstep_batch=4 does not divide the 9 tokens"):
        with torch.no_grad(), routing_hook(model, SereConfig(policy="oea", num_primary=1), lockstep_batch=4):
            model(_ids(batch=3, seq=3))
