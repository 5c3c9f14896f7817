"""TempFlow-GRPO's noise-aware weight and GRPO-Guard's RatioNorm and dt-invariant weight, against numbers worked
by hand and closed forms (trl_visual/core/step_weights.py)."""

import math

import pytest
import torch

from trl_visual.core.sde import sde_step_with_logprob
from trl_visual.core.step_weights import (
    dt_invariant_weights,
    noise_aware_weights,
    ratio_norm_log_ratio,
    transition_stds,
)

#: a 3-step schedule σ: 1 → 0.75 → 0.5 → 0, sigma_max (the schedule's second σ) 0.75
SIGMAS, SIGMAS_NEXT = torch.tensor([1.0, 0.75, 0.5]), torch.tensor([0.75, 0.5, 0.0])


def test_noise_aware_weight_of_a_three_step_flow_grpo_schedule_by_hand():
    # a = 0.5; σ_t = a sqrt(σ / (1 − σ)), at σ = 1 the denominator is 1 − 0.75 = 0.25:
    #   step 0: σ_t = 0.5 · sqrt(1 / 0.25) = 1,           Δt = 0.25, s = 1 · 0.5 = 0.5
    #   step 1: σ_t = 0.5 · sqrt(0.75 / 0.25) = 0.5√3,     Δt = 0.25, s = 0.5√3 · 0.5 = 0.25√3
    #   step 2: σ_t = 0.5 · sqrt(0.5 / 0.5) = 0.5,         Δt = 0.5,  s = 0.5 · √0.5 = 0.25√2
    stds = transition_stds("flow_grpo", SIGMAS, SIGMAS_NEXT, 0.5, sigma_max=0.75)
    by_hand = torch.tensor([0.5, 0.25 * math.sqrt(3), 0.25 * math.sqrt(2)])
    torch.testing.assert_close(stds, by_hand)
    mean = (0.5 + 0.25 * math.sqrt(3) + 0.25 * math.sqrt(2)) / 3  # 0.42767…
    torch.testing.assert_close(noise_aware_weights(stds), by_hand / mean)
    assert noise_aware_weights(stds).mean().item() == pytest.approx(1.0)
    # normalized over the first two steps only (timestep_fraction 2/3): mean 1 over those two
    over_two = noise_aware_weights(stds, trained=torch.tensor([0, 1]))
    torch.testing.assert_close(over_two, by_hand / ((0.5 + 0.25 * math.sqrt(3)) / 2))
    assert over_two[:2].mean().item() == pytest.approx(1.0)


def test_noise_aware_weight_with_dance_grpo_degenerates_to_norm_sqrt_dt():
    stds = transition_stds("dance_grpo", SIGMAS, SIGMAS_NEXT, 0.3)
    torch.testing.assert_close(stds, 0.3 * torch.tensor([0.5, 0.5, math.sqrt(0.5)]))
    sqrt_dt = torch.tensor([0.5, 0.5, math.sqrt(0.5)])
    torch.testing.assert_close(noise_aware_weights(stds), sqrt_dt / sqrt_dt.mean())


def test_equal_stds_give_weight_one():
    assert torch.equal(noise_aware_weights(torch.full((4,), 0.3)), torch.ones(4))


def test_dt_invariant_weight_by_hand_for_both_sde_types():
    # flow_grpo: δ = 1 / Δt = [4, 4, 2]
    torch.testing.assert_close(
        dt_invariant_weights("flow_grpo", SIGMAS, SIGMAS_NEXT, 0.7), torch.tensor([4.0, 4.0, 2.0])
    )
    # dance_grpo, η = 0.3: β = 1 + 0.09 (1 − t) / (2t): t = 1 → 1; t = 0.75 → 1 + 0.09 · 0.25 / 1.5 = 1.015;
    # t = 0.5 → 1 + 0.09 · 0.5 / 1 = 1.045; δ = β / Δt = [4, 4.06, 2.09]
    torch.testing.assert_close(
        dt_invariant_weights("dance_grpo", SIGMAS, SIGMAS_NEXT, 0.3), torch.tensor([4.0, 4.06, 2.09])
    )
    # t floored at 1e-3: a step from σ = 0 would otherwise divide by zero
    floored = dt_invariant_weights("dance_grpo", torch.tensor([0.0]), torch.tensor([-0.5]), 1.0)
    torch.testing.assert_close(floored, torch.tensor([(1 + 0.999 / 2e-3) / 0.5]))
    with pytest.raises(ValueError, match="flow_grpo"):
        dt_invariant_weights("cps", SIGMAS, SIGMAS_NEXT, 0.7)


