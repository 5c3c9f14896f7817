#!/usr/bin/env bash
# Colab-like check (issue 26): a venv that already has older transformers/diffusers/accelerate/peft/datasets/
# huggingface_hub installed, as Colab and most GPU images do, then the notebooks' own install line (read from
# examples/notebooks/quickstart.ipynb, with this clone in place of the GitHub URL), then `import trl_visual` and a
# 2-step run. It passes only if that install line brings everything trl_visual needs.
#
#   bash .ci/colab_like.sh            # about 10 minutes on a loaded 2-core machine (two installs); not in .ci/run
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${COLAB_LIKE_VENV:-/tmp/trl-visual-colab-like}
# what a Colab runtime ships preinstalled (older than our floors on purpose); torch as in the other jobs
PREINSTALLED=${COLAB_LIKE_PREINSTALLED:-"transformers==4.57.6 diffusers==0.33.1 accelerate==1.8.1 peft==0.15.2 datasets==4.0.0 huggingface_hub==0.34.4"}
rm -rf "$VENV"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q torch==2.13.0
# shellcheck disable=SC2086
pip install -q $PREINSTALLED
echo "preinstalled: $PREINSTALLED"
# the notebook's install line, as the notebook runs it (same requirement string), from this clone
REQUIREMENT=$(python - "$REPO" <<'PY'
import json
import re
import sys

cells = json.load(open("examples/notebooks/quickstart.ipynb"))["cells"]
source = next("".join(c["source"]) for c in cells if c["cell_type"] == "code" and '"install"' in "".join(c["source"]))
(requirement,) = re.findall(r'"(trl_visual[^"]*@ git\+[^"]+)"', source)
print(re.sub(r"git\+\S+", f"file://{sys.argv[1]}", requirement))
PY
)
echo "notebook install line: pip install -q \"$REQUIREMENT\""
pip install -q "$REQUIREMENT"
python - <<'PY'
from importlib.metadata import version

import trl_visual
from trl_visual import DiffusionGRPOTrainer  # noqa: F401

print("after the install line:", ", ".join(f"{n} {version(n)}" for n in ("trl", "transformers", "diffusers", "accelerate", "peft", "datasets", "huggingface_hub")))
PY
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
cd "$OUT"
HF_HUB_OFFLINE=1 trl-visual grpo --model_name_or_path tiny:shapes --dataset_name builtin:shapes \
    --reward_funcs shapes_adherence --max_steps 2 --output_dir "$OUT/run"
echo "colab-like check passed"
