import math

import pytest
import torch

from trl_visual.core.advantages import combine_rewards, group_advantages, nan_std, weighted_reward_sum
from trl_visual.core.policy_loss import clipped_policy_loss, gaussian_kl
from trl_visual.core.timesteps import (
    num_train_timesteps,
    sample_window_start,
    select_train_timesteps,
    stochastic_step_indices,
)


def test_group_advantages_by_hand():
    # group [1, 2, 3, 4]: mean 2.5, unbiased std sqrt(5/3) = 1.2909944; A = ±1.5/1.2910944, ±0.5/1.2910944
    # group [5, 5, 5, 5]: std 0, so A = 0
    advantages = group_advantages(torch.tensor([1.0, 2, 3, 4, 5, 5, 5, 5]), 4, "group")
    expected = [-1.161805, -0.387268, 0.387268, 1.161805, 0, 0, 0, 0]
    assert advantages.tolist() == pytest.approx(expected, abs=1e-5)


def test_nan_rewards_are_left_out():
    # [1, NaN, 3]: mean 2, std sqrt(2) = 1.414214; A = ∓1/1.414314 = ∓0.707057; the NaN gets 0
    advantages = group_advantages(torch.tensor([1.0, float("nan"), 3.0]), 3, "group")
    assert advantages.tolist() == pytest.approx([-0.707057, 0.0, 0.707057], abs=1e-5)


def test_batch_scale_and_none_and_clip():
    rewards = torch.tensor([0.0, 2.0, 10.0, 14.0])
    # batch std of [0, 2, 10, 14]: mean 6.5, squares 42.25 + 20.25 + 12.25 + 56.25 = 131, /3 → std 6.608076
    batch = group_advantages(rewards, 2, "batch", clip=None)
    assert batch.tolist() == pytest.approx(
        [-1 / 6.608176, 1 / 6.608176, -2 / 6.608176, 2 / 6.608176], abs=1e-5
    )
    assert group_advantages(rewards, 2, "none", clip=None).tolist() == [-1.0, 1.0, -2.0, 2.0]
    assert group_advantages(rewards, 2, "none", clip=1.5).tolist() == [-1.0, 1.0, -1.5, 1.5]


def test_nan_std_by_hand():
    assert nan_std(torch.tensor([1.0, float("nan"), 3.0])).item() == pytest.approx(math.sqrt(2))
    assert nan_std(torch.tensor([float("nan"), 3.0])).item() == 0.0


def test_combine_rewards_both_aggregations():
    rewards = torch.tensor([[1.0, 10.0], [3.0, 30.0]])  # one group of 2, two reward functions
    weights = torch.tensor([1.0, 0.5])
    reward, advantage = combine_rewards(rewards, weights, 2, "sum_then_normalize", "none")
    assert reward.tolist() == [6.0, 18.0]  # 1 + 5, 3 + 15
    assert advantage.tolist() == [-5.0, 5.0]  # ±6 clamped to ±5
    _, advantage = combine_rewards(rewards, weights, 2, "normalize_then_sum", "none", clip=None)
    assert advantage.tolist() == [-1.0 - 0.5 * 10, 1.0 + 0.5 * 10]
    # a sample whose every reward is NaN stays NaN and gets advantage 0
    reward, advantage = combine_rewards(torch.tensor([[float("nan")], [1.0]]), torch.ones(1), 2)
    assert math.isnan(reward[0]) and advantage[0] == 0


def test_clipped_policy_loss_by_hand():
    log_ratio = torch.tensor([0.1, 0.1, -0.1, 0.0])
    advantages = torch.tensor([1.0, -1.0, -1.0, 2.0])
    loss, clipped = clipped_policy_loss(log_ratio, advantages, 0.05)
    # ρ = e^0.1 = 1.105171, e^−0.1 = 0.904837
    # A = 1: max(−1.105171, −1.05) = −1.05 (clipped); A = −1: max(1.105171, 1.05) = 1.105171
    # A = −1, ρ = 0.904837: max(0.904837, 0.95) = 0.95 (clipped); ρ = 1: −2
    assert loss.tolist() == pytest.approx([-1.05, 1.105171, 0.95, -2.0], abs=1e-6)
    assert clipped.tolist() == [True, False, True, False]


def test_asymmetric_clipping_epsilon_high_by_hand():
    """TRL's ``epsilon_high``: the ratio is clipped to [1 − ε, 1 + ε_high]. With ε = 0.05, ε_high = 0.2:
    ρ = e^0.1 = 1.105171 < 1.2, so A = 1 is no longer clipped (−1.105171, where symmetric clipping gave −1.05);
    ρ = e^0.3 = 1.349859 > 1.2 is (−1.2); the low side is unchanged: ρ = e^−0.1 with A = −1 gives 0.95."""
    log_ratio = torch.tensor([0.1, 0.3, -0.1, 0.3])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = clipped_policy_loss(log_ratio, advantages, 0.05, epsilon_high=0.2)
    # A = −1, ρ = 1.349859: max(1.349859, 1.2) = 1.349859 (the unclipped term, as for symmetric clipping)
    assert loss.tolist() == pytest.approx([-1.105171, -1.2, 0.95, 1.349859], abs=1e-6)
    assert clipped.tolist() == [False, True, True, False]
    symmetric, _ = clipped_policy_loss(log_ratio, advantages, 0.05)
    assert symmetric.tolist() == pytest.approx([-1.05, -1.05, 0.95, 1.349859], abs=1e-6)


def test_gaussian_kl_matches_torch():
    mean, ref, std = torch.randn(10), torch.randn(10), torch.rand(10) + 0.1
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std), torch.distributions.Normal(ref, std)
    )
    torch.testing.assert_close(gaussian_kl(mean, ref, std), expected)


def test_stochastic_steps_and_windows():
    assert stochastic_step_indices(5, "flow_grpo") == [0, 1, 2, 3, 4]
    assert stochastic_step_indices(5, "cps") == [0, 1, 2, 3]  # its last step has zero noise
    assert stochastic_step_indices(10, "flow_grpo", window_size=3, window_start=4) == [4, 5, 6]
    starts = {
        sample_window_start(3, (0, 20), 10, "flow_grpo", torch.Generator().manual_seed(s)) for s in range(50)
    }
    assert starts <= set(range(8)) and len(starts) > 3  # clipped so the window fits in 10 steps


def test_train_timestep_selection():
    assert num_train_timesteps(10, 0.6) == 6
    assert num_train_timesteps(3, 0.01) == 1
    ordered = select_train_timesteps(list(range(10)), 3, 0.5, "ordered")
    assert ordered.tolist() == [[0, 1, 2, 3, 4]] * 3
    random = select_train_timesteps(list(range(10)), 64, 0.5, "random", torch.Generator().manual_seed(0))
    assert random.shape == (64, 5)
    assert all(len(set(row)) == 5 for row in random.tolist())  # no step twice for a sample
    assert len({tuple(row) for row in random.tolist()}) > 1  # samples differ


def test_weighted_reward_sum_skips_missing_terms_and_keeps_all_missing_rows_nan():
    nan = float("nan")
    rewards = torch.tensor([[1.0, 2.0], [nan, 3.0], [nan, nan]])
    total = weighted_reward_sum(rewards, torch.tensor([0.5, 2.0]))
    assert total[:2].tolist() == [0.5 * 1.0 + 2.0 * 2.0, 2.0 * 3.0]
    assert torch.isnan(total[2])
