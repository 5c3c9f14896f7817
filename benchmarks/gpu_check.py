"""One command that checks the trainer on one GPU at real model sizes, and prints one table.

    python benchmarks/gpu_check.py            # one H100-class GPU: sized to finish in under 8 minutes
    python benchmarks/gpu_check.py --smoke    # the same code on the CPU, architectures shrunk: a few minutes

Every model is built from its published config with random weights (:mod:`architectures`; nothing is
downloaded), in bf16 with float32 LoRA (``bf16=True``), and trained on the ``red_channel`` reward. The rows:

- **SD3.5-Medium at 512²** (``step_time.py --reference``'s bench: one prompt × G = 8, 8 sampling steps of which 7
  are trained, CFG 4.5, LoRA r 8): the GRPO trainer against the reference loop in Flow-GRPO's shape (ratio of
  seconds per step), then BPGO, ViPO with DINOv2-L's architecture as its backbone (at 224 pixels) and GRPO with
  the denoiser under ``torch.compile``, each against GRPO. Model FLOP utilisation (MFU: the denoiser FLOPs a step
  needs, counted by ``torch.utils.flop_counter``, over the step's time and ``--peak-tflops``) and peak memory.
- **FLUX.1-dev at 512²**, a LoRA GRPO step with gradient checkpointing (G = 2, 4 sampling steps, 2 trained,
  guidance 3.5): seconds per step and peak memory.
- **Wan2.1-T2V-1.3B**, 33 frames of 480×832 (17 or 9 frames if 33 run out of memory; the row says which), CFG
  5, G = 2, 4 sampling steps, 2 trained, gradient checkpointing: seconds per step and peak memory.

Each contender runs one warm-up step (the compile happens there) and ``--steps`` timed ones, one after another
(one round: a GPU is not shared). ``torch.compile`` is the trainer's own ``torch_compile=True`` (accelerate
compiles the denoiser that the training passes run; sampling stays eager), with inductor. Without a GPU the
command says so in one line and exits with status 2. ``--smoke`` divides every width by 8 and cuts every model to
one block (FLUX: one of each kind), at 64² (video: 5 frames of 32²), on the CPU in float32, and compiles with the
``eager`` backend (dynamo traces the same graphs; inductor's CPU code generation alone takes minutes); its seconds,
MFU and memory (the process's maximum resident set there) check the code, not the speed.
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
from architectures import (
    CLIP_L,
    FLUX_DEV_TRANSFORMER,
    SD3_FLUX_VAE,
    T5_XXL,
    UMT5_XXL,
    WAN_T2V_1_3B_TRANSFORMER,
    WAN_VAE,
    Shrink,
    clip_text,
    flux_transformer,
    image_vae,
    t5_encoder,
    video_vae,
    wan_transformer,
)
from step_time import (
    Bench,
    Measured,
    PipelineFactory,
    forward_flops,
    measured,
    step_flops,
    time_reference,
    time_trainer,
)

from trl_visual.testing import tiny_flux_pipeline, tiny_wan_pipeline

NO_GPU = (
    "gpu_check.py needs a CUDA GPU and found none; `python benchmarks/gpu_check.py --smoke` runs the same code "
    "on the CPU with shrunken architectures."
)


@dataclass
class Scale:
    """What differs between the GPU run and the CPU smoke run: device, precision, how far each architecture is
    shrunk, and the sizes."""

    device: str
    dtype: torch.dtype
    shrink: Shrink
    backbone_layers: int | None
    sd3_resolution: int
    max_sequence_length: int
    flux_resolution: int
    video_sizes: tuple[tuple[int, int, int], ...]  # (frames, height, width), largest first
    compile_backend: str


GPU = Scale(
    device="cuda",
    dtype=torch.bfloat16,
    shrink=Shrink(),
    backbone_layers=None,
    sd3_resolution=512,
    max_sequence_length=256,
    flux_resolution=512,
    video_sizes=((33, 480, 832), (17, 480, 832), (9, 480, 832)),
    compile_backend="inductor",
)
SMOKE = Scale(
    device="cpu",
    dtype=torch.float32,
    shrink=Shrink(width=8, layers=1, text_layers=1),
    backbone_layers=1,
    sd3_resolution=64,
    max_sequence_length=16,
    flux_resolution=64,
    video_sizes=((5, 32, 32),),
    compile_backend="eager",  # dynamo traces the same graphs; inductor's CPU codegen takes minutes
)


@dataclass
class Row:
    """One line of the table; ``None`` prints as "–"."""

    name: str
    seconds: float
    ratio: str | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    note: str = ""


# ------------------------------------------------------------------------------------------------------
# SD3.5-Medium: the trainer against the reference loop, the methods, torch.compile
# ------------------------------------------------------------------------------------------------------
def sd35_bench(scale: Scale) -> Bench:
    """``step_time.py --reference --device cuda``'s bench (one prompt × G = 8, 8 steps, 7 trained), at ``scale``."""
    shrink = scale.shrink
    return Bench(
        device=scale.device,
        dtype=scale.dtype,
        arch="sd35-medium",
        resolution=scale.sd3_resolution,
        num_layers=shrink.layers or 24,
        text_layers=shrink.text_layers,
        prompts_per_step=1,
        num_generations=8,
        max_sequence_length=scale.max_sequence_length,
        width_divisor=shrink.width,
        backbone="dinov2-large",
        backbone_layers=scale.backbone_layers,
    )


