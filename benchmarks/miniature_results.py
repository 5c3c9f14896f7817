"""What GRPO, BPGO and ViPO do on the pretrained miniature world (issue 16, item 4). An experiment, not a test.

Every run starts from ``tiny:shapes`` and is paired with a run at learning rate 0 with the same seed (the same
prompts, initial noise and SDE noise): the **noise floor**. Two figures per run:

* the training reward minus the lr-0 run's, step by step (the same samples would be drawn at lr 0, so the
  difference is the effect of the updates, not of which prompts a step drew);
* the evaluation gain: mean reward of deterministic (ODE) samples of fixed evaluation prompts from fixed noise,
  trained weights minus base weights (exactly 0 at lr 0).

Parts (``--parts``):

* ``grpo``: GRPO with the ``tiny:shapes`` recipe (:data:`trl_visual.miniature.GRPO_DEFAULTS`) at CFG 1 and at
  CFG 4.5, on ``builtin:shapes``, rewarded by ``shapes_adherence``;
* ``bpgo``: BPGO vs GRPO on a mix of full captions and partial ones (``builtin:shapes-ambiguous``): the gain
  per prompt kind, and BPGO's mean RAS weight per kind;
* ``vipo``: ViPO (backbone ``tiny:shapes-features``) vs GRPO on a local reward, the redness of the left half of
  the image, and overlay pictures of ViPO's maps;
* ``vipo_object``: ViPO vs GRPO on a defect that sits on the object, ``shapes_purity`` (blemishes of another
  colour on the shape), with ``shapes_adherence`` kept in view, where ViPO's maps put their mass (the shape, the
  blemishes, against a uniform map) and overlay pictures.

It writes ``docs/images/results/*.png`` (matplotlib) and ``docs/images/results/results.json``; the tables are
printed as Markdown (mean ± std over seeds) for ``docs/results.md``.

    python benchmarks/miniature_results.py                          # every part, 3 seeds
    python benchmarks/miniature_results.py --parts grpo --seeds 0 1 2 --steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset

from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer
from trl_visual.core.vipo import heat_overlay
from trl_visual.data import load_prompts
from trl_visual.miniature import GRPO_DEFAULTS
from trl_visual.miniature.reward import ShapesAdherence, colour_deviation
from trl_visual.miniature.scenes import parse_prompt
from trl_visual.trainer.bpgo_config import BPGOConfig
from trl_visual.trainer.bpgo_trainer import BPGOTrainer
from trl_visual.trainer.logging_utils import to_pil
from trl_visual.trainer.vipo_config import ViPOConfig
from trl_visual.trainer.vipo_trainer import ViPOTrainer

OUT = Path(__file__).resolve().parent.parent / "docs" / "images" / "results"
EVAL_SEED = 4242
CONFIG_FIELDS = set(DiffusionGRPOConfig.__dataclass_fields__)


def recipe(**overrides) -> dict:
    """The ``tiny:shapes`` GRPO recipe as config fields (CLI-only keys dropped), with ``overrides``."""
    settings = {k: v for k, v in GRPO_DEFAULTS.items() if k in CONFIG_FIELDS}
    settings.update(
        output_dir="/tmp/miniature-results", report_to="none", save_strategy="no", disable_tqdm=True
    )
    settings.update(eval_strategy="no", eval_on_start=False)  # evaluated here, on fixed noise (eval_rewards)
    return {**settings, **overrides}


def left_redness(prompts: list[str], images: torch.Tensor, **columns) -> list[float]:
    """A local reward: how red the LEFT half of the image is, ``mean(max(0, r − max(g, b)))`` over its pixels."""
    left = images[..., : images.shape[-1] // 2]
    return (left[:, 0] - left[:, 1:].amax(dim=1)).clamp_min(0).mean(dim=(1, 2)).tolist()


def prompt_kind(prompt: str) -> str:
    """``full`` (all four attributes named), ``partial`` or ``none`` ("a shape")."""
    named = len(parse_prompt(prompt))
    return "full" if named == 4 else "none" if named == 0 else "partial"


class RecordingBPGOTrainer(BPGOTrainer):
    """BPGO that also keeps each group's RAS weight, by the kind of its prompt (``ras_by_kind``)."""

    def compute_advantages(self, rewards_per_func, inputs):
        self._group_kinds = [prompt_kind(row["prompt"]) for row in inputs[:: self.args.num_generations]]
        return super().compute_advantages(rewards_per_func, inputs)

    def _ras_weights(self, signal, priors):
        weights = super()._ras_weights(signal, priors)
        self.ras_by_kind = getattr(self, "ras_by_kind", {})
        for kind, weight in zip(self._group_kinds, weights.tolist()):
            self.ras_by_kind.setdefault(kind, []).append(weight)
        return weights


