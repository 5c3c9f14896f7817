"""``shapes_adherence``: how surely an image shows what its shapes-world prompt says.

For a prompt naming the attributes ``A`` (e.g. "a red circle" names colour = red and shape = circle), the
classifier's softmax heads give ``p_a(v | image)`` for each attribute ``a``, and the reward is their product

    r(prompt, image) = ∏_{a ∈ A} p_a(v_a | image),

the probability that *every* named attribute holds if the heads are independent. The product (not the mean)
is what "adheres to the prompt" means: an image with the right colour but the wrong shape scores near 0, not
0.5. Attributes the prompt leaves open do not enter, so a partly specified prompt ("a red shape") is satisfied
by any red shape, and "a shape" scores 1 for every image: the uncertainty of partial prompts is BPGO's setting.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..rewards.registry import register_reward
from .classifier import load_classifier
from .scenes import ATTRIBUTES, IMAGE_SIZE, parse_prompt


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

    @torch.no_grad()
    def attribute_probabilities(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax probabilities ``(B, num_values)`` of each attribute for images ``(B, 3, H, W)`` in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
        param = next(self.classifier.parameters())
        images = images.to(device=param.device, dtype=param.dtype)
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = nn.functional.interpolate(
                images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False
            )
        return {name: logits.softmax(-1) for name, logits in self.classifier(images).items()}

    def forward(self, prompts: list[str], images: torch.Tensor, **columns) -> list[float]:
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images.")
        named = [parse_prompt(prompt) for prompt in prompts]  # grammar errors before any compute
        probabilities = self.attribute_probabilities(images)
        scores = []
        for i, attributes in enumerate(named):
            score = torch.ones((), device=images.device)
            for name, value in attributes.items():
                score = score * probabilities[name][i, ATTRIBUTES[name].index(value)]
            scores.append(float(score))
        return scores
