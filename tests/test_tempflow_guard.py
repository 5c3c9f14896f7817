"""TempFlow-GRPO's noise-aware weight and trajectory branching and GRPO-Guard's RatioNorm and dt-invariant weight
in the trainer (issue 28): the weights by hand, the gradients they give against the plain one in closed form,
branched rollouts, their advantages, the config checks and an exact resume."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import logged, lora_weights, make_config, make_trainer

from trl_visual import BPGOConfig, DiffusionGRPOConfig, ViPOConfig
from trl_visual.core.branching import branch_advantages, branch_points, branch_positions
from trl_visual.core.step_weights import transition_stds
from trl_visual.trainer.step_weighting import step_loss_weights


def test_step_weights_of_a_three_step_schedule_by_hand(tmp_path):
    """σ: 1 → 0.75 → 0.5 → 0 with a = 0.5: stds [0.5, 0.25√3, 0.25√2] (tests/test_step_weights.py), all three
    trained by sample 0 and the first two by sample 1: normalized over the steps trained, {0, 1, 2}."""
    rollouts = SimpleNamespace(
        sigmas=torch.tensor([1.0, 0.75, 0.5]),
        sigmas_next=torch.tensor([0.75, 0.5, 0.0]),
        sigma_max=0.75,
        train_steps=torch.tensor([[0, 1, 2], [1, 0, 0]]),
    )
    stds = [0.5, 0.25 * math.sqrt(3), 0.25 * math.sqrt(2)]
    mean = sum(stds) / 3
    args = make_config(tmp_path, noise_aware_weight=True, noise_level=0.5)
    expected = torch.tensor([[stds[0], stds[1], stds[2]], [stds[1], stds[0], stds[0]]]) / mean
    torch.testing.assert_close(step_loss_weights(rollouts, args), expected)
    # δ = 1 / Δt = [4, 4, 2], and both options multiply
    args = make_config(tmp_path, dt_invariant_weight=True, noise_level=0.5)
    torch.testing.assert_close(
        step_loss_weights(rollouts, args), torch.tensor([[4.0, 4.0, 2.0], [4.0, 4.0, 4.0]])
    )
    args = make_config(tmp_path, dt_invariant_weight=True, noise_aware_weight=True, noise_level=0.5)
    torch.testing.assert_close(
        step_loss_weights(rollouts, args), expected * torch.tensor([[4.0, 4.0, 2.0], [4.0, 4.0, 4.0]])
    )
    assert step_loss_weights(rollouts, make_config(tmp_path)) is None  # no option: today's loss, untouched


def gradient(trainer) -> list[torch.Tensor]:
    """The LoRA gradient of one ``training_step`` on the tiny run's first batch (``PROMPTS`` × G)."""
    trainer.current_gradient_accumulation_steps = 1
    rows = next(iter(trainer.get_train_dataloader()))
    trainer.model.zero_grad()
    trainer.training_step(trainer.model, rows)
    return [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]


def test_noise_aware_weights_all_one_give_exactly_todays_gradient(tiny_trainer):
    """dance_grpo on the uniform schedule (time_shift 1: Δt = 0.25 at every step) has equal stds, so the weights
    are all exactly 1 and the gradient is bitwise today's."""
    settings = dict(sde_type="dance_grpo", noise_level=0.3, time_shift=1.0)
    plain = gradient(tiny_trainer(**settings))
    weighted = gradient(tiny_trainer(noise_aware_weight=True, **settings))
    assert all(torch.equal(a, b) for a, b in zip(plain, weighted))
    assert any(a.abs().max() > 0 for a in plain)


def window_step(trainer) -> tuple[float, float, float]:
    """``(σ, σ', s)`` of the one trained step of a window-of-one rollout."""
    rollouts = trainer._rollouts
    position = int(rollouts.train_steps[0, 0])
    sigma, sigma_next = rollouts.sigmas[position], rollouts.sigmas_next[position]
    args = trainer.args
    std = transition_stds(args.sde_type, sigma[None], sigma_next[None], args.noise_level, rollouts.sigma_max)
    return float(sigma), float(sigma_next), float(std)


