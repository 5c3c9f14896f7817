"""Train with ViPO: GRPO whose advantage is a perceptual map over latent positions.

Runs offline on the CPU by default: the tiny random SD3 pipeline (``tiny:sd3``, 32×32 images), the
``red_channel`` reward, and a tiny random DINOv2 built in code (patch 4, so the 32×32 samples give an 8×8
patch grid). With real models, on a GPU::

    python examples/train_vipo.py --model stabilityai/stable-diffusion-3.5-medium \\
        --backbone facebook/dinov2-large --reward hpsv2 --height 512 --width 512 --steps 500 --lr 1e-4

Heat-map overlays of the maps beside the samples are written to ``<output_dir>/samples/`` every
``--log-every`` steps; the ``vipo/map_mean``, ``vipo/map_std`` and ``vipo/map_fallbacks`` metrics go to the
log with GRPO's ones.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from peft import LoraConfig

from trl_visual.backbones import IMAGENET_MEAN, IMAGENET_STD, VisionBackbone
from trl_visual.testing import tiny_dinov2
from trl_visual.trainer.vipo_config import ViPOConfig
from trl_visual.trainer.vipo_trainer import ViPOTrainer

PROMPTS = ["a cat", "a dog", "a red car", "a tree"]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]


def tiny_backbone() -> VisionBackbone:
    """A random-weight DINOv2 small enough for the CPU: ViPO's plumbing without a download."""
    return VisionBackbone(tiny_dinov2(), image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny:sd3", help="'tiny:sd3', a Hub id or a local path")
    parser.add_argument(
        "--backbone", default=None, help="Hub id or local path (default: tiny DINOv2 in code)"
    )
    parser.add_argument("--reward", default="red_channel", help="a built-in reward name")
    parser.add_argument("--output-dir", default="vipo-out")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--lr", type=float, default=3e-2, help="3e-2 suits the tiny model; ~1e-4 for real ones"
    )
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--map-normalization", default="minmax", choices=["minmax", "mean_one"])
    parser.add_argument("--dense-level", default="position", choices=["position", "sample"])
    parser.add_argument("--log-every", type=int, default=10)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    tiny = args.model.startswith("tiny:")
    if tiny:
        torch.set_num_threads(1)  # the tiny model runs fastest on one thread
    config = ViPOConfig(
        output_dir=args.output_dir,
        backbone=args.backbone or ViPOConfig.backbone,
        map_normalization=args.map_normalization,
        dense_level=args.dense_level,
        num_generations=8,
        per_device_train_batch_size=32 if tiny else 8,
        learning_rate=args.lr,
        max_steps=args.steps,
        height=args.height,
        width=args.width,
        num_inference_steps=4 if tiny else 10,
        guidance_scale=1.0 if tiny else 4.5,
        max_sequence_length=16 if tiny else 256,
        log_images=True,
        logging_steps=args.log_every,
        save_strategy="no",
        report_to="none",
    )
    trainer = ViPOTrainer(
        model=args.model,
        reward_funcs=args.reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=8, lora_alpha=8, target_modules=LORA_TARGETS),
        backbone=None if args.backbone else tiny_backbone(),
    )
    trainer.train()
    trainer.save_model(f"{args.output_dir}/final")
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    print(f"reward: first log {rewards[0]:.4f}, last log {rewards[-1]:.4f}; LoRA in {args.output_dir}/final")


if __name__ == "__main__":
    main()
