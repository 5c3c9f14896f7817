import math

import pytest
import torch

from trl_visual.core.sde import euler_step, gaussian_log_prob, sde_mean_std, sde_step_with_logprob
from trl_visual.core.timesteps import stochastic_step_indices

SDE_TYPES = ["flow_grpo", "dance_grpo", "cps"]


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_zero_noise_limit_is_the_euler_step(sde_type):
    x, v = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.1])
    mean, std = sde_mean_std(sde_type, x, v, sigma, sigma_next, noise_level=1e-7, sigma_max=0.95)
    torch.testing.assert_close(mean, euler_step(x, v, sigma, sigma_next), atol=1e-6, rtol=0)
    assert std.abs().max() < 1e-6


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_log_prob_equals_torch_normal(sde_type):
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sigma, sigma_next = torch.tensor([0.7, 0.4]), torch.tensor([0.6, 0.3])
    step = sde_step_with_logprob(sde_type, x, v, sigma, sigma_next, 0.7, sigma_max=0.9)
    expected = torch.distributions.Normal(step.mean, step.std).log_prob(step.prev_sample)
    torch.testing.assert_close(step.log_prob, expected, atol=1e-5, rtol=1e-5)


def test_rescoring_a_stored_transition_gives_the_stored_log_prob():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sigma, sigma_next = torch.tensor([0.7, 0.7]), torch.tensor([0.6, 0.6])
    sampled = sde_step_with_logprob("flow_grpo", x, v, sigma, sigma_next, 0.7, sigma_max=0.9)
    rescored = sde_step_with_logprob(
        "flow_grpo", x, v, sigma, sigma_next, 0.7, sigma_max=0.9, prev_sample=sampled.prev_sample
    )
    assert torch.equal(rescored.log_prob, sampled.log_prob)


def test_gaussian_log_prob_by_hand():
    # x = 1, μ = 0, s = 2: −1/8 − log 2 − ½ log 2π = −0.125 − 0.693147 − 0.918939 = −1.737086
    value = gaussian_log_prob(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0]))
    assert value.item() == pytest.approx(-1.737086, abs=1e-6)


def test_flow_grpo_step_by_hand():
    # x = 1, v = 2, σ = 0.5 → σ' = 0.25, a = 0.5: σ_t = 0.5·sqrt(0.5/0.5) = 0.5, dt = −0.25
    # μ = 1·(1 + 0.25/(2·0.5)·(−0.25)) + 2·(1 + 0.25·0.5/(2·0.5))·(−0.25) = 0.9375 − 0.5625 = 0.375
    # s = 0.5·sqrt(0.25) = 0.25
    mean, std = sde_mean_std("flow_grpo", torch.tensor([1.0]), torch.tensor([2.0]), 0.5, 0.25, 0.5)
    assert mean.item() == pytest.approx(0.375)
    assert std.item() == pytest.approx(0.25)


def test_flow_grpo_first_step_uses_the_second_sigma():
    # σ = 1 would divide by zero; the denominator becomes 1 − σ_1 = 1 − 0.9 = 0.1, so σ_t = a·sqrt(10)
    _, std = sde_mean_std("flow_grpo", torch.zeros(1), torch.zeros(1), 1.0, 0.9, 0.7, sigma_max=0.9)
    assert std.item() == pytest.approx(0.7 * math.sqrt(10) * math.sqrt(0.1))


def test_dance_grpo_step_by_hand():
    # x = 1, v = 2, σ = 0.5 → 0.25, η = 0.4. x̂0 = 1 − 0.5·2 = 0; score = −(1 − 0.5·0)/0.25 = −4
    # μ = 1 + 2·(−0.25) − ½·0.16·(−4)·(−0.25) = 1 − 0.5 − 0.08 = 0.42; s = 0.4·0.5 = 0.2
    mean, std = sde_mean_std("dance_grpo", torch.tensor([1.0]), torch.tensor([2.0]), 0.5, 0.25, 0.4)
    assert mean.item() == pytest.approx(0.42)
    assert std.item() == pytest.approx(0.2)


