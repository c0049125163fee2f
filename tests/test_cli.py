"""The `sere` command (sere.cli) and the progress reporting of long loops (sere.progress).

The command is run as users run it: the console script `sere` of this environment, in a
subprocess, so its stderr is a pipe (not a terminal) and progress comes as plain lines.
"""

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_hf_moe import SAMPLE_TEXT, save_tiny_model, tiny_moe  # noqa: E402

import sere.progress  # noqa: E402
from sere.hf.moe import find_moe_blocks  # noqa: E402
from sere.progress import Progress, format_seconds, progress  # noqa: E402
from sere.sidecars import load_sidecar  # noqa: E402

SERE = Path(sys.executable).parent / "sere"

# Every option of each command, written out here: a new option must come with its help text.
OPTIONS = {
    "calibrate": ["--model", "--data", "--metric", "--tokens", "--chunk-tokens", "--seq-len", "--batch-size",
                  "--out", "--threads"],
    "substitution": ["--model", "--data", "--tokens", "--chunk-tokens", "--seq-len", "--batch-size", "--out",
                     "--threads"],
    "evaluate": ["--model", "--text", "--batch-size", "--policy", "--num-primary", "--threshold",
                 "--threshold-quantile", "--similarity", "--error", "--tolerance", "--keep-cost", "--max-distinct",
                 "--renormalize", "--refill", "--seq-len", "--num-batches", "--num-sequences", "--max-text-tokens",
                 "--json", "--png", "--ep-size", "--ranks-per-node", "--node-limit", "--max-nodes",
                 "--layer-num-primary", "--threads", "--schedule"],
    "tune": ["--model", "--text", "--max-ppl-increase", "--confidence", "--out", "--policies", "--error", "--seq-len",
             "--num-sequences", "--min-batches", "--max-text-tokens", "--threads"],
}


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    assert SERE.is_file(), f"{SERE} is missing: reinstall the package (pip install --no-build-isolation -e .)"
    return subprocess.run([str(SERE), *args], capture_output=True, text=True, timeout=timeout)


def option_help(help_text: str) -> dict[str, str]:
    """{option: its help text} from argparse's `options:` section (continuation lines joined)."""
    section = help_text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    entries: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        match = re.match(r"^  (-[^\s,]+)(?:, (--\S+))?((?: \S+)*)(?:\s{2,}(.*))?$", line)
        if match:
            current = match.group(2) or match.group(1)
            entries[current] = match.group(4) or ""
        elif current is not None:
            entries[current] = (entries[current] + " " + line.strip()).strip()
    return entries