def sd35_rows(scale: Scale, steps: int, peak_tflops: float) -> list[Row]:
    bench = sd35_bench(scale)
    factory = PipelineFactory(bench)
    forward = forward_flops(factory(), bench)
    flops = step_flops(forward, bench, cfg=True, trained_passes=1)
    reference_flops = step_flops(forward, bench, cfg=True, trained_passes=2)
    contenders: dict[str, tuple[Callable[[], list[float]], float]] = {
        "GRPO": (lambda: time_trainer("GRPO", factory, bench, 4.5, steps), flops),
        "reference": (lambda: time_reference(factory, bench, 4.5, steps), reference_flops),
        "BPGO": (lambda: time_trainer("BPGO", factory, bench, 4.5, steps), flops),
        "ViPO": (lambda: time_trainer("ViPO", factory, bench, 4.5, steps), flops),
        "GRPO compiled": (  # the trainer's own option: accelerate compiles the denoiser of the training passes
            lambda: time_trainer(
                "GRPO",
                factory,
                bench,
                4.5,
                steps,
                torch_compile=True,
                torch_compile_backend=scale.compile_backend,
            ),
            flops,
        ),
    }
    results: dict[str, Measured] = {}
    for name, (run, count) in contenders.items():
        results[name] = measured(run, bench, count)
        release()
    factory.components.clear()  # the text encoders and VAE, before the next model is built
    release()

    def row(name: str, label: str, over: str | None, note: str = "") -> Row:
        result = results[name]
        ratio = f"{result.median / results[over].median:.2f}× {over}" if over else None
        mfu = result.flops_per_step / result.median / (peak_tflops * 1e12)
        return Row(label, result.median, ratio, mfu, peak_gib(result), note)

    size = f"{bench.resolution}²"
    return [
        row("GRPO", f"SD3.5-M {size} GRPO trainer", "reference", "CFG 4.5, B = 1 × 8, 8 steps, 7 trained"),
        row(
            "reference", f"SD3.5-M {size} reference loop", None, "Flow-GRPO's shape: 2B forwards in training"
        ),
        row("BPGO", f"SD3.5-M {size} BPGO", "GRPO"),
        row("ViPO", f"SD3.5-M {size} ViPO, DINOv2-L", "GRPO", f"backbone at {bench.backbone_image_size} px"),
        row(
            "GRPO compiled", f"SD3.5-M {size} GRPO, torch.compile", "GRPO", f"backend {scale.compile_backend}"
        ),
    ]


# ------------------------------------------------------------------------------------------------------
# FLUX.1-dev and Wan2.1-T2V-1.3B
# ------------------------------------------------------------------------------------------------------
def flux_dev_pipeline(shrink: Shrink):
    """FLUX.1-dev's architecture (:mod:`architectures`), random weights, on the default device; the tokenizers
    are the tiny in-memory ones (their ids fit every vocabulary)."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizers = tiny_flux_pipeline()
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vae = image_vae(SD3_FLUX_VAE, shrink)
    return FluxPipeline(
        transformer=FluxTransformer2DModel(**flux_transformer(FLUX_DEV_TRANSFORMER, shrink)),
        scheduler=tokenizers.scheduler,
        vae=AutoencoderKL(
            **vae, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False
        ),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip_text(CLIP_L, shrink), **ids)),
        tokenizer=tokenizers.tokenizer,
        text_encoder_2=T5EncoderModel(T5Config(**t5_encoder(T5_XXL, shrink))),
        tokenizer_2=tokenizers.tokenizer_2,
    )


def wan_1_3b_pipeline(shrink: Shrink):
    """Wan2.1-T2V-1.3B's architecture (:mod:`architectures`), random weights, on the default device."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tiny = tiny_wan_pipeline()
    return WanPipeline(
        tokenizer=tiny.tokenizer,
        text_encoder=UMT5EncoderModel(UMT5Config(**t5_encoder(UMT5_XXL, shrink))),
        vae=AutoencoderKLWan(**video_vae(WAN_VAE, shrink)),
        scheduler=tiny.scheduler,
        transformer=WanTransformer3DModel(**wan_transformer(WAN_T2V_1_3B_TRANSFORMER, shrink)),
    )


