"""HPSv2.1 (Human Preference Score v2.1) on transformers' ``CLIPModel``, without open_clip.

HPSv2 is an open_clip ViT-H/14 fine-tuned on human preference pairs; its checkpoint
(``xswu/HPSv2`` / ``HPS_v2.1_compressed.pt``) is an open_clip state dict, ``{"state_dict": {...}}``. open_clip
needs torchvision, which does not import beside the torch this project pins, so this module maps the open_clip
weights onto a ``transformers.CLIPModel`` of the same architecture instead (:func:`open_clip_to_transformers`)
and scores like HPSv2 does: the cosine of the image and text embeddings.

The mapping (open_clip name -> transformers name):

==========================================  ==================================================================
``token_embedding.weight``                  ``text_model.embeddings.token_embedding.weight``
``positional_embedding``                    ``text_model.embeddings.position_embedding.weight``
``ln_final.*``                              ``text_model.final_layer_norm.*``
``text_projection`` (width x embed, x @ W)  ``text_projection.weight`` (transposed, an ``nn.Linear``)
``visual.class_embedding``                  ``vision_model.embeddings.class_embedding``
``visual.positional_embedding``             ``vision_model.embeddings.position_embedding.weight``
``visual.conv1.weight``                     ``vision_model.embeddings.patch_embedding.weight``
``visual.ln_pre.*`` / ``visual.ln_post.*``  ``vision_model.pre_layrnorm.*`` / ``vision_model.post_layernorm.*``
``visual.proj`` (width x embed, x @ W)      ``visual_projection.weight`` (transposed)
``logit_scale``                             ``logit_scale``
``[visual.]transformer.resblocks.{i}.``     ``{text,vision}_model.encoder.layers.{i}.``
   ``ln_1`` / ``ln_2``                         ``layer_norm1`` / ``layer_norm2``
   ``attn.in_proj_{weight,bias}`` (fused)      ``self_attn.{q,k,v}_proj.{weight,bias}`` (split in three, q first)
   ``attn.out_proj.*``                         ``self_attn.out_proj.*``
   ``mlp.c_fc.*`` / ``mlp.c_proj.*``           ``mlp.fc1.*`` / ``mlp.fc2.*``
==========================================  ==================================================================
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trl_visual.rewards.clip_rewards import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPRewardBase,
    ImageTransform,
    load_weights_file,
    resolve_dtype,
    resolve_file,
)
from trl_visual.rewards.registry import register_reward

_TOP_LEVEL: dict[str, str] = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
# open_clip stores these as matrices applied as ``x @ W``; nn.Linear wants ``W.T``.
_PROJECTIONS: dict[str, str] = {
    "text_projection": "text_projection.weight",
    "visual.proj": "visual_projection.weight",
}
_BLOCK_PARTS: dict[str, str] = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Buffers some open_clip versions save; transformers builds its own.
_IGNORED = {"attn_mask", "visual.attn_mask"}
# ``attn.in_proj_weight`` is the one name with ``_`` before weight/bias (nn.MultiheadAttention's packed q, k, v).
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(?:(attn\.in_proj)_|(.+)\.)(weight|bias)$")


def _map_block_key(key: str, value: Tensor) -> dict[str, Tensor]:
    """Map one residual-block tensor; a fused ``in_proj`` tensor becomes three (q, k, v)."""
    match = _BLOCK.match(key)
    if match is None:
        raise KeyError(key)
    visual, layer, in_proj, part, kind = match.groups()
    part = in_proj or part
    prefix = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{layer}"
    if part == "attn.in_proj":
        q, k, v = value.chunk(3, dim=0)
        return {f"{prefix}.self_attn.{name}_proj.{kind}": t.clone() for name, t in zip("qkv", (q, k, v))}
    if part not in _BLOCK_PARTS:
        raise KeyError(key)
    return {f"{prefix}.{_BLOCK_PARTS[part]}.{kind}": value}


def open_clip_to_transformers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an open_clip CLIP (ViT image tower, causal text tower) state dict to ``transformers.CLIPModel``'s.

    Pure: no model is built and the input is not modified. The fused attention ``in_proj`` is split into q, k, v
    (in that order, as ``nn.MultiheadAttention`` packs it) and the two projection matrices are transposed.

    Raises:
        ValueError: when a key has no counterpart (for example layer scale, attentional pooling or a
            Hugging Face text tower, which this architecture does not have), naming the keys.
    """
    mapped: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key in _IGNORED:
            continue
        if key in _TOP_LEVEL:
            mapped[_TOP_LEVEL[key]] = value
        elif key in _PROJECTIONS:
            mapped[_PROJECTIONS[key]] = value.t().contiguous()
        else:
            try:
                mapped.update(_map_block_key(key, value))
            except KeyError:
                unknown.append(key)
    if unknown:
        raise ValueError(
            f"These open_clip keys have no CLIPModel counterpart: {unknown[:10]} (of {len(unknown)})."
        )
    return mapped


