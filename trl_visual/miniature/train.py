"""Train the miniature world's weights from a seed: the scene classifier, the VAE and the SD3 denoiser.

Usage::

    python -m trl_visual.miniature.train --part all --seed 0 --output_dir trl_visual/miniature/weights

Each part is deterministic given ``--seed`` and the thread count (``--threads``, default 1: on a busy 2-core
machine one thread is faster than two). The parts run in order classifier → VAE → transformer for
``tiny:shapes``, then VAE → transformer for ``tiny:shapes-pairs`` (``--part pairs``, or ``pairs-vae`` or
``pairs-transformer`` alone: the same objectives on a pool of twice as many scenes, half of them two-shape
scenes, with that model's longer text), and the classifier → VAE → transformer of ``tiny:scenes`` (``--part scenes``,
or ``scenes-classifier``, ``scenes-vae``, ``scenes-transformer``: the same objectives on 8,192 one-shape scenes over
structured backgrounds). A transformer trains on latents of its VAE found in ``--output_dir``.

Objectives:

* classifier: the sum over attributes of the cross-entropy of each head, on scenes with random brightness
  ``× U(0.85, 1.15)``, a random 3×3 blur (probability 1/2) and Gaussian noise ``σ ~ U(0, 0.08)``;
* VAE: ``‖D(z) − x‖² + β·KL(q(z|x) ‖ N(0, I))`` with ``z ~ q(z|x)`` and ``β = 1e-5`` per latent element;
  afterwards ``shift_factor`` and ``scaling_factor`` are set to the mean and 1/std of the latent means;
* transformer: rectified flow matching, ``x_t = (1 − t)·x₀ + t·ε`` with ``t = sigmoid(n)``, ``n ~ N(0, 1)``
  (SD3's logit-normal sampling), loss ``‖v_θ(x_t, t, c) − (ε − x₀)‖²``; the caption ``c`` of each scene is
  full, partial or "a shape" (probabilities 0.5, 0.4, 0.1), replaced by the empty prompt 10 % of the time
  so that classifier-free guidance has an unconditional model.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .classifier import CLASSIFIER_FILE, ShapesClassifier
from .pipeline import (
    ONE_SHAPE,
    SCENES,
    TWO_SHAPES,
    ShapesModel,
    build_shapes_pipeline,
    build_transformer,
    build_vae,
    load_vae,
    seeded_text_encoders,
    text_encoders_state,
)
from .scenes import ATTRIBUTES, Scene, ScenePair, StructuredScene, random_caption, render_batch

NUM_SCENES = 4096
"""Size of the rendered scene pool each part of ``tiny:shapes`` trains on (twice that for ``tiny:shapes-pairs``,
whose 576 two-shape scenes are six times the one-shape world's 96)."""


def scene_pool(
    seed: int, num_scenes: int = NUM_SCENES, two_shape_fraction: float = 0.0, backgrounds: bool = False
) -> tuple[torch.Tensor, list[Scene | ScenePair]]:
    """``num_scenes`` rendered scenes ``(N, 3, 32, 32)`` and their records, fixed by ``seed`` (over structured
    backgrounds with ``backgrounds``)."""
    generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    return render_batch(num_scenes, generator, rng, two_shape_fraction, backgrounds)


def model_pool(seed: int, model: ShapesModel) -> tuple[torch.Tensor, list[Scene | ScenePair]]:
    """``model``'s scene pool (:func:`pool_size` scenes of its kind), fixed by ``seed``."""
    return scene_pool(seed, pool_size(model), model.two_shape_fraction, model.backgrounds)


def pool_size(model: ShapesModel) -> int:
    """The scene pool of ``model``: :data:`NUM_SCENES`, doubled when it draws two-shape scenes or backgrounds."""
    return NUM_SCENES * (2 if model.two_shape_fraction > 0 or model.backgrounds else 1)


def attribute_labels(scenes: list[Scene | StructuredScene]) -> dict[str, torch.Tensor]:
    """Class index of each (one-shape) scene's value, per attribute."""
    return {
        name: torch.tensor([values.index(getattr(s.objects[0], name)) for s in scenes])
        for name, values in ATTRIBUTES.items()
    }


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness ``× U(0.85, 1.15)``, a 3×3 box blur on half the images, Gaussian noise ``σ ~ U(0, 0.08)``."""
    b = images.shape[0]
    scale = 0.85 + 0.3 * torch.rand(b, 1, 1, 1, generator=generator)
    images = images * scale
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    blur = torch.rand(b, 1, 1, 1, generator=generator) < 0.5
    images = torch.where(blur, blurred, images)
    sigma = 0.08 * torch.rand(b, 1, 1, 1, generator=generator)
    return (images + sigma * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def train_classifier(
    seed: int, steps: int, batch_size: int = 128, model: ShapesModel = ONE_SHAPE
) -> ShapesClassifier:
    """Train :class:`ShapesClassifier` on ``model``'s scene pool (see the module docstring for the objective)."""
    torch.manual_seed(seed)
    images, scenes = model_pool(seed, model)
    labels = attribute_labels(scenes)
    model = ShapesClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        index = torch.randint(len(scenes), (batch_size,), generator=generator)
        logits = model(augment(images[index], generator))
        loss = sum(F.cross_entropy(logits[name], labels[name][index]) for name in ATTRIBUTES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"classifier step {step}: loss {loss.item():.4f}", flush=True)
    return model.eval()


def train_vae(seed: int, steps: int, batch_size: int = 32, model: ShapesModel = ONE_SHAPE):
    """Train the miniature ``AutoencoderKL`` on ``model``'s scene pool and set its latent shift and scale."""
    torch.manual_seed(seed)
    images, _ = model_pool(seed + 10, model)
    vae = build_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 11)
    for step in range(steps):
        x = images[torch.randint(len(images), (batch_size,), generator=generator)] * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(z).sample
        mse = F.mse_loss(reconstruction, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + 1e-5 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}: mse {mse.item():.5f} kl {kl.item():.3f}", flush=True)
    vae.eval()
    with torch.no_grad():
        means = torch.cat(
            [
                vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean
                for i in range(0, min(1024, len(images)), 256)
            ]
        )
    vae.register_to_config(shift_factor=means.mean().item(), scaling_factor=1.0 / means.std().item())
    return vae


