"""The GRPO trainer's gradient points where the reward rises, on the pretrained miniature world.

A directional-derivative check with common random numbers: the trainer's own ``training_step`` gives the
policy gradient ``g`` of a batch; a small plain step ``θ ± ε g / ‖g‖`` (not Adam) must raise the mean
``shapes_adherence`` for ``+ε`` and lower it for ``−ε``, when the same prompts are sampled again from the same
initial noise and SDE noise. A flipped sign, old and new log-probs swapped, or a training forward that does not
match the sampling one (timestep scale, CFG) fails it, or fails the lr-0 checks (ratio 1, nothing clipped).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer
from trl_visual.data import load_prompts
from trl_visual.trainer.rollout import rescore_transition, transition_at

#: every 12th prompt of ``builtin:shapes``: 8 prompts, 64 samples, of which some groups are all right and others
#: mixed (adherence at CFG 1 is 0.73 over the whole set)
PROMPTS = load_prompts("builtin:shapes")["prompt"][::12]


def make_trainer(prompts: list[str], num_generations: int = 8, **overrides) -> DiffusionGRPOTrainer:
    """A GRPO trainer on ``tiny:shapes`` at CFG 1 whose global batch is exactly ``prompts`` × G."""
    from datasets import Dataset

    settings = dict(
        output_dir="/tmp/unused",
        report_to="none",
        save_strategy="no",
        num_generations=num_generations,
        per_device_train_batch_size=len(prompts) * num_generations,
        guidance_scale=1.0,
        num_inference_steps=10,
        scale_rewards="batch",
        max_steps=1,
    )
    args = DiffusionGRPOConfig(**{**settings, **overrides})
    trainer = DiffusionGRPOTrainer(
        model="tiny:shapes",
        reward_funcs="shapes_adherence",
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
    )
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); training_step reads it
    return trainer


def policy_gradient(trainer: DiffusionGRPOTrainer, prompts: list[str]) -> tuple[list[torch.Tensor], int]:
    """One ``training_step`` on ``prompts`` × G (grouped); returns the gradient of every trained parameter and the
    seed its rollouts were sampled with."""
    rows = [{"prompt": p} for p in prompts for _ in range(trainer.args.num_generations)]
    trainer.model.zero_grad()
    trainer.training_step(trainer.model, rows)
    seed = trainer._generation_seed()
    return [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad], seed


@torch.no_grad()
def rewards_after_step(
    trainer: DiffusionGRPOTrainer, prompts: list[str], direction: list[torch.Tensor], step: float, seed: int
) -> torch.Tensor:
    """Rewards of ``prompts`` × G sampled from ``seed`` (initial and SDE noise) at ``θ + step · direction``;
    the weights are restored afterwards."""
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    original = [p.detach().clone() for p in params]
    for p, d in zip(params, direction):
        p.add_(step * d)
    rows = [{"prompt": p} for p in prompts for _ in range(trainer.args.num_generations)]
    group_ids = torch.arange(len(rows)) // trainer.args.num_generations
    try:
        rollouts = trainer.sample([r["prompt"] for r in rows], group_ids, seed=seed, rows=rows)
        return torch.tensor(trainer.reward_funcs[0](rollouts.prompts, rollouts.samples))
    finally:
        for p, o in zip(params, original):
            p.copy_(o)


def unit_ascent_direction(gradient: list[torch.Tensor]) -> list[torch.Tensor]:
    """``−∇L / ‖∇L‖``: the loss is minimised, so the reward should rise along minus its gradient."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in gradient)).float()
    return [-g / norm for g in gradient]


@pytest.fixture(scope="module")
def trainer() -> DiffusionGRPOTrainer:
    return make_trainer(PROMPTS)


def test_at_lr_0_the_ratio_is_one_and_nothing_is_clipped(trainer):
    """Re-scoring the stored transitions with unchanged weights gives the stored log-probs exactly (the training
    forward is the sampling forward: same timestep scale, same guidance), so ρ = 1 and no sample is clipped."""
    rows = [{"prompt": p} for p in PROMPTS for _ in range(8)]
    rollouts = trainer._make_rollouts(rows)
    for k in range(rollouts.train_steps.shape[1]):
        transition = transition_at(rollouts, k)
        with torch.no_grad():
            step = rescore_transition(trainer.adapter, trainer.model, rollouts, transition, trainer.args)
        assert torch.equal(step.log_prob, transition.old_log_prob)
        _, clipped = trainer.clipped_objective(
            step.log_prob, transition.old_log_prob, rollouts.advantages.advantages
        )
        assert not clipped.any()
    # the batch has signal: groups differ (a batch of identical rewards would make this test vacuous)
    assert rollouts.advantages.advantages.abs().max() > 0.5