def vit_h_14_config() -> Any:
    """The ``transformers.CLIPConfig`` of open_clip's ``ViT-H-14`` (HPSv2's and PickScore's architecture).

    Vision: 32 layers, width 1280, 16 heads of 80, MLP 5120, patch 14, 224 px. Text: 24 layers, width 1024,
    16 heads, MLP 4096, 77 tokens, vocabulary 49408. Embedding 1024. Both towers use exact GELU (not the
    quick GELU of OpenAI's CLIP) and LayerNorm eps 1e-5. ``eos_token_id=49407`` pools the first end-of-text
    token, as open_clip's ``argmax`` over token ids does.
    """
    from transformers import CLIPConfig

    text = {
        "vocab_size": 49408,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0,
        "projection_dim": 1024,
    }
    vision = {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 1024,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)


def clip_model_from_open_clip(
    state_dict: Mapping[str, Tensor], config: Any, dtype: torch.dtype | str = torch.float32
) -> Any:
    """A frozen, eval-mode ``transformers.CLIPModel`` holding an open_clip state dict's weights.

    The model is built without random initialization and every weight is assigned from the checkpoint
    (strictly: a missing or extra tensor, or a shape that does not fit ``config``, raises).
    """
    from transformers import CLIPModel
    from transformers.initialization import no_init_weights

    torch_dtype = resolve_dtype(dtype)
    mapped = {key: value.to(torch_dtype) for key, value in open_clip_to_transformers(state_dict).items()}
    with no_init_weights():
        model = CLIPModel(config)
    try:
        model.load_state_dict(mapped, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(
            "The open_clip checkpoint does not fit the CLIPConfig given (HPSv2.1 is ViT-H-14; pass `config=` "
            f"for another architecture): {error}"
        ) from error
    return model.to(torch_dtype).eval().requires_grad_(False)


def hps_image_transform(size: int = 224) -> ImageTransform:
    """HPSv2's evaluation preprocessing: longest side to ``size`` (bicubic), black padding to a square,
    OpenAI CLIP mean/std."""
    return ImageTransform(
        resize_mode="longest_edge_pad",
        size=size,
        crop_size=None,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        interpolation="bicubic",
    )


@register_reward("hpsv2")
class HPSv2Reward(CLIPRewardBase):
    """HPSv2.1: human preference for text-to-image generations (Wu et al., 2023).

    Score: ``scale * cosine(image embedding, text embedding)`` of the preference-tuned ViT-H/14, the number
    HPSv2's ``score()`` returns (it does not apply ``logit_scale``). With ``scale=1`` typical values are about
    0.20-0.35 (the HPSv2.1 benchmark reports 0.25-0.33 for current models; papers often print it ×100).

    Args:
        model_name_or_path: a Hub repo id, a local folder, or the checkpoint file itself.
        filename: the checkpoint inside ``model_name_or_path`` (``HPS_v2.1_compressed.pt``; ``HPS_v2_compressed.pt``
            is HPSv2.0).
        tokenizer_name_or_path: the CLIP BPE tokenizer; open_clip's ViT-H-14 tokenizer is the one in
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
        config: the ``CLIPConfig`` (or a path / Hub id holding one) of the checkpoint's architecture; defaults to
            :func:`vit_h_14_config`.
        image_size: the side of the square the image is resized and padded to; defaults to the config's
            ``vision_config.image_size`` (224).
        scale: multiplies the cosine.
        dtype: dtype the model runs in.
        batch_size: the most images sent through the model at once.
    """

    name = "hpsv2"

    def __init__(
        self,
        model_name_or_path: str = "xswu/HPSv2",
        *,
        filename: str = "HPS_v2.1_compressed.pt",
        tokenizer_name_or_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        config: Any | str | Path | None = None,
        image_size: int | None = None,
        scale: float = 1.0,
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 32,
    ) -> None:
        from transformers import AutoTokenizer, CLIPConfig

        if config is None:
            config = vit_h_14_config()
        elif isinstance(config, str | Path):
            config = CLIPConfig.from_pretrained(str(config))
        state_dict = load_weights_file(resolve_file(model_name_or_path, filename))
        super().__init__(
            clip_model_from_open_clip(state_dict, config, dtype),
            AutoTokenizer.from_pretrained(tokenizer_name_or_path),
            hps_image_transform(image_size or config.vision_config.image_size),
            dtype=dtype,
            batch_size=batch_size,
            scale=scale,
        )
