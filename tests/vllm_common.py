"""What the real-engine vLLM test files share: the bundled model, the prompts, its fixture."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ.get("SERE_TEST_MODEL", REPO / "models" / "tiny-moe"))
PROMPTS = [
    "def parse_args(argv):\n    ",
    "import os\nimport sys\n\n",
    "The quick brown fox",
    "class Stack:\n    def push(self, item):\n",
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The trained tiny MoE that ships in the repo; its absence is a failure, never a skip."""
    if not MODEL_DIR.is_dir():
        pytest.fail(f"{MODEL_DIR} is absent: the trained tiny MoE checkpoint ships in the repo (see models/)")
    return MODEL_DIR


def cpu_expert_kernel(seed: int, tokens: int, topk_ids, topk_weights, num_experts: int = 8):
    """vLLM's CPU unquantized expert kernel (with sere.vllm.ep's fixes installed) on random bf16
    weights: returns `run(experts, expert_map) -> [T, H] float32`, the output of the experts
    `experts` (a slice of the E) under `expert_map` (None: vLLM's own call, every slot computed)."""
    from types import SimpleNamespace

    import torch
    import vllm  # noqa: F401
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    from sere.vllm import ep as vllm_ep

    vllm_ep.install()
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = 128, 64
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.05).bfloat16()  # [E, 2I, H]
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) * 0.05).bfloat16()  # [E, H, I]
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()  # [T, H]
    fake = SimpleNamespace(_use_zentorch=False, w1_bias=None, w2_bias=None, isa="vec")

    def run(experts, expert_map):
        out = torch.zeros(tokens, hidden, dtype=torch.bfloat16)
        CPUUnquantizedExperts.apply(
            fake, out, x, cpu_prepack_moe_weight(w13[experts].contiguous(), "vec"),
            cpu_prepack_moe_weight(w2[experts].contiguous(), "vec"), topk_weights.clone(), topk_ids.clone(),
            MoEActivation.SILU, num_experts, expert_map, None, None, None, None, None, False,
        )
        return out.float()

    return run