@torch.no_grad()
def eval_samples(trainer: DiffusionGRPOTrainer, prompts: list[str], per_prompt: int = 4):
    """The rows and the ``per_prompt`` deterministic samples of each prompt, from noise fixed by :data:`EVAL_SEED`."""
    rows = [p for p in prompts for _ in range(per_prompt)]
    rollouts = trainer.sample(rows, torch.arange(len(rows)), seed=EVAL_SEED, stochastic=False, training=False)
    return rows, rollouts.samples


def eval_rewards(trainer: DiffusionGRPOTrainer, prompts: list[str], per_prompt: int = 4) -> torch.Tensor:
    """Rewards of :func:`eval_samples`."""
    rows, samples = eval_samples(trainer, prompts, per_prompt)
    return torch.tensor(trainer.reward_funcs[0](rows, samples))


def train(trainer_class, config_class, reward, prompts: list[str], settings: dict, **kwargs):
    """Build and train one run; returns the trainer, its logged training rewards and its wall time."""
    trainer = trainer_class(
        model="tiny:shapes",
        reward_funcs=reward,
        args=config_class(**settings),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        **kwargs,
    )
    start = time.time()
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    return trainer, rewards, time.time() - start


def paired_run(
    trainer_class, config_class, reward, prompts, eval_prompts, settings, extras=None, **kwargs
) -> dict:
    """A run and its lr-0 twin (same seed); the per-step reward difference and the evaluation gain. ``extras``
    maps the trained trainer to more figures to keep (BPGO's RAS weights, ViPO's map pictures)."""
    trained, rewards, seconds = train(trainer_class, config_class, reward, prompts, settings, **kwargs)
    floor, floor_rewards, _ = train(
        trainer_class, config_class, reward, prompts, {**settings, "learning_rate": 0.0}, **kwargs
    )
    after, before = eval_rewards(trained, eval_prompts), eval_rewards(floor, eval_prompts)
    return {
        "rewards": rewards,
        "floor": floor_rewards,
        "diff": [a - b for a, b in zip(rewards, floor_rewards)],
        "eval_before": before.tolist(),
        "eval_after": after.tolist(),
        "seconds": seconds,
        **(extras(trained) if extras is not None else {}),
    }


def mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) < 2:
        return f"{values[0]:+.{digits}f}" if values else "n/a"
    return f"{statistics.mean(values):+.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def plot_diffs(runs: dict[str, list[dict]], title: str, path: Path) -> None:
    """Training reward minus the lr-0 run's, per step: the mean over seeds with a ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for label, seeds in runs.items():
        diffs = torch.tensor([run["diff"] for run in seeds])
        mean, std = diffs.mean(0), diffs.std(0) if len(seeds) > 1 else torch.zeros(diffs.shape[1])
        steps = range(1, len(mean) + 1)
        axis.plot(steps, mean, label=label)
        axis.fill_between(steps, mean - std, mean + std, alpha=0.2)
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.set(xlabel="optimizer step", ylabel="reward − lr-0 reward", title=title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_grpo(seeds: list[int], steps: int) -> dict[str, list[dict]]:
    """GRPO at CFG 1 and CFG 4.5 on ``builtin:shapes``, evaluated on every other prompt."""
    prompts = load_prompts("builtin:shapes")["prompt"]
    runs: dict[str, list[dict]] = {}
    for cfg in (1.0, 4.5):
        label = f"GRPO, CFG {cfg:g}"
        for seed in seeds:
            settings = recipe(seed=seed, max_steps=steps, guidance_scale=cfg)
            run = paired_run(
                DiffusionGRPOTrainer, DiffusionGRPOConfig, "shapes_adherence", prompts, prompts[::2], settings
            )
            runs.setdefault(label, []).append(run)
            print(
                f"{label}, seed {seed}: eval {statistics.mean(run['eval_before']):.3f} -> "
                f"{statistics.mean(run['eval_after']):.3f}, {run['seconds']:.0f} s",
                flush=True,
            )
    return runs


def report_grpo(runs: dict[str, list[dict]]) -> list[str]:
    plot_diffs(runs, "GRPO on tiny:shapes (shapes_adherence)", OUT / "grpo_reward_vs_floor.png")
    lines = [
        "| Run | seeds | eval before | eval gain | train reward − lr 0, last 5 steps | train time |",
        "|---|---|---|---|---|---|",
    ]
    for label, seeds_runs in runs.items():
        before = [statistics.mean(r["eval_before"]) for r in seeds_runs]
        gain = [statistics.mean(r["eval_after"]) - statistics.mean(r["eval_before"]) for r in seeds_runs]
        last = [statistics.mean(r["diff"][-5:]) for r in seeds_runs]
        seconds = statistics.mean(r["seconds"] for r in seeds_runs)
        lines.append(
            f"| {label} | {len(seeds_runs)} | {statistics.mean(before):.3f} | {mean_std(gain)} | {mean_std(last)} | "
            f"{seconds:.0f} s |"
        )
    return lines


def bpgo_prompts() -> list[str]:
    """A quarter of the full captions and a quarter of the partial ones (and "a shape")."""
    return (
        load_prompts("builtin:shapes")["prompt"][::4]
        + load_prompts("builtin:shapes-ambiguous")["prompt"][::4]
    )


def run_bpgo(seeds: list[int], steps: int) -> dict[str, list[dict]]:
    """BPGO vs GRPO on full and partial captions, keeping BPGO's RAS weights by prompt kind."""
    prompts = bpgo_prompts()
    runs: dict[str, list[dict]] = {"GRPO": [], "BPGO": []}
    for seed in seeds:
        settings = recipe(seed=seed, max_steps=steps)
        runs["GRPO"].append(
            paired_run(
                DiffusionGRPOTrainer, DiffusionGRPOConfig, "shapes_adherence", prompts, prompts, settings
            )
        )
        runs["BPGO"].append(
            paired_run(
                RecordingBPGOTrainer,
                BPGOConfig,
                "shapes_adherence",
                prompts,
                prompts,
                settings,
                extras=lambda trainer: {"ras_by_kind": getattr(trainer, "ras_by_kind", {})},
            )
        )
    return runs


def report_bpgo(runs: dict[str, list[dict]]) -> list[str]:
    plot_diffs(runs, "BPGO vs GRPO, full + partial captions", OUT / "bpgo_vs_grpo.png")
    kinds = [prompt_kind(p) for p in bpgo_prompts() for _ in range(4)]
    lines = [
        "| Method | seeds | eval gain, full captions | eval gain, partial captions |",
        "|---|---|---|---|",
    ]
    for label, seeds_runs in runs.items():
        cells = []
        for kind in ("full", "partial"):
            gains = [
                statistics.mean(
                    a - b for a, b, k in zip(r["eval_after"], r["eval_before"], kinds) if k == kind
                )
                for r in seeds_runs
            ]
            cells.append(mean_std(gains))
        lines.append(f"| {label} | {len(seeds_runs)} | {cells[0]} | {cells[1]} |")
    ras: dict[str, list[float]] = {}
    for run in runs.get("BPGO", []):
        for kind, weights in run.get("ras_by_kind", {}).items():
            ras.setdefault(kind, []).extend(weights)
    lines += ["", "| Prompt kind | BPGO's mean RAS weight | groups |", "|---|---|---|"]
    lines += [f"| {kind} | {statistics.mean(w):.3f} | {len(w)} |" for kind, w in ras.items() if w]
    return lines


def run_vipo(seeds: list[int], steps: int) -> dict[str, list[dict]]:
    """ViPO vs GRPO on the local ``left_redness`` reward; saves overlays of ViPO's maps (first seed)."""
    prompts = load_prompts("builtin:shapes")["prompt"][::4]
    runs: dict[str, list[dict]] = {"GRPO": [], "ViPO": []}
    for seed in seeds:
        settings = recipe(seed=seed, max_steps=steps)
        runs["GRPO"].append(
            paired_run(DiffusionGRPOTrainer, DiffusionGRPOConfig, left_redness, prompts, prompts, settings)
        )
        vipo_settings = {**settings, "backbone": "tiny:shapes-features"}
        overlays = lambda trainer, seed=seed: save_map_overlays(trainer, OUT / f"vipo_maps_seed{seed}.png")  # noqa: E731
        runs["ViPO"].append(
            paired_run(
                ViPOTrainer, ViPOConfig, left_redness, prompts, prompts, vipo_settings, extras=overlays
            )
        )
    return runs


