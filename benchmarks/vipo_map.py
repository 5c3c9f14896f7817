"""How much ViPO's perceptual map costs, and a check that it equals the reference-style computation.

Three figures:

1. **Map time per image**: backbone forward, and the map itself (``perceptual_map``: batched PCA, sign,
   aggregation, smoothing, resize, all in torch on the training device), on the same features.
2. **Reference-style map**: the released code's way, one image at a time, features moved to the CPU, PCA with
   numpy's SVD, then the same steps in numpy/PIL. Same features, same sign rule: the maps must agree to
   float error (the max absolute difference is printed).
3. **Share of a training step** (``--steps N``, tiny SD3 on the CPU): ViPO's step time against GRPO's, and
   the time of the maps inside a ViPO step.

Examples::

    python benchmarks/vipo_map.py                               # tiny random DINOv2, 32 images of 256²
    python benchmarks/vipo_map.py --vit-large --image-size 1024 --device cuda   # ViT-L/14 shapes, random init
    python benchmarks/vipo_map.py --backbone facebook/dinov2-large --device cuda
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image
from transformers import PrinterCallback

from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer
from trl_visual.backbones import VisionBackbone
from trl_visual.core.vipo import perceptual_map
from trl_visual.trainer.vipo_config import ViPOConfig
from trl_visual.trainer.vipo_trainer import ViPOTrainer


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up, and its last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def random_backbone(large: bool, patch_size: int = 8) -> VisionBackbone:
    """A random-weight DINOv2: ViT-L/14's shapes (``large``) or a small ViT with ``patch_size`` patches."""
    from transformers import Dinov2Config, Dinov2Model

    if large:
        config = Dinov2Config(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            patch_size=14,
        )
    else:
        config = Dinov2Config(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            patch_size=patch_size,
        )
    torch.manual_seed(0)
    model = Dinov2Model(config).eval()
    return VisionBackbone(model, image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))


