"""Train a diffusion model with BPGO (Bayesian Prior-Guided Optimization).

Runs offline in well under a minute on a CPU with the built-in tiny SD3 and the red-channel reward,
in the paper's form (sigmoid RAS, auxiliary CRT) with a moving-average prior per prompt:

    python examples/train_bpgo.py

The released code's form, with priors estimated from the base model before training:

    python examples/train_bpgo.py --prior_source base_model --ras_mode posterior --crt_mode replace

(the released CRT multiplies by the reward, so it needs positive rewards such as HPSv2 or PickScore;
``red_channel`` is negative, and the trainer warns). With a real model (on a GPU):

    python examples/train_bpgo.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset user/prompts --reward pickscore --max_steps 1000 --output_dir sd35-bpgo
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig

from trl_visual.trainer.bpgo_config import CRT_MODES, PRIOR_SOURCES, RAS_MODES, BPGOConfig
from trl_visual.trainer.bpgo_trainer import BPGOTrainer

QUICK_START_PROMPTS = ["a cat", "a dog", "a red car", "a tree", "a house", "a bird", "a boat", "a flower"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny:sd3", help="tiny:sd3, a Hub id or a local pipeline folder")
    parser.add_argument("--dataset", default=None, help="a Hub data set or local file with a 'prompt' column")
    parser.add_argument("--reward", default="red_channel", nargs="+", help="registered reward names")
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--output_dir", default="bpgo-output")
    parser.add_argument("--prior_source", default="ema", choices=PRIOR_SOURCES)
    parser.add_argument("--ras_mode", default="sigmoid", choices=RAS_MODES)
    parser.add_argument("--crt_mode", default="auxiliary", choices=CRT_MODES)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    tiny = args.model.startswith("tiny:")
    if tiny:
        torch.set_num_threads(1)  # the tiny model is fastest on one thread
    dataset = (
        Dataset.from_dict({"prompt": QUICK_START_PROMPTS})
        if args.dataset is None
        else load_dataset(args.dataset, split="train")
    )
    # The tiny model learns in seconds with a large step on a short schedule; real models use the usual
    # settings (the released code's: DanceGRPO SDE, 16 steps, timestep_fraction 0.6, shared group noise).
    settings = (
        dict(
            num_generations=8,
            per_device_train_batch_size=32,
            learning_rate=3e-2,
            guidance_scale=1.0,
            num_inference_steps=4,
            max_sequence_length=16,
            height=32,
            width=32,
        )
        if tiny
        else dict(
            num_generations=8,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=4,
            learning_rate=3e-4,
            num_inference_steps=16,
            sde_type="dance_grpo",
            noise_level=0.3,
            timestep_fraction=0.6,
            timestep_selection="random",
            init_same_noise=True,
            bf16=True,
            activation_checkpointing=True,
        )
    )
    trainer = BPGOTrainer(
        model=args.model,
        reward_funcs=args.reward,
        args=BPGOConfig(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            save_strategy="no",
            report_to="none",
            logging_steps=1,
            prior_source=args.prior_source,
            ras_mode=args.ras_mode,
            crt_mode=args.crt_mode,
            **settings,
        ),
        train_dataset=dataset,
        peft_config=LoraConfig(
            r=8 if tiny else 32,
            lora_alpha=8 if tiny else 64,
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"],
        ),
    )
    trainer.train()
    trainer.save_model(f"{args.output_dir}/final")
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    weights = [
        entry["bpgo/ras_weight_mean"]
        for entry in trainer.state.log_history
        if "bpgo/ras_weight_mean" in entry
    ]
    window = max(1, min(5, len(rewards) // 2))
    print(f"reward at the start (mean of the first {window} steps): {sum(rewards[:window]) / window:.4f}")
    print(f"reward at the end   (mean of the last {window} steps):  {sum(rewards[-window:]) / window:.4f}")
    print(f"mean RAS weight over the run: {sum(weights) / len(weights):.3f}")
    print(f"LoRA weights saved to {args.output_dir}/final (load with pipe.load_lora_weights)")


if __name__ == "__main__":
    main()