@pytest.mark.parametrize("sde_type", ["flow_grpo", "dance_grpo"])
def test_dt_invariant_weight_takes_the_step_size_out_of_the_mean_s_velocity_slope(sde_type):
    """``δ · ∂μ/∂v`` does not depend on ``Δt``: what makes the gradient independent of the step size."""
    sigmas, sigmas_next = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.3, 0.25])
    x, v = torch.randn(3, 5), torch.randn(3, 5)
    noise_level = 0.7 if sde_type == "flow_grpo" else 0.3
    slopes = []
    for i in range(3):

        def mean_of(velocity, i=i):
            return sde_step_with_logprob(
                sde_type, x[i : i + 1], velocity, sigmas[i : i + 1], sigmas_next[i : i + 1], noise_level
            ).mean.sum()

        slopes.append(torch.autograd.functional.jacobian(mean_of, v[i : i + 1])[0, 0].item())
    delta = dt_invariant_weights(sde_type, sigmas, sigmas_next, noise_level)
    scaled = delta * torch.tensor(slopes)
    if sde_type == "flow_grpo":  # one constant, −(1 + a²/2)
        expected = torch.full((3,), -(1 + noise_level**2 / 2))
    else:  # −β²: free of Δt (0.1, 0.3, 0.05 here), not of t
        expected = -((1 + noise_level**2 * (1 - sigmas) / (2 * sigmas)) ** 2)
    torch.testing.assert_close(scaled, expected, rtol=1e-4, atol=1e-5)


def test_ratio_norm_by_hand():
    # one element: s = 0.5, μ_old = 0, x' = 0.5 (ε = 1), μ_θ = 0.1, so Δμ = 0.1
    # log p_θ − log p_old = [−(0.4)² + (0.5)²] / (2 · 0.25) = 0.09 / 0.5 = 0.18
    # log r̂ = 0.5 · (0.18 + 0.01 / 0.5) = 0.5 · 0.2 = 0.1 = Δμ · ε
    std, x_next = torch.tensor([0.5]), torch.tensor([0.5])
    log_p = sde_log_prob(x_next, torch.tensor([0.1]), std)
    log_p_old = sde_log_prob(x_next, torch.tensor([0.0]), std)
    torch.testing.assert_close(log_p - log_p_old, torch.tensor([0.18]))
    torch.testing.assert_close(
        ratio_norm_log_ratio(log_p, log_p_old, torch.tensor([0.1]), std), torch.tensor([0.1])
    )


def sde_log_prob(x, mean, std):
    return torch.distributions.Normal(mean, std).log_prob(x)


@pytest.mark.parametrize("sde_type", ["flow_grpo", "dance_grpo", "cps"])
def test_ratio_norm_is_the_mean_difference_times_the_noise_elementwise(sde_type):
    """Closed form: for ``x' = μ_old + s ε``, ``log r̂ = Δμ · ε`` with ``Δμ = μ_θ − μ_old``, per element."""
    x, v_old, v_new = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sigma, sigma_next = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.3])
    noise = torch.randn(2, 3, 4, 4)
    old = sde_step_with_logprob(sde_type, x, v_old, sigma, sigma_next, 0.7, sigma_max=0.9, noise=noise)
    new = sde_step_with_logprob(
        sde_type, x, v_new, sigma, sigma_next, 0.7, sigma_max=0.9, prev_sample=old.prev_sample
    )
    mean_delta = new.mean - old.mean
    log_ratio = ratio_norm_log_ratio(new.log_prob, old.log_prob, mean_delta, new.std)
    torch.testing.assert_close(log_ratio, mean_delta * noise, rtol=1e-4, atol=1e-4)
    # without the normalization the log-ratio is biased by −Δμ² / (2s²), which RatioNorm removes
    plain = new.log_prob - old.log_prob
    torch.testing.assert_close(
        plain, mean_delta * noise / new.std - mean_delta**2 / (2 * new.std**2), rtol=1e-4, atol=1e-4
    )


def test_ratio_norm_of_unchanged_weights_is_zero():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sigma, sigma_next = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.3])
    old = sde_step_with_logprob("flow_grpo", x, v, sigma, sigma_next, 0.7, sigma_max=0.9)
    assert torch.equal(
        ratio_norm_log_ratio(old.log_prob, old.log_prob, old.mean - old.mean, old.std), torch.zeros_like(x)
    )