@pytest.mark.parametrize("sde_type", ["flow_grpo", "dance_grpo"])
def test_ratio_norm_and_dt_weight_scale_the_on_policy_gradient_in_closed_form(tiny_trainer, sde_type):
    """One trained step (a window of one): on policy (``Δμ = 0``) the gradient of ``log r̂ = s log r + Δμ²/(2s)`` is
    ``s ∇log r``, so RatioNorm's gradient is ``s`` times the plain one; the dt weight's is ``β / Δt`` times it."""
    settings = dict(sde_type=sde_type, noise_level=0.7 if sde_type == "flow_grpo" else 0.3, sde_window_size=1)
    plain_trainer = tiny_trainer(**settings)
    plain = gradient(plain_trainer)
    sigma, sigma_next, std = window_step(plain_trainer)
    ratio_norm = gradient(tiny_trainer(ratio_norm=True, **settings))
    for a, b in zip(plain, ratio_norm):
        torch.testing.assert_close(b, std * a, rtol=2e-3, atol=1e-9)
    beta = 1.0 if sde_type == "flow_grpo" else 1 + 0.09 * (1 - sigma) / (2 * sigma)
    reweighted = gradient(tiny_trainer(dt_invariant_weight=True, **settings))
    for a, b in zip(plain, reweighted):
        torch.testing.assert_close(b, beta / (sigma - sigma_next) * a, rtol=1e-4, atol=1e-9)
    assert any(a.abs().max() > 0 for a in plain)


def test_on_policy_ratio_norm_is_the_noise_aware_weight_up_to_its_normalization(tiny_trainer):
    """Every step trained: on policy, RatioNorm's gradient is ``Σ_k s_k g_k`` and the noise-aware weight's
    ``Σ_k (s_k / mean_j s_j) g_k``, so the first is ``mean_j s_j`` times the second (which Adam cannot tell apart)."""
    weighted_trainer = tiny_trainer(noise_aware_weight=True)
    weighted = gradient(weighted_trainer)
    rollouts, args = weighted_trainer._rollouts, weighted_trainer.args
    assert rollouts.train_steps.shape[1] == 4
    stds = transition_stds(
        args.sde_type, rollouts.sigmas, rollouts.sigmas_next, args.noise_level, rollouts.sigma_max
    )
    assert stds.max() > 1.5 * stds.min()  # the weights are far from all 1
    ratio_norm = gradient(tiny_trainer(ratio_norm=True))
    for a, b in zip(weighted, ratio_norm):
        torch.testing.assert_close(b, stds.mean() * a, rtol=2e-3, atol=1e-9)
    plain = torch.cat([g.flatten() for g in gradient(tiny_trainer())])
    flat = torch.cat([g.flatten() for g in weighted])
    assert (
        torch.nn.functional.cosine_similarity(plain, flat, dim=0) < 0.9
    )  # the weights turn the gradient (cosine 0.65)


def test_ratio_norm_keeps_the_sampled_means_and_is_zero_at_lr_0(tiny_trainer):
    trainer = tiny_trainer(ratio_norm=True, learning_rate=0.0, max_steps=2)
    trainer.train()
    rollouts = trainer._rollouts
    assert rollouts.means is not None and rollouts.means.shape == rollouts.latents.shape
    assert logged(trainer, "clip_ratio") == [0.0, 0.0]


# -- trajectory branching ---------------------------------------------------------------------------------------
def test_branch_points_and_sub_groups():
    generator = torch.Generator().manual_seed(0)
    assert branch_points("all", 5, 0, generator) == [0, 1, 2, 3]  # never the last step, 4
    assert branch_points("first", 5, 2, generator) == [0, 1]
    drawn = [branch_points("sampled", 5, 2, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(len(p) == 2 and p == sorted(p) and max(p) <= 3 for p in drawn)
    assert len({tuple(p) for p in drawn}) > 1  # the draw moves with the seed
    assert drawn[3] == branch_points("sampled", 5, 2, torch.Generator().manual_seed(3))
    # G = 4, P = 2: samples 0, 1 of each group branch at the first point, 2, 3 at the second
    assert branch_positions(torch.arange(8), 4, 2).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


def test_branch_advantages_by_hand():
    # sub-group [1, 3]: mean 2, population std 1 → ∓1 / (1 + 1e-4); [2, 2]: std 0 → 0; [0, 4]: std 2 → ∓2 / 2.0001
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0, 5.0, float("nan")])
    advantages = branch_advantages(rewards, 2)
    expected = torch.tensor([-1 / 1.0001, 1 / 1.0001, 0.0, 0.0, -2 / 2.0001, 2 / 2.0001, 0.0, 0.0])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(branch_advantages(rewards, 2, scale=False)[:2], torch.tensor([-1.0, 1.0]))