def on_bench(build: Callable[[], object], bench: Bench) -> Callable[[], object]:
    """``build``'s pipeline on the bench's device, frozen parts in its dtype (float32 LoRA is the trainer's). It is
    built in that dtype: FLUX.1-dev and T5-XXL in float32 would hold 67 GB for a moment."""

    def make():
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(bench.dtype)
        try:
            with torch.device(bench.device):
                pipeline = build()
        finally:
            torch.set_default_dtype(default)
        for module in pipeline.components.values():
            if isinstance(module, torch.nn.Module):
                module.to(bench.device, bench.dtype).eval()
        return pipeline

    return make


def small_group(scale: Scale, resolution: int) -> Bench:
    """G = 2 samples of one prompt, 4 sampling steps of which 2 are trained, gradient checkpointing."""
    return Bench(
        device=scale.device,
        dtype=scale.dtype,
        arch="other",
        resolution=resolution,
        num_layers=0,
        prompts_per_step=1,
        num_generations=2,
        num_inference_steps=4,
        trained_steps=2,
        max_sequence_length=scale.max_sequence_length,
        gradient_checkpointing=True,
    )


def flux_row(scale: Scale, steps: int) -> Row:
    bench = small_group(scale, scale.flux_resolution)
    factory = on_bench(lambda: flux_dev_pipeline(scale.shrink), bench)
    result = measured(lambda: time_trainer("GRPO", factory, bench, 3.5, steps), bench, 0.0)
    release()
    size = f"{bench.resolution}²"
    return Row(
        f"FLUX.1-dev {size} LoRA, GC",
        result.median,
        None,
        None,
        peak_gib(result),
        "G = 2, 4 steps, 2 trained",
    )


def wan_row(scale: Scale, steps: int) -> Row:
    for frames, height, width in scale.video_sizes:
        bench = replace(small_group(scale, height), resolution=height)
        factory = on_bench(lambda: wan_1_3b_pipeline(scale.shrink), bench)
        size = dict(height=height, width=width, num_frames=frames)
        try:
            run = partial(time_trainer, "GRPO", factory, bench, 5.0, steps, **size)
            result = measured(run, bench, 0.0)
        except torch.cuda.OutOfMemoryError:
            release()
            continue
        release()
        name = f"Wan2.1-1.3B T2V {frames}×{height}×{width}, GC"
        return Row(name, result.median, None, None, peak_gib(result), "CFG 5, G = 2, 4 steps, 2 trained")
    return Row("Wan2.1-1.3B T2V", math.nan, note="out of memory at every size tried")


# ------------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------------
def peak_gib(result: Measured) -> float:
    """Peak GPU memory of the run, or on the CPU the process's maximum resident set so far (GiB)."""
    if result.peak_memory is not None:
        return result.peak_memory
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def table(rows: list[Row], header: str) -> str:
    """The rows as one Markdown table, under ``header``."""

    def cell(value: float | str | None, form: str = "") -> str:
        if value is None:
            return "–"
        return value if isinstance(value, str) else format(value, form)

    lines = [
        header,
        "",
        "| contender | s/step | ratio | MFU | peak GiB | settings |",
        "|---|---:|---|---:|---:|---|",
    ]
    for row in rows:
        mfu = None if row.mfu is None else f"{100 * row.mfu:.1f} %"
        lines.append(
            f"| {row.name} | {cell(row.seconds, '.3f')} | {cell(row.ratio)} | {cell(mfu)} "
            f"| {cell(row.peak_gib, '.1f')} | {row.note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU, architectures shrunk")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per contender (after one warm-up)")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="dense bf16 peak (989: H100/H200; smoke: 1)"
    )
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    scale = SMOKE if args.smoke else GPU
    peak = args.peak_tflops or (1.0 if args.smoke else 989.0)
    if args.smoke:
        torch.set_num_threads(1)
    start = time.perf_counter()
    rows = sd35_rows(scale, args.steps, peak) + [flux_row(scale, args.steps), wan_row(scale, args.steps)]
    device = torch.cuda.get_device_name() if scale.device == "cuda" else "CPU (smoke: shrunk architectures)"
    header = (
        f"gpu_check on {device}, {str(scale.dtype).removeprefix('torch.')} with float32 LoRA r 8, "
        f"{args.steps} timed steps per contender after one warm-up, MFU against {peak:g} TFLOP/s; "
        f"{time.perf_counter() - start:.0f} s in all"
    )
    print(table(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