def _caption_embeddings(pipeline, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and pooled embeddings of ``captions`` through the pipeline's frozen text towers."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompt=captions,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
        )
    return embeds, pooled


def train_transformer(
    seed: int,
    steps: int,
    weights_dir: Path,
    batch_size: int = 64,
    lr: float = 1e-3,
    model: ShapesModel = ONE_SHAPE,
):
    """Train the miniature ``SD3Transformer2DModel`` by flow matching on VAE latents of ``model``'s scene pool,
    with ``model``'s VAE from ``weights_dir``."""
    vae = load_vae(weights_dir, model)
    torch.manual_seed(seed)
    transformer = build_transformer().train()
    # the shipped text towers: they are never trained
    pipeline = build_shapes_pipeline(transformer, vae, model)
    images, scenes = model_pool(seed + 20, model)
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean for i in range(0, len(images), 256)]
        )
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    rng = random.Random(seed + 21)
    captions = [[random_caption(s, rng) for _ in range(8)] for s in scenes]
    unique = sorted({c for cs in captions for c in cs} | {""})
    embeds, pooled = _caption_embeddings(pipeline, unique, model.t5_max_length)
    caption_index = {c: i for i, c in enumerate(unique)}
    transformer.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * (1 - s / steps) + 0.05
    )
    generator = torch.Generator().manual_seed(seed + 22)
    for step in range(steps):
        index = torch.randint(len(scenes), (batch_size,), generator=generator).tolist()
        which = torch.randint(8, (batch_size,), generator=generator).tolist()
        drop = (torch.rand(batch_size, generator=generator) < 0.1).tolist()
        rows = [caption_index["" if d else captions[i][w]] for i, w, d in zip(index, which, drop)]
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.sigmoid(torch.randn(batch_size, generator=generator)).view(-1, 1, 1, 1)
        xt = (1 - t) * x0 + t * noise
        prediction = transformer(
            hidden_states=xt,
            timestep=t.flatten() * 1000,
            encoder_hidden_states=embeds[rows],
            pooled_projections=pooled[rows],
            return_dict=False,
        )[0]
        loss = F.mse_loss(prediction, noise - x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"transformer step {step}: loss {loss.item():.4f} ({time.strftime('%X')})", flush=True)
    return transformer.eval()


def _save(
    module: torch.nn.Module,
    path: Path,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Save ``module``'s weights as safetensors (cast to ``dtype`` if given: half the size in float16)."""
    state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part",
        choices=(
            "all",
            "text-encoders",
            "classifier",
            "vae",
            "transformer",
            "pairs",
            "pairs-vae",
            "pairs-transformer",
            "scenes",
            "scenes-classifier",
            "scenes-vae",
            "scenes-transformer",
        ),
        default="all",
        help="all: every part; text-encoders: the frozen text towers of every model, from their seeds; pairs: tiny:shapes-pairs' VAE, then its transformer; scenes: tiny:scenes' "
        "classifier, VAE and transformer",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).parent / "weights")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--classifier_steps", type=int, default=600)
    parser.add_argument("--vae_steps", type=int, default=600)
    parser.add_argument("--transformer_steps", type=int, default=1200)
    parser.add_argument("--pairs_vae_steps", type=int, default=800)
    parser.add_argument("--pairs_transformer_steps", type=int, default=6000)
    parser.add_argument("--scenes_classifier_steps", type=int, default=600)
    parser.add_argument("--scenes_vae_steps", type=int, default=800)
    parser.add_argument("--scenes_transformer_steps", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.part in ("all", "text-encoders"):
        for model in (ONE_SHAPE, TWO_SHAPES):  # tiny:scenes shares tiny:shapes' towers and file
            save_file(
                text_encoders_state(seeded_text_encoders(model)),
                str(args.output_dir / model.text_encoders_file),
            )
    if args.part in ("all", "classifier"):
        _save(train_classifier(args.seed, args.classifier_steps), args.output_dir / CLASSIFIER_FILE)
    for model, prefix, vae_steps, transformer_steps in (
        (ONE_SHAPE, "", args.vae_steps, args.transformer_steps),
        (TWO_SHAPES, "pairs-", args.pairs_vae_steps, args.pairs_transformer_steps),
        (SCENES, "scenes-", args.scenes_vae_steps, args.scenes_transformer_steps),
    ):
        both = ("all", prefix[:-1]) if prefix else ("all",)
        if model is SCENES and args.part in (*both, "scenes-classifier"):
            classifier = train_classifier(args.seed, args.scenes_classifier_steps, model=SCENES)
            _save(classifier, args.output_dir / SCENES.classifier_file)
        if args.part in (*both, prefix + "vae"):
            vae = train_vae(args.seed, vae_steps, model=model)
            scaling = {k: str(vae.config[k]) for k in ("shift_factor", "scaling_factor")}
            _save(vae, args.output_dir / model.vae_file, scaling)
        if args.part in (*both, prefix + "transformer"):
            transformer = train_transformer(args.seed, transformer_steps, args.output_dir, model=model)
            _save(transformer, args.output_dir / model.transformer_file, dtype=torch.float16)


if __name__ == "__main__":
    main()
