"""A before/after picture of a GRPO run on ``tiny:shapes`` (or ``tiny:shapes-pairs``): the same prompts and the
same initial noise, the base model's samples above and the trained model's below, each captioned with its
``shapes_adherence``.

Usage::

    trl-visual grpo --model_name_or_path tiny:shapes --dataset_name builtin:shapes --reward_funcs shapes_adherence
    python -m trl_visual.miniature.before_after --run_dir tiny-shapes-grpo --out before_after.png
    python -m trl_visual.miniature.before_after --model tiny:shapes-pairs --run_dir tiny-shapes-pairs-grpo

``--run_dir`` is the run's ``output_dir`` (the trained denoiser is in its ``transformer/`` folder); where it holds
no run yet, the script trains one first, with the command above. The prompts are the first
``--num_prompts`` of the run's evaluation set (the ``test`` split of the model's prompt set: ``builtin:shapes``,
or ``builtin:shapes-pairs``), not picked by hand. Both
models sample with the pipeline's own Euler sampler, with the recipe's sampling steps and guidance scale
(:data:`~trl_visual.miniature.GRPO_DEFAULTS`: 4 steps, CFG 1).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..cli import run
from ..data import load_prompts
from ..images import to_pil
from . import GRPO_DEFAULTS, MINIATURE_MODELS
from .evaluate import sample
from .pipeline import ONE_SHAPE, SHAPES_MODELS, ShapesModel, build_shapes_pipeline, load_shapes_pipeline
from .reward import ShapesAdherence

SCALE = 3
"""Each 32×32 sample is drawn 3 times larger (nearest neighbour: its pixels stay visible)."""
TILE = 32 * SCALE
GAP = 6
LABEL_WIDTH = 84
LINE_HEIGHT = 14
CAPTION_HEIGHT = 16
FONT_SIZE = 11
PROMPT_CHARS_PER_LINE = 16


def eval_prompts(count: int, dataset_name: str = "builtin:shapes") -> list[str]:
    """The first ``count`` distinct prompts of the evaluation (``test``) split of ``dataset_name``."""
    prompts = list(dict.fromkeys(load_prompts(dataset_name, split="test")["prompt"]))
    return prompts[:count]


def trained_pipeline(run_dir: str | Path, base=None, model: ShapesModel = ONE_SHAPE):
    """``model`` (``tiny:shapes``) with the denoiser a full fine-tuning run saved in ``run_dir/transformer`` (the
    other parts, which GRPO does not train, are the base model's: ``base``'s when given)."""
    from diffusers import SD3Transformer2DModel

    folder = Path(run_dir) / "transformer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"No trained transformer in {folder}: pass the output_dir of a `trl-visual grpo --model_name_or_path "
            f"{model.name}` run (a LoRA run saves pytorch_lora_weights.safetensors instead: load it with "
            "pipe.load_lora_weights)."
        )
    base = base if base is not None else load_shapes_pipeline(model=model)
    transformer = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=base.transformer.dtype)
    return build_shapes_pipeline(transformer, base.vae, model)


def header_height(prompts: list[str]) -> int:
    """Pixels of the header row: the longest prompt, wrapped at :data:`PROMPT_CHARS_PER_LINE` characters (at
    least three lines, the height of the one-shape pictures)."""
    lines = max([3] + [len(textwrap.wrap(prompt, PROMPT_CHARS_PER_LINE)) for prompt in prompts])
    return lines * LINE_HEIGHT + 6


def grid_size(prompts: list[str]) -> tuple[int, int]:
    """(width, height) in pixels of the picture of ``prompts``: a label column and one column per prompt; a
    header row of prompts and two rows of captioned samples."""
    width = LABEL_WIDTH + len(prompts) * (TILE + GAP)
    height = header_height(prompts) + 2 * (TILE + CAPTION_HEIGHT + GAP)
    return width, height


def tile_box(row: int, column: int, header: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) pixels of the sample in ``row`` (0: base, 1: trained) and ``column``, below
    a header ``header`` pixels high."""
    left = LABEL_WIDTH + column * (TILE + GAP)
    top = header + row * (TILE + CAPTION_HEIGHT + GAP)
    return left, top, left + TILE, top + TILE


def render_grid(prompts: list[str], rows: list[tuple[str, torch.Tensor, list[float]]]) -> Image.Image:
    """Draw the picture: ``rows`` are (label, images ``(N, 3, H, W)`` in [0, 1], adherence per image), one column
    per prompt, each image captioned with its adherence and each row labelled with its mean."""
    canvas = Image.new("RGB", grid_size(prompts), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_SIZE)
    header = header_height(prompts)
    for column, prompt in enumerate(prompts):
        left = tile_box(0, column, header)[0]
        draw.multiline_text((left, 2), textwrap.fill(prompt, PROMPT_CHARS_PER_LINE), fill="black", font=font)
    for row, (label, images, scores) in enumerate(rows):
        top = tile_box(row, 0, header)[1]
        mean = sum(scores) / len(scores)
        draw.multiline_text((4, top + TILE // 3), f"{label}\nmean {mean:.2f}", fill="black", font=font)
        for column, (image, score) in enumerate(zip(images, scores)):
            left, _, _, bottom = tile_box(row, column, header)
            canvas.paste(to_pil(image).resize((TILE, TILE), Image.NEAREST), (left, top))
            draw.text((left, bottom + 2), f"adherence {score:.2f}", fill="black", font=font)
    return canvas


def before_after(
    base,
    trained,
    prompts: list[str],
    reward: ShapesAdherence,
    seed: int = 0,
    num_inference_steps: int = GRPO_DEFAULTS["num_inference_steps"],
    guidance_scale: float = GRPO_DEFAULTS["guidance_scale"],
    labels: tuple[str, str] = ("base", "trained"),
) -> Image.Image:
    """The picture of ``prompts`` sampled by the ``base`` and the ``trained`` pipelines from the same initial
    noise (``seed``), scored by ``reward``."""
    rows = []
    for label, pipeline in zip(labels, (base, trained)):
        images = sample(pipeline, prompts, guidance_scale, num_inference_steps, seed=seed)
        rows.append((label, images, list(reward(prompts, images))))
    return render_grid(prompts, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=tuple(SHAPES_MODELS), default=ONE_SHAPE.name)
    parser.add_argument(
        "--run_dir", default=None, help="The run's output_dir (default: the model's recipe's)."
    )
    parser.add_argument("--out", default="shapes_before_after.png", help="Where to save the PNG.")
    parser.add_argument("--num_prompts", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the samples' initial noise.")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, defaults = SHAPES_MODELS[args.model], MINIATURE_MODELS[args.model].grpo_defaults
    run_dir = args.run_dir or defaults["output_dir"]
    if not (Path(run_dir) / "transformer").is_dir():
        print(f"No run in {run_dir}: training one (trl-visual grpo --model_name_or_path {model.name}).")
        run(["grpo", "--model_name_or_path", model.name, "--output_dir", run_dir])
    base = load_shapes_pipeline(model=model)
    trained = trained_pipeline(run_dir, base, model)
    for pipeline in (base, trained):
        pipeline.set_progress_bar_config(disable=True)
    picture = before_after(
        base,
        trained,
        eval_prompts(args.num_prompts, defaults["dataset_name"]),
        ShapesAdherence(),
        args.seed,
        labels=("base", "after GRPO"),
    )
    picture.save(args.out)
    print(f"saved {args.out} ({picture.width}×{picture.height} pixels)")


if __name__ == "__main__":
    main()
