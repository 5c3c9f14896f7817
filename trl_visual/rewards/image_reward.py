"""ImageReward (Xu et al., NeurIPS 2023) on transformers' BLIP modules, without the ``image-reward`` package.

ImageReward is BLIP (a ViT-L/16 image encoder and a BERT-base text encoder whose layers cross-attend to every image
token) fine-tuned on human preference rankings, with a small MLP on the text encoder's ``[CLS]`` state. It is the
out-of-domain metric of both BPGO and ViPO. The official package imports torchvision, which does not import beside
the torch this project pins, so this module maps the official checkpoint (``THUDM/ImageReward`` /
``ImageReward.pt``, a plain state dict) onto ``transformers.BlipVisionModel`` and ``BlipTextModel`` instead
(:func:`imagereward_to_transformers`) and scores as ImageReward's ``score()`` does::

    reward = (MLP(text_encoder(prompt tokens, cross-attending to ViT(image))[:, 0]) − 0.16717) / 1.03334

The mapping (official name -> transformers name):

==============================================  ================================================================
``blip.visual_encoder.cls_token``               ``vision.embeddings.class_embedding``
``blip.visual_encoder.pos_embed``               ``vision.embeddings.position_embedding``
``blip.visual_encoder.patch_embed.proj.*``      ``vision.embeddings.patch_embedding.*``
``blip.visual_encoder.norm.*``                  ``vision.post_layernorm.*``
``blip.visual_encoder.blocks.{i}.``             ``vision.encoder.layers.{i}.``
   ``norm1`` / ``norm2``                           ``layer_norm1`` / ``layer_norm2``
   ``attn.qkv`` / ``attn.proj``                    ``self_attn.qkv`` / ``self_attn.projection`` (same fused q, k, v)
   ``mlp.fc1`` / ``mlp.fc2``                       ``mlp.fc1`` / ``mlp.fc2``
``blip.text_encoder.*``                         ``text.*`` (BLIP's BERT and transformers' ``BlipTextModel`` share
                                                names: ``embeddings.*``, ``encoder.layer.{i}.attention``,
                                                ``.crossattention``, ``.intermediate``, ``.output``)
``mlp.layers.{0,2,4,6,7}.*``                    ``head.layers.*`` (:class:`~.clip_rewards.AestheticMLP`'s layout)
``blip.vision_proj.*``, ``blip.text_proj.*``    unused by the score: dropped
``*.position_ids``                              a buffer transformers builds itself: dropped
==============================================  ================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from trl_visual.rewards.clip_rewards import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    AestheticMLP,
    ImageScorer,
    ImageTransform,
    _chunks,
    check_batch_size,
    load_weights_file,
    resolve_dtype,
    resolve_file,
    tokenize,
)
from trl_visual.rewards.registry import register_reward

IMAGEREWARD_MEAN = 0.16717362830052426
"""Mean of the MLP's raw output over ImageReward's data; the score subtracts it."""
IMAGEREWARD_STD = 1.0333394966054072
"""Standard deviation of the MLP's raw output over ImageReward's data; the score divides by it."""
IMAGEREWARD_MAX_LENGTH = 35
"""Prompt tokens ImageReward reads (padded or truncated to this length, ``[CLS]`` and ``[SEP]`` included)."""

_VISUAL, _TEXT, _HEAD = "blip.visual_encoder.", "blip.text_encoder.", "mlp."
_DROPPED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
_VISION_TOP_LEVEL: dict[str, str] = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK_PARTS: dict[str, str] = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _map_vision_key(key: str) -> str | None:
    """transformers' ``BlipVisionModel`` name of a ``visual_encoder`` tensor (without the prefix), or ``None``."""
    if key in _VISION_TOP_LEVEL:
        return _VISION_TOP_LEVEL[key]
    parts = key.split(".")
    if len(parts) >= 4 and parts[0] == "blocks" and parts[1].isdigit():
        part, kind = ".".join(parts[2:-1]), parts[-1]
        if part in _VISION_BLOCK_PARTS and kind in ("weight", "bias"):
            return f"encoder.layers.{parts[1]}.{_VISION_BLOCK_PARTS[part]}.{kind}"
    return None


