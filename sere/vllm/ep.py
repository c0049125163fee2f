"""Expert parallelism for the SERE vLLM plugin: the EP-wide primary set, and two CPU-backend fixes.

1. `primary_allreduce_for(runner)`: with scope "ep_group", the primary set P is the union of
   every EP rank's, and xshare selects by the group's gating mass (one all-reduce SUM of 2E
   float32 per layer and step, `sere.agreement`), whenever the ranks route different tokens (DP attention + all2all dispatch after routing). Where vLLM gathers
   the tokens of all DP ranks *before* routing (the naive / allgather-reducescatter path, the
   only one on CPU) or replicates them (TP only), every rank already sees the same tokens and
   the same P, so no collective is issued (set SERE_EP_ALLREDUCE=1 to force it).
2. vLLM 0.32.0's CPU unquantized experts (`CPUUnquantizedExperts.apply`, the `cpu_fused_moe`
   kernel) ignore `expert_map`: under EP each rank holds E / ep_size experts but receives global
   ids, which index past its weights (segfault). `install()` maps ids to the local range;
   slots owned by another rank get weight 0 (and local id 0, which the kernel then computes
   for nothing: the kernel has no "skip this slot" id). Merged slots (docs/spec.md §19): a
   token naming one expert in several slots (SERE maps secondaries onto primaries) keeps the
   first slot with the summed weight and the repeats get weight 0 (`merge_duplicate_slots`, whose
   id -1 becomes that zero-weight slot): the output is sum_k w_k expert_k(x) as before, with
   fewer weighted (token, expert) rows. `SERE_MERGE_SLOTS=0` (or `set_merge_slots(False)`) off.
3. vLLM 0.32.0's `CpuCommunicator` lacks `all_gatherv` / `reduce_scatterv`, which the only CPU
   all2all backend (allgather_reducescatter) calls under DP + EP. `install()` adds them over
   the group's gloo process group: uneven all-gather by padding to the largest chunk, and
   reduce-scatter as an all-reduce followed by a slice (gloo has no uneven reduce-scatter).
4. In vLLM's compiled mode the CPU backend inlines the MoE forward into the Dynamo graph (GPUs
   call it through the opaque op `vllm.moe_forward`). Under DP + EP the per-rank token counts
   of the dispatch are data-dependent, which Dynamo cannot trace; `opaque_moe_forward(runner)`
   routes such layers through `vllm.moe_forward` on CPU too, so they run eagerly inside it.
"""

from __future__ import annotations

import inspect
import os

import torch

from sere.ep.accounting import merge_duplicate_slots

__all__ = [
    "ENV_MERGE_SLOTS", "MERGE_SLOTS", "install", "local_slots", "opaque_moe_forward", "primary_allreduce_for",
    "all_gatherv", "reduce_scatterv", "set_merge_slots",
]

ENV_MERGE_SLOTS = "SERE_MERGE_SLOTS"  # "0": dispatch repeated experts of a token as they come
MERGE_SLOTS = os.environ.get(ENV_MERGE_SLOTS, "1") != "0"
_installed = False


def set_merge_slots(on: bool) -> bool:
    """Switch merged slots on or off in this process (between steps); returns the old setting."""
    global MERGE_SLOTS
    old, MERGE_SLOTS = MERGE_SLOTS, bool(on)
    return old


def install() -> None:
    """Patch the CPU backend (idempotent). Only classes of the running vLLM are touched."""
    global _installed
    if _installed:
        return
    _patch_cpu_experts()
    _patch_cpu_communicator()
    _installed = True


def opaque_moe_forward(runner) -> bool:
    """Make a CPU DP + EP layer's forward the opaque op `vllm.moe_forward` (as on GPUs); True if done.

    Called at the end of MoERunner.__init__ for every layer, SERE on or off.
    """
    from vllm.platforms import current_platform

    parallel = runner.moe_config.moe_parallel_config
    if not (current_platform.is_cpu() and parallel.use_ep and parallel.dp_size > 1):
        return False
    shared = runner.shared_experts is not None
    runner._forward_entry = torch.ops.vllm.moe_forward_shared if shared else torch.ops.vllm.moe_forward
    return True


def primary_allreduce_for(runner, force: bool = False):
    """A function summing this layer's [2E] agreement vector (`sere.agreement`) over the EP group,
    or None (no EP).

    The routing hook calls it when the config's scope is "ep_group".

    The decision needs the layer's quant method (known after weight loading), so it is taken on
    the first call; before that nothing about the layer's dispatch path is fixed.
    """
    parallel = runner.moe_config.moe_parallel_config
    if not parallel.use_ep or parallel.ep_size <= 1:
        return None
    decided: list = []

    def allreduce(agreement: torch.Tensor) -> torch.Tensor:
        if not decided:
            replicated = (
                parallel.dp_size == 1 and not runner.moe_config.is_sequence_parallel
            ) or runner.do_naive_dispatch_combine
            decided.append(force or not replicated)
        if not decided[0]:
            return agreement
        from vllm.distributed import get_ep_group

        summed = agreement.clone()  # [2E] float32 (sere.agreement): primary mask, gating mass
        torch.distributed.all_reduce(summed, group=get_ep_group().device_group)  # SUM
        return summed

    return allreduce


