"""The published architectures the benchmarks build with random weights (nothing is downloaded), and one way to
shrink them for a CPU.

The numbers are the ``config.json`` values of the released checkpoints: SD3.5-Medium, FLUX.1-dev, Wan2.1-T2V
(1.3B and 14B), their text encoders (CLIP-L, OpenCLIP bigG, T5-XXL, UMT5-XXL) and VAEs, and DINOv2-L (ViPO's
backbone). ``memory_estimate.py`` counts them on the meta device; ``step_time.py`` and ``gpu_check.py`` build
them on a device.

:class:`Shrink` divides every width by the same factor and cuts the blocks, keeping the head counts (so the
head width shrinks) wherever the head count does not set a width of its own: a model and its shrunk copy have
the same shape of computation, and two models shrunk by the same factor keep their size ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: ``SD3Transformer2DModel`` of stable-diffusion-3.5-medium
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
#: ``SD3Transformer2DModel`` of stable-diffusion-3.5-large: wider, deeper, no dual-attention blocks
SD35_LARGE_TRANSFORMER = {
    key: value for key, value in SD35_MEDIUM_TRANSFORMER.items() if key != "dual_attention_layers"
} | dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192)
#: ``FluxTransformer2DModel`` of FLUX.1-dev (19 double-stream and 38 single-stream blocks)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
)
#: ``WanTransformer3DModel`` of Wan2.1-T2V-1.3B (14B: 40 heads, ``ffn_dim`` 13824, 40 layers)
WAN_T2V_1_3B_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
WAN_T2V_14B_TRANSFORMER = {
    **WAN_T2V_1_3B_TRANSFORMER,
    "num_attention_heads": 40,
    "ffn_dim": 13824,
    "num_layers": 40,
}
#: SD3's CLIP-L text encoder (projects to 768; ``CLIPTextConfig``'s default is 512)
CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
#: SD3's OpenCLIP bigG text encoder
CLIP_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)
#: T5-XXL's encoder (SD3, FLUX)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
)
#: UMT5-XXL's encoder (Wan)
UMT5_XXL = {**T5_XXL, "vocab_size": 256384}
#: the 16-channel ``AutoencoderKL`` SD3/SD3.5 and FLUX.1 share
SD3_FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
)
#: Wan2.1's video VAE
WAN_VAE = dict(base_dim=96, z_dim=16)
#: DINOv2-L (facebook/dinov2-large), ViPO's default backbone: 0.30 B parameters
DINOV2_LARGE = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14, image_size=518
)


@dataclass(frozen=True)
class Shrink:
    """Every width divided by ``width``; the denoiser and the backbone cut to ``layers`` blocks (each stream
    of FLUX to ``layers``), the text encoders to ``text_layers`` (``None``: as published)."""

    width: int = 1
    layers: int | None = None
    text_layers: int | None = None

    def __bool__(self) -> bool:
        return self != Shrink()

    def w(self, value: int) -> int:
        """``value / width``, which must divide exactly (a published width that does not is refused)."""
        if value % self.width:
            raise ValueError(f"width {value} is not divisible by the shrink factor {self.width}.")
        return value // self.width


def sd3_transformer(config: dict, shrink: Shrink = Shrink()) -> dict:
    """An SD3 transformer config shrunk: heads ÷ width (64-wide heads kept), text widths ÷ width."""
    layers = shrink.layers or config["num_layers"]
    heads = shrink.w(config["num_attention_heads"])
    out = {
        **config,
        "num_layers": layers,
        "num_attention_heads": heads,
        "caption_projection_dim": heads * config["attention_head_dim"],
        "joint_attention_dim": shrink.w(config["joint_attention_dim"]),
        "pooled_projection_dim": shrink.w(config["pooled_projection_dim"]),
    }
    if "dual_attention_layers" in config:
        out["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < layers)
    return out


def flux_transformer(config: dict, shrink: Shrink = Shrink()) -> dict:
    """A FLUX transformer config shrunk: heads ÷ width (128-wide heads kept: the RoPE axes fill them)."""
    return {
        **config,
        "num_layers": shrink.layers or config["num_layers"],
        "num_single_layers": shrink.layers or config["num_single_layers"],
        "num_attention_heads": shrink.w(config["num_attention_heads"]),
        "joint_attention_dim": shrink.w(config["joint_attention_dim"]),
        "pooled_projection_dim": shrink.w(config["pooled_projection_dim"]),
    }


def wan_transformer(config: dict, shrink: Shrink = Shrink()) -> dict:
    """A Wan transformer config shrunk: head width, MLP and text width ÷ width, heads kept."""
    return {
        **config,
        "num_layers": shrink.layers or config["num_layers"],
        "attention_head_dim": shrink.w(config["attention_head_dim"]),
        "ffn_dim": shrink.w(config["ffn_dim"]),
        "text_dim": shrink.w(config["text_dim"]),
    }


def clip_text(config: dict, shrink: Shrink = Shrink()) -> dict:
    return {
        **config,
        "hidden_size": shrink.w(config["hidden_size"]),
        "intermediate_size": shrink.w(config["intermediate_size"]),
        "projection_dim": shrink.w(config["projection_dim"]),
        "num_hidden_layers": shrink.text_layers or config["num_hidden_layers"],
    }


def t5_encoder(config: dict, shrink: Shrink = Shrink()) -> dict:
    return {
        **config,
        "d_model": shrink.w(config["d_model"]),
        "d_kv": shrink.w(config["d_kv"]),
        "d_ff": shrink.w(config["d_ff"]),
        "num_layers": shrink.text_layers or config["num_layers"],
    }


def image_vae(config: dict, shrink: Shrink = Shrink()) -> dict:
    channels = tuple(shrink.w(c) for c in config["block_out_channels"])
    return {**config, "block_out_channels": channels, "norm_num_groups": max(1, 32 // shrink.width)}


def video_vae(config: dict, shrink: Shrink = Shrink()) -> dict:
    return {**config, "base_dim": shrink.w(config["base_dim"])}


def dinov2(config: dict = DINOV2_LARGE, shrink: Shrink = Shrink()) -> dict:
    """DINOv2 shrunk: hidden width ÷ width (heads kept), blocks cut to ``layers``."""
    return {
        **config,
        "hidden_size": shrink.w(config["hidden_size"]),
        "num_hidden_layers": shrink.layers or config["num_hidden_layers"],
    }


def dinov2_model(shrink: Shrink = Shrink(), seed: int = 0) -> torch.nn.Module:
    """DINOv2-L's architecture (shrunk by ``shrink``) with random weights, in eval mode."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(**dinov2(DINOV2_LARGE, shrink))).eval()


def count(module: torch.nn.Module) -> int:
    """Parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
