"""``benchmarks/gpu_check.py``: without a GPU it says so in one line; ``--smoke`` runs every row's code on the CPU
with shrunken architectures and prints one table whose every row has finite numbers."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ROWS = [
    "SD3.5-M 64² GRPO trainer",
    "SD3.5-M 64² reference loop",
    "SD3.5-M 64² BPGO",
    "SD3.5-M 64² ViPO, DINOv2-L",
    "SD3.5-M 64² GRPO, torch.compile",
    "FLUX.1-dev 64² LoRA, GC",
    "Wan2.1-1.3B T2V 5×32×32, GC",
]


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def test_without_a_gpu_one_line_says_so_and_names_smoke(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert "needs a CUDA GPU" in out.err and "--smoke" in out.err


def test_the_table_prints_a_dash_for_what_a_row_does_not_measure(gpu_check):
    rows = [gpu_check.Row("a", 1.5, "0.50× b", 0.125, 2.0, "x"), gpu_check.Row("b", 3.0)]
    lines = gpu_check.table(rows, "head").splitlines()
    assert lines[-2] == "| a | 1.500 | 0.50× b | 12.5 % | 2.0 | x |"
    assert lines[-1] == "| b | 3.000 | – | – | – |  |"


def numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.?\d*(?:e-?\d+)?|nan|inf", cell)]


@pytest.mark.slow
def test_smoke_prints_every_row_with_finite_numbers():
    """The whole command on the CPU (shrunk SD3.5-M with its reference loop, BPGO, ViPO with a shrunk DINOv2-L and
    a compiled denoiser; shrunk FLUX.1-dev and Wan2.1): every row present, every number finite and positive."""
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--steps", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("| ") and "contender" not in line]
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines}
    assert list(table) == ROWS
    for name, (seconds, ratio, mfu, peak, _) in table.items():
        measured = numbers(seconds) + numbers(peak) + numbers(mfu) + numbers(ratio)
        assert all(math.isfinite(x) and x > 0 for x in measured), (name, table[name])
        assert numbers(seconds) and numbers(peak), name
        if name.startswith("SD3.5-M") and "reference" not in name:
            assert ratio.endswith(("× reference", "× GRPO")) and numbers(mfu), name
