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
* ``bpgo_judge``: GRPO, BPGO (defaults) and BPGO (released form) on the same mix, trained on an *unreliable*
  judge (``shapes_judge``: partial captions completed by a random guess) and evaluated by the clean
  ``shapes_adherence``; the judge's noise per prompt kind and the RAS weights per kind;
  ``bpgo_judge_ablation``: the same with BPGO's RAS or CRT switched off;
* ``bpgo_uncertainty``: GRPO and BPGO (paper form, released form, and the uncertainty-aware RAS with and
  without its consistency factor) trained on ``shapes_judge`` with 4 draws per sample (its interpretations),
  scored by the clean ``shapes_adherence``: gains paired by seed with GRPO (mean difference ± standard error), the
  RAS weights per prompt kind, and a picture of each group's weight against its measured ambiguity share;
* ``vipo``: ViPO (backbone ``tiny:shapes-features``) vs GRPO on a local reward, the redness of the left half of
  the image, and overlay pictures of ViPO's maps;
* ``vipo_object``: ViPO vs GRPO on a defect that sits on the object, ``shapes_purity`` (blemishes of another
  colour on the shape), with ``shapes_adherence`` kept in view, where ViPO's maps put their mass (the shape, the
  blemishes, against a uniform map) and overlay pictures;
* ``lora``: GRPO with the LoRA recipe (``examples/configs/shapes_grpo_lora.yaml``) on ``builtin:shapes``, like
  ``grpo`` at CFG 1; ``--lora_set key=value …`` tries a variant (a config field or a ``lora_*`` flag);
* ``lora_headroom``: the LoRA recipe on the two headroom prompts of ``tests/test_learning_signal.py``, 8 steps of
  2 prompts × 8 samples (the fast screen a variant passes before the ``lora`` part);
* ``demo``: the demos' own runs (``trl_visual.demo``: its settings and LoRA) on the notebook's and the Space's
  prompts;
