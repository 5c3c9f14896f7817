"""What every yes/no judge shares, local (:class:`~trl_visual.rewards.vlm_judge.VLMJudgeReward`) or remote
(:mod:`trl_visual.rewards.remote`): question templates, the samples' frames, and the score's formula.

A judge is asked one question per (sample, prompt variant, template) and answers with its next-token
distribution. With ``P(yes)`` and ``P(no)`` the probabilities of the answer words' tokens, the score is

    score = P(yes) / (P(yes) + P(no)) = sigmoid(log P(yes) − log P(no))

in ``[0, 1]``, read from one forward pass (no sampling), so it does not depend on the rest of the vocabulary's
mass. ``M`` questions per sample (several templates, or a ``prompt_variants`` column) return ``M`` scores per
sample: its *interpretations* (:mod:`trl_visual.core.interpretations`), whose spread BPGO's
``ras_mode="uncertainty"`` reads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from trl_visual.rewards.variants import prompt_variants

DEFAULT_TEMPLATE = "Does this {media} show: {prompt}? Answer yes or no."
"""The question asked by default; ``{media}`` is ``image`` or ``video``, ``{prompt}`` the sample's prompt."""

DEFAULT_ANSWERS = ("yes", "no")
"""The positive and the negative answer word."""


def check_templates(templates: str | Sequence[str]) -> list[str]:
    """One template or several as a list; each must hold ``{prompt}`` and no other field than ``{media}``.

    Raises:
        ValueError: no template, a template without ``{prompt}``, or with another ``{field}`` (the message says to
            double literal braces).
    """
    listed = [templates] if isinstance(templates, str) else list(templates)
    if not listed or not all(isinstance(t, str) for t in listed):
        raise ValueError(f"templates must be a question string or a list of them, got {templates!r}.")
    for template in listed:
        if "{prompt}" not in template:
            raise ValueError(
                f"The judge template {template!r} has no {{prompt}}: write where the prompt goes, e.g. "
                f"{DEFAULT_TEMPLATE!r}."
            )
        try:
            template.format(prompt="", media="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"The judge template {template!r} cannot be filled ({type(error).__name__}: {error}): its only "
                "fields are {prompt} and {media}; write a literal brace twice ({{ or }})."
            ) from None
    return listed


def check_answers(answers: Sequence[str]) -> tuple[str, str]:
    """``(positive, negative)`` answer words: two different non-empty strings."""
    if isinstance(answers, str) or len(answers) != 2:
        raise ValueError(f"answers must be two words, positive first, e.g. ('yes', 'no'); got {answers!r}.")
    positive, negative = (str(a).strip() for a in answers)
    if not positive or not negative or positive.lower() == negative.lower():
        raise ValueError(
            f"answers must be two different words, positive first, e.g. ('yes', 'no'); got {answers!r}."
        )
    return positive, negative


def answer_forms(word: str) -> list[str]:
    """The spellings of an answer a model may start its reply with: the word as given, lower-case and
    capitalized, each with and without a leading space (``yes``, ``Yes``, `` yes``, `` Yes``)."""
    cases = dict.fromkeys([word, word.lower(), word.capitalize()])
    return [prefix + case for prefix in ("", " ") for case in cases]


def matches_answer(token: str, word: str) -> bool:
    """Whether a returned token text is a spelling of ``word`` (spaces and case ignored): how a remote judge's
    top log-probs are read."""
    return token.strip().lower() == word.lower()


def yes_probability(log_yes: Tensor, log_no: Tensor) -> Tensor:
    """``P(yes) / (P(yes) + P(no)) = sigmoid(log P(yes) − log P(no))``, elementwise, in float32."""
    return torch.sigmoid(log_yes.float() - log_no.float())