def imagereward_to_transformers(state_dict: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split an official ImageReward state dict into ``{"vision", "text", "head"}`` state dicts named as
    ``BlipVisionModel``, ``BlipTextModel`` and :class:`~.clip_rewards.AestheticMLP` name their tensors.

    Pure: no model is built and the input is not modified. The contrastive projections (``vision_proj``,
    ``text_proj``) and ``position_ids`` buffers are dropped; nothing else is.

    Raises:
        ValueError: when a key has no counterpart, naming the keys.
    """
    parts: dict[str, dict[str, Tensor]] = {"vision": {}, "text": {}, "head": {}}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key.startswith(_DROPPED_PREFIXES) or key.endswith("position_ids"):
            continue
        if key.startswith(_VISUAL) and (name := _map_vision_key(key.removeprefix(_VISUAL))) is not None:
            parts["vision"][name] = value
        elif key.startswith(_TEXT):
            parts["text"][key.removeprefix(_TEXT)] = value
        elif key.startswith(_HEAD + "layers."):
            parts["head"][key.removeprefix(_HEAD)] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"These ImageReward checkpoint keys have no counterpart: {unknown[:10]} (of {len(unknown)}); "
            "expected an official `ImageReward.pt` (keys `blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.*`)."
        )
    return parts


def imagereward_configs() -> tuple[Any, Any]:
    """The ``(BlipVisionConfig, BlipTextConfig)`` of the official ImageReward (BLIP ``vit="large"``, 224 px).

    Vision: ViT-L/16, 24 layers, width 1024, 16 heads, MLP 4096, 224 px, exact GELU, LayerNorm eps 1e-6 (BLIP's
    ViT). Text: BERT-base, 12 layers, width 768, 12 heads, MLP 3072, 512 positions, vocabulary 30524 (BERT's 30522
    plus BLIP's ``[DEC]`` and ``[ENC]``), LayerNorm eps 1e-12, cross-attention to the 1024-wide image tokens in
    every layer (``is_decoder=True`` only builds those layers: the score runs the encoder bidirectionally).
    Dropout is 0: the reward only runs in eval mode.
    """
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=16,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )
    text = BlipTextConfig(
        vocab_size=30524,
        hidden_size=768,
        encoder_hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=512,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_decoder=True,
        pad_token_id=0,
    )
    return vision, text


class ImageRewardModel(nn.Module):
    """ImageReward's network: a BLIP ViT, a BERT text encoder cross-attending to all its tokens, an MLP on
    ``[CLS]``. :meth:`forward` returns the MLP's raw output; :class:`ImageRewardReward` standardizes it.

    Args:
        vision_config: a ``transformers.BlipVisionConfig``.
        text_config: a ``transformers.BlipTextConfig`` whose ``encoder_hidden_size`` is the vision width and whose
            ``is_decoder`` is true (it builds the cross-attention layers).
        head: the MLP; by default ImageReward's widths ``(768, 1024, 128, 64, 16, 1)``.
    """

    def __init__(self, vision_config: Any, text_config: Any, head: AestheticMLP | None = None) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        if not text_config.is_decoder or text_config.encoder_hidden_size != vision_config.hidden_size:
            raise ValueError(
                "ImageReward's text encoder cross-attends to the image tokens: its BlipTextConfig needs "
                f"is_decoder=True and encoder_hidden_size={vision_config.hidden_size} (the vision width); got "
                f"is_decoder={text_config.is_decoder}, encoder_hidden_size={text_config.encoder_hidden_size}."
            )
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = head or AestheticMLP((text_config.hidden_size, 1024, 128, 64, 16, 1))

    @classmethod
    def from_official_state_dict(
        cls, state_dict: Mapping[str, Tensor], vision_config: Any, text_config: Any
    ) -> ImageRewardModel:
        """A frozen, eval-mode model holding an official ImageReward state dict's weights, every tensor assigned
        (strictly: a missing or extra tensor, or a shape that does not fit the configs, raises)."""
        from transformers.initialization import no_init_weights

        parts = imagereward_to_transformers(state_dict)
        head = AestheticMLP.from_state_dict(parts["head"])  # its widths come from its weights
        with no_init_weights():
            model = cls(vision_config, text_config, head)
        try:
            model.vision.load_state_dict(parts["vision"], strict=True, assign=True)
            model.text.load_state_dict(parts["text"], strict=True, assign=True)
        except RuntimeError as error:
            raise ValueError(
                "The ImageReward checkpoint does not fit the BLIP configs given (the official one is "
                f"imagereward_configs(); pass `vision_config=` / `text_config=` for another): {error}"
            ) from error
        return model.eval().requires_grad_(False)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The MLP's raw output ``(B,)`` (float32) for normalized images ``(B, 3, S, S)`` and their prompts'
        tokens ``(B, L)``; the text encoder runs bidirectionally, attending to every image token."""
        image_tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_tokens,
            is_decoder=False,
        )
        return self.head(text.last_hidden_state[:, 0].float())


def blip_tokenizer(name_or_path: str) -> Any:
    """BERT's uncased tokenizer with BLIP's two added tokens, ``[DEC]`` (as ``bos_token``) and ``[ENC]``, as BLIP's
    ``init_tokenizer`` makes it (ids 30522 and 30523 on ``bert-base-uncased``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


@register_reward("imagereward")
class ImageRewardReward(ImageScorer):
    """ImageReward: human preference for text-to-image generations (Xu et al., 2023); BPGO's and ViPO's
    out-of-domain metric, so usually an ``eval_reward_funcs`` entry.

    Score: ``(MLP(h_CLS) − 0.16717) / 1.03334``, ``h_CLS`` the text encoder's ``[CLS]`` state over the prompt
    (35 tokens) cross-attending to the image. Standardized over ImageReward's data, so about −2 to 2; the papers
    report its mean (SD 1.5 about 0.2, SD3.5 about 1.0 on their prompt sets). Preprocessing is ImageReward's:
    shortest side to 224 (bicubic), center crop 224, OpenAI CLIP mean/std.

    Args:
        model_name_or_path: a Hub repo id, a local folder, or the checkpoint file itself.
        filename: the checkpoint inside ``model_name_or_path``.
        tokenizer_name_or_path: BERT's uncased tokenizer (BLIP's ``[DEC]`` and ``[ENC]`` are added).
        vision_config: the ``BlipVisionConfig`` of the checkpoint's image encoder; with ``text_config``, or both
            left unset for :func:`imagereward_configs`.
        text_config: the ``BlipTextConfig`` of its text encoder.
        dtype: dtype the BLIP encoders run in (the head always runs in float32, as ImageReward's ``score()``).
        batch_size: the most images sent through the model at once.
    """

    name = "imagereward"

    def __init__(
        self,
        model_name_or_path: str = "THUDM/ImageReward",
        *,
        filename: str = "ImageReward.pt",
        tokenizer_name_or_path: str = "google-bert/bert-base-uncased",
        vision_config: Any | None = None,
        text_config: Any | None = None,
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        check_batch_size(batch_size)
        if (vision_config is None) != (text_config is None):
            raise ValueError(
                "Pass both `vision_config` and `text_config`, or neither (the official ImageReward)."
            )
        if vision_config is None:
            vision_config, text_config = imagereward_configs()
        state_dict = load_weights_file(resolve_file(model_name_or_path, filename))
        self.model = ImageRewardModel.from_official_state_dict(state_dict, vision_config, text_config)
        self.model.vision.to(resolve_dtype(dtype))
        self.model.text.to(resolve_dtype(dtype))
        self.tokenizer = blip_tokenizer(tokenizer_name_or_path)
        if len(self.tokenizer) > text_config.vocab_size:
            raise ValueError(
                f"The tokenizer has {len(self.tokenizer)} tokens but the text encoder {text_config.vocab_size}: "
                "ImageReward uses BERT's uncased vocabulary (`google-bert/bert-base-uncased`)."
            )
        size = vision_config.image_size
        self.transform = ImageTransform(
            "shortest_edge", size, (size, size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        )
        self.batch_size = batch_size
        self.requires_grad_(False)
        self.eval()

    def score_images(self, prompts: list[str], images: Tensor) -> Tensor:
        """The standardized ImageReward score of each (prompt, image) pair."""
        device, dtype = self.model.vision.embeddings.patch_embedding.weight.device, self.model.vision.dtype
        scores = []
        for part in _chunks(len(prompts), self.batch_size):
            tokens = tokenize(self.tokenizer, prompts[part], IMAGEREWARD_MAX_LENGTH, device)
            pixels = self.transform(images[part].to(device)).to(dtype)
            scores.append(self.model(pixels, tokens["input_ids"], tokens["attention_mask"]))
        return (torch.cat(scores) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