def structured_images(batch: int, size: int) -> torch.Tensor:
    """Images with a subject: a coloured disc at a random place on a textured background."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = 0.3 * torch.rand(batch, 3, size, size, generator=g)
    for i in range(batch):
        cy, cx, r = 0.3 + 0.4 * torch.rand(3, generator=g)
        disc = (((yy - cy) ** 2 + (xx - cx) ** 2) < (0.15 + 0.2 * r) ** 2).float()
        images[i] += disc * torch.rand(3, 1, 1, generator=g)
    return images.clamp(0, 1)


# ------------------------------------------------------------------------------------------------------
# The reference-style computation: per image, on the CPU, numpy
# ------------------------------------------------------------------------------------------------------
def _border_sign(z: np.ndarray) -> float:
    """The project's sign rule in numpy: interior above the border ring, then positive skew, then +1."""
    centred = z - z.mean()
    std = math.sqrt(float((centred**2).mean()))
    tol = 1e-3 * std
    skew = float((centred**3).mean()) / max(std, 1e-30) ** 2
    sign = math.copysign(1.0, skew) if abs(skew) > tol else 1.0
    ring = np.zeros_like(z, dtype=bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    interior = float(z.mean() - z[ring].mean())
    return math.copysign(1.0, interior) if abs(interior) > tol else sign


def _minmax(x: np.ndarray) -> np.ndarray:
    rng = x.max() - x.min()
    return np.ones_like(x) if rng <= 64 * np.finfo(x.dtype).eps * np.abs(x).max() else (x - x.min()) / rng


def _blur_axis(x: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    radius = max(1, math.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(x, pad, mode="reflect")
    return np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="valid"), axis, padded)


def reference_map(features: np.ndarray, grid: tuple[int, int], k: int = 3, sigma: float = 1.0) -> np.ndarray:
    """One image's map the released code's way (numpy SVD PCA), with the project's sign rule so that the
    result is comparable: ``S = clip(Σ_j λ_j z'_j, 0, 1)`` → blur → min-max → resize → min-max."""
    h, w, d = features.shape
    x = features.reshape(h * w, d).astype(np.float64)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    ratios = s**2 / (s**2).sum()
    maps = np.zeros((h, w))
    for j in range(min(k, len(s))):
        z = (x @ vt[j]).reshape(h, w)
        maps += ratios[j] * _minmax(_border_sign(z) * z)
    maps = _minmax(_blur_axis(_blur_axis(np.clip(maps, 0, 1), sigma, 0), sigma, 1))
    resized = Image.fromarray(maps.astype(np.float32), mode="F").resize(grid[::-1], Image.Resampling.BILINEAR)
    return _minmax(np.asarray(resized, dtype=np.float64))


# ------------------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------------------
def bench_map(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    backbone = VisionBackbone(args.backbone) if args.backbone else random_backbone(args.vit_large)
    backbone.to(device)
    images = structured_images(args.batch, args.image_size).to(device)
    grid = (args.image_size // 8, args.image_size // 8)  # SD3/FLUX latent grid
    with torch.no_grad():
        t_backbone, features = timed(lambda: backbone(images), device, args.repeats)
        t_map, (maps, _) = timed(lambda: perceptual_map(features, grid), device, args.repeats)

        def per_image_cpu() -> list[np.ndarray]:
            return [reference_map(f.cpu().numpy(), grid) for f in features]

        t_ref, ref_maps = timed(per_image_cpu, device, max(1, args.repeats // 2))
    diff = np.abs(maps.double().cpu().numpy() - np.stack(ref_maps)).max()
    b = args.batch
    print(
        f"backbone {backbone.name} on {device}, {b} images of {args.image_size}², features {tuple(features.shape)}"
    )
    print(f"  backbone forward          {1e3 * t_backbone / b:9.3f} ms/image")
    print(f"  map, batched torch        {1e3 * t_map / b:9.3f} ms/image")
    print(
        f"  map, reference-style CPU  {1e3 * t_ref / b:9.3f} ms/image   ({t_ref / t_map:.1f}x the batched map)"
    )
    print(f"  max |torch − reference|   {diff:.2e}")


class TimedViPOTrainer(ViPOTrainer):
    """ViPOTrainer recording the wall time of each map computation."""

    map_times: list[float]

    def compute_maps(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        out = super().compute_maps(samples)
        self.map_times = [*getattr(self, "map_times", []), time.perf_counter() - start]
        return out


def _step_time(method: str, steps: int, backbone: VisionBackbone) -> tuple[float, list[float]]:
    """Mean training-step time of GRPO or ViPO on tiny SD3 with the known-good settings, and the map times."""
    dataset = Dataset.from_dict({"prompt": ["a cat", "a dog", "a red car", "a tree"]})
    lora = LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"])
    with tempfile.TemporaryDirectory() as out:
        common = dict(
            output_dir=out, num_generations=8, per_device_train_batch_size=32, learning_rate=3e-2,
            guidance_scale=1.0, max_sequence_length=16, num_inference_steps=4, height=32, width=32,
            report_to="none", save_strategy="no", disable_tqdm=True, max_steps=steps,
        )  # fmt: skip
        if method == "GRPO":
            config = DiffusionGRPOConfig(**common)
            trainer = DiffusionGRPOTrainer("tiny:sd3", "red_channel", config, dataset, peft_config=lora)
        else:
            config = ViPOConfig(**common)
            trainer = TimedViPOTrainer(
                "tiny:sd3", "red_channel", config, dataset, peft_config=lora, backbone=backbone
            )
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        return (time.perf_counter() - start) / steps, getattr(trainer, "map_times", [])


def bench_step(args: argparse.Namespace) -> None:
    """GRPO vs ViPO step time on tiny SD3 (CPU, one thread), and the maps' share of a ViPO step."""
    torch.set_num_threads(1)
    backbone = random_backbone(False, patch_size=4)  # an 8×8 patch grid on the 32×32 tiny samples
    grpo, _ = _step_time("GRPO", args.steps, backbone)
    vipo, map_times = _step_time("ViPO", args.steps, backbone)
    map_step = float(np.median(map_times))
    print(f"tiny SD3, 32 samples/step, 4 sampling steps, CPU 1 thread, {args.steps} steps each")
    print(f"  GRPO step {1e3 * grpo:8.1f} ms   ViPO step {1e3 * vipo:8.1f} ms   ratio {vipo / grpo:.3f}")
    print(f"  maps in a ViPO step {1e3 * map_step:8.2f} ms = {100 * map_step / vipo:.1f}% of the step")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default=None, help="Hub id or local path (default: random DINOv2)")
    parser.add_argument("--vit-large", action="store_true", help="random backbone with ViT-L/14's shapes")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="training steps per trainer (0: skip)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # the timings below are per core
    bench_map(args)
    if args.steps:
        bench_step(args)


if __name__ == "__main__":
    main()
