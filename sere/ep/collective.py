"""Small collectives of the EP group: agreement checks that fail on every rank, and the shared P.

Every rank must reach the same collectives in the same order. A rank that found a local problem
therefore does not raise at once (its peers would wait forever in the next collective): it
publishes the problem in the first, fixed-size all-gather and every rank raises the same error.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["EPError", "default_backend", "agree_or_raise"]

_MSG_BYTES = 240


class EPError(RuntimeError):
    """Raised on every rank of the EP group when any rank's inputs are invalid or disagree."""


def default_backend() -> str:
    """NCCL on CUDA, gloo otherwise (the CPU build of torch has no NCCL)."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def _device(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def agree_or_raise(meta: dict[str, int], error: str | None, group=None,
                   shared: dict[str, int] | None = None) -> dict[str, list[int]]:
    """All-gather `meta` (same keys on every rank) and a short error text; raise EPError everywhere
    if any rank reported an error or any value of `meta` differs between ranks. The values of
    `shared` travel in the same all-gather without being compared; returns them per rank.
    """
    world = dist.get_world_size(group)
    shared = shared or {}
    shared_keys = sorted(shared)
    meta = {**meta, **{f"~{k}": v for k, v in shared.items()}}
    keys = sorted(meta)
    encoded = (error or "").encode()[:_MSG_BYTES]
    local = torch.zeros(1 + len(keys) + _MSG_BYTES, dtype=torch.int64)  # [1 + M + B]
    local[0] = len(encoded)
    local[1 : 1 + len(keys)] = torch.tensor([int(meta[k]) for k in keys], dtype=torch.int64)
    if encoded:
        local[1 + len(keys) : 1 + len(keys) + len(encoded)] = torch.tensor(list(encoded), dtype=torch.int64)
    device = _device(group)
    gathered = [torch.empty_like(local, device=device) for _ in range(world)]
    dist.all_gather(gathered, local.to(device), group=group)
    table = torch.stack(gathered).cpu()  # [W, 1 + M + B]

    problems = []
    for rank in range(world):
        n = int(table[rank, 0])
        if n:
            text = bytes(table[rank, 1 + len(keys) : 1 + len(keys) + n].tolist()).decode(errors="replace")
            problems.append(f"rank {rank}: {text}")
    values = table[:, 1 : 1 + len(keys)]  # [W, M]
    for i, key in enumerate(keys):
        column = values[:, i]
        if not key.startswith("~") and (column != column[0]).any():
            problems.append(f"{key} differs across ranks: {column.tolist()}")
    if problems:
        raise EPError("expert-parallel step rejected on every rank: " + "; ".join(problems))
    return {k: values[:, keys.index(f"~{k}")].tolist() for k in shared_keys}