def test_branched_rollouts_take_one_sde_step_each_and_train_it(tiny_trainer):
    """G = 4 branched at the 2 first steps: a group shares its ODE path up to its branch step, sub-group 0 branches
    at step 0 and sub-group 1 at step 1 (where sub-group 0 has already left the path), only the branch step is
    trained, and the advantages are per sub-group."""
    trainer = tiny_trainer(trajectory_branching="first", num_branch_points=2, max_steps=1)
    trainer.train()
    rollouts = trainer._rollouts
    assert rollouts.train_steps.tolist() == [[0], [0], [1], [1]] * 2
    for group in (slice(0, 4), slice(4, 8)):
        at_0, at_1 = rollouts.latents[group, 0], rollouts.latents[group, 1]
        assert all(torch.equal(at_0[0], x) for x in at_0)  # the same initial noise
        assert torch.equal(at_1[2], at_1[3]) and torch.equal(at_1[2], rollouts.next_latents[group, 0][2])
        assert not torch.equal(at_1[0], at_1[1])  # the two branched at step 0 took different noise
        assert not torch.equal(rollouts.samples[group][2], rollouts.samples[group][3])
    sub_groups = rollouts.advantages.advantages.reshape(-1, 2)
    torch.testing.assert_close(sub_groups.sum(dim=1), torch.zeros(4), atol=1e-5, rtol=0)


def test_a_branch_point_on_a_frozen_experts_step_is_an_error(tiny_trainer, monkeypatch):
    trainer = tiny_trainer(trajectory_branching="first", num_branch_points=2, max_steps=1)
    monkeypatch.setattr(trainer.adapter, "trains_at", lambda sigmas: sigmas >= 1)  # only step 0 is trained
    with pytest.raises(RuntimeError, match="frozen expert"):
        trainer.train()


def test_resume_of_a_sampled_branching_run_is_bitwise_exact(tmp_path):
    config = dict(
        trajectory_branching="sampled",
        num_branch_points=2,
        max_steps=3,
        save_strategy="steps",
        save_steps=1,
        learning_rate=3e-2,
        seed=3,
        noise_aware_weight=True,
        ratio_norm=True,
    )
    straight = make_trainer(tmp_path / "straight", **config)
    straight.train()
    expected, rewards = lora_weights(straight), logged(straight, "reward")
    resumed = make_trainer(tmp_path / "resumed", **config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "out" / "checkpoint-1"))
    got = lora_weights(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert logged(resumed, "reward") == rewards


# -- config checks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dt_invariant_weight=True, sde_type="cps"), "set `sde_type` to one of them"),
        (dict(trajectory_branching="first", sde_window_size=1), "set `sde_window_size=0`"),
        (dict(trajectory_branching="all"), "multiple of 3"),
        (dict(trajectory_branching="first", num_branch_points=4), r"\[1, num_inference_steps − 1 = 3\]"),
        (dict(trajectory_branching="sampled", num_branch_points=3), "multiple of 3"),
        (dict(trajectory_branching="first", scale_rewards="batch"), "scale_rewards"),
        (dict(trajectory_branching="every"), "trajectory_branching"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        make_config(tmp_path, **overrides)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("config_class", [BPGOConfig, ViPOConfig])
def test_branching_is_refused_by_methods_that_group_by_prompt(tmp_path, config_class):
    with pytest.raises(ValueError, match="trajectory_branching='none'"):
        make_config(tmp_path, config_class, trajectory_branching="first")
    assert make_config(
        tmp_path, config_class, noise_aware_weight=True, ratio_norm=True, dt_invariant_weight=True
    )


def test_noise_aware_weight_with_constant_noise_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        make_config(tmp_path, noise_aware_weight=True, sde_type="dance_grpo", noise_level=0.3)
    assert "Norm(sqrt(Δt))" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert isinstance(make_config(tmp_path, noise_aware_weight=True), DiffusionGRPOConfig)
    assert "noise_aware_weight" not in caplog.text


def test_bpgo_vipo_takes_the_options_through_the_same_loss_path(tmp_path, dinov2_path):
    """BPGO × ViPO's dense loss (one ratio per latent position, BPGO's weight and auxiliary CRT) gets the same
    closed forms as GRPO: on policy, RatioNorm scales the gradient by ``s`` and the dt weight by ``1 / Δt``."""
    from trl_visual.trainer.bpgo_vipo import BPGOViPOConfig, BPGOViPOTrainer

    def trainer(name, **options):
        torch.manual_seed(0)
        return make_trainer(
            tmp_path / name,
            trainer_class=BPGOViPOTrainer,
            config_class=BPGOViPOConfig,
            trainer_kwargs={"backbone": dinov2_path},
            sde_window_size=1,
            **options,
        )

    plain_trainer = trainer("plain")
    plain = gradient(plain_trainer)
    sigma, sigma_next, std = window_step(plain_trainer)
    assert plain_trainer._rollouts.advantages.advantages.ndim > 1  # the dense (per-position) loss
    for a, b in zip(plain, gradient(trainer("ratio_norm", ratio_norm=True))):
        torch.testing.assert_close(b, std * a, rtol=2e-3, atol=1e-9)
    for a, b in zip(plain, gradient(trainer("dt", dt_invariant_weight=True))):
        torch.testing.assert_close(b, a / (sigma - sigma_next), rtol=1e-4, atol=1e-9)
    assert any(a.abs().max() > 0 for a in plain)
