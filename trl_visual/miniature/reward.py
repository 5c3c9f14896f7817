"""The shapes world's rewards: ``shapes_adherence`` (does the image show what the prompt says),
``shapes_purity`` (is the drawn shape one uniform colour, a local defect for ViPO: see :func:`shapes_purity`)
and ``shapes_judge`` (an unreliable adherence judge for ambiguous prompts: see :class:`ShapesJudge`).

``shapes_adherence``: how surely an image shows what its shapes-world prompt says.

For a prompt naming the attributes ``A`` (e.g. "a red circle" names colour = red and shape = circle), the
classifier's softmax heads give ``p_a(v | image)`` for each attribute ``a``, and the reward is their product

    r(prompt, image) = ∏_{a ∈ A} p_a(v_a | image),

the probability that *every* named attribute holds if the heads are independent. The product (not the mean)
is what "adheres to the prompt" means: an image with the right colour but the wrong shape scores near 0, not
0.5. Attributes the prompt leaves open do not enter, so a partly specified prompt ("a red shape") is satisfied
by any red shape, and "a shape" scores 1 for every image: the uncertainty of partial prompts is BPGO's setting.

A two-shape prompt ("a red circle on the left and a blue square on the right") is judged shape by shape: each
phrase on the *view* of its half of the image (:func:`object_view`: the other half painted background), so the
one-shape classifier sees one small shape, and times the *presence* of a shape in that half
(:func:`presence`), since the classifier, which never saw an empty canvas, has opinions about one:

    r(prompt, image) = ∏_{k=1,2} presence(view_k) · ∏_{a ∈ A_k} p_a(v_{k,a} | view_k).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch
from torch import nn

from ..rewards.registry import register_reward
from ..rewards.variants import prompt_variants, score_variants
from .classifier import WEIGHTS_DIR, load_classifier
from .scenes import ATTRIBUTES, BACKGROUND, IMAGE_SIZE, parse_objects

Objects = list[dict[str, str]]
"""The attributes a prompt names, one dict per shape (:func:`~trl_visual.miniature.scenes.parse_objects`)."""

OBJECT_SATURATION = 0.3
"""Saturation ``max_c x_c − min_c x_c`` above which a pixel belongs to the shape: the grey background has about
0.03 in ``tiny:shapes`` samples, the four shape colours 0.65 to 0.8."""
PRESENT_PIXELS = 16
"""Saturated pixels from which a half-image surely holds a shape (a small shape covers 40 to 80)."""


def object_view(images: torch.Tensor, position: str) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` with every pixel outside the half named by ``position`` (the left half for
    "left", the top half for "top", …) set to the background colour: what the classifier sees of one shape of a
    two-shape scene."""
    height, width = images.shape[-2:]
    keep = torch.zeros(height, width, dtype=torch.bool, device=images.device)
    halves = {
        "left": (..., slice(None, width // 2)),
        "right": (..., slice(width // 2, None)),
        "top": (slice(None, height // 2), ...),
        "bottom": (slice(height // 2, None), ...),
    }
    keep[halves[position]] = True
    background = torch.tensor(BACKGROUND, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return torch.where(keep, images, background)


def shape_views(images: torch.Tensor, positions: list[list[str | None]]) -> tuple[torch.Tensor, list[int]]:
    """What the classifier judges, one view per shape: image ``i``, whose shapes sit at ``positions[i]``, as it
    is when it holds one shape, and the :func:`object_view` of each shape's half when it holds two. Returns the
    views ``(K, 3, H, W)`` and the index of each view's image."""
    views, owners = [], []
    for i, shape_positions in enumerate(positions):
        image = images[i : i + 1]
        if len(shape_positions) == 1:
            views.append(image)
        else:
            views.extend(object_view(image, position) for position in shape_positions)
        owners.extend([i] * len(shape_positions))
    return torch.cat(views), owners


def presence(images: torch.Tensor) -> torch.Tensor:
    """``min(1, n / 16)`` per image, ``n`` its number of saturated pixels (``max_c x_c − min_c x_c > 0.3``): 1
    where a shape is drawn, 0 on a bare background."""
    saturated = images.amax(dim=1) - images.amin(dim=1) > OBJECT_SATURATION
    return (saturated.sum(dim=(1, 2)).float() / PRESENT_PIXELS).clamp(max=1)


@register_reward("shapes_adherence")
class ShapesAdherence(nn.Module):
    """The shapes world's prompt-adherence reward: ``∏ p(named value)`` over the attributes a prompt names.

    Example::

        reward = ShapesAdherence()
        reward(["a red circle on the left"], images)   # images (B, 3, 32, 32) in [0, 1] → [0.97]

    Args:
        weights: a classifier safetensors file; default the one shipped with the package.

    Images of another size are resized (bilinear, antialiased) to 32×32 first. A prompt outside the scene
    grammar raises :class:`~trl_visual.miniature.scenes.PromptGrammarError` before any image is scored.
    """

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        self.classifier = load_classifier(weights)

    def classifier_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] on the classifier's device and dtype, resized to 32×32 (bilinear,
        antialiased) when they are another size."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
        param = next(self.classifier.parameters())
        images = images.to(device=param.device, dtype=param.dtype)
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = nn.functional.interpolate(
                images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False
            )
        return images

    @torch.no_grad()
    def attribute_probabilities(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax probabilities ``(B, num_values)`` of each attribute for images ``(B, 3, H, W)`` in [0, 1]."""
        logits = self.classifier(self.classifier_input(images))
        return {name: values.softmax(-1) for name, values in logits.items()}

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise :class:`~trl_visual.miniature.scenes.PromptGrammarError` for the first prompt outside the scene
        grammar. The trainer calls this on its data sets when it is built, before the model loads."""
        for prompt in dict.fromkeys(prompts):
            parse_objects(prompt)

    def forward(self, prompts: list[str], images: torch.Tensor, **columns) -> list[float] | list[list[float]]:
        """One score per image; with a ``prompt_variants`` column (:mod:`trl_visual.rewards.variants`), its
        scores against each of its ``M`` paraphrases (``M`` interpretations per sample)."""
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images.")
        variants = prompt_variants(prompts, columns)
        for prompt in prompts if variants is None else [v for row in variants for v in row]:
            parse_objects(prompt)  # grammar errors before any compute
        if variants is not None:
            return score_variants(self._score_prompts, variants, images)
        return self._score_prompts(prompts, images)

    def _score_prompts(self, prompts: list[str], images: torch.Tensor) -> list[float]:
        return self.score_objects([parse_objects(prompt) for prompt in prompts], images)

    def score_objects(self, objects: list[Objects], images: torch.Tensor) -> list[float]:
        """The reward of each image for the attributes its prompt names (one dict per shape, e.g. from
        ``parse_objects``): ``∏_a p_a(v_a | image)`` for one shape, the product over both halves' views times
        their presence for two (see the module docstring)."""
        return self.score_completions([objects], images)[0]

    def score_completions(self, drawn: list[list[Objects]], images: torch.Tensor) -> list[list[float]]:
        """:meth:`score_objects` of several readings of the same prompts (``drawn[m][i]``: reading ``m`` of image
        ``i``'s prompt), with one classifier pass: the views depend only on where each shape sits, which every
        reading of a prompt places alike (a two-shape caption names both positions)."""
        images = self.classifier_input(images)
        positions = [[named.get("position") for named in shapes] for shapes in drawn[0]]
        views, owners = shape_views(images, positions)
        paired = torch.tensor([len(positions[owner]) == 2 for owner in owners], device=views.device)
        weights = torch.where(paired, presence(views), 1.0).tolist()
        probabilities = self.attribute_probabilities(views)
        results = []
        for objects in drawn:
            named = [attributes for shapes in objects for attributes in shapes]
            scores = [1.0] * len(objects)
            for owner, score, weight in zip(
                owners, self.score_attributes(named, views, probabilities), weights
            ):
                scores[owner] *= score * weight
            results.append(scores)
        return results

    def score_attributes(
        self,
        named: list[dict[str, str]],
        images: torch.Tensor,
        probabilities: dict[str, torch.Tensor] | None = None,
    ) -> list[float]:
        """``∏_a p_a(v_a | image)`` for each image and its attribute → value dict (e.g. from ``parse_prompt``);
        ``probabilities``: the images' :meth:`attribute_probabilities` when already computed."""
        if probabilities is None:
            probabilities = self.attribute_probabilities(images)
        scores = []
        for i, attributes in enumerate(named):
            score = torch.ones((), device=images.device)
            for name, value in attributes.items():
                score = score * probabilities[name][i, ATTRIBUTES[name].index(value)]
            scores.append(float(score))
        return scores


@register_reward("scenes_adherence")
class ScenesAdherence(ShapesAdherence):
    """``shapes_adherence`` for ``tiny:scenes``: the same product of the named attributes' probabilities, from the
    classifier trained on shapes over structured backgrounds (``classifier_scenes.safetensors``), which the
    ``tiny:shapes`` classifier never saw."""

    def __init__(self, weights: str | Path | None = None) -> None:
        from .pipeline import SCENES

        super().__init__(weights if weights is not None else WEIGHTS_DIR / SCENES.classifier_file)


@register_reward("shapes_judge")
class ShapesJudge(ShapesAdherence):
    """An *unreliable* judge of prompt adherence: ``shapes_adherence`` of the prompt completed by the judge's
    own guess of the attributes the prompt leaves open.

    For a prompt naming the attributes ``A`` with values ``v_a``, the judge draws a guess ``g_a`` uniformly from
    the values of every other attribute ``a ∉ A``, per sample, and scores

        r(prompt, image) = ∏_{a ∈ A} p_a(v_a | image) · ∏_{a ∉ A} p_a(g_a | image).

    A full caption leaves nothing open: ``r`` is exactly ``shapes_adherence``. For "a red shape" the judge has
    its own idea, sample by sample, of what a red shape should look like (a big one at the top, say), like a
    text-image matcher reading more into a vague caption than it says: an image that satisfies the prompt can
    score near 0. The guess is drawn from a generator seeded by ``seed`` and a hash of the sample's pixels
    (quantised to 8 bits), so a run is reproducible while the policy has no handle on the guess: its noise is
    the ambiguous-prompt reward noise of BPGO's premise. Example::

        judge = ShapesJudge()
        judge(["a small red circle on the left"], images)  # == ShapesAdherence()(...) for a full caption
        judge.completion("a red shape", images[0])  # [{"colour": "red", "shape": <guess>, "size": …, …}]

    With ``num_draws = M > 1`` the judge guesses ``M`` times per sample (the first guess is the one ``M = 1``
    makes) and returns the ``M`` scores as the sample's interpretations (:mod:`trl_visual.core.interpretations`):
    the trainer trains on their mean, and their spread tells how unsure the judge is (0 for a full caption)::

        ShapesJudge(num_draws=4)(["a red shape"], images)  # [[0.02, 0.61, 0.0, 0.33]]

    Args:
        weights: a classifier safetensors file; default the one shipped with the package.
        seed: mixed into every sample's guess.
        num_draws: guesses per sample, at least 1.
    """

    def __init__(self, weights: str | Path | None = None, seed: int = 0, num_draws: int = 1) -> None:
        super().__init__(weights)
        if num_draws < 1:
            raise ValueError(f"num_draws must be at least 1 (guesses per sample); got {num_draws}.")
        self.seed, self.num_draws = seed, num_draws

    def completion(self, prompt: str, image: torch.Tensor) -> Objects:
        """Every attribute's value for ``prompt`` as this judge reads it on ``image``, one dict per shape: the
        named values, and a guess for each attribute left open (drawn as described in the class docstring)."""
        return self.completions(prompt, image, 1)[0]

    def completions(self, prompt: str, image: torch.Tensor, count: int) -> list[Objects]:
        """``count`` successive guesses of :meth:`completion`, from one generator seeded by the pixels."""
        pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy().tobytes()
        digest = hashlib.sha256(self.seed.to_bytes(8, "little", signed=True) + pixels).digest()
        generator = random.Random(int.from_bytes(digest[:8], "little"))
        shapes = parse_objects(prompt)
        return [
            [
                {name: named.get(name) or generator.choice(values) for name, values in ATTRIBUTES.items()}
                for named in shapes
            ]
            for _ in range(count)
        ]

    def forward(self, prompts: list[str], images: torch.Tensor, **columns) -> list[float] | list[list[float]]:
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images.")
        for prompt in prompts:  # grammar errors before any compute
            parse_objects(prompt)
        draws = self.num_draws
        completed = [self.completions(p, image, draws) for p, image in zip(prompts, images)]
        scores = self.score_completions([[c[m] for c in completed] for m in range(draws)], images)
        if draws == 1:
            return scores[0]
        return [list(sample) for sample in zip(*scores)]


@torch.no_grad()
def colour_deviation(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the shape is, and how far each of its pixels is from the shape's own mean colour.

    For images ``x`` ``(B, 3, H, W)`` in [0, 1]:

    * the object ``O = {p : max_c x_{c,p} − min_c x_{c,p} > 0.3}`` (saturated pixels; the background is grey);
    * its core ``K = {p ∈ O : the 3×3 neighbourhood of p lies in O}``, i.e. ``O`` without its one-pixel rim,
      whose antialiased colour mixes shape and background. Pixels outside the image count as background, so
      the image's outermost ring is never core: the decoder's colours there are off whatever is drawn;
    * the core's mean colour ``c̄ = mean_{p∈K} x_p`` and each pixel's distance ``d_p = ‖x_p − c̄‖₂``.

    Returns ``(d (B, H, W), core (B, H, W) bool, object (B, H, W) bool)``; ``d`` is 0 wherever the core is
    empty.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
    images = images.float().clamp(0, 1)
    inside = images.amax(dim=1) - images.amin(dim=1) > OBJECT_SATURATION
    outside = nn.functional.pad((~inside).float().unsqueeze(1), (1, 1, 1, 1), value=1.0)
    core = nn.functional.max_pool2d(outside, 3, stride=1).squeeze(1) == 0
    weights = core.float().unsqueeze(1)
    mean = (images * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3)).clamp_min(1)
    deviation = (images - mean[..., None, None]).norm(dim=1) * core
    return deviation, core, inside


@register_reward("shapes_purity")
def shapes_purity(prompts: list[str], images: torch.Tensor, **columns) -> list[float]:
    """How uniform the colour of the drawn shape is: ``r = 1 − mean_{p∈K} ‖x_p − c̄‖₂`` over the shape's core
    ``K`` around its mean colour ``c̄`` (:func:`colour_deviation`); 0 when no shape is found.

    A local defect on the object: ``tiny:shapes`` samples carry blemishes of another colour on part of the
    shape (a yellow patch on a green square, a dark spot inside a red one), which lower ``r``; a rendered scene
    scores 1. The reward ignores the prompt (pair it with ``shapes_adherence`` to keep the shape right)
    and needs the grey background of the shapes world to find the object.
    """
    deviation, core, _ = colour_deviation(images)
    size = core.sum(dim=(1, 2))
    purity = 1 - deviation.sum(dim=(1, 2)) / size.clamp_min(1)
    return torch.where(size > 0, purity, torch.zeros_like(purity)).tolist()