# ---------------------------------------------------------------- CPU experts: honour expert_map


def _patch_cpu_experts() -> None:
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    apply = CPUUnquantizedExperts.apply
    names = list(inspect.signature(apply).parameters)[1:]  # after self; read once, not per call

    # NOTE: traced by Dynamo in vLLM's compiled mode (the CPU MoE forward is inlined): plain
    # dict and tensor operations only, no inspect.Signature.bind per call.
    def _apply(self, *args, **kwargs):
        kwargs = {**dict(zip(names, args)), **kwargs}
        expert_map = kwargs.get("expert_map")
        if expert_map is None:  # no EP: vLLM's call, untouched
            return apply(self, **kwargs)
        kwargs["topk_ids"], kwargs["topk_weights"] = local_slots(
            kwargs["topk_ids"], kwargs["topk_weights"], expert_map, MERGE_SLOTS)
        return apply(self, **kwargs)

    CPUUnquantizedExperts.apply = _apply


def local_slots(topk_ids: torch.Tensor, topk_weights: torch.Tensor, expert_map: torch.Tensor, merge: bool):
    """The (ids, weights) [T, K] one EP rank's CPU kernel gets: local ids, weight 0 elsewhere.

    topk_ids: [T, K] global ids; expert_map: [E] global -> local id, -1 on another rank.
    merge: a repeated expert of a token gets weight 0, its first slot the summed weight.
    """
    ids, weights = topk_ids.long(), topk_weights
    if merge:  # repeats become id -1 with weight 0
        ids, weights = merge_duplicate_slots(ids, weights)
    local_ids = expert_map[ids.clamp_min(0)]  # [T, K], -1: another rank's expert
    owned = (ids >= 0) & (local_ids >= 0)
    weights = torch.where(owned, weights, 0.0).contiguous()
    return torch.where(owned, local_ids, 0).to(topk_ids.dtype).contiguous(), weights


# ---------------------------------------------------------------- CPU communicator: uneven collectives


def all_gatherv(self, input_, dim: int = 0, sizes: list[int] | None = None):
    """Concatenate every rank's chunk along dim 0; chunk r has sizes[r] rows (None: all equal)."""
    if dim != 0:
        raise NotImplementedError("sere: CPU all_gatherv supports dim 0 only")
    if isinstance(input_, (list, tuple)):
        return [_all_gatherv_one(self, tensor, sizes) for tensor in input_]
    return _all_gatherv_one(self, input_, sizes)


def _all_gatherv_one(self, tensor: torch.Tensor, sizes: list[int] | None) -> torch.Tensor:
    world_size = self.world_size
    if sizes is None or all(size == sizes[0] for size in sizes):
        return self.all_gather(tensor, dim=0)
    assert len(sizes) == world_size and tensor.shape[0] == sizes[self.rank_in_group], (sizes, tensor.shape)
    longest = max(sizes)
    padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))  # [max_r sizes[r], ...]
    padded[: tensor.shape[0]] = tensor
    gathered = tensor.new_empty((world_size * longest,) + tuple(tensor.shape[1:]))
    torch.distributed.all_gather_into_tensor(gathered, padded, group=self.device_group)
    return torch.cat([gathered[r * longest : r * longest + sizes[r]] for r in range(world_size)])


def reduce_scatterv(self, input_: torch.Tensor, dim: int = -1, sizes: list[int] | None = None):
    """Sum over ranks, then keep this rank's chunk (sizes[r] rows along `dim`)."""
    if sizes is None or all(size == sizes[0] for size in sizes):
        return self.reduce_scatter(input_, dim)
    if dim < 0:
        dim += input_.dim()
    summed = input_.movedim(dim, 0).contiguous()  # [sum(sizes), ...]
    assert summed.shape[0] == sum(sizes), (sizes, summed.shape)
    torch.distributed.all_reduce(summed, group=self.device_group)
    start = sum(sizes[: self.rank_in_group])
    return summed[start : start + sizes[self.rank_in_group]].movedim(0, dim).contiguous()


def _patch_cpu_communicator() -> None:
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    if "all_gatherv" not in CpuCommunicator.__dict__:
        CpuCommunicator.all_gatherv = all_gatherv
    if "reduce_scatterv" not in CpuCommunicator.__dict__:
        CpuCommunicator.reduce_scatterv = reduce_scatterv
