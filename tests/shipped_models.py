"""Loading a model that ships in models/ (its absence is a failure, never a skip)."""

from pathlib import Path

import pytest
import torch
import transformers

MODELS = Path(__file__).resolve().parents[1] / "models"


def load_shipped(name: str):
    """(tokenizer, float32 eval model) of models/<name>."""
    model_dir = MODELS / name
    assert (model_dir / "model.safetensors").exists(), f"the shipped model is missing: {model_dir}"
    torch.set_num_threads(2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def shipped(request):
    """(tokenizer, model) of the test module's MODEL_DIR."""
    return load_shipped(request.module.MODEL_DIR.name)


@pytest.fixture(scope="module")
def tok(shipped):
    return shipped[0]


@pytest.fixture(scope="module")
def model(shipped):
    return shipped[1]
