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

A second table (``--memory``, also printed by default) gives, per family, the parameters, the LoRA, the
optimizer state (LoRA and full fine-tuning, AdamW in float32 and 8-bit) and an activation estimate for one
trained timestep with and without gradient checkpointing (:func:`activation_bytes` states the formula).

These are **estimates**: the VAE decode, rewards and kernel efficiency are not measured
and activations follow a formula, not a profile. Replace them with measured figures
from a GPU run (``benchmarks/step_time.py`` on the device) when available.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from architectures import (
    CLIP_G,
    CLIP_L,
    FLUX_DEV_TRANSFORMER,
    SD3_FLUX_VAE,
    SD35_LARGE_TRANSFORMER,
    SD35_MEDIUM_TRANSFORMER,
    T5_XXL,
    UMT5_XXL,
    WAN_T2V_1_3B_TRANSFORMER,
    WAN_T2V_14B_TRANSFORMER,
    WAN_VAE,
    count,
)
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
    Setting("sd35_pickscore_grpo.yaml with SD3.5-Large", "sd35-large", 512, 512, 1, 8, 4, 10, 1.0, True, 32),
    Setting(
        "flux_hpsv2_bpgo.yaml / flux_hpsv2_vipo.yaml", "flux-dev", 512, 512, 1, 12, 4, 16, 0.6, False, 32
    ),
    Setting("wan_video_bpgo.yaml", "wan2.1-t2v-1.3b", 480, 832, 33, 8, 4, 16, 0.6, True, 32),
    Setting(
        "wan_video_bpgo.yaml with Wan2.1-T2V-14B", "wan2.1-t2v-14b", 480, 832, 33, 8, 4, 16, 0.6, True, 32
    ),
]

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def sd35_medium() -> dict[str, torch.nn.Module]:
    from diffusers import SD3Transformer2DModel

    return {
        "denoiser": SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER),
        "text encoders (CLIP-L, CLIP-G, T5-XXL)": _clip_l_g_t5(),
        "vae": _sd3_flux_vae(),
    }


def sd35_large() -> dict[str, torch.nn.Module]:
    from diffusers import SD3Transformer2DModel

    return {
        "denoiser": SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER),
        "text encoders (CLIP-L, CLIP-G, T5-XXL)": _clip_l_g_t5(),
        "vae": _sd3_flux_vae(),
    }


def flux_dev() -> dict[str, torch.nn.Module]:
    from diffusers import FluxTransformer2DModel

    return {
        "denoiser": FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER),
        "text encoders (CLIP-L, T5-XXL)": _clip_l_g_t5(with_clip_g=False),
        "vae": _sd3_flux_vae(),
    }


def wan_1_3b() -> dict[str, torch.nn.Module]:
    return _wan(WAN_T2V_1_3B_TRANSFORMER)


def wan_14b() -> dict[str, torch.nn.Module]:
    return _wan(WAN_T2V_14B_TRANSFORMER)


def _wan(transformer: dict) -> dict[str, torch.nn.Module]:
    """Wan2.1 text-to-video: the transformer, UMT5-XXL and the video VAE."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    return {
        "denoiser": WanTransformer3DModel(**transformer),
        "text encoder (UMT5-XXL)": UMT5EncoderModel(UMT5Config(**UMT5_XXL)),
        "vae": AutoencoderKLWan(**WAN_VAE),
    }


def _sd3_flux_vae() -> torch.nn.Module:
    """The 16-channel ``AutoencoderKL`` that SD3/SD3.5 and FLUX.1 share."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**SD3_FLUX_VAE)


def _clip_l_g_t5(with_clip_g: bool = True) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    encoders = [
        CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
        T5EncoderModel(T5Config(**T5_XXL)),
    ]
    if with_clip_g:
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)))
    return torch.nn.ModuleList(encoders)


BUILDERS = {
    "sd35-medium": sd35_medium,
    "sd35-large": sd35_large,
    "flux-dev": flux_dev,
    "wan2.1-t2v-1.3b": wan_1_3b,
    "wan2.1-t2v-14b": wan_14b,
}

#: attention width ``d`` and number of transformer blocks of each family's denoiser
DENOISER_SHAPES = {
    "sd35-medium": (24 * 64, 24),
    "sd35-large": (38 * 64, 38),
    "flux-dev": (24 * 128, 19 + 38),
    "wan2.1-t2v-1.3b": (12 * 128, 30),
    "wan2.1-t2v-14b": (40 * 128, 40),
}