def report_vipo(runs: dict[str, list[dict]]) -> list[str]:
    plot_diffs(runs, "ViPO vs GRPO, left-half redness", OUT / "vipo_vs_grpo.png")
    lines = ["| Method | seeds | eval gain in left-half redness |", "|---|---|---|"]
    for label, seeds_runs in runs.items():
        gains = [statistics.mean(r["eval_after"]) - statistics.mean(r["eval_before"]) for r in seeds_runs]
        lines.append(f"| {label} | {len(seeds_runs)} | {mean_std(gains)} |")
    return lines


def save_map_overlays(trainer: ViPOTrainer, path: Path, count: int = 8) -> dict:
    """The last training batch's samples with ViPO's map (upsampled to the image) over them; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rollouts = trainer._rollouts
    maps = rollouts.advantages.maps if rollouts is not None and rollouts.advantages is not None else None
    if maps is None:
        return {}
    images = rollouts.samples[:count].cpu()
    grid = maps[:count].float().cpu().reshape(len(images), 1, *maps.shape[-2:])
    grid = torch.nn.functional.interpolate(grid, size=images.shape[-2:])
    figure, axes = plt.subplots(2, len(images), figsize=(1.5 * len(images), 3))
    for i in range(len(images)):
        axes[0, i].imshow(images[i].permute(1, 2, 0))
        axes[1, i].imshow(images[i].permute(1, 2, 0))
        axes[1, i].imshow(grid[i, 0], cmap="magma", alpha=0.6)
        for axis in axes[:, i]:
            axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return {"map_picture": str(path)}


DEFECT_DISTANCE = 0.1
"""A core pixel of the shape farther than this from the shape's mean colour is a blemish (the ``vipo_object`` part's
defect region; the mean distance of ``tiny:shapes`` samples is about 0.045)."""


def object_prompts() -> list[str]:
    """24 full captions: each colour × shape × size once, the positions taking turns (left, right, top, bottom)."""
    prompts = load_prompts("builtin:shapes")["prompt"]
    return [prompts[4 * k + k % 4] for k in range(24)]


def map_shares(maps: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    """Where a map's mass lies, against a uniform map's: with ``M`` upsampled (bilinear) to the image, the share
    ``Σ_{p∈R} M_p / Σ_p M_p`` of the object ``R = O``, of the blemishes ``R = D`` (core pixels farther than
    :data:`DEFECT_DISTANCE` from the shape's colour), and of the blemishes within the object's mass; a uniform map
    gives the area shares ``|O|/HW``, ``|D|/HW`` and ``|D|/|O|``. Means over the images (with a blemish, for D)."""
    grid = torch.nn.functional.interpolate(maps[:, None].float(), size=images.shape[-2:], mode="bilinear")[
        :, 0
    ]
    deviation, _, inside = colour_deviation(images)
    defect = deviation > DEFECT_DISTANCE
    has_defect = defect.any(dim=(1, 2))
    total, on_object = grid.sum(dim=(1, 2)), (grid * inside).sum(dim=(1, 2))
    on_defect = (grid * defect).sum(dim=(1, 2))
    area = images.shape[-1] * images.shape[-2]
    mean = lambda values, rows=slice(None): float(values[rows].mean()) if len(values[rows]) else float("nan")  # noqa: E731
    return {
        "object_share": mean(on_object / total),
        "object_uniform": mean(inside.sum(dim=(1, 2)) / area),
        "defect_share": mean(on_defect / total, has_defect),
        "defect_uniform": mean(defect.sum(dim=(1, 2)) / area, has_defect),
        "defect_share_in_object": mean(on_defect / on_object, has_defect),
        "defect_uniform_in_object": mean(defect.sum(dim=(1, 2)) / inside.sum(dim=(1, 2)), has_defect),
        "images_with_defect": int(has_defect.sum()),
    }


def flat_weights(trainer: DiffusionGRPOTrainer) -> torch.Tensor:
    """Every weight of the trained denoiser, flattened into one float32 vector."""
    return torch.cat([p.detach().float().flatten().cpu() for p in trainer.model.parameters()])


def object_figures(
    trainer: DiffusionGRPOTrainer, prompts: list[str], base_weights: torch.Tensor, picture: Path | None = None
) -> dict:
    """After training: the evaluation samples' ``shapes_adherence`` and share of blemished core pixels, and the
    weight update ``θ − θ₀`` (key ``update``, a tensor to pop before saving); for ViPO also where its maps lie
    (:func:`map_shares`) on the last training batch and on the evaluation samples and, with ``picture``, an
    overlay of the last training batch's maps."""
    rows, images = eval_samples(trainer, prompts)
    figures = {
        "adherence_after": ShapesAdherence()(rows, images),
        "defect_area_after": defect_area(images),
        "update": flat_weights(trainer) - base_weights,
    }
    if isinstance(trainer, ViPOTrainer):
        maps, _ = trainer.compute_maps(images)
        batch = (
            trainer._rollouts
        )  # the last training batch: SDE samples and the maps that weighted their loss
        figures["map_shares"] = {
            "training": map_shares(batch.advantages.maps, batch.samples),
            "evaluation": map_shares(maps, images),
        }
        if picture is not None:
            save_object_overlays(batch.samples, batch.advantages.maps, picture)
    return figures


def defect_area(images: torch.Tensor) -> float:
    """Mean over images of the share of the shape's core pixels that are blemishes (:data:`DEFECT_DISTANCE`)."""
    deviation, core, _ = colour_deviation(images)
    blemished = (deviation > DEFECT_DISTANCE).sum(dim=(1, 2))
    return float((blemished / core.sum(dim=(1, 2)).clamp_min(1)).mean())


def save_object_overlays(images: torch.Tensor, maps: torch.Tensor, path: Path, count: int = 8) -> None:
    """The ``count`` samples with the most blemished pixels, in three rows, 4× enlarged: the sample, ViPO's map
    over it (:func:`~trl_visual.core.vipo.heat_overlay`, red = high), and the blemishes (white: distance to the
    shape's mean colour, from 0 to 0.3)."""
    deviation, _, _ = colour_deviation(images)
    order = (deviation > DEFECT_DISTANCE).sum(dim=(1, 2)).argsort(descending=True)[:count]
    rows = [
        torch.cat([images[i].float().clamp(0, 1) for i in order], dim=-1),
        torch.cat([heat_overlay(images[i], maps[i]) for i in order], dim=-1),
        torch.cat([(deviation[i] / 0.3).clamp(0, 1).expand(3, -1, -1) for i in order], dim=-1),
    ]
    grid = torch.nn.functional.interpolate(torch.cat(rows, dim=-2)[None], scale_factor=4, mode="nearest")[0]
    to_pil(grid).save(path)


def run_vipo_object(seeds: list[int], steps: int) -> dict[str, list[dict]]:
    """ViPO vs GRPO on ``shapes_purity``, a defect on the object itself; adherence kept in view (the base model's
    is stored as ``adherence_before``); overlays of ViPO's maps per seed."""
    prompts = object_prompts()
    base = DiffusionGRPOTrainer(
        model="tiny:shapes",
        reward_funcs="shapes_purity",
        args=DiffusionGRPOConfig(**recipe()),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
    )
    rows, images = eval_samples(base, prompts)
    before = {"adherence_before": ShapesAdherence()(rows, images), "defect_area_before": defect_area(images)}
    base_weights = flat_weights(base)
    runs: dict[str, list[dict]] = {"GRPO": [], "ViPO": []}
    for seed in seeds:
        settings = recipe(seed=seed, max_steps=steps)
        picture = OUT / f"vipo_object_maps_seed{seed}.png"
        updates = {}
        for label, trainer_class, config_class, extra_settings in (
            ("GRPO", DiffusionGRPOTrainer, DiffusionGRPOConfig, {}),
            ("ViPO", ViPOTrainer, ViPOConfig, {"backbone": "tiny:shapes-features"}),
        ):
            run = paired_run(
                trainer_class,
                config_class,
                "shapes_purity",
                prompts,
                prompts,
                {**settings, **extra_settings},
                extras=partial(object_figures, prompts=prompts, base_weights=base_weights, picture=picture),
            )
            updates[label] = run.pop("update")
            runs[label].append({**run, **before, "update_norm": float(updates[label].norm())})
            print(
                f"{label}, seed {seed}: purity {statistics.mean(run['eval_before']):.4f} -> "
                f"{statistics.mean(run['eval_after']):.4f}, {run['seconds']:.0f} s",
                flush=True,
            )
        cosine = torch.nn.functional.cosine_similarity(updates["GRPO"], updates["ViPO"], dim=0)
        runs["ViPO"][-1]["update_cosine_to_grpo"] = float(cosine)
    return runs


def report_vipo_object(runs: dict[str, list[dict]]) -> list[str]:
    plot_diffs(runs, "ViPO vs GRPO, colour purity of the shape", OUT / "vipo_object_vs_grpo.png")
    lines = [
        "| Method | seeds | eval purity before | eval gain in purity | train reward − lr 0, last 5 steps | "
        "blemished share of the core, before → after | adherence before | adherence change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, seeds_runs in runs.items():
        gains = [statistics.mean(r["eval_after"]) - statistics.mean(r["eval_before"]) for r in seeds_runs]
        last = [statistics.mean(r["diff"][-5:]) for r in seeds_runs]
        adherence_before = statistics.mean(seeds_runs[0]["adherence_before"])
        adherence = [statistics.mean(r["adherence_after"]) - adherence_before for r in seeds_runs]
        area_after = statistics.mean(r["defect_area_after"] for r in seeds_runs)
        lines.append(
            f"| {label} | {len(seeds_runs)} | {statistics.mean(seeds_runs[0]['eval_before']):.4f} | "
            f"{mean_std(gains, 4)} | {mean_std(last, 4)} | {seeds_runs[0]['defect_area_before']:.3f} → {area_after:.3f} | "
            f"{adherence_before:.3f} | {mean_std(adherence)} |"
        )
    norms = {label: [r["update_norm"] for r in seeds_runs] for label, seeds_runs in runs.items()}
    cosines = [r["update_cosine_to_grpo"] for r in runs.get("ViPO", [])]
    lines += [
        "",
        f"Weight update ‖θ − θ₀‖: GRPO {statistics.mean(norms['GRPO']):.4f}, ViPO {statistics.mean(norms['ViPO']):.4f}; "
        f"cosine between ViPO's and GRPO's update (same seed): {mean_std(cosines)} "
        f"(per seed: {', '.join(f'{c:.3f}' for c in cosines)}).",
    ]
    shares = [r["map_shares"] for r in runs.get("ViPO", []) if "map_shares" in r]
    if shares:
        lines += [
            "",
            "| Samples | region | share of ViPO's map mass | share for a uniform map | ratio |",
            "|---|---|---|---|---|",
        ]
        for samples in ("training", "evaluation"):
            for region, share_key, uniform_key in (
                ("the shape", "object_share", "object_uniform"),
                ("its blemishes", "defect_share", "defect_uniform"),
                ("its blemishes, within the shape", "defect_share_in_object", "defect_uniform_in_object"),
            ):
                share = statistics.mean(s[samples][share_key] for s in shares)
                uniform = statistics.mean(s[samples][uniform_key] for s in shares)
                lines.append(
                    f"| {samples} | {region} | {share:.3f} | {uniform:.3f} | {share / uniform:.2f} |"
                )
        blemished = ", ".join(
            f"{s['training']['images_with_defect']}/{s['evaluation']['images_with_defect']}" for s in shares
        )
        lines.append(
            f"\nImages with a blemish per seed, last training batch (of 64) / evaluation (of 96): {blemished}."
        )
    return lines


PARTS = {
    "grpo": (run_grpo, report_grpo),
    "bpgo": (run_bpgo, report_bpgo),
    "vipo": (run_vipo, report_vipo),
    "vipo_object": (run_vipo_object, report_vipo_object),
}


def merged_runs(part: str) -> dict[str, list[dict]]:
    """Every saved ``<part>_*.json`` (one per process), merged run list by run list."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(OUT.glob(f"{part}_seeds*.json")):
        for label, seeds_runs in json.loads(path.read_text()).items():
            runs.setdefault(label, []).extend(seeds_runs)
    return runs


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=GRPO_DEFAULTS["max_steps"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="Only merge the saved runs into tables and plots (no training).",
    )
    parser.add_argument("--out", type=Path, default=OUT, help="Folder for the JSON files and the pictures.")
    args = parser.parse_args()
    OUT = args.out
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    for part in args.parts:
        run, report = PARTS[part]
        if not args.report_only:
            runs = run(args.seeds, args.steps)
            tag = "-".join(str(seed) for seed in args.seeds)
            (OUT / f"{part}_seeds{tag}_steps{args.steps}.json").write_text(json.dumps(runs))
        print("\n".join(report(merged_runs(part))), flush=True)


if __name__ == "__main__":
    main()