def test_sde_samples_score_like_ode_samples(trainer):
    """The stochastic sampler at the default noise level does not wreck the samples: its mean reward is within
    0.1 of the deterministic sampler's on the same prompts and initial noise."""
    prompts = [p for p in PROMPTS for _ in range(8)]
    group_ids = torch.arange(len(prompts)) // 8
    with torch.no_grad():
        sde = trainer.sample(prompts, group_ids, seed=7)
        ode = trainer.sample(prompts, group_ids, seed=7, stochastic=False)
    score = trainer.reward_funcs[0]
    sde_mean, ode_mean = (
        torch.tensor(score(prompts, sde.samples)).mean(),
        torch.tensor(score(prompts, ode.samples)).mean(),
    )
    assert sde.log_probs.shape[1] == 10 and ode.log_probs.shape[1] == 0
    assert abs(sde_mean - ode_mean) < 0.1, (sde_mean, ode_mean)


def test_a_small_step_along_the_policy_gradient_raises_the_reward_and_against_it_lowers_it(trainer):
    """On the batch's own noise (common random numbers), ``θ + ε d`` scores higher than ``θ`` and ``θ − ε d``
    lower, with ``d`` the trainer's normalised ascent direction; the gap ``R(+ε) − R(−ε)`` is several times its
    standard error (about 4 at this size, measured)."""
    gradient, seed = policy_gradient(trainer, PROMPTS)
    direction = unit_ascent_direction(gradient)
    base = rewards_after_step(trainer, PROMPTS, direction, 0.0, seed)
    up = rewards_after_step(trainer, PROMPTS, direction, 0.03, seed)
    down = rewards_after_step(trainer, PROMPTS, direction, -0.03, seed)
    gap = up - down
    standard_error = gap.std() / len(gap) ** 0.5
    assert up.mean() > base.mean() > down.mean(), (up.mean(), base.mean(), down.mean())
    assert gap.mean() > 2 * standard_error, (gap.mean(), standard_error)


@pytest.mark.slow
def test_the_policy_gradient_raises_the_reward_on_fresh_samples():
    """The same check on samples the gradient never saw: 32 prompts × 8 samples give the gradient, and a step of
    ε = 0.03 along it must raise the mean reward of 512 fresh deterministic (ODE) samples (two other noise
    seeds) more than a step against it, by more than twice the standard error of the paired difference."""
    prompts = load_prompts("builtin:shapes")["prompt"][::3]
    trainer = make_trainer(prompts)
    gradient, _ = policy_gradient(trainer, prompts)
    direction = unit_ascent_direction(gradient)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    rows = [p for p in prompts for _ in range(8)]
    group_ids = torch.arange(len(rows)) // 8

    @torch.no_grad()
    def fresh_rewards(step: float) -> torch.Tensor:
        for p, d in zip(params, direction):
            p.add_(step * d)
        rewards = []
        for seed in (12345, 54321):
            rollouts = trainer.sample(rows, group_ids, seed=seed, stochastic=False)
            rewards += trainer.reward_funcs[0](rows, rollouts.samples)
        for p, d in zip(params, direction):
            p.sub_(step * d)
        return torch.tensor(rewards)

    gap = fresh_rewards(0.03) - fresh_rewards(-0.03)
    assert gap.mean() > 2 * gap.std() / len(gap) ** 0.5, (gap.mean(), gap.std() / len(gap) ** 0.5)


#: two ``builtin:shapes`` prompts whose shape tiny:shapes often gets wrong at CFG 1 (adherence 0.30 and 0.35)
HEADROOM_PROMPTS = ["a small blue circle on the left", "a big blue square on the right"]


def short_run_gain(seed: int, learning_rate: float = 5e-5, steps: int = 8) -> float:
    """Train GRPO on :data:`HEADROOM_PROMPTS` with the tiny:shapes recipe's sampling (4 steps, CFG 1, the first
    half trained, batch-scaled advantages), then return the mean reward of 32 deterministic samples per prompt
    from fixed noise, minus the same figure for the untrained weights (which is what the lr-0 run with the same
    seed ends with)."""
    return short_run(seed, learning_rate, steps)[1]