def _tie_embeddings(module: torch.nn.Module) -> None:
    """``init_empty_weights`` leaves T5's ``shared`` and ``encoder.embed_tokens`` as two tensors; the real
    checkpoints tie them, so tie them back before counting."""
    for submodule in module.modules():
        if isinstance(submodule, PreTrainedModel):
            submodule.tie_weights()


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
    width, layers = DENOISER_SHAPES[setting.family]
    if setting.family.startswith("wan"):
        return (setting.num_frames - 1) // 4 * h * w + h * w, width, layers
    if setting.family == "flux-dev":
        return h * w + 512, width, layers  # image tokens + T5 tokens in the joint stream
    return h * w + 333, width, layers  # image tokens + 77 CLIP + 256 T5 tokens


#: bytes of activations a transformer block keeps for its backward, per token and unit of width, in bf16 with
#: fused (flash / SDPA) attention: Korthikanti et al. (2022)'s ``34 s h`` per block and sample
ACTIVATION_BYTES_PER_TOKEN_WIDTH = 34
#: with gradient checkpointing each block keeps only its bf16 input (``2 s h``) and one block is recomputed
CHECKPOINTED_BYTES_PER_TOKEN_WIDTH = 2


def activation_bytes(setting: Setting, checkpointing: bool) -> float:
    """Activations held for one backward (one trained timestep of a micro-batch):

    ``A = 34 · s · d · L · b`` without gradient checkpointing, and ``A = (2 · L + 34) · s · d · b`` with it
    (every block's input, plus one block's activations while it is recomputed), for ``s`` tokens of width ``d``,
    ``L`` blocks and ``b = per_device_train_batch_size`` inputs, doubled with CFG in training (both branches
    go through the forward). The MLP ratio is taken as 4 (Wan's is 5.8 and FLUX's single blocks fuse attention and
    MLP: ± 30 %); text-encoder, VAE and reward activations are not included.
    """
    tokens, width, layers = denoiser_tokens(setting)
    inputs = setting.batch * (2 if setting.cfg else 1)
    per_block = ACTIVATION_BYTES_PER_TOKEN_WIDTH * tokens * width * inputs
    if not checkpointing:
        return per_block * layers
    return CHECKPOINTED_BYTES_PER_TOKEN_WIDTH * tokens * width * inputs * layers + per_block


def memory(setting: Setting) -> dict[str, float]:
    """Parameter counts and memory (bytes) of one family at one config (see :func:`memory_table`)."""
    with init_empty_weights():
        parts = BUILDERS[setting.family]()
    for module in parts.values():
        _tie_embeddings(module)
    params = {name: count(module) for name, module in parts.items()}
    denoiser = params["denoiser"]
    text = sum(n for name, n in params.items() if name.startswith("text encoder"))
    lora = lora_parameters(parts["denoiser"], setting.lora_rank)
    return {
        **{f"params/{name}": n for name, n in params.items()},
        "params/text": text,
        "lora": lora,
        "weights": 2 * sum(params.values()),
        "weights_text_offloaded": 2 * (sum(params.values()) - text),
        "lora_training": 16 * lora,  # fp32 weight, gradient, two AdamW moments
        "full_adamw": 8 * denoiser,  # two fp32 moments; + 4 (fp32 gradient) + 4 (fp32 master) on top
        "full_adamw_8bit": 2 * denoiser,
        "activations": activation_bytes(setting, checkpointing=False),
        "activations_checkpointed": activation_bytes(setting, checkpointing=True),
    }


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


def memory_table() -> None:
    """Per family: parameters, LoRA, optimizer state, activations with and without gradient checkpointing."""
    gib = 1024**3
    print(
        "| family (config) | parameters: denoiser / text encoders / VAE | bf16 weights (text encoders on CPU) "
        "| LoRA r=32: params, fp32 + grad + AdamW | full FT AdamW moments: fp32 / 8-bit "
        "| activations, 1 trained step: no GC / GC |"
    )
    print("|---|---|---|---|---|---|")
    for setting in SETTINGS:
        m = memory(setting)
        parts = [n for name, n in m.items() if name.startswith("params/") and name != "params/text"]
        print(
            f"| {setting.family} (`{setting.yaml}`) | {' / '.join(f'{n / 1e9:.2f} B' for n in parts)} "
            f"| {m['weights'] / gib:.1f} GiB ({m['weights_text_offloaded'] / gib:.1f} GiB) "
            f"| {m['lora'] / 1e6:.1f} M, {m['lora_training'] / gib:.2f} GiB "
            f"| {m['full_adamw'] / gib:.0f} / {m['full_adamw_8bit'] / gib:.0f} GiB "
            f"| {m['activations'] / gib:.0f} / {m['activations_checkpointed'] / gib:.1f} GiB |"
        )


def main() -> None:
    if "--memory" in sys.argv:
        memory_table()
        return
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
    print("\nMemory per family (meta-device parameter counts; activations: see activation_bytes)\n")
    memory_table()


if __name__ == "__main__":
    main()
