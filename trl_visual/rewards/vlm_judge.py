"""A vision-language model asked a yes/no question about each sample: ``VLMJudgeReward`` (``vlm_judge``).

Any transformers image-text-to-text checkpoint (``AutoModelForImageTextToText`` + ``AutoProcessor``: Qwen2.5-VL,
Qwen3-VL, SmolVLM / Idefics3, LLaVA, …) reads each sample with a templated question ("Does this image show: a
red cube left of a blue sphere? Answer yes or no.") in its own chat format, and the score is

    score = P(yes) / (P(yes) + P(no)) = sigmoid(LSE_{t ∈ yes} z_t − LSE_{t ∈ no} z_t)

with ``z`` the next-token logits after the assistant's turn opens, from one forward pass (no sampling), and
``yes`` / ``no`` the single-token spellings of the answer words (:func:`answer_token_ids`, resolved and checked
when the reward is built). Several templates, or a ``prompt_variants`` column, give several scores per sample:
its interpretations (:mod:`trl_visual.rewards.judging`).

Unlike the CLIP-family rewards, images go through the model's own processor (after a ``uint8`` round, as an
image file would): a VLM's preprocessing decides how many image tokens the prompt holds, so it is part of the
model's input format, not a detail to re-implement.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from trl_visual.rewards.clip_rewards import (
    RewardModel,
    _chunks,
    check_batch_size,
    resize_shortest_edge,
    resolve_dtype,
)
from trl_visual.rewards.judging import (
    DEFAULT_ANSWERS,
    DEFAULT_TEMPLATE,
    answer_forms,
    as_interpretations,
    check_answers,
    check_num_frames,
    check_templates,
    media_frames,
    questions_per_sample,
    to_uint8,
    yes_probability,
)
from trl_visual.rewards.registry import register_reward

logger = logging.getLogger(__name__)

VIDEO_MODES = ("frames", "video")
"""How a video reaches the judge: ``frames`` as that many images in one turn (every VLM reads it), ``video`` as
one video input (processors with a video processor: Qwen2-VL and later, SmolVLM2, LLaVA-OneVision)."""


def answer_token_ids(tokenizer: Any, word: str) -> list[int]:
    """The ids of every spelling of ``word`` that is one token (:func:`~trl_visual.rewards.judging.answer_forms`:
    case and a leading space vary), in a stable order.

    Raises:
        ValueError: no spelling of ``word`` is a single token; the message shows how it splits and names the fix.
    """
    ids: list[int] = []
    for form in answer_forms(word):
        pieces = tokenizer.encode(form, add_special_tokens=False)
        if len(pieces) == 1 and pieces[0] not in ids:
            ids.append(int(pieces[0]))
    if not ids:
        split = tokenizer.convert_ids_to_tokens(tokenizer.encode(word, add_special_tokens=False))
        raise ValueError(
            f"The judge's answer word {word!r} is not a single token of this tokenizer (it splits into {split}), so "
            "its probability is not one next-token probability. Pass answers=(positive, negative) with one-token "
            "words, e.g. answers=('yes', 'no'), and ask for them in the template."
        )
    return ids


def chat_template_of(processor: Any) -> str | None:
    """The processor's chat template (its own, else its tokenizer's), or ``None``."""
    template = getattr(processor, "chat_template", None)
    if template is None:
        template = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    return template


@register_reward("vlm_judge")
class VLMJudgeReward(RewardModel):
    """A vision-language model's probability that each sample answers its prompt: ``P(yes) / (P(yes) + P(no))``.

    Each sample is shown to the model with the question ``template.format(prompt=..., media="image"|"video")`` in
    one user turn of the model's chat template, and the next-token logits at the opening of the assistant's turn
    give the score (module docstring), in ``[0, 1]``. With ``M`` templates (or a ``prompt_variants`` column) the
    reward returns ``M`` scores per sample: interpretations, whose mean is trained on and whose spread BPGO's
    ``ras_mode="uncertainty"`` reads.

    Like the other learned rewards it is a frozen ``nn.Module`` in eval mode that the trainer moves to the
    training device once; calls run under ``torch.no_grad()``, in ``dtype``, ``batch_size`` questions per forward.

    Args:
        model_name_or_path: a Hub id or local folder of an image-text-to-text checkpoint (instruction-tuned, with a
            chat template), e.g. ``Qwen/Qwen2.5-VL-3B-Instruct`` or ``HuggingFaceTB/SmolVLM-256M-Instruct``.
        processor_name_or_path: where the processor (tokenizer, image processor, chat template) is; defaults to
            ``model_name_or_path``.
        templates: the question, or a list of questions (one interpretation each); ``{prompt}`` is the sample's
            prompt, ``{media}`` is ``image`` or ``video``.
        answers: the positive and the negative answer word; each must be one token in some spelling (case, a
            leading space), checked here.
        system_prompt: an optional system turn before the question.
        chat_template: a Jinja chat template to use instead of the processor's (for a checkpoint without one).
        dtype: the dtype the model runs in (``"bfloat16"`` for real checkpoints on a GPU).
        batch_size: the most questions sent through the model at once (scores do not depend on it).
        num_frames: the frames taken from each video, evenly spaced, first and last included.
        video_mode: ``"frames"`` (the frames as images in one turn) or ``"video"`` (one video input, where the
            processor has a video processor).
        image_size: resize each frame so its shorter side is this many pixels before the processor (for
            processors that refuse small images); ``None`` leaves the size to the processor.
        name: the metric name; ``vlm_judge`` by default.

    Example:
        ```python
        judge = VLMJudgeReward("Qwen/Qwen2.5-VL-3B-Instruct", dtype="bfloat16").to("cuda")
        judge(["a red cube left of a blue sphere"], images)  # images: (1, 3, H, W) in [0, 1] -> [0.93]
        ```
    """

    name = "vlm_judge"

    def __init__(
        self,
        model_name_or_path: str = "Qwen/Qwen2.5-VL-3B-Instruct",
        *,
        processor_name_or_path: str | None = None,
        templates: str | Sequence[str] = DEFAULT_TEMPLATE,
        answers: Sequence[str] = DEFAULT_ANSWERS,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 8,
        num_frames: int = 4,
        video_mode: str = "frames",
        image_size: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        resolve_dtype(dtype)  # an unknown dtype is refused before anything loads
        self.templates = check_templates(templates)
        positive, negative = check_answers(answers)
        check_batch_size(batch_size)
        self.num_frames = check_num_frames(num_frames)
        if video_mode not in VIDEO_MODES:
            raise ValueError(f"video_mode must be one of {VIDEO_MODES}, got {video_mode!r}.")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}.")
        self.batch_size, self.video_mode, self.image_size = batch_size, video_mode, image_size
        self.system_prompt = system_prompt
        self.name = name or type(self).name
        self.model_name_or_path = model_name_or_path
        self.processor = self._load_processor(processor_name_or_path or model_name_or_path, chat_template)
        tokenizer = self.processor.tokenizer
        self.yes_ids, self.no_ids = (
            answer_token_ids(tokenizer, positive),
            answer_token_ids(tokenizer, negative),
        )
        shared = set(self.yes_ids) & set(self.no_ids)
        if shared:
            raise ValueError(
                f"The answers {positive!r} and {negative!r} share the token(s) {tokenizer.convert_ids_to_tokens(sorted(shared))}; "
                "pass two answer words that are different tokens, e.g. answers=('yes', 'no')."
            )
        self._protected = sorted(
            {t for t in [*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()] if len(t) > 1}, key=len
        )[::-1]
        self.model = self._load_model(model_name_or_path, dtype)
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.requires_grad_(False)
        self.eval()

    # -- loading, with every check that needs no weights first -----------------------------------------------
    def _load_processor(self, name_or_path: str, chat_template: str | None) -> Any:
        """``AutoProcessor`` with a chat template, padding on the right with a pad token."""
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(name_or_path)
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None or not hasattr(processor, "image_processor"):
            raise ValueError(
                f"{name_or_path!r} has no image-text processor (AutoProcessor gave {type(processor).__name__}); the "
                "judge needs an image-text-to-text checkpoint, e.g. Qwen/Qwen2.5-VL-3B-Instruct."
            )
        processor.chat_template = chat_template or chat_template_of(processor)
        if processor.chat_template is None:
            raise ValueError(
                f"The processor of {name_or_path!r} has no chat template, so the judge cannot phrase its question as "
                "the model expects. Use the instruction-tuned checkpoint (…-Instruct), or pass chat_template= (a "
                "Jinja template string) to VLMJudgeReward."
            )
        tokenizer.padding_side = "right"  # real tokens keep their positions; the last one is read per row
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    f"The tokenizer of {name_or_path!r} has neither a pad nor an eos token; set one."
                )
            tokenizer.pad_token = tokenizer.eos_token
        return processor

    @staticmethod
    def _load_model(name_or_path: str, dtype: torch.dtype | str) -> torch.nn.Module:
        """``AutoModelForImageTextToText.from_pretrained`` in ``dtype``, frozen and in eval mode."""
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=resolve_dtype(dtype))
        return model.eval().requires_grad_(False)

    # -- scoring ------------------------------------------------------------------------------------------------
    def score_batch(
        self, prompts: list[str], images: Tensor | None, videos: Tensor | None, columns: dict[str, Any]
    ) -> list[float | None] | list[list[float] | None]:
        """``P(yes) / (P(yes) + P(no))`` of every question of every sample; ``M > 1`` questions per sample return
        ``M`` scores per sample (interpretations)."""
        frames, media = media_frames(prompts, images, videos, self.num_frames, self.name)
        if self.image_size is not None:
            frames = resize_shortest_edge(frames.flatten(0, 1).float(), self.image_size).unflatten(
                0, frames.shape[:2]
            )
        pictures = to_uint8(frames)
        questions = [
            [self.protect(question) for question in row]
            for row in questions_per_sample(prompts, columns, self.templates, media)
        ]
        pairs = [(index, question) for index, row in enumerate(questions) for question in row]
        scores: list[float | None] = []
        for part in _chunks(len(pairs), self.batch_size):
            chunk = pairs[part]
            scores.extend(
                self.score_questions([q for _, q in chunk], [pictures[i] for i, _ in chunk], media).tolist()
            )
        return as_interpretations(scores, len(prompts))

    def protect(self, text: str) -> str:
        """``text`` (a question, with its prompt in it) with any special token written in it (``<image>``,
        ``<|im_end|>``) broken by a zero-width space, so that a prompt's text can never add an image slot or end
        the user's turn."""
        for token in self._protected:
            if token in text:
                text = text.replace(token, token[0] + "\u200b" + token[1:])
        return text

    def conversation(self, question: str, num_images: int, media: str) -> list[dict[str, Any]]:
        """One user turn: the media (``num_images`` images, or one video), then the question; after the system
        turn if there is one."""
        if media == "video" and self.video_mode == "video":
            slots = [{"type": "video"}]
        else:
            slots = [{"type": "image"} for _ in range(num_images)]
        turns = [{"role": "user", "content": [*slots, {"type": "text", "text": question}]}]
        if self.system_prompt is not None:
            turns.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return turns

    def processor_inputs(self, questions: list[str], pictures: list[Tensor], media: str) -> dict[str, Tensor]:
        """The processor's batch (right-padded) for the questions, each with its sample's ``uint8`` frames
        ``(T, 3, H, W)``, on the model's device, floating tensors in the model's dtype.

        Raises:
            ValueError: the processor refused the inputs (an image size it does not take, …): one line, with
                the fix.
        """
        from PIL import Image

        texts = [
            self.processor.apply_chat_template(
                self.conversation(question, len(frames), media), add_generation_prompt=True, tokenize=False
            )
            for question, frames in zip(questions, pictures)
        ]
        as_pil = [
            [Image.fromarray(frame.permute(1, 2, 0).numpy()) for frame in frames] for frames in pictures
        ]
        media_kwargs = (
            {"videos": as_pil} if media == "video" and self.video_mode == "video" else {"images": as_pil}
        )
        try:
            batch = self.processor(text=texts, return_tensors="pt", padding=True, **media_kwargs)
        except Exception as error:  # a processor's own message, made one line and given the fix
            reason = " ".join(str(error).split())[:300]
            size = "x".join(str(s) for s in pictures[0].shape[-2:])
            raise ValueError(
                f"The processor of {self.model_name_or_path!r} refused the judge's inputs ({len(pictures[0])} "
                f"frame(s) of {size} pixels): {type(error).__name__}: {reason}. If it is the image size, pass "
                "image_size=N (e.g. 448) to VLMJudgeReward to resize frames before the processor; for a video, try "
                "video_mode='frames'."
            ) from None
        return {
            key: value.to(self.device, self.dtype if value.is_floating_point() else None)
            if isinstance(value, Tensor)
            else value
            for key, value in batch.items()
        }

    @torch.no_grad()
    def score_questions(self, questions: list[str], pictures: list[Tensor], media: str) -> Tensor:
        """``(n,)`` float32 ``sigmoid(LSE_yes z − LSE_no z)`` of the next-token logits ``z`` after each question
        (its last real token: the batch is right-padded)."""
        inputs = self.processor_inputs(questions, pictures, media)
        mask = inputs["attention_mask"]
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)  # each row's last real token
        if self._keeps_logits:  # only the positions read, not (n, L, vocab)
            kept, row_of = torch.unique(last, return_inverse=True)
            logits = self.model(**inputs, logits_to_keep=kept).logits[torch.arange(len(last)), row_of]
        else:
            logits = self.model(**inputs).logits[torch.arange(len(last)), last]
        logits = logits.float()
        log_yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
        log_no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        return yes_probability(log_yes, log_no).cpu()
