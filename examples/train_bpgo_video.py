"""Train a video model with BPGO (Bayesian Prior-Guided Optimization).

Runs offline on a CPU in well under a minute with the built-in tiny Wan text-to-video pipeline and the
red-channel reward (scored per frame, then averaged over the video):

    python examples/train_bpgo_video.py

With a real model, prompts and a video reward (on a GPU):

    python examples/train_bpgo_video.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers \\
        --dataset user/video-prompts --reward clipscore_video --max_steps 500 --output_dir wan-bpgo

Image-to-video: ``--model tiny:wan-i2v`` (or a Wan I2V checkpoint) with a data set that has an ``image``
column; the tiny run makes one coloured image per prompt. The trained LoRA loads with
``WanPipeline.from_pretrained(...).load_lora_weights(output_dir)``.
"""

from __future__ import annotations

import argparse

from datasets import Dataset, load_dataset
from peft import LoraConfig
from PIL import Image

from trl_visual.trainer.bpgo_config import BPGOConfig
from trl_visual.trainer.bpgo_trainer import BPGOTrainer

QUICK_START_PROMPTS = ["a cat", "a dog", "a red car", "a tree", "a house", "a bird", "a boat", "a flower"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="tiny:wan", help="tiny:wan, tiny:wan-i2v, a Hub id or a local folder"
    )
    parser.add_argument("--dataset", default=None, help="a Hub data set or local file with a 'prompt' column")
    parser.add_argument("--reward", default=["red_channel"], nargs="+", help="registered reward names")
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--output_dir", default="bpgo-video-output")
    return parser.parse_args()


def quick_start_dataset(model: str) -> Dataset:
    """The tiny prompts; image-to-video also gets one plain coloured conditioning image per prompt."""
    data: dict[str, list] = {"prompt": QUICK_START_PROMPTS}
    if "i2v" in model:
        colours = [(40 * i % 256, 90 * i % 256, 150 * i % 256) for i in range(len(QUICK_START_PROMPTS))]
        data["image"] = [Image.new("RGB", (32, 32), colour) for colour in colours]
    return Dataset.from_dict(data)


def training_settings(tiny: bool) -> dict:
    """Settings for the tiny CPU run (a large step on a short schedule), or the BPGO paper's video settings."""
    if tiny:
        return dict(
            num_generations=8,
            per_device_train_batch_size=32,
            learning_rate=2e-2,
            guidance_scale=1.0,
            num_inference_steps=4,
            max_sequence_length=16,
            height=32,
            width=32,
            num_frames=5,
        )
    return dict(
        num_generations=8,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=4,
        learning_rate=1e-4,
        guidance_scale=5.0,
        negative_prompt="static, blurry, low quality, distorted",
        num_inference_steps=16,
        sde_type="dance_grpo",
        noise_level=0.25,
        timestep_fraction=0.6,
        init_same_noise=True,
        height=480,
        width=832,
        num_frames=33,
        bf16=True,
        activation_checkpointing=True,
        vae_tiling=True,
    )


def main() -> None:
    args = parse_args()
    tiny = args.model.startswith("tiny:")
    dataset = (
        quick_start_dataset(args.model) if args.dataset is None else load_dataset(args.dataset, split="train")
    )
    config = BPGOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        log_images=True,  # an animated GIF per logging step in output_dir/samples/
        num_images_to_log=4,
        logging_first_step=True,
        prior_source="ema",  # each prompt's prior is a moving average of its group rewards
        **training_settings(tiny),
    )
    trainer = BPGOTrainer(
        model=args.model,
        reward_funcs=args.reward,
        args=config,
        train_dataset=dataset,
        peft_config=LoraConfig(
            r=8 if tiny else 32,
            lora_alpha=8 if tiny else 64,
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"],
        ),
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    print(f"reward: first {rewards[0]:.4f}, last {rewards[-1]:.4f}; LoRA saved to {args.output_dir}")


if __name__ == "__main__":
    main()