def test_sere_help_lists_every_command_with_one_line():
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: sere ")
    commands = proc.stdout.split("\ncommands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split()[0] for line in commands] == ["calibrate", "substitution", "evaluate", "tune"]
    assert all(len(line.split()) > 3 for line in commands), commands  # a summary after each name


@pytest.mark.parametrize("command", list(OPTIONS))
def test_command_help_names_the_command_and_explains_every_option(command):
    proc = run(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: sere {command} ")
    helps = option_help(proc.stdout)
    assert sorted(helps) == sorted(["--help"] + OPTIONS[command])
    too_short = {opt: text for opt, text in helps.items() if len(text.split()) < 5}
    assert not too_short, f"options without a real help text: {too_short}"


def test_numeric_options_state_their_default_or_range():
    helps = option_help(run("calibrate", "--help").stdout)
    assert "default: 16384" in helps["--tokens"] and ">= 1" in helps["--tokens"]
    helps = option_help(run("evaluate", "--help").stdout)
    assert "(0, 1]" in helps["--tolerance"] and "default: 1.0" in helps["--tolerance"]
    assert "[0, 1]" in helps["--threshold"] and "default: 64" in helps["--seq-len"]


def test_unknown_or_missing_command_exits_2_with_a_message():
    proc = run("frobnicate")
    assert proc.returncode == 2
    assert "invalid choice: 'frobnicate'" in proc.stderr and "calibrate" in proc.stderr
    proc = run()
    assert proc.returncode == 2 and "required: <command>" in proc.stderr


def test_a_bad_option_is_reported_under_the_commands_name():
    proc = run("calibrate", "--model", "m", "--data", "d", "--tokens", "0")
    assert proc.returncode == 2
    assert "sere calibrate: error: --tokens must be >= 1, got 0" in proc.stderr


@pytest.mark.parametrize("module, prog", [("sere.calibrate", "python -m sere.calibrate"),
                                          ("sere", "python -m sere")])
def test_python_dash_m_still_works(module, prog):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {prog} ")


def test_sere_calibrate_end_to_end_on_a_tiny_model(tmp_path):
    """Expert 1 is a copy of expert 0 in every layer: their similarity must come out as 1."""
    model = tiny_moe("mixtral")
    with torch.no_grad():
        for b in find_moe_blocks(model):
            b.experts.gate_up_proj[1] = b.experts.gate_up_proj[0]
            b.experts.down_proj[1] = b.experts.down_proj[0]
    model_dir = save_tiny_model(tmp_path / "m", model=model)
    (tmp_path / "c.txt").write_text(SAMPLE_TEXT[:4000])
    out = tmp_path / "sidecar.safetensors"
    proc = run("calibrate", "--model", str(model_dir), "--data", str(tmp_path / "c.txt"), "--metric", "frobenius",
               "--tokens", "256", "--seq-len", "64", "--chunk-tokens", "32", "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    sidecar = load_sidecar(out, num_experts=8, layer_ids=[0, 1])
    assert sidecar.metric == "frobenius" and sidecar.num_tokens == 256
    for sim in sidecar.matrices.values():
        assert sim[0, 1] == pytest.approx(1.0, abs=1e-5) and sim[1, 0] == pytest.approx(1.0, abs=1e-5)
        assert float(sim[2:, 2:].fill_diagonal_(0).max()) < 0.999
    # a pipe, not a terminal: plain lines, no bar redraws; 4 windows, 2 layers, 8 chunks per layer
    assert "\r" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert "[capture] forward pass: window 4/4 (100%)" in proc.stderr
    assert any(line.startswith("[calibrate] frobenius: layer 2/2 (100%)") for line in lines)
    chunk_lines = [line for line in lines if line.startswith("[calibrate] layer 0 frobenius: chunk")]
    assert [line.split()[5] for line in chunk_lines] == ["2/8", "4/8", "6/8", "8/8"]  # every 25%


# ---- sere.progress ---------------------------------------------------------------------------


class FakeClock:
    """A `time.monotonic` whose value the test sets."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(sere.progress.time, "monotonic", fake)
    return fake


def test_plain_lines_every_tenth_of_the_total(clock):
    lines = []
    for _ in progress(range(1000), desc="[t] work", unit="item", sink=lines.append, tty=False):
        pass
    # 10% marks at 100, 200, ..., 1000: ten lines, the last one at 100%, no extra final line
    assert len(lines) == 10
    assert lines[0] == "[t] work: item 100/1000 (10%), 0s elapsed, ETA 0s"
    assert lines[-1] == "[t] work: item 1000/1000 (100%), 0s elapsed"


def test_plain_lines_every_interval_when_the_total_is_unknown(clock):
    lines = []
    bar = Progress(None, "[t] stream", unit="token", sink=lines.append, interval_s=30.0, tty=False)
    for second in range(1, 101):  # one unit per second for 100 s
        clock.now = float(second)
        bar.update()
    bar.close()
    # lines at 30, 60 and 90 s, then the final count at close
    assert lines == ["[t] stream: token 30, 30s elapsed", "[t] stream: token 60, 1m00s elapsed",
                     "[t] stream: token 90, 1m30s elapsed", "[t] stream: token 100, 1m40s elapsed"]


def test_line_count_is_bounded_by_fractions_plus_intervals(clock):
    lines = []
    bar = Progress(50, "[t] slow", sink=lines.append, every=0.1, interval_s=30.0, tty=False)
    for k in range(1, 51):  # 7 s per unit: 350 s in all
        clock.now = 7.0 * k
        bar.update()
    bar.close()
    assert lines[-1].startswith("[t] slow: item 50/50 (100%)")
    assert 10 <= len(lines) <= 10 + 350 // 30 + 1


def test_eta_uses_the_rate_of_this_run_after_a_resume(clock):
    lines = []
    bar = Progress(10, "[t] train", initial=5, unit="step", sink=lines.append, tty=False)
    clock.now = 4.0
    bar.update()  # step 6 of 10 after 4 s: 4 steps left at 4 s each
    assert lines == ["[t] train: step 6/10 (60%), 4s elapsed, ETA 16s"]


def test_terminal_gets_a_tqdm_bar_and_no_plain_lines(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    lines = []
    for _ in progress(range(10), desc="[t] bar", unit="step", sink=lines.append):
        pass
    assert lines == []
    drawn = terminal.getvalue()
    assert "\r" in drawn and "[t] bar: 100%" in drawn and "10/10" in drawn


def test_disabled_progress_reports_nothing(clock, monkeypatch):
    lines = []
    bar = Progress(4, "[t] rank 1", sink=lines.append, enabled=False, tty=False)
    for _ in range(4):
        bar.update()
    bar.close()
    assert lines == [] and bar.count == 4


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="every must be in"):
        Progress(10, every=0.0)
    with pytest.raises(ValueError, match="total must be"):
        Progress(-1)


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (45, "45s"), (185, "3m05s"), (7620, "2h07m")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text
