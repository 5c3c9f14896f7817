"""How long ``trl-visual`` takes to answer before any training: help, cold and warm, and one-line errors.

Issue 26's goals: an argument error in ≤ 2 s and a cold ``trl-visual grpo --help`` in ≤ 5 s, on a quiet machine.
Each command runs in a fresh process (wall time, the median of ``--repeats`` runs). "cold" help starts from an
empty help cache (``TRL_VISUAL_CACHE`` pointed at a new folder), as right after an install: it prints the
shipped help (``trl_visual/cli_help/``) when that was made for the installed versions, else renders it from the
real parser (importing transformers), which "rendered" times on its own; "warm" reads the cached text. The errors
are answered by :mod:`trl_visual.preflight` before torch is imported (the typo with a cold cache too: the shipped
names).

Run::

    python benchmarks/cli_startup.py            # prints one line per command
    python benchmarks/cli_startup.py --repeats 5

On a loaded machine the numbers grow with the load; compare them only with runs on the same machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "examples", "configs", "tiny_quickstart.yaml")


RENDER = "from trl_visual.cli import render_help; print(render_help('grpo'))"
"""What a cold ``--help`` runs where the shipped help does not apply (other transformers or trl versions)."""


def timed(args: list[str], env: dict[str, str], cwd: str) -> tuple[float, int]:
    """Wall seconds and exit status of ``python -m trl_visual.cli *args`` (``python -c CODE`` for ``-c``)."""
    command = [sys.executable, *args] if args[0] == "-c" else [sys.executable, "-m", "trl_visual.cli", *args]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - start, result.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    work = tempfile.mkdtemp(prefix="trl-visual-startup-")
    with open(os.path.join(work, "my_prompts.txt"), "w") as handle:
        handle.write("a cat\n")
    base = {**os.environ, "HF_HUB_OFFLINE": "1"}
    quick = ["--config", QUICKSTART, "--output_dir", os.path.join(work, "run")]
    cases = {
        "grpo --help (cold cache)": (["grpo", "--help"], "cold"),
        "grpo --help (warm cache)": (["grpo", "--help"], "warm"),
        "grpo --help (rendered, no shipped help)": (["-c", RENDER], "cold"),
        "error: --dataset_name my_prompts": (["grpo", *quick, "--dataset_name", "my_prompts"], "warm"),
        "error: --learning_rat (typo)": (["grpo", *quick, "--learning_rat", "1"], "warm"),
        "error: --learning_rat (cold cache)": (["grpo", *quick, "--learning_rat", "1"], "cold"),
        "error: Hub id offline": (["grpo", *quick, "--dataset_name", "someone/prompts"], "warm"),
    }
    warm_cache = os.path.join(work, "cache-warm")
    timed(["grpo", "--help"], {**base, "TRL_VISUAL_CACHE": warm_cache}, work)  # fills it
    for name, (args, cache) in cases.items():
        times = []
        for repeat in range(repeats):
            folder = os.path.join(work, f"cache-cold-{repeat}") if cache == "cold" else warm_cache
            seconds, status = timed(args, {**base, "TRL_VISUAL_CACHE": folder}, work)
            times.append(seconds)
        print(f"{name:<40} {statistics.median(times):6.2f} s (median of {repeats}; exit status {status})")


if __name__ == "__main__":
    main()