def short_run(
    seed: int,
    learning_rate: float,
    steps: int = 8,
    peft_config=None,
    model: str = "tiny:shapes",
    prompts: list[str] = HEADROOM_PROMPTS,
) -> tuple[DiffusionGRPOTrainer, float]:
    """:func:`short_run_gain`'s run (of ``model`` on ``prompts``), with a LoRA when ``peft_config`` is given: the
    trained trainer and the gain."""
    from datasets import Dataset

    args = DiffusionGRPOConfig(
        output_dir="/tmp/unused",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        num_generations=8,
        per_device_train_batch_size=16,
        guidance_scale=1.0,
        num_inference_steps=4,
        timestep_fraction=0.5,
        scale_rewards="batch",
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        max_steps=steps,
        seed=seed,
    )
    trainer = DiffusionGRPOTrainer(
        model=model,
        reward_funcs="shapes_adherence",
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        peft_config=peft_config,
    )
    rows = [p for p in prompts for _ in range(32)]

    @torch.no_grad()
    def mean_reward() -> float:
        rollouts = trainer.sample(rows, torch.arange(len(rows)), seed=99, stochastic=False, training=False)
        return torch.tensor(trainer.reward_funcs[0](rows, rollouts.samples)).mean().item()

    before = mean_reward()
    trainer.train()
    return trainer, mean_reward() - before


def test_a_short_grpo_run_raises_the_reward_above_the_lr_0_run():
    """8 steps of 16 samples at lr 5e-5 raise the adherence of prompts with headroom clearly: measured gains
    +0.24, +0.30, +0.21, +0.30 (seeds 0 to 3; +0.14 to +0.22 at 2e-5) from 0.53, while the lr-0 run gains exactly
    0. The test asks for a little over half the smallest."""
    assert short_run_gain(seed=0) > 0.12


#: two builtin:shapes-pairs prompts whose colours tiny:shapes-pairs often binds to the wrong side (the trainer's
#: deterministic samples at CFG 1, 4 steps: adherence 0.27, 41 % of the shapes in the other phrase's colour)
BINDING_PROMPTS = [
    "a small yellow triangle on the left and a small red square on the right",
    "a small green square at the bottom and a small red square at the top",
]


def test_a_short_grpo_run_on_two_shape_prompts_improves_attribute_binding():
    """16 steps of 16 samples at lr 5e-5 on tiny:shapes-pairs raise the adherence of two prompts it often binds
    wrongly: measured gains +0.12, +0.16, +0.15, +0.07 (seeds 0 to 3) from 0.27, with the shapes drawn in the other
    phrase's colour down from 41 % to 22 to 32 %; at 8 steps the gains are not reliable (−0.05 to +0.12). The
    test asks for half the smallest."""
    _, gain = short_run(0, 5e-5, steps=16, model="tiny:shapes-pairs", prompts=BINDING_PROMPTS)
    assert gain > 0.035


#: the LoRA recipe for tiny:shapes, shipped as a CLI config
LORA_RECIPE = Path(__file__).resolve().parent.parent / "examples" / "configs" / "shapes_grpo_lora.yaml"


def test_the_lora_recipe_learns_and_its_saved_lora_reloads_at_the_trained_strength(tmp_path):
    """The LoRA recipe (``shapes_grpo_lora.yaml``, read by the CLI's parser: its LoRA and learning rate), 8 steps of
    16 samples on the headroom prompts, raises their deterministic adherence by +0.23 to +0.29 (seeds 0 to 3,
    std 0.03; the lr-0 run gains exactly 0); the test asks for +0.15. The saved file, loaded with
    ``load_lora_weights`` into a fresh ``tiny:shapes``, draws the trained model's pictures (its alpha/r = 2 is kept:
    at the default scale 1 they would differ)."""
    from trl_visual.cli import parse_args
    from trl_visual.models.loading import load_pipeline

    _, _, config, model_args = parse_args(["grpo", "--config", str(LORA_RECIPE)])
    lora = model_args.lora_config()
    assert lora.lora_alpha != lora.r  # else reloading at the wrong strength would go unnoticed
    trainer, gain = short_run(seed=0, learning_rate=config.learning_rate, peft_config=lora)
    assert gain > 0.15, gain

    trainer.save_model(str(tmp_path))
    fresh = load_pipeline("tiny:shapes")
    untrained = draw(fresh)
    fresh.load_lora_weights(str(tmp_path))
    trainer.model.eval()
    trained = draw(trainer.pipeline)
    assert (trained - untrained).abs().max() > 0.05  # the LoRA changes the pictures
    torch.testing.assert_close(draw(fresh), trained, atol=1e-5, rtol=0)


def draw(pipeline) -> torch.Tensor:
    """The headroom prompts drawn by ``pipeline`` itself (4 deterministic steps, CFG 1) from a fixed seed."""
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(5)
    call = dict(height=32, width=32, num_inference_steps=4, guidance_scale=1.0, max_sequence_length=8)
    return pipeline(HEADROOM_PROMPTS, generator=generator, output_type="pt", **call).images
