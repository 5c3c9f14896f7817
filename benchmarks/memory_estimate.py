"""Estimated GPU memory and time per step of the shipped real-model configs, without a download.

    python benchmarks/memory_estimate.py

Each model is built from its published ``config.json`` values (written out below) on the ``meta``
device, so every parameter is counted exactly and nothing is allocated. From the counts and the shipped
YAML settings the script estimates, per config:

- frozen weights in bf16 (denoiser, text encoders, VAE) and the trainable LoRA in float32 with AdamW's two
  moments: ``4 + 4 + 4`` bytes per trainable parameter, plus its float32 gradient;
- the denoiser's forward FLOPs per sample and step, ``2 · P_denoiser · N_tokens`` (matrix products only;
  attention's ``4 · N² · d`` per layer is added), and from them a time per training step at an assumed
  400 TFLOP/s of bf16 throughput (about 50 % of an H100's dense peak). A training step samples
  ``B`` trajectories of ``T`` steps (× 2 with CFG) and trains ``round(f · T)`` of them (forward + backward
  ≈ 3 × forward, of the conditional branch only: ``cfg_uncond_grad=False`` reuses the sampled ``v_u``).

These are **estimates**: activations, the VAE decode, rewards and kernel efficiency are not measured
(activations with gradient checkpointing are a few GB at these sizes). Replace them with measured figures
from a GPU run (``benchmarks/step_time.py`` on the device) when available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from transformers import PreTrainedModel

ASSUMED_TFLOPS = 400.0


@dataclass
class Setting:
    """One shipped config: the model family and the YAML values that set the cost of a step."""

    yaml: str
    family: str
    height: int
    width: int
    num_frames: int
    batch: int  # samples per device and micro-step
    accumulation: int
    steps: int  # num_inference_steps
    trained_fraction: float
    cfg: bool  # a second (unconditional) pass at every step
    lora_rank: int


SETTINGS = [
    Setting("sd35_pickscore_grpo.yaml", "sd35-medium", 512, 512, 1, 8, 4, 10, 1.0, True, 32),
    Setting(
        "flux_hpsv2_bpgo.yaml / flux_hpsv2_vipo.yaml", "flux-dev", 512, 512, 1, 12, 4, 16, 0.6, False, 32
    ),
    Setting("wan_video_bpgo.yaml", "wan2.1-t2v-1.3b", 480, 832, 33, 8, 4, 16, 0.6, True, 32),
]

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


#: ``SD3Transformer2DModel`` of stable-diffusion-3.5-medium (also built by ``step_time.py --device cuda``)
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


def sd35_medium() -> dict[str, torch.nn.Module]:
    from diffusers import SD3Transformer2DModel

    return {
        "denoiser": SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER),
        "text encoders (CLIP-L, CLIP-G, T5-XXL)": _clip_l_g_t5(),
        "vae": _sd3_flux_vae(),
    }


def flux_dev() -> dict[str, torch.nn.Module]:
    from diffusers import FluxTransformer2DModel

    return {
        "denoiser": FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
        ),
        "text encoders (CLIP-L, T5-XXL)": _clip_l_g_t5(with_clip_g=False),
        "vae": _sd3_flux_vae(),
    }


def wan_1_3b() -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    return {
        "denoiser": WanTransformer3DModel(
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
        ),
        "text encoder (UMT5-XXL)": UMT5EncoderModel(
            UMT5Config(
                vocab_size=256384,
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                feed_forward_proj="gated-gelu",
            )
        ),
        "vae": AutoencoderKLWan(base_dim=96, z_dim=16),
    }


def _sd3_flux_vae() -> torch.nn.Module:
    """The 16-channel ``AutoencoderKL`` that SD3/SD3.5 and FLUX.1 share."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
    )


