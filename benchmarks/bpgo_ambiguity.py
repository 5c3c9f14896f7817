"""BPGO vs GRPO when the reward is ambiguous for some prompts (issue 3, part 8). An experiment, not a test.

The trainer sees ``R_obs = R_true + 1 + σ(prompt) · ε`` with ``R_true`` the ``red_channel`` reward,
``ε ~ N(0, 1)`` drawn afresh for every sample, and ``σ = 0`` for half the prompts (reliable) and
``σ = --noise`` for the other half (ambiguous). The ``+ 1`` keeps rewards positive, which the
released code's CRT needs (it multiplies by R) and which changes nothing for GRPO (its advantages
are shift-invariant). ``red_channel`` itself is passed as a second reward with weight 0, so the
true reward is logged but not trained on.

Every method starts from the same weights and, per seed, sees the same noise draws. The TRUE reward
gained is measured with deterministic (ODE) sampling from fixed noise on the reliable and the
ambiguous prompts, after training minus before (a paired difference: exactly 0 with learning rate 0).
Time per step is the training wall time divided by the steps (prior estimation reported apart).

    python benchmarks/bpgo_ambiguity.py                 # 3 seeds × 3 methods × 30 steps, ~4 min on one core
    python benchmarks/bpgo_ambiguity.py --steps 10 --seeds 0   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from datasets import Dataset
from peft import LoraConfig

from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer
from trl_visual.rewards.builtin import red_channel
from trl_visual.trainer.bpgo_config import BPGOConfig
from trl_visual.trainer.bpgo_trainer import BPGOTrainer

RELIABLE = ["a cat", "a dog", "a red car", "a tree"]
AMBIGUOUS = ["a house", "a bird", "a flower", "a boat"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]
METHODS = {
    "GRPO": None,
    "BPGO paper (sigmoid+aux, ema)": dict(prior_source="ema", ras_mode="sigmoid", crt_mode="auxiliary"),
    "BPGO released (posterior+replace, base_model)": dict(
        prior_source="base_model", ras_mode="posterior", crt_mode="replace"
    ),
}


class NoisyRed:
    """``red_channel + 1 + σ(prompt) ε``; the noise stream is fixed by ``seed`` (paired across methods)."""

    __name__ = "noisy_red"

    def __init__(self, noise: float, seed: int):
        self.noise = {p: noise for p in AMBIGUOUS}
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, prompts: list[str], images: torch.Tensor | None = None, **kwargs) -> list[float]:
        sigma = torch.tensor([self.noise.get(p, 0.0) for p in prompts])
        eps = torch.randn(len(prompts), generator=self.generator)
        return (torch.tensor(red_channel(prompts, images)) + 1.0 + sigma * eps).tolist()


@dataclass
class Result:
    gain_reliable: float
    gain_ambiguous: float
    rollout_gain: float
    seconds_per_step: float
    prior_seconds: float


def true_reward(trainer: DiffusionGRPOTrainer, prompts: list[str]) -> float:
    metrics = trainer.evaluate(Dataset.from_dict({"prompt": prompts * 4}))
    return metrics["eval_rewards/red_channel/mean"]


def run(method: dict | None, seed: int, steps: int, noise: float, out: str) -> Result:
    common = dict(
        output_dir=out,
        num_generations=8,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=16,
        learning_rate=3e-2,
        guidance_scale=1.0,
        max_sequence_length=16,
        num_inference_steps=4,
        height=32,
        width=32,
        max_steps=steps,
        seed=seed,
        reward_weights=[1.0, 0.0],
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    config = DiffusionGRPOConfig(**common) if method is None else BPGOConfig(**common, **method)
    trainer_class = DiffusionGRPOTrainer if method is None else BPGOTrainer
    torch.manual_seed(seed)  # the same LoRA initialisation for every method of a seed
    trainer = trainer_class(
        model="tiny:sd3",
        reward_funcs=[NoisyRed(noise, seed), "red_channel"],
        args=config,
        train_dataset=Dataset.from_dict({"prompt": RELIABLE + AMBIGUOUS}),
        peft_config=LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS),
    )
    before = true_reward(trainer, RELIABLE), true_reward(trainer, AMBIGUOUS)
    start = time.perf_counter()
    if isinstance(trainer, BPGOTrainer):
        trainer.prior_estimator.prepare(
            trainer.prior_store, None, trainer.train_dataset
        )  # timed apart from the training steps
    prior_seconds = time.perf_counter() - start
    output = trainer.train()
    after = true_reward(trainer, RELIABLE), true_reward(trainer, AMBIGUOUS)
    rollout = [
        e["rewards/red_channel/mean"] for e in trainer.state.log_history if "rewards/red_channel/mean" in e
    ]
    window = min(5, len(rollout) // 2)
    return Result(
        gain_reliable=after[0] - before[0],
        gain_ambiguous=after[1] - before[1],
        rollout_gain=statistics.mean(rollout[-window:]) - statistics.mean(rollout[:window]),
        seconds_per_step=output.metrics["train_runtime"] / steps,
        prior_seconds=prior_seconds,
    )


def summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * 1e3:+7.2f} ± {spread * 1e3:4.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--noise", type=float, default=0.01, help="σ of the ambiguous prompts' reward noise")
    parser.add_argument("--output_dir", default="/tmp/bpgo_ambiguity")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the tiny model is fastest on one thread
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[Result]] = {name: [] for name in METHODS}
    for i, seed in enumerate(seeds):
        names = list(METHODS)
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate the order: fairer timing
            method = METHODS[name]
            out = f"{args.output_dir}/{name.split()[0]}-{len(results[name])}-{seed}"
            results[name].append(run(method, seed, args.steps, args.noise, out))
            r = results[name][-1]
            print(
                f"seed {seed} {name}: reliable {r.gain_reliable * 1e3:+.2f}, ambiguous {r.gain_ambiguous * 1e3:+.2f}"
            )

    grpo_step = statistics.mean(r.seconds_per_step for r in results["GRPO"])
    print(
        f"\nTRUE red_channel reward gained (×1e-3, mean ± std over seeds {seeds}), {args.steps} steps, "
        f"noise σ = {args.noise} on the ambiguous prompts"
    )
    header = f"{'method':48s} {'reliable (ODE)':>16s} {'ambiguous (ODE)':>16s} {'rollouts':>16s} {'s/step':>7s} {'vs GRPO':>8s}"
    print(header + "\n" + "-" * len(header))
    for name, rs in results.items():
        step = statistics.mean(r.seconds_per_step for r in rs)
        print(
            f"{name:48s} {summary([r.gain_reliable for r in rs]):>16s} {summary([r.gain_ambiguous for r in rs]):>16s} "
            f"{summary([r.rollout_gain for r in rs]):>16s} {step:7.3f} {step / grpo_step:7.2f}x"
        )
    prior = statistics.mean(r.prior_seconds for r in results[list(METHODS)[2]])
    print(f"\nPrior estimation (base_model, 8 prompts × 8 rollouts), once before training: {prior:.2f} s")


if __name__ == "__main__":
    main()
