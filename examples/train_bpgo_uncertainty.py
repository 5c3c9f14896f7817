"""BPGO with the uncertainty-aware RAS on the miniature world: rewards that say how unsure they are.

A reward may score each sample several ways (its *interpretations*); the trainer trains on their mean, and
``ras_mode="uncertainty"`` weighs each group by how little of its spread is disagreement between them
(``docs/bpgo.md``). Three ways to get interpretations, one per ``--source``, each runnable offline in a few
minutes on a CPU with ``tiny:shapes``, on full captions ("a small red circle on the left") and partial ones
("a red shape"):

    python examples/train_bpgo_uncertainty.py --source draws     # the judge completes a partial caption 4 ways
    python examples/train_bpgo_uncertainty.py --source variants  # a prompt_variants column of paraphrases
    python examples/train_bpgo_uncertainty.py --source ensemble  # two rewards as interpretations of one

It prints the mean ambiguity share of the groups and the range of their RAS weights (mean 1 each step). The same
from the command line, with this file's ``judge`` (``ShapesJudge(num_draws=4)``) as the reward:

    trl-visual bpgo --model_name_or_path tiny:shapes --dataset_name builtin:shapes-ambiguous \\
        --reward_funcs examples/train_bpgo_uncertainty.py:judge --ras_mode uncertainty --prior_source base_model
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset

from trl_visual.data import load_prompts
from trl_visual.miniature import GRPO_DEFAULTS
from trl_visual.miniature.reward import ShapesJudge
from trl_visual.miniature.scenes import parse_prompt
from trl_visual.trainer.bpgo_config import BPGOConfig
from trl_visual.trainer.bpgo_trainer import BPGOTrainer

judge = ShapesJudge(num_draws=4)
"""The judge with 4 guesses per sample, for ``--reward_funcs examples/train_bpgo_uncertainty.py:judge``."""

SHAPES = ("circle", "square", "triangle")


def paraphrases(prompt: str) -> list[str]:
    """Three readings of a caption: one per shape when it leaves the shape open ("a red shape" → "a red circle",
    "a red square", "a red triangle"), the caption itself three times when it names one."""
    if "shape" in parse_prompt(prompt) or "shape" not in prompt:
        return [prompt] * len(SHAPES)
    return [prompt.replace("shape", shape) for shape in SHAPES]


def dataset(source: str) -> Dataset:
    """Every 8th full caption and every 8th partial one; with ``source="variants"`` their paraphrases."""
    prompts = (
        load_prompts("builtin:shapes")["prompt"][::8]
        + load_prompts("builtin:shapes-ambiguous")["prompt"][::8]
    )
    columns = {"prompt": prompts}
    if source == "variants":
        columns["prompt_variants"] = [paraphrases(p) for p in prompts]
    return Dataset.from_dict(columns)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", default="draws", choices=["draws", "variants", "ensemble"])
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--consistency", action="store_true", help="multiply by 2Φ(z) against the anchor")
    parser.add_argument("--output_dir", default="bpgo-uncertainty-output")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rewards = {
        "draws": judge,
        "variants": "shapes_adherence",
        "ensemble": ["shapes_adherence", "shapes_judge"],
    }
    settings = {k: v for k, v in GRPO_DEFAULTS.items() if k in BPGOConfig.__dataclass_fields__}
    uncertainty = dict(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=32,
        eval_strategy="no",
        eval_on_start=False,
        save_strategy="no",
        report_to="none",
        prior_source="base_model",  # the fixed anchor: the base model's mean and variance per prompt
        prior_num_rollouts=4,
        ras_mode="uncertainty",
        ras_consistency=args.consistency,
        reward_ensemble=args.source == "ensemble",
    )
    trainer = BPGOTrainer(
        model="tiny:shapes",
        reward_funcs=rewards[args.source],
        args=BPGOConfig(**{**settings, **uncertainty}),
        train_dataset=dataset(args.source),
    )
    trainer.train()
    shares = [e["ambiguity_share_mean"] for e in trainer.state.log_history if "ambiguity_share_mean" in e]
    low = [e["bpgo/ras_weight_min"] for e in trainer.state.log_history if "bpgo/ras_weight_min" in e]
    high = [e["bpgo/ras_weight_max"] for e in trainer.state.log_history if "bpgo/ras_weight_max" in e]
    figures = {"ambiguity_share": sum(shares) / len(shares), "weight_min": min(low), "weight_max": max(high)}
    print(
        f"mean ambiguity share {figures['ambiguity_share']:.2f}; RAS weights from {figures['weight_min']:.2f} "
        f"to {figures['weight_max']:.2f} (mean 1 each step)"
    )
    return figures


if __name__ == "__main__":
    main()