def _clip_l_g_t5(with_clip_g: bool = True) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    encoders = [
        CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
            )
        ),
        T5EncoderModel(
            T5Config(
                vocab_size=32128,
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                feed_forward_proj="gated-gelu",
            )
        ),
    ]
    if with_clip_g:
        encoders.append(
            CLIPTextModelWithProjection(
                CLIPTextConfig(
                    hidden_size=1280,
                    intermediate_size=5120,
                    num_hidden_layers=32,
                    num_attention_heads=20,
                    projection_dim=1280,
                )
            )
        )
    return torch.nn.ModuleList(encoders)


BUILDERS = {"sd35-medium": sd35_medium, "flux-dev": flux_dev, "wan2.1-t2v-1.3b": wan_1_3b}


def _tie_embeddings(module: torch.nn.Module) -> None:
    """``init_empty_weights`` leaves T5's ``shared`` and ``encoder.embed_tokens`` as two tensors; the real
    checkpoints tie them, so tie them back before counting."""
    for submodule in module.modules():
        if isinstance(submodule, PreTrainedModel):
            submodule.tie_weights()


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_parameters(denoiser: torch.nn.Module, rank: int) -> int:
    """``r · (d_in + d_out)`` for every ``nn.Linear`` whose name ends with a LoRA target."""
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in denoiser.named_modules()
        if isinstance(m, torch.nn.Linear) and name.endswith(LORA_TARGETS)
    )


def denoiser_tokens(setting: Setting) -> tuple[int, int, int]:
    """Image/video tokens, attention width ``d`` and layers of the denoiser at the config's resolution."""
    h, w = setting.height // 16, setting.width // 16  # VAE factor 8, patch 2
    if setting.family == "wan2.1-t2v-1.3b":
        return (setting.num_frames - 1) // 4 * h * w + h * w, 12 * 128, 30
    if setting.family == "flux-dev":
        return h * w + 512, 24 * 128, 19 + 38  # image tokens + T5 tokens in the joint stream
    return h * w + 333, 24 * 64, 24  # image tokens + 77 CLIP + 256 T5 tokens


def estimate(setting: Setting) -> dict[str, float]:
    with init_empty_weights():
        parts = BUILDERS[setting.family]()
    for module in parts.values():
        _tie_embeddings(module)
    gib = 1024**3
    frozen = sum(count(m) for m in parts.values())
    lora = lora_parameters(parts["denoiser"], setting.lora_rank)
    tokens, width, layers = denoiser_tokens(setting)
    forward = 2 * count(parts["denoiser"]) * tokens + layers * 4 * tokens**2 * width
    passes = 2 if setting.cfg else 1
    trained = round(setting.trained_fraction * setting.steps)
    # training differentiates the conditional branch only (cfg_uncond_grad=False reuses the sampled v_u)
    flops = setting.batch * forward * (passes * setting.steps + 3 * trained) * setting.accumulation
    return {
        "params": {name: count(m) for name, m in parts.items()},
        "weights_gib": frozen * 2 / gib,
        "lora_params": lora,
        "lora_gib": lora * 16 / gib,  # fp32 weight + grad + two AdamW moments
        "step_seconds": flops / (ASSUMED_TFLOPS * 1e12),
    }


def main() -> None:
    print(f"Estimates (meta-device parameter counts; {ASSUMED_TFLOPS:.0f} TFLOP/s bf16 assumed)\n")
    print("| config | model parameters | bf16 weights | LoRA r=32 (fp32 + AdamW) | est. s / optimizer step |")
    print("|---|---|---|---|---|")
    for setting in SETTINGS:
        e = estimate(setting)
        params = ", ".join(f"{name} {n / 1e9:.2f} B" for name, n in e["params"].items())
        print(
            f"| `{setting.yaml}` | {params} | {e['weights_gib']:.1f} GiB | "
            f"{e['lora_params'] / 1e6:.1f} M, {e['lora_gib']:.2f} GiB | ~{math.ceil(e['step_seconds'])} |"
        )


if __name__ == "__main__":
    main()