def test_cps_step_by_hand():
    # x = 1, v = 2, σ = 0.5 → 0.25, a = 1/3: s = 0.25·sin(π/6) = 0.125
    # x̂0 = 0, x̂1 = 1 + 0.5·2 = 2, μ = 0·0.75 + 2·sqrt(0.0625 − 0.015625) = 2·0.216506 = 0.433013
    mean, std = sde_mean_std("cps", torch.tensor([1.0]), torch.tensor([2.0]), 0.5, 0.25, 1 / 3)
    assert std.item() == pytest.approx(0.125)
    assert mean.item() == pytest.approx(0.433013, abs=1e-6)


def _gaussian_data_velocity(x, sigma, m, q):
    """Exact velocity E[ε | x_σ] − E[x_0 | x_σ] for x_0 ~ N(m, q²), x_σ = (1 − σ) x_0 + σ ε."""
    variance = (1 - sigma) ** 2 * q**2 + sigma**2
    centred = x - (1 - sigma) * m
    expected_x0 = m + (1 - sigma) * q**2 / variance * centred
    expected_eps = sigma / variance * centred
    return expected_eps - expected_x0


def _sample_particles(sde_type, noise_level, m, q, steps, count=40_000):
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(count, generator=generator, dtype=torch.float64)
    stochastic = set(stochastic_step_indices(steps, sde_type))
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        velocity = _gaussian_data_velocity(x, sigma, m, q)
        if i in stochastic:
            mean, std = sde_mean_std(sde_type, x, velocity, sigma, sigma_next, noise_level, float(sigmas[1]))
            x = mean + std * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        else:
            x = euler_step(x, velocity, sigma, sigma_next)
    return x


@pytest.mark.parametrize("sde_type,noise_level", [("flow_grpo", 0.7), ("dance_grpo", 0.3)])
def test_sde_sampling_reaches_the_data_marginal(sde_type, noise_level):
    x = _sample_particles(sde_type, noise_level, m=1.5, q=0.5, steps=200)
    assert x.mean().item() == pytest.approx(1.5, abs=0.02)
    assert x.std().item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("steps,noise_level", [(10, 0.7), (200, 0.3)])
def test_cps_keeps_the_mean_and_follows_its_exact_variance_recursion(steps, noise_level):
    """CPS re-noises the posterior mean x̂_0 with fresh noise of std σ' sin(aπ/2) at every step, however small
    the step, so it does not keep the data variance (it under-disperses). For Gaussian data the chain is linear:
    x' = α x + β + s ε with α = (1 − σ c)(1 − σ') + (1 + (1 − σ) c) sqrt(σ'² − s²), c = dv/dx =
    (σ − (1 − σ) q²) / V, V = (1 − σ)² q² + σ², so Var' = α² Var + s². The particles must follow it exactly."""
    m, q = 1.5, 0.5
    x = _sample_particles("cps", noise_level, m, q, steps)
    variance = 1.0
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        slope = (sigma - (1 - sigma) * q**2) / ((1 - sigma) ** 2 * q**2 + sigma**2)
        last = sigma_next == 0  # the last CPS step has no noise and is the Euler step
        s = 0.0 if last else sigma_next * math.sin(noise_level * math.pi / 2)
        if last:
            alpha = 1 + slope * (sigma_next - sigma)
        else:
            alpha = (1 - sigma * slope) * (1 - sigma_next) + (1 + (1 - sigma) * slope) * math.sqrt(
                sigma_next**2 - s**2
            )
        variance = alpha**2 * variance + s**2
    assert x.mean().item() == pytest.approx(m, abs=0.02)
    assert x.std().item() == pytest.approx(math.sqrt(variance), rel=0.02)
    assert math.sqrt(variance) < q  # documented: CPS under-disperses
