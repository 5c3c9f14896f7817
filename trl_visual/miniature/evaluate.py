"""Measure the miniature world: the classifier on held-out scenes, and how well ``tiny:shapes`` follows prompts.

Usage::

    python -m trl_visual.miniature.evaluate --num_scenes 1024 --samples_per_prompt 2
    python -m trl_visual.miniature.evaluate --model tiny:shapes-pairs --samples_per_prompt 1

prints the classifier's accuracy per attribute on freshly rendered scenes (a seed the training never used),
then, at CFG 1 and CFG 4, the accuracy of each attribute of the model's samples as judged by the classifier,
and their mean ``shapes_adherence``: for ``tiny:shapes`` over the 96 full prompts; for ``tiny:shapes-pairs``
over the 96 full one-shape prompts and, separately, the 576 full two-shape prompts (each shape judged on the
view of its half, :func:`~trl_visual.miniature.reward.shape_views`).
"""

from __future__ import annotations

import argparse
import random

import torch

from .classifier import WEIGHTS_DIR, ShapesClassifier
from .pipeline import ONE_SHAPE, SHAPES_MODELS, load_shapes_pipeline
from .reward import ShapesAdherence, shape_views
from .scenes import ATTRIBUTES, full_prompts, pair_prompts, parse_objects, render_batch

HELD_OUT_SEED = 12345


def classifier_accuracy(
    classifier: ShapesClassifier,
    num_scenes: int = 512,
    seed: int = HELD_OUT_SEED,
    two_shape_fraction: float = 0.0,
    backgrounds: bool = False,
) -> dict[str, float]:
    """Fraction of the shapes of freshly rendered scenes (over structured backgrounds with ``backgrounds``) whose
    attribute the classifier gets right (on the view of its half, in a two-shape scene), per attribute."""
    generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    images, scenes = render_batch(num_scenes, generator, rng, two_shape_fraction, backgrounds)
    views, _ = shape_views(images, [[shape.position for shape in scene.objects] for scene in scenes])
    predicted = classifier.predict(views)
    shapes = [shape for scene in scenes for shape in scene.objects]
    return {
        name: sum(p == getattr(shape, name) for p, shape in zip(predicted[name], shapes)) / len(shapes)
        for name in ATTRIBUTES
    }


@torch.no_grad()
def sample(
    pipeline,
    prompts: list[str],
    guidance_scale: float,
    num_inference_steps: int = 20,
    seed: int = 0,
    batch_size: int = 192,
) -> torch.Tensor:
    """Images ``(B, 3, 32, 32)`` in [0, 1] of ``prompts`` from the pipeline's own Euler sampler, in batches of
    ``batch_size`` prompts (T5 reads as many tokens as the pipeline's T5 tokenizer holds: what it was trained
    on)."""
    generator = torch.Generator().manual_seed(seed)
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    return torch.cat(
        [
            pipeline(
                prompt=batch,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                max_sequence_length=pipeline.tokenizer_3.model_max_length,
                generator=generator,
                output_type="pt",
            ).images
            for batch in batches
        ]
    )


def prompt_following(reward: ShapesAdherence, prompts: list[str], images: torch.Tensor) -> dict[str, float]:
    """Per attribute, the fraction of the shapes the prompts name whose classified value (on the view of its
    half, for a two-shape prompt) is the one named (over the shapes whose phrase names it), and the mean
    ``shapes_adherence``. With two-shape prompts, also ``<attribute>_swapped`` for colour and shape: the fraction
    of shapes drawn with the value the *other* phrase names instead of their own (attribute binding failures)."""
    objects = [parse_objects(prompt) for prompt in prompts]
    views, _ = shape_views(images, [[named.get("position") for named in shapes] for shapes in objects])
    predicted = reward.classifier.predict(reward.classifier_input(views))
    hits: dict[str, list[bool]] = {name: [] for name in ATTRIBUTES}
    swapped: dict[str, list[bool]] = {"colour_swapped": [], "shape_swapped": []}
    judged = [
        (named, other, len(shapes)) for shapes in objects for named, other in zip(shapes, reversed(shapes))
    ]
    for k, (named, other, count) in enumerate(judged):
        for name, value in named.items():
            hits[name].append(predicted[name][k] == value)
        for name in ("colour", "shape"):
            if count == 2 and name in named and name in other:
                swapped[f"{name}_swapped"].append(predicted[name][k] == other[name] != named[name])
    result = {name: sum(h) / len(h) for name, h in {**hits, **swapped}.items() if h}
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
    parser.add_argument("--model", choices=tuple(SHAPES_MODELS), default=ONE_SHAPE.name)
    parser.add_argument("--weights_dir", default=None, help="default: the weights shipped with the package")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = SHAPES_MODELS[args.model]
    reward = ShapesAdherence(WEIGHTS_DIR / model.classifier_file)
    accuracy = classifier_accuracy(
        reward.classifier,
        args.num_scenes,
        two_shape_fraction=model.two_shape_fraction,
        backgrounds=model.backgrounds,
    )
    print("classifier on held-out scenes:", accuracy, flush=True)
    pipeline = load_shapes_pipeline(args.weights_dir, model=model)
    pipeline.set_progress_bar_config(disable=True)
    prompt_sets = {"one-shape": full_prompts()}
    if model.two_shape_fraction > 0:
        prompt_sets["two-shape"] = pair_prompts()
    for scale in args.guidance_scales:
        for kind, prompts in prompt_sets.items():
            prompts = prompts * args.samples_per_prompt
            images = sample(pipeline, prompts, scale)
            following = prompt_following(reward, prompts, images)
            print(f"{model.name}, {kind} prompts, CFG {scale}:", following, flush=True)


if __name__ == "__main__":
    main()