* ``vipo_structure``: the ViPO paper's claim in the structured world ``tiny:scenes``: the global red-channel
  reward, GRPO against ViPO (backbone ``tiny:scenes-features``, default and released map) and the map controls
  (shuffled, all ones, the object-region oracle); the red gain and the structure kept (edge-map correlation with
  the base model's samples from the same noise) probed along training, paired differences to GRPO with standard
  errors, a Pareto picture and a before/after picture; ``vipo_structure_saturation`` the same on a second global
  reward (the mean colour saturation), ``vipo_structure_adherence`` on a preference-like reward that depends on
  the object (``scenes_adherence``), ``vipo_structure_g8`` the red channel at G = 8 (``--structure_methods``
  picks arms, ``--structure_probes`` the number of probes);
* ``pairs``: GRPO on two-shape scenes: ``tiny:shapes-pairs`` with its recipe
  (:data:`trl_visual.miniature.PAIRS_GRPO_DEFAULTS`) at CFG 1 and CFG 4.5 on ``builtin:shapes-pairs``, evaluated on
  the 48 prompts of its ``test`` split, with attribute binding before and after (each shape drawn in its own
  phrase's colour and shape, or in the other's), and a before/after picture of seed 0's runs.

It writes ``docs/images/results/*.png`` (matplotlib) and ``docs/images/results/results.json``; the tables are
printed as Markdown (mean ± std over seeds) for ``docs/results.md``.

    python benchmarks/miniature_results.py                          # every part, 3 seeds
    python benchmarks/miniature_results.py --parts grpo --seeds 0 1 2 --steps 30
    python benchmarks/miniature_results.py --parts lora_headroom --lora_set lora_r=16 learning_rate=3e-4
    python benchmarks/miniature_results.py --parts vipo_structure --seeds 0 1 2 --steps 40 \
        --structure_methods grpo vipo shuffled oracle --structure_probes 8   # and --seeds 3 4 5 beside it
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer
from trl_visual.cli import ModelArguments
from trl_visual.core.interpretations import ambiguity_share
from trl_visual.core.vipo import heat_overlay
from trl_visual.data import load_prompts
from trl_visual.demo import SHAPES_LORA, demo_settings
from trl_visual.images import to_pil
from trl_visual.miniature import GRPO_DEFAULTS
from trl_visual.miniature.before_after import before_after
from trl_visual.miniature.evaluate import prompt_following
from trl_visual.miniature.pipeline import load_shapes_pairs_pipeline
from trl_visual.miniature.reward import ShapesAdherence, ShapesJudge, colour_deviation
from trl_visual.miniature.scenes import parse_prompt
from trl_visual.miniature.structure import edge_correlation
from trl_visual.trainer.bpgo_config import BPGOConfig
from trl_visual.trainer.bpgo_trainer import BPGOTrainer
from trl_visual.trainer.vipo_config import ViPOConfig
from trl_visual.trainer.vipo_trainer import ViPOTrainer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "images" / "results"
LORA_RECIPE = ROOT / "examples" / "configs" / "shapes_grpo_lora.yaml"
EVAL_SEED = 4242
CONFIG_FIELDS = set(DiffusionGRPOConfig.__dataclass_fields__)


def recipe(**overrides) -> dict:
    """The ``tiny:shapes`` GRPO recipe as config fields (CLI-only keys dropped), with ``overrides``."""
    settings = {k: v for k, v in GRPO_DEFAULTS.items() if k in CONFIG_FIELDS}
    settings.update(
        # one output folder per process (each takes the folder's lock): parts can run side by side
        output_dir=f"/tmp/miniature-results-{os.getpid()}",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
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

    def _ras_weights(self, signal, priors, uncertainty=None):
        weights = super()._ras_weights(signal, priors, uncertainty)
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


def train(
    trainer_class,
    config_class,
    reward,
    prompts: list[str],
    settings: dict,
    model: str = "tiny:shapes",
    **kwargs,
):
    """Build and train one run of ``model``; returns the trainer, its logged training rewards and its wall time."""
    trainer = trainer_class(
        model=model,
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
    trainer_class,
    config_class,
    reward,
    prompts,
    eval_prompts,
    settings,
    extras=None,
    floor_extras=None,
    **kwargs,
) -> dict:
    """A run and its lr-0 twin (same seed); the per-step reward difference and the evaluation gain. ``extras``
    maps the trained trainer to more figures to keep (BPGO's RAS weights, ViPO's map pictures), ``floor_extras``
    the lr-0 one (kept with a ``floor_`` prefix)."""
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
        **({f"floor_{k}": v for k, v in floor_extras(floor).items()} if floor_extras is not None else {}),
    }


def adherence_run(prompts, eval_prompts, settings, **kwargs) -> dict:
    """:func:`paired_run` of GRPO rewarded by ``shapes_adherence`` (``kwargs``: a LoRA, extras, the model)."""
    return paired_run(
        DiffusionGRPOTrainer,
        DiffusionGRPOConfig,
        "shapes_adherence",
        prompts,
        eval_prompts,
        settings,
        **kwargs,
    )


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
            run = adherence_run(prompts, prompts[::2], settings)
            runs.setdefault(label, []).append(run)
            print(
                f"{label}, seed {seed}: eval {statistics.mean(run['eval_before']):.3f} -> "
                f"{statistics.mean(run['eval_after']):.3f}, {run['seconds']:.0f} s",
                flush=True,
            )
    return runs


def report_grpo(runs: dict[str, list[dict]], plot: bool = True) -> list[str]:
    if plot:
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
        runs["GRPO"].append(adherence_run(prompts, prompts, settings))
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


def report_bpgo(runs: dict[str, list[dict]], plot: bool = True) -> list[str]:
    if plot:
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
    if "BPGO" in runs:
        lines += ["", *ras_table(runs["BPGO"])]
    return lines


def ras_table(seeds_runs: list[dict]) -> list[str]:
    """BPGO's RAS weights per prompt kind, over the seeds: :func:`ras_spread` and the number of groups."""
    ras: dict[str, list[float]] = {}
    for run in seeds_runs:
        for kind, weights in run.get("ras_by_kind", {}).items():
            ras.setdefault(kind, []).extend(weights)
    lines = [
        "| Prompt kind | BPGO's mean RAS weight | std | mean abs(w − 1) after the first visit | groups |",
        "|---|---|---|---|---|",
    ]
    return lines + [f"| {kind} | {ras_spread(w)} | {len(w)} |" for kind, w in ras.items() if w]


def ras_spread(weights: list[float]) -> str:
    """Mean and std of RAS weights, and the mean ``|w − 1|`` of the groups whose weight is not exactly 1.

    A prompt's first visit has the EMA prior equal to its own group mean (Δ = 0, w = 1); the others show how
    far RAS moves a group's weight.
    """
    moved = [abs(w - 1) for w in weights if w != 1.0]
    moved_mean = f"{statistics.mean(moved):.3f}" if moved else "–"
    return f"{statistics.mean(weights):.3f} | {statistics.pstdev(weights):.3f} | {moved_mean}"


#: BPGO in its released form: posterior RAS, CRT replacing the rewards, priors from the base model's rollouts
BPGO_RELEASED = {"ras_mode": "posterior", "crt_mode": "replace", "prior_source": "base_model"}
#: The default BPGO with one of its two parts switched off (the ``bpgo_judge_ablation`` part)
BPGO_ABLATIONS = {
    "BPGO, RAS only (no CRT)": {"crt_mode": "none"},
    "BPGO, CRT only (no RAS)": {"ras_mode": "none"},
}


def ras_extras(trainer: RecordingBPGOTrainer) -> dict:
    """The RAS weights a :class:`RecordingBPGOTrainer` kept, by prompt kind."""
    return {"ras_by_kind": getattr(trainer, "ras_by_kind", {})}


def judge_run(trainer_class, config_class, settings: dict, clean: ShapesAdherence, extras=None) -> dict:
    """One run trained on the unreliable judge (``shapes_judge``), evaluated by the clean ``shapes_adherence``
    on :func:`bpgo_prompts` (:func:`eval_samples`)."""
    trainer, rewards, seconds = train(trainer_class, config_class, "shapes_judge", bpgo_prompts(), settings)
    rows, samples = eval_samples(trainer, bpgo_prompts())
    return {
        "rewards": rewards,
        "eval": clean(rows, samples),
        "seconds": seconds,
        **(extras(trainer) if extras is not None else {}),
    }


def run_bpgo_judge(seeds: list[int], steps: int, methods: dict | None = None) -> dict[str, list[dict]]:
    """GRPO, BPGO (defaults) and BPGO (released form), or ``methods`` (label → trainer class, config class,
    config overrides, :func:`judge_run` keywords), trained on ``shapes_judge`` over the ``bpgo`` prompt mix.

    One lr-0 GRPO run per seed is the floor of all of them: at lr 0 the weights never move, so every method
    draws the same samples and the judge gives them the same rewards.
    """
    clean = ShapesAdherence()
    ras = {"extras": ras_extras}
    methods = methods or {
        "GRPO": (DiffusionGRPOTrainer, DiffusionGRPOConfig, {}, {}),
        "BPGO (defaults)": (RecordingBPGOTrainer, BPGOConfig, {}, ras),
        "BPGO (released form)": (RecordingBPGOTrainer, BPGOConfig, BPGO_RELEASED, ras),
    }
    return floored_runs(
        seeds, steps, methods, partial(judge_run, clean=clean), "/tmp/miniature-results-judge"
    )


def floored_runs(
    seeds: list[int], steps: int, methods: dict, one_run, output_dir: str
) -> dict[str, list[dict]]:
    """Every method of ``methods`` (label → trainer class, config class, config overrides, ``one_run`` keywords)
    for every seed, by ``one_run(trainer_class, config_class, settings, **keywords)``, each against one lr-0 GRPO
    run of the seed (its floor), in ``output_dir-<seed>``."""
    runs: dict[str, list[dict]] = {label: [] for label in methods}
    for seed in seeds:
        settings = recipe(seed=seed, max_steps=steps, output_dir=f"{output_dir}-{seed}")
        floor = one_run(DiffusionGRPOTrainer, DiffusionGRPOConfig, {**settings, "learning_rate": 0.0})
        for label, (trainer_class, config_class, overrides, keywords) in methods.items():
            run = one_run(trainer_class, config_class, {**settings, **overrides}, **keywords)
            run.update(
                seed=seed,
                floor=floor["rewards"],
                diff=[a - b for a, b in zip(run["rewards"], floor["rewards"])],
                eval_before=floor["eval"],
                eval_after=run.pop("eval"),
            )
            runs[label].append(run)
            print_run(label, seed, run)
    return runs


@torch.no_grad()
def judge_noise(judge_seeds: int = 16, per_prompt: int = 8) -> list[str]:
    """How unreliable ``shapes_judge`` is on the base model, per prompt kind: one group of ``per_prompt`` SDE
    samples of each :func:`bpgo_prompts` prompt (seed 7), judged by ``judge_seeds`` judges (judge seeds 0, 1, …).

    Columns: the clean reward's mean and within-group std; the judge's; the std of one sample's score across
    judge seeds (the guess's noise); the std of a group's mean across judge seeds; and the guess's share of the
    judge's within-group variance, ``E[Var_judge(r)] / E[Var_group(r)]``.
    """
    trainer = DiffusionGRPOTrainer(
        model="tiny:shapes",
        reward_funcs="shapes_adherence",
        args=DiffusionGRPOConfig(**recipe(seed=0)),
        train_dataset=Dataset.from_dict({"prompt": bpgo_prompts()}),
    )
    rows = [p for p in bpgo_prompts() for _ in range(per_prompt)]
    samples = trainer.sample(rows, torch.arange(len(rows)), seed=7, stochastic=True, training=False).samples
    clean = torch.tensor(ShapesAdherence()(rows, samples)).view(-1, per_prompt)
    judged = torch.stack(
        [torch.tensor(ShapesJudge(seed=s)(rows, samples)).view(-1, per_prompt) for s in range(judge_seeds)]
    )
    kinds = [prompt_kind(p) for p in bpgo_prompts()]
    lines = [
        "| Prompt kind | groups | clean mean | clean std in a group | judge mean | judge std in a group | "
        "guess std of a sample | guess std of a group mean | guess share of the judge's variance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("full", "partial"):
        groups = [g for g, k in enumerate(kinds) if k == kind]
        j = judged[:, groups]
        lines.append(
            f"| {kind} | {len(groups)} | {clean[groups].mean():.3f} | {clean[groups].std(1).mean():.3f} | "
            f"{j.mean():.3f} | {j.std(-1).mean():.3f} | {j.var(0).mean().sqrt():.3f} | "
            f"{j.mean(-1).std(0).mean():.3f} | {j.var(0).mean() / j.var(-1).mean():.2f} |"
        )
    return lines


def report_bpgo_judge(runs: dict[str, list[dict]]) -> list[str]:
    """The judge's noise on the base model (:func:`judge_noise`), then the ``bpgo`` tables: the gain per prompt
    kind by the clean reward, and the RAS weights per kind for each BPGO form."""
    plot_diffs(runs, "GRPO and BPGO on an unreliable judge", OUT / "bpgo_judge_vs_grpo.png")
    return [*judge_noise(), "", *judge_tables(runs)]


def judge_tables(runs: dict[str, list[dict]]) -> list[str]:
    """The clean gain per prompt kind of every method, the same minus GRPO's with the same seed, and the RAS
    weights per kind of each BPGO run."""
    lines = [*report_bpgo(runs, plot=False), "", *gains_over_grpo(runs)]
    for label in runs:
        if label.startswith("BPGO"):
            lines += ["", f"{label}:", *ras_table(runs[label])]
    return lines


def gains_over_grpo(runs: dict[str, list[dict]]) -> list[str]:
    """Each method's clean gain per prompt kind minus that of the ``bpgo_judge`` GRPO run with the same seed
    (mean ± std over the seeds both have), and in how many seeds it is the larger."""
    grpo = {run["seed"]: run for run in merged_runs("bpgo_judge").get("GRPO", []) if "seed" in run}
    kinds = [prompt_kind(p) for p in bpgo_prompts() for _ in range(4)]

    def gain(run: dict, kind: str) -> float:
        return statistics.mean(
            a - b for a, b, k in zip(run["eval_after"], run["eval_before"], kinds) if k == kind
        )

    lines = [
        "| Method | seeds | full: gain − GRPO's | above GRPO | partial: gain − GRPO's | above GRPO |",
        "|---|---|---|---|---|---|",
    ]
    for label, seeds_runs in runs.items():
        pairs = [(run, grpo[run["seed"]]) for run in seeds_runs if run.get("seed") in grpo]
        if label == "GRPO" or not pairs:
            continue
        cells = []
        for kind in ("full", "partial"):
            differences = [gain(run, kind) - gain(reference, kind) for run, reference in pairs]
            cells += [mean_std(differences), f"{sum(d > 0 for d in differences)}/{len(pairs)}"]
        lines.append(f"| {label} | {len(pairs)} | {' | '.join(cells)} |")
    return lines


def run_bpgo_judge_ablation(seeds: list[int], steps: int) -> dict[str, list[dict]]:
    """The ``bpgo_judge`` runs of :data:`BPGO_ABLATIONS`: which of RAS and CRT makes the default BPGO's gain."""
    methods = {
        label: (RecordingBPGOTrainer, BPGOConfig, overrides, {"extras": ras_extras})
        for label, overrides in BPGO_ABLATIONS.items()
    }
    return run_bpgo_judge(seeds, steps, methods)


# ---------------------------------------------------------------------------------------------------------------
# BPGO that knows what to trust (issue 24): the uncertainty-aware RAS on a judge with M draws
# ---------------------------------------------------------------------------------------------------------------
#: Guesses of the judge per sample in the ``bpgo_uncertainty`` part: its M interpretations
JUDGE_DRAWS = 4
#: The ``bpgo_uncertainty`` methods: label → BPGO config overrides (GRPO has none). The uncertainty forms read the
#: base model's mean and variance per prompt (``prior_source="base_model"``), as a fixed anchor.
UNCERTAINTY_METHODS = {
    "BPGO (paper form)": {},
    "BPGO (uncertainty)": {"ras_mode": "uncertainty", "prior_source": "base_model"},
    "BPGO (uncertainty + consistency)": {
        "ras_mode": "uncertainty",
        "prior_source": "base_model",
        "ras_consistency": True,
    },
    "BPGO (released form)": BPGO_RELEASED,  # last: reads the means the uncertainty forms cached with variances
}


#: ``--uncertainty_methods`` keys of the ``bpgo_uncertainty`` methods (one process per seed and method runs them in
#: parallel on a shared machine)
METHOD_KEYS = {
    "GRPO": "grpo",
    "BPGO (uncertainty)": "uncertainty",
    "BPGO (paper form)": "paper",
    "BPGO (uncertainty + consistency)": "consistency",
    "BPGO (released form)": "released",
}
UNCERTAINTY_ONLY: list[str] = []
"""The keys given to ``--uncertainty_methods`` (empty: every method)."""


class GroupRecordingBPGOTrainer(RecordingBPGOTrainer):
    """:class:`RecordingBPGOTrainer` that also keeps, per group, ``(prompt kind, RAS weight, ambiguity share ρ)``
    in ``groups`` (ρ measured from the judge's draws, whatever the RAS mode reads)."""

    def _ras_weights(self, signal, priors, uncertainty=None):
        self._last_weights = super()._ras_weights(signal, priors, uncertainty)
        return self._last_weights

    def compute_advantages(self, rewards_per_func, inputs):
        out = super().compute_advantages(rewards_per_func, inputs)
        grouped = out.reward.reshape(-1, self.args.num_generations)
        variance = out.interpretation_var
        share = (
            ambiguity_share(grouped, variance.reshape(grouped.shape))
            if variance is not None
            else torch.zeros(len(grouped))
        )
        self.groups = getattr(self, "groups", [])
        self.groups += [list(g) for g in zip(self._group_kinds, self._last_weights.tolist(), share.tolist())]
        return out


def uncertainty_run(trainer_class, config_class, settings: dict, clean: ShapesAdherence) -> dict:
    """One run trained on ``shapes_judge`` with :data:`JUDGE_DRAWS` draws, evaluated by the clean
    ``shapes_adherence`` on :func:`bpgo_prompts`."""
    judge = ShapesJudge(num_draws=JUDGE_DRAWS)
    trainer, rewards, seconds = train(trainer_class, config_class, judge, bpgo_prompts(), settings)
    rows, samples = eval_samples(trainer, bpgo_prompts())
    extras = {"ras_by_kind": getattr(trainer, "ras_by_kind", {}), "groups": getattr(trainer, "groups", [])}
    return {"rewards": rewards, "eval": clean(rows, samples), "seconds": seconds, **extras}


def run_bpgo_uncertainty(seeds: list[int], steps: int) -> dict[str, list[dict]]:
    """GRPO and four BPGO forms (:data:`UNCERTAINTY_METHODS`) trained on ``shapes_judge`` with M = 4 draws over
    the ``bpgo`` prompt mix, scored by the clean ``shapes_adherence``, in the order GRPO, uncertainty, paper form,
    uncertainty + consistency, released form; each seed's runs are saved after every method, so a run cut short
    keeps what it finished.

    The floor of the evaluation gain is the base weights' evaluation, which is the lr-0 run's exactly (at lr 0
    the weights never move and the evaluation noise is fixed by :data:`EVAL_SEED`); this part skips training that
    run, to spend the machine on methods and seeds.
    """
    clean = ShapesAdherence()
    methods = {"GRPO": (DiffusionGRPOTrainer, DiffusionGRPOConfig, {})}
    order = [
        "BPGO (uncertainty)",
        "BPGO (paper form)",
        "BPGO (uncertainty + consistency)",
        "BPGO (released form)",
    ]
    methods.update(
        {label: (GroupRecordingBPGOTrainer, BPGOConfig, UNCERTAINTY_METHODS[label]) for label in order}
    )
    keys = "-".join(UNCERTAINTY_ONLY)
    if UNCERTAINTY_ONLY:
        methods = {label: m for label, m in methods.items() if METHOD_KEYS[label] in UNCERTAINTY_ONLY}
    runs: dict[str, list[dict]] = {label: [] for label in methods}
    for seed in seeds:
        # one folder per seed (and subset of methods): its prior cache (means and variances) is shared by the forms
        folder = f"/tmp/miniature-results-uncertainty-{seed}{keys}"
        settings = recipe(seed=seed, max_steps=steps, output_dir=folder)
        base = DiffusionGRPOTrainer(
            model="tiny:shapes",
            reward_funcs=ShapesJudge(num_draws=JUDGE_DRAWS),
            args=DiffusionGRPOConfig(**settings),
            train_dataset=Dataset.from_dict({"prompt": bpgo_prompts()}),
        )
        before = clean(*eval_samples(base, bpgo_prompts()))
        for label, (trainer_class, config_class, overrides) in methods.items():
            run = uncertainty_run(trainer_class, config_class, {**settings, **overrides}, clean)
            run.update(seed=seed, eval_before=before, eval_after=run.pop("eval"))
            runs[label].append(run)
            print(
                f"{label}, seed {seed}: clean eval {statistics.mean(before):.3f} -> "
                f"{statistics.mean(run['eval_after']):.3f}, {run['seconds']:.0f} s",
                flush=True,
            )
            partial_runs = {k: [r for r in v if r["seed"] == seed] for k, v in runs.items()}
            name = f"bpgo_uncertainty_seeds{seed}{'_' + keys if keys else ''}_steps{steps}.json"
            (OUT / name).write_text(json.dumps(partial_runs))
    return runs


def mean_se(values: list[float], digits: int = 3) -> str:
    """``mean ± standard error`` (std / √n) of ``values``, NaN left out (``n/a`` without values; one value is
    shown without an error)."""
    values = [v for v in values if v == v]
    if len(values) < 2:
        return f"{values[0]:+.{digits}f}" if values else "n/a"
    return (
        f"{statistics.mean(values):+.{digits}f} ± {statistics.stdev(values) / len(values) ** 0.5:.{digits}f}"
    )


def kind_gain(run: dict, kind: str) -> float:
    """The clean evaluation gain of ``run`` on the prompts of ``kind``."""
    kinds = [prompt_kind(p) for p in bpgo_prompts() for _ in range(4)]
    return statistics.mean(
        a - b for a, b, k in zip(run["eval_after"], run["eval_before"], kinds) if k == kind
    )


def report_bpgo_uncertainty(runs: dict[str, list[dict]]) -> list[str]:
    """Clean gains per prompt kind (mean ± SE), the same paired by seed with GRPO (mean difference ± SE, and
    whether it exceeds 2 SE) and, for the uncertainty forms, with BPGO's paper form (the same CRT: the RAS alone
    differs), the RAS weights per kind, and the picture of weight against ambiguity share."""
    runs = {
        label: runs[label] for label in METHOD_KEYS if runs.get(label)
    }  # GRPO first, whatever the file order
    plot_weights_vs_ambiguity(runs, OUT / "bpgo_uncertainty_weights.png")
    lines = [
        "| Method | seeds | eval gain, full captions | eval gain, partial captions |",
        "|---|---|---|---|",
    ]
    for label, seeds_runs in runs.items():
        if not seeds_runs:
            continue
        cells = [mean_se([kind_gain(r, kind) for r in seeds_runs]) for kind in ("full", "partial")]
        lines.append(f"| {label} | {len(seeds_runs)} | {cells[0]} | {cells[1]} |")
    lines += ["", *paired_table(runs, "GRPO")]
    uncertainty = {
        label: r for label, r in runs.items() if "uncertainty" in label or label == "BPGO (paper form)"
    }
    lines += ["", *paired_table(uncertainty, "BPGO (paper form)")]  # the same CRT: only the RAS differs
    lines += ["", *uncertainty_weight_table(runs)]
    return lines


def paired_table(runs: dict[str, list[dict]], reference: str) -> list[str]:
    """Each method's clean gain minus ``reference``'s of the same seed, per prompt kind: mean ± SE, whether the
    full-caption difference exceeds two standard errors, and on how many seeds the method is above."""
    base = {run["seed"]: run for run in runs.get(reference, [])}
    lines = [
        f"| Method | seeds | full: gain − {reference}'s | > 2 SE | above | partial: gain − {reference}'s | above |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, seeds_runs in runs.items():
        pairs = [(run, base[run["seed"]]) for run in seeds_runs if run["seed"] in base]
        if label == reference or not pairs:
            continue
        cells = []
        for kind in ("full", "partial"):
            diffs = [kind_gain(run, kind) - kind_gain(ref, kind) for run, ref in pairs]
            cells.append(mean_se(diffs))
            if kind == "full":
                se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("inf")
                cells.append("yes" if statistics.mean(diffs) > 2 * se else "no")
            cells.append(f"{sum(d > 0 for d in diffs)}/{len(pairs)}")
        lines.append(f"| {label} | {len(pairs)} | {' | '.join(cells)} |")
    return lines


def uncertainty_weight_table(runs: dict[str, list[dict]]) -> list[str]:
    """Per BPGO form: the mean RAS weight of partial and full captions' groups (± SE over the seeds' means), their
    ratio, and the mean measured ambiguity share ρ of each kind."""
    lines = [
        "| Method | mean weight, partial | mean weight, full | partial / full | ρ partial | ρ full | groups |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, seeds_runs in runs.items():
        if label == "GRPO" or not seeds_runs:
            continue
        per_seed = {kind: [] for kind in ("partial", "full")}
        share = {kind: [] for kind in ("partial", "full")}
        count = 0
        for run in seeds_runs:
            for kind in per_seed:
                groups = [g for g in run["groups"] if g[0] == kind]
                count += len(groups)
                if groups:
                    per_seed[kind].append(statistics.mean(g[1] for g in groups))
                    share[kind].append(statistics.mean(g[2] for g in groups))
        ratio = statistics.mean(per_seed["partial"]) / statistics.mean(per_seed["full"])
        lines.append(
            f"| {label} | {mean_se(per_seed['partial'])} | {mean_se(per_seed['full'])} | {ratio:.2f} | "
            f"{statistics.mean(share['partial']):.2f} | {statistics.mean(share['full']):.2f} | {count} |"
        )
    return lines


def plot_weights_vs_ambiguity(runs: dict[str, list[dict]], path: Path) -> None:
    """One panel per BPGO form: each group's RAS weight against its measured ambiguity share, by prompt kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label in runs if label != "GRPO" and runs[label]]
    figure, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 3.2), sharey=True, squeeze=False)
    for axis, label in zip(axes[0], labels):
        groups = [g for run in runs[label] for g in run["groups"]]
        for kind, colour in (("full", "tab:blue"), ("partial", "tab:orange"), ("none", "tab:green")):
            points = [(g[2], g[1]) for g in groups if g[0] == kind]
            if points:
                xs, ys = zip(*points)
                axis.scatter(xs, ys, s=4, alpha=0.4, color=colour, label=kind)
        axis.axhline(1, color="grey", linewidth=0.8)
        axis.set(title=label.replace("BPGO ", ""), xlabel="ambiguity share ρ (judge draws)")
    axes[0][0].set_ylabel("RAS weight of the group")
    axes[0][0].legend(markerscale=3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


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


# --------------------------------------------------------------------------------------------------
# vipo_structure: a global reward in the structured world (issue 25)
# --------------------------------------------------------------------------------------------------
SCENES_BACKBONE = {"backbone": "tiny:scenes-features"}
#: the arms of the ``vipo_structure`` part: label → (trainer, config, extra settings)
STRUCTURE_METHODS: dict[str, tuple] = {
    "GRPO": (DiffusionGRPOTrainer, DiffusionGRPOConfig, {}),
    "ViPO": (ViPOTrainer, ViPOConfig, SCENES_BACKBONE),
    "ViPO oracle map": (ViPOTrainer, ViPOConfig, {"map_fn": "tiny:scenes-objects"}),
    "ViPO shuffled map": (ViPOTrainer, ViPOConfig, {**SCENES_BACKBONE, "aggregation": "shuffled"}),
    "ViPO ones map": (ViPOTrainer, ViPOConfig, {"aggregation": "ones"}),
    "ViPO released map": (ViPOTrainer, ViPOConfig, {**SCENES_BACKBONE, "map_variant": "released"}),
}
#: the ``vipo_structure`` recipe: the tiny:shapes recipe at G = 4 (8 prompts × 4 samples a step), a larger step
#: (a global reward with room to wreck the background), and probes of the evaluation samples every few steps
STRUCTURE_SETTINGS = {"num_generations": 4, "per_device_train_batch_size": 32, "learning_rate": 5e-5}
STRUCTURE_MODEL = "tiny:scenes"
STRUCTURE_PROBES = 4
"""Evaluations along a run (and one before it): the points of the Pareto picture."""
#: ``--structure_methods``: only these arms of a ``vipo_structure*`` part (its JSON file is named after them)
STRUCTURE_ONLY: list[str] = []
#: ``--structure_probes``: the number of probes along a run (default :data:`STRUCTURE_PROBES`)
STRUCTURE_PROBE_COUNT: list[int] = []


def saturation(prompts: list[str], images: torch.Tensor, **columns) -> list[float]:
    """A second global reward: the mean colour saturation ``mean_p (max_c x_{c,p} − min_c x_{c,p})`` over all
    pixels, in ``[0, 1]``. The backgrounds of ``tiny:scenes`` are dull (a horizon's bands under 0.2, the shapes
    0.65 to 0.8), so the reward has room everywhere, as the red channel has."""
    pixels = images.float().clamp(0, 1)
    return (pixels.amax(dim=1) - pixels.amin(dim=1)).mean(dim=(1, 2)).tolist()


def structure_reward(name: str):
    """The reward of a ``vipo_structure*`` part by name: ``red_channel``, ``saturation`` or ``scenes_adherence``
    (the preference-like one: the classifier's product of the named attributes' probabilities, which depends on
    the object, not on the background)."""
    from trl_visual.miniature.reward import ScenesAdherence
    from trl_visual.rewards import red_channel

    rewards = {"red_channel": red_channel, "saturation": saturation, "scenes_adherence": ScenesAdherence}
    if name not in rewards:
        raise ValueError(f"Unknown structure reward {name!r}; use one of {sorted(rewards)}.")
    reward = rewards[name]
    return reward() if isinstance(reward, type) else reward


#: the ``vipo_structure*`` parts: part → (reward, settings over :data:`STRUCTURE_SETTINGS`, picture title)
STRUCTURE_PARTS: dict[str, tuple[str, dict, str]] = {
    "vipo_structure": ("red_channel", {}, "global red-channel reward, G = 4"),
    "vipo_structure_g8": (
        "red_channel",
        {"num_generations": 8, "per_device_train_batch_size": 64},
        "global red-channel reward, G = 8",
    ),
    "vipo_structure_saturation": ("saturation", {}, "global saturation reward, G = 4"),
    "vipo_structure_adherence": ("scenes_adherence", {}, "preference-like reward (adherence), G = 4"),
}


def structure_prompts() -> list[str]:
    """The 24 full captions of :func:`object_prompts`: every colour × shape × size once."""
    return object_prompts()


class StructureProbe(TrainerCallback):
    """Every ``every`` steps, the evaluation samples (ODE, fixed noise: :func:`eval_samples`, 2 per prompt) of the
    run's trainer: their mean reward, their structure kept against the base model's samples from the same noise
    (:func:`~trl_visual.miniature.structure.edge_correlation`) and their ``scenes_adherence``."""

    def __init__(self, prompts: list[str], base_images: torch.Tensor, every: int, reward, adherence) -> None:
        self.prompts, self.base_images, self.every = prompts, base_images, every
        self.reward, self.adherence = reward, adherence
        self.trainer = None
        self.points: list[dict] = []
        self.images: torch.Tensor | None = None

    def probe(self, step: int) -> None:
        rows, images = eval_samples(self.trainer, self.prompts, per_prompt=2)
        self.images = images.cpu()
        self.points.append(
            {
                "step": step,
                "reward": statistics.mean(self.reward(rows, images)),
                "structure": float(edge_correlation(images.cpu(), self.base_images).mean()),
                "adherence": statistics.mean(self.adherence(rows, images)),
            }
        )

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.probe(state.global_step)


def structure_run(
    label: str, seed: int, steps: int, prompts, base_images, reward, settings: dict | None = None
) -> tuple[dict, torch.Tensor]:
    """One arm of :data:`STRUCTURE_METHODS` on ``tiny:scenes``: its probes (step 0 included) and final samples;
    ``settings`` override :data:`STRUCTURE_SETTINGS`."""
    from trl_visual.miniature.reward import ScenesAdherence

    trainer_class, config_class, extra = STRUCTURE_METHODS[label]
    settings = recipe(seed=seed, max_steps=steps, **{**STRUCTURE_SETTINGS, **(settings or {})}, **extra)
    probes = STRUCTURE_PROBE_COUNT[0] if STRUCTURE_PROBE_COUNT else STRUCTURE_PROBES
    probe = StructureProbe(prompts, base_images, max(1, steps // probes), reward, ScenesAdherence())
    trainer = trainer_class(
        model=STRUCTURE_MODEL,
        reward_funcs=reward,
        args=config_class(**settings),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        callbacks=[probe],
    )
    probe.trainer = trainer
    probe.probe(0)
    start = time.time()
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    return {"points": probe.points, "rewards": rewards, "seconds": time.time() - start}, probe.images


def base_structure_images(prompts: list[str]) -> torch.Tensor:
    """The base ``tiny:scenes`` model's evaluation samples: the reference of the structure measure."""
    base = DiffusionGRPOTrainer(
        model=STRUCTURE_MODEL,
        reward_funcs="red_channel",
        args=DiffusionGRPOConfig(**recipe()),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
    )
    return eval_samples(base, prompts, per_prompt=2)[1].cpu()


def structure_file_name(part: str, seeds: list[int], steps: int) -> str:
    """The JSON file of a ``vipo_structure*`` run: part, seeds, the arms when :data:`STRUCTURE_ONLY` picks some,
    steps (what :func:`merged_runs` and ``--report_steps`` read back)."""
    tag = "-".join(str(s) for s in seeds)
    arms = f"_{'-'.join(STRUCTURE_ONLY)}" if STRUCTURE_ONLY else ""
    return f"{part}_seeds{tag}{arms}_steps{steps}.json"


#: short names of :data:`STRUCTURE_METHODS` for ``--structure_methods`` and file names
STRUCTURE_METHOD_KEYS = {
    "GRPO": "grpo",
    "ViPO": "vipo",
    "ViPO oracle map": "oracle",
    "ViPO shuffled map": "shuffled",
    "ViPO ones map": "ones",
    "ViPO released map": "released",
}


def run_vipo_structure(
    seeds: list[int], steps: int, methods: list[str] | None = None, part: str = "vipo_structure"
) -> dict[str, list[dict]]:
    """Every arm of :data:`STRUCTURE_METHODS` (or ``methods``, or those of :data:`STRUCTURE_ONLY`) on the reward
    and settings of ``part`` (:data:`STRUCTURE_PARTS`) in ``tiny:scenes``, seed by seed; the first seed's final
    samples go into the before/after picture. The runs so far are saved after each arm (the file ``main`` writes at
    the end), so that a stopped process keeps them."""
    reward_name, settings, _ = STRUCTURE_PARTS[part]
    reward = structure_reward(reward_name)
    chosen = [label for label in STRUCTURE_METHODS if STRUCTURE_METHOD_KEYS[label] in STRUCTURE_ONLY]
    prompts = structure_prompts()
    base_images = base_structure_images(prompts)
    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        finals = {"base model": base_images}
        for label in methods or chosen or STRUCTURE_METHODS:
            run, images = structure_run(label, seed, steps, prompts, base_images, reward, settings)
            run["seed"] = seed
            runs.setdefault(label, []).append(run)
            finals[label] = images
            (OUT / structure_file_name(part, seeds, steps)).write_text(json.dumps(runs))
            if seed == seeds[0]:
                save_structure_picture(finals, OUT / f"{part}_before_after_seed{seed}.png")
            last = run["points"][-1]
            print(
                f"{label}, seed {seed}: {reward_name} {run['points'][0]['reward']:.4f} -> {last['reward']:.4f}, structure "
                f"{last['structure']:.3f}, adherence {last['adherence']:.3f}, {run['seconds']:.0f} s",
                flush=True,
            )
    return runs


def save_structure_picture(finals: dict[str, torch.Tensor], path: Path, count: int = 8) -> None:
    """Rows of the same ``count`` evaluation samples (same prompts, same noise, spread evenly over the prompts so
    that every colour shows): the base model's, then each run's after training, 3× enlarged, each row labelled."""
    from PIL import ImageDraw

    total = len(finals["base model"])
    picked = list(range(0, total, max(1, total // count)))[:count]
    rows = [torch.cat([images[i].float().clamp(0, 1) for i in picked], dim=-1) for images in finals.values()]
    grid = torch.nn.functional.interpolate(torch.cat(rows, dim=-2)[None], scale_factor=3, mode="nearest")[0]
    picture = to_pil(torch.nn.functional.pad(grid, (150, 0, 0, 0), value=1.0))
    draw = ImageDraw.Draw(picture)
    for k, label in enumerate(finals):
        draw.text((4, k * 96 + 42), label, fill=(0, 0, 0))
    picture.save(path)


def structure_gain(run: dict) -> tuple[float, float]:
    """A run's final reward gain over its step-0 probe and the structure its final samples keep."""
    first, last = run["points"][0], run["points"][-1]
    return last["reward"] - first["reward"], last["structure"]


def structure_at_gain(run: dict, gain: float) -> float:
    """The structure kept when the run's reward gain first reached ``gain`` (linear between probes); NaN if never."""
    points = [(p["reward"] - run["points"][0]["reward"], p["structure"]) for p in run["points"]]
    for (g0, s0), (g1, s1) in zip(points, points[1:]):
        if g0 <= gain <= g1 and g1 > g0:
            return s0 + (s1 - s0) * (gain - g0) / (g1 - g0)
    return float("nan")


def paired_structure(runs: dict[str, list[dict]], label: str) -> dict[str, list[float]]:
    """Per seed, ``label`` minus GRPO: the reward gain, the structure kept, and the structure kept at the smaller
    of the two runs' final gains (both interpolated along their probes)."""
    grpo = {run["seed"]: run for run in runs["GRPO"]}
    out: dict[str, list[float]] = {"gain": [], "structure": [], "structure_at_equal_gain": []}
    for run in runs[label]:
        other = grpo.get(run["seed"])
        if other is None:
            continue
        (gain, structure), (gain_0, structure_0) = structure_gain(run), structure_gain(other)
        out["gain"].append(gain - gain_0)
        out["structure"].append(structure - structure_0)
        common = min(gain, gain_0)
        if common > 0:
            out["structure_at_equal_gain"].append(
                structure_at_gain(run, common) - structure_at_gain(other, common)
            )
    return out


#: the fractions of GRPO's mean final gain at which the report compares the structure kept, paired by seed
STRUCTURE_GAIN_FRACTIONS = (0.25, 0.5)


def paired_structure_at(
    runs: dict[str, list[dict]], label: str, gain: float, reference: str = "GRPO"
) -> list[float]:
    """Per seed, the structure ``label`` kept minus ``reference``'s where each first reached the reward gain
    ``gain`` (:func:`structure_at_gain`); seeds where either run never reached it are left out."""
    grpo = {run["seed"]: run for run in runs[reference]}
    out = []
    for run in runs[label]:
        if run["seed"] in grpo:
            difference = structure_at_gain(run, gain) - structure_at_gain(grpo[run["seed"]], gain)
            if difference == difference:
                out.append(difference)
    return out


def plot_structure_pareto(runs: dict[str, list[dict]], path: Path, part: str = "vipo_structure") -> None:
    """Structure kept against reward gained along training: each arm's probes averaged over seeds, the final
    point with ±1 standard error on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for label, seeds_runs in runs.items():
        gains = torch.tensor(
            [[p["reward"] - r["points"][0]["reward"] for p in r["points"]] for r in seeds_runs]
        )
        structure = torch.tensor([[p["structure"] for p in r["points"]] for r in seeds_runs])
        style = "--" if "ones" in label else "-"  # all-ones maps train as GRPO does (Adam): drawn over it
        line = axis.plot(gains.mean(0), structure.mean(0), style, marker="o", markersize=3, label=label)[0]
        if len(seeds_runs) > 1:
            root_n = len(seeds_runs) ** 0.5
            axis.errorbar(
                gains.mean(0)[-1],
                structure.mean(0)[-1],
                xerr=gains[:, -1].std() / root_n,
                yerr=structure[:, -1].std() / root_n,
                color=line.get_color(),
            )
    reward_name, _, title = STRUCTURE_PARTS[part]
    axis.set(
        xlabel=f"{reward_name} gained (evaluation samples)",
        ylabel="structure kept (edge corr. with base)",
        title=f"tiny:scenes, {title}",
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report_vipo_structure(runs: dict[str, list[dict]], part: str = "vipo_structure") -> list[str]:
    """The tables of a ``vipo_structure*`` part (each arm; each arm minus GRPO, paired by seed) and its Pareto
    picture ``<part>_pareto.png``."""
    if not runs:
        return [f"{part}: no saved runs."]
    steps = "".join(f"_steps{n}" for n in REPORT_STEPS)  # --report_steps 8: its own picture
    plot_structure_pareto(runs, OUT / f"{part}_pareto{steps}.png", part)
    reward_name = STRUCTURE_PARTS[part][0]
    lines = [
        f"{part} ({reward_name}, steps {sorted({r['points'][-1]['step'] for rs in runs.values() for r in rs})})",
        "",
        f"| Method | seeds | {reward_name} gain | structure kept | adherence change | train time |",
        "|---|---|---|---|---|---|",
    ]
    for label, seeds_runs in runs.items():
        gains = [structure_gain(r)[0] for r in seeds_runs]
        kept = [structure_gain(r)[1] for r in seeds_runs]
        adherence = [r["points"][-1]["adherence"] - r["points"][0]["adherence"] for r in seeds_runs]
        seconds = statistics.mean(r["seconds"] for r in seeds_runs)
        lines.append(
            f"| {label} | {len(seeds_runs)} | {mean_se(gains, 4)} | {mean_se(kept)} | {mean_se(adherence)} | {seconds:.0f} s |"
        )
    lines += [
        "",
        f"| Method − GRPO (paired by seed) | seeds | {reward_name} gain | structure kept | structure at equal gain |",
        "|---|---|---|---|---|",
    ]
    for label in runs:
        if label == "GRPO" or "GRPO" not in runs:
            continue
        paired = paired_structure(runs, label)
        lines.append(
            f"| {label} | {len(paired['gain'])} | {mean_se(paired['gain'], 4)} | {mean_se(paired['structure'])} | "
            f"{mean_se(paired['structure_at_equal_gain'])} |"
        )
    return lines + structure_at_levels(runs)


def structure_at_levels(runs: dict[str, list[dict]]) -> list[str]:
    """The table of each arm's structure kept minus GRPO's at fixed reward gains (the fractions
    :data:`STRUCTURE_GAIN_FRACTIONS` of GRPO's mean final gain), paired by seed: the Pareto picture's vertical
    gaps, with standard errors. Nothing when GRPO gained nothing."""
    if "GRPO" not in runs:
        return []
    grpo_gain = statistics.mean(structure_gain(run)[0] for run in runs["GRPO"])
    if grpo_gain <= 0:
        return []
    levels = [fraction * grpo_gain for fraction in STRUCTURE_GAIN_FRACTIONS]
    header = " | ".join(f"structure at gain {level:+.4f} (seeds)" for level in levels)
    lines = ["", f"| Structure kept, paired by seed | {header} |", "|---" * (len(levels) + 1) + "|"]
    pairs = [(label, "GRPO") for label in runs if label != "GRPO"]
    pairs += [  # the controls against ViPO: is it the map's placement, or a better map?
        (label, reference)
        for label, reference in (("ViPO", "ViPO shuffled map"), ("ViPO oracle map", "ViPO"))
        if label in runs and reference in runs
    ]
    for label, reference in pairs:
        cells = [paired_structure_at(runs, label, level, reference) for level in levels]
        lines.append(
            f"| {label} − {reference} | "
            + " | ".join(f"{mean_se(cell)} ({len(cell)})" for cell in cells)
            + " |"
        )
    return lines


PARTS = {
    "grpo": (run_grpo, report_grpo),
    "bpgo": (run_bpgo, report_bpgo),
    "vipo": (run_vipo, report_vipo),
    "vipo_object": (run_vipo_object, report_vipo_object),
    "bpgo_judge": (run_bpgo_judge, report_bpgo_judge),
    "bpgo_judge_ablation": (run_bpgo_judge_ablation, judge_tables),
    "bpgo_uncertainty": (run_bpgo_uncertainty, report_bpgo_uncertainty),
    **{
        part: (partial(run_vipo_structure, part=part), partial(report_vipo_structure, part=part))
        for part in STRUCTURE_PARTS
    },
}


#: ``--report_steps``: merge only the saved runs of this many steps (``None``: every file of the part)
REPORT_STEPS: list[int] = []


def merged_runs(part: str) -> dict[str, list[dict]]:
    """Every saved ``<part>_*.json`` (one per process), merged run list by run list; with ``--report_steps N``
    only the files of runs of N steps (``…_stepsN.json``)."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(OUT.glob(f"{part}_seeds*.json")):
        if REPORT_STEPS and not any(
            f"_steps{n}." in path.name or f"_steps{n}_" in path.name for n in REPORT_STEPS
        ):
            continue
        for label, seeds_runs in json.loads(path.read_text()).items():
            runs.setdefault(label, []).extend(seeds_runs)
    return runs


#: ``--lora_set`` overrides of the LoRA recipe (values read as YAML: ``lora_target_modules=[to_q, to_k]``)
LORA_OVERRIDES: dict = {}
MODEL_FIELDS = set(ModelArguments.__dataclass_fields__)


def yaml_value(text: str):
    """``text`` read as YAML, with ``3e-4`` a number (YAML 1.1 asks for ``3.0e-4``)."""
    value = yaml.safe_load(text)
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def lora_recipe(seed: int, **overrides) -> tuple[dict, LoraConfig]:
    """The config fields and the ``LoraConfig`` of :data:`LORA_RECIPE` (as the CLI builds them), with
    :data:`LORA_OVERRIDES` and then ``overrides`` applied."""
    fields = {**yaml.safe_load(LORA_RECIPE.read_text()), **LORA_OVERRIDES, "seed": seed, **overrides}
    model_args = ModelArguments(**{k: v for k, v in fields.items() if k in MODEL_FIELDS})
    return recipe(**{k: v for k, v in fields.items() if k in CONFIG_FIELDS}), model_args.lora_config()


def lora_label() -> str:
    variant = ", ".join(f"{key} {value}" for key, value in LORA_OVERRIDES.items())
    return f"LoRA recipe ({variant})" if variant else "LoRA recipe"


def run_lora(seeds: list[int], steps: int) -> dict[str, list[dict]]:
    """GRPO with the LoRA recipe at CFG 1 on ``builtin:shapes``, evaluated like ``grpo`` (every other prompt)."""
    prompts = load_prompts("builtin:shapes")["prompt"]
    return lora_runs(seeds, prompts, prompts[::2], max_steps=steps)


#: prompts whose shape tiny:shapes often gets wrong at CFG 1 (those of ``tests/test_learning_signal.py``)
HEADROOM_PROMPTS = ["a small blue circle on the left", "a big blue square on the right"]


def run_lora_headroom(seeds: list[int], steps: int) -> dict[str, list[dict]]:
    """The LoRA recipe on :data:`HEADROOM_PROMPTS`, 2 prompts × 8 samples a step, 8 steps (``--steps`` is for
    the other parts); evaluated on 32 deterministic samples per prompt."""
    return lora_runs(
        seeds, HEADROOM_PROMPTS, HEADROOM_PROMPTS * 8, max_steps=8, per_device_train_batch_size=16
    )


def lora_runs(
    seeds: list[int], prompts: list[str], eval_prompts: list[str], **overrides
) -> dict[str, list[dict]]:
    """:func:`paired_run` of the LoRA recipe (with ``overrides``) for each seed, under :func:`lora_label`."""
    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        settings, lora = lora_recipe(seed, **overrides)
        run = adherence_run(
            prompts,
            eval_prompts,
            settings,
            peft_config=lora,
        )
        runs.setdefault(lora_label(), []).append(run)
        print_run(lora_label(), seed, run)
    return runs


#: each demo's prompts and steps: the quickstart notebook trains 40 steps on ``builtin:shapes``, the Space 20 steps
#: (its default) on its default prompts
DEMO_RUNS = {
    "quickstart notebook": (load_prompts("builtin:shapes")["prompt"], 40),
    "Space": (
        [
            "a red circle on the left",
            "a blue square at the top",
            "a big green triangle",
            "a small yellow shape",
        ],
        20,
    ),
}


def run_demo(seeds: list[int], steps: int) -> dict[str, list[dict]]:
    """The demos' settings and LoRA (``trl_visual.demo``) on each demo's prompts for its own number of steps
    (``--steps`` is for the other parts); evaluated on every other prompt of a large set, or on each of a few
    prompts 8 times."""
    runs: dict[str, list[dict]] = {}
    for name, (prompts, demo_steps) in DEMO_RUNS.items():
        evaluation = prompts[::2] if len(prompts) > 8 else prompts * 8
        label = f"demo, {name} ({demo_steps} steps)"
        for seed in seeds:
            settings = recipe(**demo_settings(prompts, seed=seed, max_steps=demo_steps))
            run = adherence_run(
                prompts,
                evaluation,
                settings,
                peft_config=LoraConfig(**SHAPES_LORA),
            )
            runs.setdefault(label, []).append(run)
            print_run(label, seed, run)
    return runs


def print_run(label: str, seed: int, run: dict) -> None:
    before, after = statistics.mean(run["eval_before"]), statistics.mean(run["eval_after"])
    last = statistics.mean(run["diff"][-5:])
    print(
        f"{label}, seed {seed}: eval {before:.3f} -> {after:.3f} ({after - before:+.3f}), train − lr 0 over the "
        f"last 5 steps {last:+.3f}, {run['seconds']:.0f} s",
        flush=True,
    )


def report_lora(runs: dict[str, list[dict]]) -> list[str]:
    """The ``grpo`` table for the LoRA runs; the plot shows them beside full fine-tuning at CFG 1 (when saved)."""
    full = {"full fine-tuning": merged_runs("grpo").get("GRPO, CFG 1", [])}
    plotted = {**(full if full["full fine-tuning"] else {}), **runs}
    plot_diffs(plotted, "GRPO on tiny:shapes, LoRA and full fine-tuning", OUT / "lora_reward_vs_floor.png")
    return report_gains(runs)


def report_gains(runs: dict[str, list[dict]]) -> list[str]:
    """The ``grpo`` table (evaluation gain, training reward over the floor) without a plot."""
    return report_grpo(runs, plot=False)


def run_pairs(seeds: list[int], steps: int) -> dict[str, list[dict]]:
    """GRPO on ``tiny:shapes-pairs`` at CFG 1 and CFG 4.5 on the 576 two-shape captions, evaluated on the 48 of
    the ``test`` split (4 samples each), with the binding figures of :func:`binding`; seed 0's runs also save a
    before/after picture."""
    prompts = load_prompts("builtin:shapes-pairs")["prompt"]
    evaluation = list(dict.fromkeys(load_prompts("builtin:shapes-pairs", split="test")["prompt"]))
    runs: dict[str, list[dict]] = {}
    for cfg in (1.0, 4.5):
        label = f"GRPO on two shapes, CFG {cfg:g}, {steps} steps"
        for seed in seeds:
            settings = recipe(seed=seed, max_steps=steps, guidance_scale=cfg)
            picture = {"cfg": cfg, "steps": steps} if seed == 0 else None
            run = adherence_run(
                prompts,
                evaluation,
                settings,
                extras=partial(binding, prompts=evaluation, picture=picture),
                floor_extras=partial(binding, prompts=evaluation),
                model="tiny:shapes-pairs",
            )
            runs.setdefault(label, []).append(run)
            print_run(label, seed, run)
    return runs


def binding(trainer: DiffusionGRPOTrainer, prompts: list[str], picture: dict | None = None) -> dict:
    """``prompt_following`` of the evaluation samples (:func:`eval_samples`): per shape, the share drawn in its
    own phrase's colour and shape, and in the other phrase's (``*_swapped``); with ``picture`` (its ``cfg`` and
    ``steps``), also the before/after picture of the first 8 prompts."""
    rows, samples = eval_samples(trainer, prompts)
    figures = {"following": prompt_following(ShapesAdherence(), rows, samples)}
    if picture is not None:
        figures |= save_pairs_picture(trainer, prompts[:8], **picture)
    return figures


def save_pairs_picture(trainer: DiffusionGRPOTrainer, prompts: list[str], cfg: float, steps: int) -> dict:
    """The before/after picture (``trl_visual.miniature.before_after``) of ``prompts``: the base
    ``tiny:shapes-pairs`` above, the trained denoiser below, the same noise and the recipe's 4 steps at ``cfg``."""
    base = load_shapes_pairs_pipeline()
    for pipeline in (base, trainer.pipeline):
        pipeline.set_progress_bar_config(disable=True)
    picture = before_after(
        base, trainer.pipeline, prompts, ShapesAdherence(), guidance_scale=cfg, labels=("base", "after GRPO")
    )
    path = OUT / f"pairs_before_after_cfg{cfg:g}_steps{steps}.png"
    picture.save(path)
    return {"picture": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)}


BINDING_FIGURES = ("colour", "colour_swapped", "shape", "shape_swapped")


def report_pairs(runs: dict[str, list[dict]]) -> list[str]:
    """The ``grpo`` table and plot, then the binding figures before → after (means over seeds)."""
    plot_diffs(runs, "GRPO on tiny:shapes-pairs (two-shape prompts)", OUT / "pairs_reward_vs_floor.png")
    lines = report_gains(runs) + ["", "| Run | " + " | ".join(BINDING_FIGURES) + " |", "|---" * 5 + "|"]
    for label, seeds_runs in runs.items():
        kept = [run for run in seeds_runs if "following" in run]
        if not kept:
            continue
        cells = [
            f"{statistics.mean(r['floor_following'][name] for r in kept):.3f} → "
            f"{statistics.mean(r['following'][name] for r in kept):.3f}"
            for name in BINDING_FIGURES
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


PARTS.update(
    {
        "lora": (run_lora, report_lora),
        "lora_headroom": (run_lora_headroom, report_gains),
        "demo": (run_demo, report_gains),
        "pairs": (run_pairs, report_pairs),
    }
)


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
    parser.add_argument(
        "--report_steps",
        type=int,
        nargs="+",
        default=[],
        help="Merge only the saved runs of these numbers of steps into the tables (default: every saved file).",
    )
    parser.add_argument(
        "--uncertainty_methods",
        nargs="+",
        default=[],
        choices=sorted(METHOD_KEYS.values()),
        help="Only these methods of the bpgo_uncertainty part (its JSON file is named after them).",
    )
    parser.add_argument(
        "--structure_methods",
        nargs="+",
        default=[],
        choices=list(STRUCTURE_METHOD_KEYS.values()),
        help="Only these arms of the vipo_structure parts (its JSON file is named after them).",
    )
    parser.add_argument(
        "--structure_probes",
        type=int,
        default=STRUCTURE_PROBES,
        help="Probes of the evaluation samples along each vipo_structure run (the Pareto picture's points).",
    )
    parser.add_argument(
        "--lora_set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="Overrides of the LoRA recipe for the lora parts, e.g. lora_r=16 learning_rate=3e-4.",
    )
    args = parser.parse_args()
    OUT = args.out
    UNCERTAINTY_ONLY.extend(args.uncertainty_methods)
    STRUCTURE_ONLY.extend(args.structure_methods)
    STRUCTURE_PROBE_COUNT.append(args.structure_probes)
    REPORT_STEPS.extend(args.report_steps)
    for assignment in args.lora_set:
        key, _, value = assignment.partition("=")
        LORA_OVERRIDES[key] = yaml_value(value)
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    for part in args.parts:
        run, report = PARTS[part]
        if not args.report_only:
            runs = run(args.seeds, args.steps)
            tag = "-".join(str(seed) for seed in args.seeds)
            variant = "".join(f"_{arg}" for arg in args.lora_set if part.startswith("lora")).replace(" ", "")
            name = f"{part}_seeds{tag}_steps{args.steps}{variant}.json"
            if part == "bpgo_uncertainty" and UNCERTAINTY_ONLY:  # the name its per-method saves use
                name = f"{part}_seeds{tag}_{'-'.join(UNCERTAINTY_ONLY)}_steps{args.steps}.json"
            if part in STRUCTURE_PARTS:
                name = structure_file_name(part, args.seeds, args.steps)
            (OUT / name).write_text(json.dumps(runs))
        print("\n".join(report(merged_runs(part))), flush=True)


if __name__ == "__main__":
    main()