CHAT_MARKERS = re.compile(
    r"<\|[^<>|\s]{1,64}\|>"  # <|im_end|>, <|eot_id|>, <|vision_start|>: Qwen, Llama 3, Phi, …
    r"|<(?:image|video|end_of_utterance|fake_token_around_image|start_of_turn|end_of_turn)>"  # Idefics3, Gemma
)
"""The chat-template markers and media placeholders of common VLMs, for a judge whose tokenizer is not known here
(a remote server's)."""


def break_chat_markers(text: str) -> str:
    """``text`` with every :data:`CHAT_MARKERS` match broken by a zero-width space after its first character, so
    that a prompt's text can never end the user's turn or add an image slot on a server whose tokenizer reads
    special tokens in text (a local judge breaks its own tokenizer's exact special tokens instead)."""
    return CHAT_MARKERS.sub(lambda match: match.group(0)[0] + "\u200b" + match.group(0)[1:], text)


def questions_per_sample(
    prompts: list[str], columns: dict[str, Any], templates: list[str], media: str
) -> list[list[str]]:
    """Each sample's questions: its ``prompt_variants`` (:mod:`~trl_visual.rewards.variants`) if the batch has
    them, else its prompt, in every template (variant-major), ``M = variants × templates`` per sample. The
    prompt is inserted verbatim: its own braces are not read as fields."""
    variants = prompt_variants(prompts, columns) or [[prompt] for prompt in prompts]
    return [[t.format(prompt=text, media=media) for text in row for t in templates] for row in variants]


def media_frames(
    prompts: list[str], images: Tensor | None, videos: Tensor | None, num_frames: int, reward_name: str
) -> tuple[Tensor, str]:
    """The frames the judge sees, ``(B, T, 3, H, W)`` float in ``[0, 1]``, and the media word: images are
    one-frame ``"image"``s; videos (or 5-D ``images``) give ``num_frames`` evenly spaced frames (first and last
    included), a ``"video"``.

    Raises:
        ValueError: no media, a wrong shape, or not one prompt per sample.
    """
    if videos is None and images is not None and images.ndim == 5:
        videos, images = images, None
    if videos is not None:
        media, frames = "video", videos
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(
                f"The judge {reward_name!r} expects (B, T, 3, H, W) videos; got {tuple(frames.shape)}."
            )
        picked = torch.linspace(0, frames.shape[1] - 1, min(num_frames, frames.shape[1])).round().long()
        frames = frames[:, picked.to(frames.device)]
    elif images is not None:
        media, frames = "image", images
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(
                f"The judge {reward_name!r} expects (B, 3, H, W) images; got {tuple(frames.shape)}."
            )
        frames = frames.unsqueeze(1)
    else:
        raise ValueError(
            f"The judge {reward_name!r} needs `images` (B, 3, H, W) or `videos` (B, T, 3, H, W)."
        )
    if frames.shape[0] != len(prompts):
        raise ValueError(
            f"The judge {reward_name!r} got {len(prompts)} prompts for {frames.shape[0]} samples; pass one prompt "
            "per sample."
        )
    return frames, media


def to_uint8(frames: Tensor) -> Tensor:
    """Float frames in ``[0, 1]`` as ``uint8`` on the CPU, ``round(255 · clamp(x, 0, 1))``: what an image file
    holds, and what a judge's processor (or a server) reads."""
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def check_num_frames(num_frames: int) -> int:
    """A judge's ``num_frames`` is a positive integer."""
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}.")
    return num_frames


def as_interpretations(
    scores: list[float | None], batch: int
) -> list[float | None] | list[list[float] | None]:
    """``B · M`` scores in sample-major order as the reward's output: ``B`` floats when ``M = 1``, else ``B`` lists
    of ``M`` floats (the sample's interpretations; ``None`` for the whole sample if any of them is missing)."""
    if batch == 0:
        return []
    count = len(scores) // batch
    if count == 1:
        return list(scores)
    rows = [scores[i * count : (i + 1) * count] for i in range(batch)]
    return [None if any(v is None for v in row) else [float(v) for v in row] for row in rows]  # type: ignore[arg-type]
