"""Train a diffusion model with GRPO.

Runs offline in about a minute on a CPU with the built-in tiny SD3 and the red-channel reward:

    python examples/train_grpo.py

With a real model, data set and reward (on a GPU):

    python examples/train_grpo.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset user/prompts --reward pickscore --max_steps 1000 --output_dir sd35-grpo
"""

from __future__ import annotations

import argparse

from datasets import Dataset, load_dataset
from peft import LoraConfig

from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer

QUICK_START_PROMPTS = ["a cat", "a dog", "a red car", "a tree", "a house", "a bird", "a boat", "a flower"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny:sd3", help="tiny:sd3, a Hub id or a local pipeline folder")
    parser.add_argument("--dataset", default=None, help="a Hub data set or local file with a 'prompt' column")
    parser.add_argument("--reward", default="red_channel", nargs="+", help="registered reward names")
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--output_dir", default="grpo-output")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    tiny = args.model.startswith("tiny:")
    dataset = (
        Dataset.from_dict({"prompt": QUICK_START_PROMPTS})
        if args.dataset is None
        else load_dataset(args.dataset, split="train")
    )
    # The tiny model learns in seconds with a large step on a short schedule; real models use the usual settings.
    settings = (
        dict(
            num_generations=8,
            per_device_train_batch_size=32,
            learning_rate=3e-2,
            guidance_scale=1.0,
            num_inference_steps=4,
            max_sequence_length=16,
        )
        if tiny
        else dict(
            num_generations=8,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=4,
            learning_rate=3e-4,
            num_inference_steps=10,
            bf16=True,
            activation_checkpointing=True,
        )
    )
    trainer = DiffusionGRPOTrainer(
        model=args.model,
        reward_funcs=args.reward,
        args=DiffusionGRPOConfig(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            save_strategy="no",
            report_to="none",
            logging_steps=1,
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
    window = max(1, min(5, len(rewards) // 2))
    print(f"reward at the start (mean of the first {window} steps): {sum(rewards[:window]) / window:.4f}")
    print(f"reward at the end   (mean of the last {window} steps):  {sum(rewards[-window:]) / window:.4f}")
    print(f"LoRA weights saved to {args.output_dir}/final (load with pipe.load_lora_weights)")


if __name__ == "__main__":
    main()
