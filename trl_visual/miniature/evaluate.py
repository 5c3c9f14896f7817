"""Measure the miniature world: the classifier on held-out scenes, and how well ``tiny:shapes`` follows prompts.

Usage::

    python -m trl_visual.miniature.evaluate --num_scenes 1024 --samples_per_prompt 2

prints the classifier's accuracy per attribute on freshly rendered scenes (a seed the training never used),
then, at CFG 1 and CFG 4, the accuracy of each attribute of ``tiny:shapes`` samples for the 96 full prompts as
judged by the classifier, and their mean ``shapes_adherence``.
"""

from __future__ import annotations

import argparse
import random

import torch

from .classifier import ShapesClassifier, load_classifier
from .pipeline import T5_MAX_LENGTH, load_shapes_pipeline
from .reward import ShapesAdherence
from .scenes import ATTRIBUTES, full_prompts, parse_prompt, render_batch

HELD_OUT_SEED = 12345


def classifier_accuracy(
    classifier: ShapesClassifier, num_scenes: int = 512, seed: int = HELD_OUT_SEED
) -> dict[str, float]:
    """Fraction of freshly rendered scenes whose attribute the classifier gets right, per attribute."""
    images, scenes = render_batch(num_scenes, torch.Generator().manual_seed(seed), random.Random(seed))
    predicted = classifier.predict(images)
    return {
        name: sum(p == getattr(s, name) for p, s in zip(predicted[name], scenes)) / num_scenes
        for name in ATTRIBUTES
    }


@torch.no_grad()
def sample(
    pipeline, prompts: list[str], guidance_scale: float, num_inference_steps: int = 20, seed: int = 0
) -> torch.Tensor:
    """Images ``(B, 3, 32, 32)`` in [0, 1] of ``prompts`` from the pipeline's own Euler sampler."""
    generator = torch.Generator().manual_seed(seed)
    return pipeline(
        prompt=prompts,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        max_sequence_length=T5_MAX_LENGTH,
        generator=generator,
        output_type="pt",
    ).images


def prompt_following(reward: ShapesAdherence, prompts: list[str], images: torch.Tensor) -> dict[str, float]:
    """Per attribute, the fraction of images whose classified value is the one the prompt names (over the
    prompts that name it), and the mean ``shapes_adherence``."""
    predicted = reward.classifier.predict(images)
    named = [parse_prompt(p) for p in prompts]
    result = {}
    for name in ATTRIBUTES:
        hits = [predicted[name][i] == n[name] for i, n in enumerate(named) if name in n]
        if hits:
            result[name] = sum(hits) / len(hits)
    result["adherence"] = sum(reward(prompts, images)) / len(prompts)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_scenes", type=int, default=1024)
    parser.add_argument("--samples_per_prompt", type=int, default=2)
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reward = ShapesAdherence()
    print(
        "classifier on held-out scenes:", classifier_accuracy(load_classifier(), args.num_scenes), flush=True
    )
    pipeline = load_shapes_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    prompts = full_prompts() * args.samples_per_prompt
    for scale in args.guidance_scales:
        images = sample(pipeline, prompts, scale)
        print(f"tiny:shapes at CFG {scale}:", prompt_following(reward, prompts, images), flush=True)


if __name__ == "__main__":
    main()
