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
