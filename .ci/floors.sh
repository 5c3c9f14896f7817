#!/usr/bin/env bash
# The floors job (issue 26): a fresh venv with exactly the dependency floors setup.cfg declares
# (.ci/floors-constraints.txt, generated from it), then `import trl_visual`, the README's quick start for 2 steps and
# a fast subset of the tests. The newest releases stay covered by the main job (.ci/run's first command).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-floors
rm -rf "$VENV"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q torch==2.13.0
pip install -q -c .ci/floors-constraints.txt -e . "pytest>=8" pytest-xdist
python .ci/make_floors_constraints.py --check
python - <<'PY'
from importlib.metadata import version
from pathlib import Path

for line in Path(".ci/floors-constraints.txt").read_text().splitlines():
    if line and not line.startswith("#"):
        name, floor = line.split("==")
        assert version(name) == floor, f"{name} {version(name)} installed, the floor is {floor}"
import trl_visual
from trl_visual import DiffusionGRPOTrainer  # noqa: F401  (the trainer's imports, not only the package's)

print("floors installed and imported:", ", ".join(f"{n} {version(n)}" for n in ("trl", "transformers", "diffusers", "accelerate", "peft", "datasets", "huggingface_hub", "safetensors", "torch")))
PY
export HF_HUB_OFFLINE=1
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
trl-visual grpo --model_name_or_path tiny:shapes --dataset_name builtin:shapes --reward_funcs shapes_adherence \
    --max_steps 2 --output_dir "$OUT/quickstart"
python -m pytest -n 2 -q -p no:cacheprovider tests/test_upstream.py tests/test_floors.py tests/test_core_advantages.py \
    tests/test_core_sde.py tests/test_checkpoints.py tests/test_trainer.py tests/test_reward_models.py \
    "tests/test_miniature.py::test_tiny_shapes_loads_offline_and_follows_its_prompts" \
    tests/test_miniature.py::test_text_towers_are_the_shipped_weights_whatever_the_installed_initialisation \
    tests/test_cli.py::test_tiny_shapes_run_prints_the_eval_reward_before_and_after_training \
    tests/test_trackers.py::test_trackio_logs_locally_unless_a_space_is_named -m "not slow"
