"""Time to reward: CPU-seconds (and steps) of training until the fixed-sample evaluation gain reaches a target, per
configuration ("arm"), on the pretrained miniature world (issue 28, item 1). An experiment, not a test.

Each run trains GRPO from ``tiny:shapes`` (or ``tiny:shapes-pairs``) on ``builtin:shapes`` (``-pairs``), rewarded by
``shapes_adherence``, and every ``--eval_every`` steps scores deterministic (ODE) samples of the fixed evaluation
prompts from fixed noise (:func:`miniature_results.eval_rewards`: 48 test-split prompts × 4, the recipe's
evaluation). The **gain** is that mean reward minus the same evaluation of the base weights before training (the lr-0
floor: at learning rate 0 every later evaluation equals it exactly). The clock is ``time.process_time()`` of this
one-threaded process (``torch_num_threads=1``), counting training only (sampling, rewards, backward, optimizer), not
the evaluations: other jobs on a shared machine do not inflate it as they inflate wall time.

Arms (:data:`ARMS`; ``--arms`` picks by key; adding one is one dict entry of config fields over the base recipe):

* ``flow_grpo`` (a) — Flow-GRPO's shape: every one of ``STEPS`` sampling steps stochastic (its ``flow_grpo`` SDE,
  noise level 0.7, as its released SD3 config), the first half trained (``timestep_fraction=0.5``), advantages
  scaled by the group's std; its lr rule (AdamW at a constant rate, no warm-up, weight decay 1e-4, gradient norm
  clipped at 1) with the rate adapted to this model: Flow-GRPO's 3e-4 trains a rank-32 LoRA of SD3.5-M, while
  ``tiny:shapes`` is trained in full (2.3 M weights), where the usual tenfold smaller rate is 3e-5. CFG stays 1 (the
  recipe's; Flow-GRPO's 4.5 would change the evaluated sampler too) and no KL (Flow-GRPO's β needs a LoRA-disabled
  reference; the full model has none).
* ``recipe`` (b) — ``examples/configs/shapes_grpo.yaml`` as it is (4 steps, batch std, lr 2e-5).
* ``window`` (c) — Flow-GRPO-Fast: ``STEPS`` steps, a random SDE window of 2 in the first half, only it trained.
* ``sliding`` (d) — MixGRPO: the same window on ``sde_window_schedule='progressive'`` (one step further every
  ``--steps // 4`` steps, wrapping).
* ``tracking`` (e) — the recipe with ``per_prompt_stat_tracking``.
* ``tempflow_weight``, ``tempflow_branching``, ``ratio_norm``, ``dt_weight`` — TempFlow-GRPO and GRPO-Guard options
  on the ``flow_grpo`` arm; skipped (with a message) while the config lacks their fields.

The window arms use ``STEPS`` = 8 sampling steps (the recipe's 4 leave a 2-step window no room to move); ``flow_grpo``
uses 8 too, as Flow-GRPO's 10-step training sampler scaled to this model. Each run's curve is written to
``docs/images/results/time_to_reward_<tag>.json`` as it finishes, so a cut-short job still reports; ``--report`` prints
the table and draws ``docs/images/time_to_reward.png`` from that file.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/time_to_reward.py --arms flow_grpo recipe window sliding tracking \
        --seeds 0 1 2 --steps 40 --eval_every 4
    python benchmarks/time_to_reward.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from datasets import Dataset
from miniature_results import CONFIG_FIELDS, OUT, eval_rewards, recipe
from transformers import TrainerCallback

from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer
from trl_visual.data import load_prompts
from trl_visual.miniature import PAIRS_GRPO_DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
#: each job writes its runs to ``time_to_reward_<tag>.json`` (``--tag``); the report merges them all
RESULTS = str(OUT / "time_to_reward_{tag}.json")
PLOT = ROOT / "docs" / "images" / "time_to_reward.png"
#: sampling steps of the arms that need room for a window (the recipe samples 4)
STEPS = 8
#: the eval gains over the lr-0 floor whose time is measured (+0.02 too: short runs seldom reach +0.04)
TARGETS = (0.02, 0.03, 0.04)

FLOW_GRPO = dict(
    num_inference_steps=STEPS, sde_type="flow_grpo", noise_level=0.7, timestep_fraction=0.5, scale_rewards="group",
    learning_rate=3e-5, lr_scheduler_type="constant", weight_decay=1e-4, max_grad_norm=1.0,
)  # fmt: skip
WINDOW = dict(
    num_inference_steps=STEPS, sde_window_size=2, sde_window_range=[0, STEPS // 2], timestep_fraction=1.0
)

#: arm key → (label, config fields over the ``tiny:shapes`` recipe); ``{steps}`` in a value is ``--steps``
ARMS: dict[str, tuple[str, dict]] = {
    "flow_grpo": ("(a) Flow-GRPO-shaped", FLOW_GRPO),
    "recipe": ("(b) recipe (shapes_grpo.yaml)", {}),
    "window": ("(c) SDE window 2 (Flow-GRPO-Fast)", WINDOW),
    "sliding": ("(d) sliding window 2 (MixGRPO)", {**WINDOW, "sde_window_schedule": "progressive"}),
    "tracking": ("(e) recipe + per-prompt tracking", {"per_prompt_stat_tracking": True}),
    "tempflow_weight": ("TempFlow noise-aware weight", {**FLOW_GRPO, "noise_aware_weight": True}),
    "tempflow_branching": (
        "TempFlow branching",
        {**FLOW_GRPO, "trajectory_branching": "first", "num_branch_points": 4},
    ),
    "ratio_norm": ("GRPO-Guard RatioNorm", {**FLOW_GRPO, "ratio_norm": True}),
    "dt_weight": ("GRPO-Guard dt-invariant weight", {**FLOW_GRPO, "dt_invariant_weight": True}),
}
#: the arm every other one is compared with
BASELINE = "flow_grpo"


class TimedEvaluation(TrainerCallback):
    """Every ``every`` optimizer steps (and before the first): the evaluation's mean reward, with the CPU-seconds
    of training so far (``time.process_time``, evaluations excluded). ``trainer`` is set once it exists."""

    def __init__(self, prompts: list[str], every: int, per_prompt: int = 4):
        self.prompts, self.every, self.per_prompt = prompts, every, per_prompt
        self.trainer: DiffusionGRPOTrainer | None = None
        self.curve: list[dict] = []
        self.cpu = 0.0
        self.mark = 0.0

    def _evaluate(self, step: int) -> None:
        self.cpu += time.process_time() - self.mark
        reward = float(eval_rewards(self.trainer, self.prompts, self.per_prompt).mean())
        self.curve.append({"step": step, "cpu_s": self.cpu, "eval_reward": reward})
        print(f"  step {step:3d}  {self.cpu:7.1f} CPU-s  eval {reward:.4f}", flush=True)
        self.mark = time.process_time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark = time.process_time()
        self._evaluate(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._evaluate(state.global_step)


def arm_settings(key: str, seed: int, steps: int, pairs: bool) -> dict | None:
    """The config fields of arm ``key`` (``None`` when this version's config lacks one of them)."""
    _, overrides = ARMS[key]
    missing = sorted(set(overrides) - CONFIG_FIELDS)
    if missing:
        print(
            f"skipping arm {key!r}: this version's DiffusionGRPOConfig has no {', '.join(missing)}",
            flush=True,
        )
        return None
    overrides = dict(overrides)
    if overrides.get("sde_window_schedule") == "progressive":
        overrides.setdefault("sde_window_interval", max(1, steps // 4))
    base = recipe(seed=seed, max_steps=steps, output_dir=f"/tmp/time-to-reward-{key}-{seed}")
    if pairs:
        base["dataset_name"] = PAIRS_GRPO_DEFAULTS["dataset_name"]
    return {**base, **overrides}


def run(key: str, seed: int, steps: int, every: int, pairs: bool, per_prompt: int = 4) -> dict | None:
    """One training run of arm ``key``: its evaluation curve against CPU-seconds."""
    settings = arm_settings(key, seed, steps, pairs)
    if settings is None:
        return None
    dataset = "builtin:shapes-pairs" if pairs else "builtin:shapes"
    train_prompts = load_prompts(dataset)["prompt"]
    eval_prompts = load_prompts(dataset, split="test")["prompt"]
    timer = TimedEvaluation(eval_prompts, every, per_prompt)
    trainer = DiffusionGRPOTrainer(
        model="tiny:shapes-pairs" if pairs else "tiny:shapes",
        reward_funcs="shapes_adherence",
        args=DiffusionGRPOConfig(**{k: v for k, v in settings.items() if k in CONFIG_FIELDS}),
        train_dataset=Dataset.from_dict({"prompt": train_prompts}),
        callbacks=[timer],
    )
    timer.trainer = trainer
    print(f"{ARMS[key][0]}, seed {seed}{' (pairs)' if pairs else ''}:", flush=True)
    trainer.train()
    return {
        "arm": key,
        "seed": seed,
        "steps": steps,
        "pairs": pairs,
        "eval_per_prompt": per_prompt,
        "curve": timer.curve,
    }


def time_to(curve: list[dict], target: float) -> tuple[int, float] | None:
    """``(step, CPU-s)`` of the first evaluation whose gain over the step-0 floor reaches ``target``."""
    floor = curve[0]["eval_reward"]
    for point in curve:
        if point["eval_reward"] - floor >= target:
            return point["step"], point["cpu_s"]
    return None


def grouped(runs: list[dict]) -> dict[str, list[dict]]:
    """The runs by arm, in :data:`ARMS`' order (unknown arms last), each arm's by seed."""
    order = {key: index for index, key in enumerate(ARMS)}
    by_arm: dict[str, list[dict]] = {}
    for r in sorted(runs, key=lambda r: (order.get(r["arm"], len(order)), r["arm"], r["seed"])):
        by_arm.setdefault(r["arm"], []).append(r)
    return by_arm


def final_gain(run: dict) -> float:
    """The last evaluation's gain over the step-0 floor."""
    return run["curve"][-1]["eval_reward"] - run["curve"][0]["eval_reward"]


def mean_se(values: list[float], digits: int = 0) -> str:
    """``mean ± standard error`` (the mean alone for one value)."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    se = statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.mean(values):.{digits}f} ± {se:.{digits}f}"


def table(runs: list[dict]) -> list[str]:
    """The Markdown table: per arm, for each target the steps and CPU-s to reach it (over the seeds that did, n/N)
    and the ratio of its mean to the baseline arm's mean over the seeds that reached it; the final gain, and its
    difference to the baseline's paired by seed (mean ± standard error); the CPU-s per step."""
    by_arm = grouped(runs)
    header = (
        "| arm | seeds | "
        + " | ".join(f"steps to +{t:.2f} | CPU-s to +{t:.2f} | × (a)" for t in TARGETS)
        + " | final gain | final gain − (a)'s, paired | CPU-s / step |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]

    def cpu_to(arm_runs: list[dict], target: float) -> list[float]:
        return [hit[1] for r in arm_runs if (hit := time_to(r["curve"], target))]

    for key, arm_runs in by_arm.items():
        cells = [ARMS.get(key, (key,))[0], str(len(arm_runs))]
        for target in TARGETS:
            hits = [time_to(r["curve"], target) for r in arm_runs]
            reached = [h for h in hits if h]
            base = cpu_to(by_arm.get(BASELINE, []), target)
            ratio = (
                statistics.mean(h[1] for h in reached) / statistics.mean(base) if reached and base else None
            )
            cells += [
                f"{mean_se([h[0] for h in reached])} ({len(reached)}/{len(hits)})",
                mean_se([h[1] for h in reached]),
                f"{ratio:.2f}" if ratio is not None else "—",
            ]
        finals = {r["seed"]: final_gain(r) for r in arm_runs}
        base_finals = {r["seed"]: final_gain(r) for r in by_arm.get(BASELINE, [])}
        paired = [finals[seed] - base_finals[seed] for seed in finals if seed in base_finals]
        per_step = [r["curve"][-1]["cpu_s"] / max(1, r["curve"][-1]["step"]) for r in arm_runs]
        cells += [mean_se(list(finals.values()), 3), mean_se(paired, 3), mean_se(per_step, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(runs: list[dict], path: Path) -> None:
    """Eval gain against CPU-seconds, per arm: each seed's curve thin, the mean over seeds (at each evaluated step)
    thick. Skipped with a message without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_arm = grouped(runs)
    for index, (key, arm_runs) in enumerate(by_arm.items()):
        colour = f"C{index}"
        for r in arm_runs:
            floor = r["curve"][0]["eval_reward"]
            xs, ys = [p["cpu_s"] for p in r["curve"]], [p["eval_reward"] - floor for p in r["curve"]]
            ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
        length = min(len(r["curve"]) for r in arm_runs)
        xs = [statistics.mean(r["curve"][i]["cpu_s"] for r in arm_runs) for i in range(length)]
        ys = [
            statistics.mean(r["curve"][i]["eval_reward"] - r["curve"][0]["eval_reward"] for r in arm_runs)
            for i in range(length)
        ]
        ax.plot(xs, ys, color=colour, linewidth=2, label=f"{ARMS.get(key, (key,))[0]} (n={len(arm_runs)})")
    for target in TARGETS:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("training CPU-seconds (one thread)")
    ax.set_ylabel("eval gain over the lr-0 floor (shapes_adherence)")
    ax.set_title("Time to reward on tiny:shapes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def load_runs(tag: str | None = None) -> list[dict]:
    """The saved runs of job ``tag`` (every job's when ``None``)."""
    paths = [Path(RESULTS.format(tag=tag))] if tag else sorted(OUT.glob("time_to_reward_*.json"))
    runs: dict[
        tuple, dict
    ] = {}  # one run per arm, seed and setting: a rerun in another job's file counts once
    for run in (run for path in paths if path.is_file() for run in json.loads(path.read_text())):
        runs.setdefault(
            (run["arm"], run["seed"], run["steps"], run["pairs"], run.get("eval_per_prompt", 4)), run
        )
    return list(runs.values())


def report(pairs: bool = False) -> None:
    runs = [r for r in load_runs() if r["pairs"] == pairs]
    print("\n".join(table(runs)))
    plot(runs, PLOT if not pairs else PLOT.with_name("time_to_reward_pairs.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=["flow_grpo", "recipe", "window", "sliding", "tracking"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval_every", type=int, default=4)
    parser.add_argument(
        "--eval_per_prompt", type=int, default=4, help="fixed-noise samples per test prompt (the recipe's: 4)"
    )
    parser.add_argument("--pairs", action="store_true", help="tiny:shapes-pairs on builtin:shapes-pairs")
    parser.add_argument("--report", action="store_true", help="only print the table and draw the plot")
    parser.add_argument("--tag", default="main", help="this job's results file (parallel jobs: one tag each)")
    args = parser.parse_args()
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if not args.report:
        for seed in args.seeds:  # seeds outermost: a cut-short job has every arm at the first seeds
            for key in args.arms:
                result = run(key, seed, args.steps, args.eval_every, args.pairs, args.eval_per_prompt)
                if result is not None:
                    path = Path(RESULTS.format(tag=args.tag))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    runs = [r for r in load_runs(args.tag) if (r["arm"], r["seed"], r["steps"], r["pairs"]) != (
                        key, seed, args.steps, args.pairs)]  # fmt: skip
                    path.write_text(json.dumps([*runs, result], indent=1))
    report(args.pairs)


if __name__ == "__main__":
    main()
