"""Tests of trl_visual.core.bpgo against values worked out by hand.

Constants used below (to 7 significant digits):
    sigmoid(2) = 0.8807971, sigmoid(-2) = 0.1192029, sigmoid(4) = 0.9820138,
    sigmoid(0.4) = 0.5986877, sigmoid(0.1) = 0.5249792, sigmoid(0.8944272) = 0.7098029,
    Phi(sqrt 2) = (1 + erf(1)) / 2 = (1 + 0.8427008) / 2 = 0.9213504,
    Phi(0.9486833) = 0.8286091, exp(2) = 7.389056, exp(-30) = 9.357623e-14, sqrt(5) = 2.236068.
"""

from __future__ import annotations

import math

import pytest
import torch

from trl_visual.core.bpgo import (
    DEFAULT_RAS_K,
    anchor_consistency,
    batch_reward_scale,
    crt_transform_paper,
    crt_transform_reference,
    prior_delta,
    ras_weights_posterior,
    ras_weights_sigmoid,
    ras_weights_uncertainty,
    update_ema_prior,
)
from trl_visual.core.interpretations import ambiguity_share, interpretation_mean_var

NAN = float("nan")


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, atol=1e-6, rtol=1e-6):
    torch.testing.assert_close(actual, t(expected, actual.dtype), atol=atol, rtol=rtol, equal_nan=True)


# ---------------------------------------------------------------------------------------------- prior_delta


def test_prior_delta_by_hand():
    # group 0: mean (1 + 2 + 3) / 3 = 2, prior 1.5 -> 0.5; group 1: mean (0 + 0 + 6) / 3 = 2, prior 3 -> -1
    close(prior_delta(t([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]]), t([1.5, 3.0])), [0.5, -1.0])


def test_prior_delta_leaves_nan_out():
    # [1, NaN, 3] has mean 2 (not NaN, not 4/3); an all-NaN group has no mean -> NaN
    close(prior_delta(t([[1.0, NAN, 3.0], [NAN, NAN, NAN]]), t([0.0, 0.0])), [2.0, NAN])


def test_prior_delta_rejects_wrong_prior_shape():
    with pytest.raises(ValueError, match="priors must have shape"):
        prior_delta(torch.zeros(3, 4), torch.zeros(4))


# ------------------------------------------------------------------------------------- batch_reward_scale


def test_batch_reward_scale_by_hand_and_nan_aware():
    # values 1, 3, 5, 7: mean 4, squared deviations 9 + 1 + 1 + 9 = 20, population var 20 / 4 = 5,
    # std sqrt(5) = 2.236068; NaN entries are ignored, so adding them changes nothing
    close(batch_reward_scale(t([[1.0, 3.0], [5.0, 7.0]])), 2.236068)
    close(batch_reward_scale(t([[1.0, 3.0, NAN], [5.0, NAN, 7.0]])), 2.236068)


def test_batch_reward_scale_floor_for_constant_or_empty_batch():
    assert batch_reward_scale(torch.full((3, 4), 0.7)).item() == pytest.approx(1e-6)
    assert batch_reward_scale(torch.full((2, 2), NAN), eps=1e-3).item() == pytest.approx(1e-3)


# ------------------------------------------------------------------------------------ ras_weights_sigmoid


def test_ras_sigmoid_paper_form_by_hand():
    # alpha 0.5, k 2, no scale: w = 1 + 0.5 (2 sigmoid(2 delta) - 1)
    # delta  1: 1 + 0.5 (2 * 0.8807971 - 1) = 1 + 0.5 * 0.7615942 = 1.3807971
    # delta  0: 1 + 0.5 (2 * 0.5 - 1) = 1
    # delta -1: 1 + 0.5 (2 * 0.1192029 - 1) = 1 - 0.3807971 = 0.6192029
    w = ras_weights_sigmoid(t([1.0, 0.0, -1.0]), alpha=0.5, k=2.0)
    close(w, [1.3807971, 1.0, 0.6192029])


def test_ras_sigmoid_with_scale_by_hand():
    # delta 0.5 in units of scale 0.25 -> 2 stds; k 2 -> sigmoid(4) = 0.9820138;
    # w = 1 + 0.5 (2 * 0.9820138 - 1) = 1 + 0.5 * 0.9640276 = 1.4820138
    close(ras_weights_sigmoid(t([0.5]), alpha=0.5, k=2.0, scale=0.25), [1.4820138])
    close(ras_weights_sigmoid(t([0.5]), alpha=0.5, k=2.0, scale=torch.tensor(0.25)), [1.4820138])


def test_ras_sigmoid_default_k_documented_values():
    # the docstring's justification of k = 2: w = 1 + alpha tanh(delta / s);
    # tanh(0.5) = 0.4621172 -> 1.2310586; tanh(1) = 0.7615942 -> 1.3807971; tanh(2) = 0.9640276 -> 1.4820138
    assert DEFAULT_RAS_K == 2.0
    w = ras_weights_sigmoid(t([0.5, 1.0, 2.0]), scale=1.0)
    close(w, [1.2310586, 1.3807971, 1.4820138])


def test_ras_sigmoid_scale_free_end_to_end_and_invariant_to_reward_units():
    # rewards [[1, 3], [5, 7]], priors [1, 7]: delta = [2 - 1, 6 - 7] = [1, -1]; batch std sqrt(5);
    # k delta / s = 2 / 2.236068 = 0.8944272; sigmoid = 0.7098029;
    # w = 1 + 0.5 (2 * 0.7098029 - 1) = 1.2098029, and 2 - 1.2098029 = 0.7901971 for delta = -1
    rewards, priors = t([[1.0, 3.0], [5.0, 7.0]]), t([1.0, 7.0])
    w = ras_weights_sigmoid(prior_delta(rewards, priors), scale=batch_reward_scale(rewards))
    close(w, [1.2098029, 0.7901971])
    # multiplying rewards and priors by 100 (PickScore-like units) leaves the scale-free weights unchanged
    w100 = ras_weights_sigmoid(
        prior_delta(rewards * 100, priors * 100), scale=batch_reward_scale(rewards * 100)
    )
    close(w100, [1.2098029, 0.7901971], atol=1e-5, rtol=1e-5)


def test_ras_sigmoid_limits_for_prior_far_below_or_above():
    # prior far below every reward -> delta large positive -> w -> 1 + alpha; far above -> 1 - alpha
    rewards = t([[0.2, 0.3, 0.25], [0.2, 0.3, 0.25]])
    w = ras_weights_sigmoid(prior_delta(rewards, t([-1000.0, 1000.0])), alpha=0.5, k=2.0)
    close(w, [1.5, 0.5])
    assert torch.isfinite(w).all()


def test_ras_sigmoid_nan_delta_is_neutral_and_alpha_zero_is_identity():
    close(ras_weights_sigmoid(t([NAN, 1.0])), [1.0, 1.3807971])
    close(ras_weights_sigmoid(t([3.0, -3.0]), alpha=0.0), [1.0, 1.0])


def test_ras_sigmoid_is_monotonic_and_bounded():
    delta = torch.linspace(-5, 5, 101)
    w = ras_weights_sigmoid(delta, alpha=0.5)
    assert (w[1:] >= w[:-1]).all() and (w[1:50] > w[:49]).all()
    assert (w > 0.5).all() and (w < 1.5).all()


@pytest.mark.parametrize("kwargs", [{"alpha": 1.5}, {"alpha": -0.1}, {"k": 0.0}, {"scale": 0.0}])
def test_ras_sigmoid_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ras_weights_sigmoid(t([0.0]), **kwargs)


# ---------------------------------------------------------------------------------- ras_weights_posterior


def test_ras_posterior_g2_by_hand():
    # each group is [1, 3] (G = 2): n = 2, mean 2, unbiased var ((1-2)^2 + (3-2)^2) / 1 = 2, s^2 = 2 + 1e-8;
    # v_post = 1 / (2 / 2 + 1 / 1) = 0.5.
    # prior 0: mu_post = 0.5 (2 * 2 / 2 + 0) = 1, z = (0 - 1) / sqrt(0.5) = -1.4142136,
    #          p = 1 - Phi(-1.4142136) = 0.9213504, w_b = 1.4213504, w = 1 + 1 * (w_b - 1) = 1.4213504
    # prior 2: mu_post = 0.5 (2 + 2) = 2, z = 0, p = 0.5, w = 1
    # prior 4: mu_post = 0.5 (2 + 4) = 3, z = (4 - 3) / sqrt(0.5) = 1.4142136, p = 0.0786496, w = 0.5786496
    rewards = t([[1.0, 3.0], [1.0, 3.0], [1.0, 3.0]])
    w = ras_weights_posterior(rewards, t([0.0, 2.0, 4.0]), alpha=1.0, prior_var=1.0)
    close(w, [1.4213504, 1.0, 0.5786496])
    assert w.shape == (3,) and w.dtype == torch.float32


def test_ras_posterior_g4_alpha_half_by_hand():
    # [0, 2, 4, 6]: n = 4, mean 3, unbiased var (9 + 1 + 1 + 9) / 3 = 20/3; n / s^2 = 4 / (20/3) = 0.6;
    # v_post = 1 / (0.6 + 1) = 0.625; mu_post = 0.625 (0.6 * 3 + 1 / 1) = 0.625 * 2.8 = 1.75 (prior 1);
    # z = (1 - 1.75) / sqrt(0.625) = -0.75 / 0.7905694 = -0.9486833; p = Phi(0.9486833) = 0.8286091;
    # alpha 0.5: w = 1 + 0.5 (0.5 + 0.8286091 - 1) = 1.1643046
    w = ras_weights_posterior(t([[0.0, 2.0, 4.0, 6.0]]), t([1.0]), alpha=0.5)
    close(w, [1.1643046])


def test_ras_posterior_prior_var_enters():
    # same group as above with v_0 = 0.25: v_post = 1 / (0.6 + 4) = 0.2173913;
    # mu_post = 0.2173913 (1.8 + 1 / 0.25) = 0.2173913 * 5.8 = 1.2608696;
    # z = (1 - 1.2608696) / sqrt(0.2173913) = -0.2608696 / 0.4662524 = -0.5595029; Phi(0.5595029) = 0.7120907;
    # alpha 1: w = 0.5 + 0.7120907 = 1.2120907
    w = ras_weights_posterior(t([[0.0, 2.0, 4.0, 6.0]]), t([1.0]), alpha=1.0, prior_var=0.25)
    close(w, [1.2120907])


def test_ras_posterior_zero_variance_group_does_not_blow_up():
    # [2, 2, 2]: var 0 -> s^2 = 1e-8; n / s^2 = 3e8; v_post = 1 / (3e8 + 1) ~ 3.3e-9; mu_post ~ 2.
    # prior 1: z ~ (1 - 2) / 5.8e-5 ~ -17320 -> p = 1 -> w = 1.5;  prior 3: p = 0 -> w = 0.5;
    # prior 2 (equal to the mean): z = 0 -> p = 0.5 -> w = 1
    rewards = torch.full((3, 3), 2.0)
    w = ras_weights_posterior(rewards, t([1.0, 3.0, 2.0]))
    assert torch.isfinite(w).all()
    close(w, [1.5, 0.5, 1.0])
    # a difference far below the reward's scale is still resolved, because s is tiny:
    # prior 2 - 1e-6: z = -1e-6 / sqrt(1e-8 / 3) (shrink ~ 1) = -0.01732 -> p = Phi(0.01732) = 0.5069095
    w_small = ras_weights_posterior(
        torch.full((1, 3), 2.0, dtype=torch.float64), t([2.0 - 1e-6], torch.float64)
    )
    close(w_small, [1.0069095], atol=1e-6, rtol=1e-6)


def test_ras_posterior_prior_far_above_or_below():
    # prior far below -> p -> 1 -> w_b = 1.5 -> w = 1.5 (alpha 1); far above -> p -> 0 -> w = 0.5
    rewards = t([[0.2, 0.3, 0.25, 0.1], [0.2, 0.3, 0.25, 0.1]])
    w = ras_weights_posterior(rewards, t([-1000.0, 1000.0]))
    close(w, [1.5, 0.5])


def test_ras_posterior_clamp():
    # alpha 3, prior far above: 1 + 3 (0.5 - 1) = -0.5 -> clamped to 0.01;
    # alpha 20, prior far below: 1 + 20 (1.5 - 1) = 11 -> clamped to 10
    rewards = t([[0.2, 0.3]])
    close(ras_weights_posterior(rewards, t([1000.0]), alpha=3.0), [0.01])
    close(ras_weights_posterior(rewards, t([-1000.0]), alpha=20.0), [10.0])


def test_ras_posterior_nan_rewards_left_out():
    # [1, NaN, 3] with prior 0 must equal [1, 3] with prior 0: 1.4213504 (see the G = 2 test);
    # [5, NaN]: n = 1, var 1.0 (released) -> v_post = 1/2, mu_post = 2.5, p = Phi(2.5 / sqrt 0.5) = 0.9997965,
    #   w = 1.4997965;
    # [NaN, NaN, NaN]: n = 0 -> mu_post = prior, z = 0 -> p = 0.5 -> w = 1
    w_nan = ras_weights_posterior(t([[1.0, NAN, 3.0], [5.0, NAN, NAN], [NAN, NAN, NAN]]), t([0.0, 0.0, 0.0]))
    close(w_nan, [1.4213504, 1.4997965, 1.0])
    w_ref = ras_weights_posterior(t([[1.0, 3.0]]), t([0.0]))
    assert w_nan[0].item() == pytest.approx(w_ref[0].item(), abs=1e-7)


def test_ras_posterior_single_reward_is_not_certain():
    # released code: a group with one valid reward has variance 1.0, so 0.01 above the prior gives
    # v_post = 1/2, mu_post = 0.005, p = Phi(0.005 / sqrt 0.5) = 0.5028209 -> w = 1.0028209 (not 1.5)
    w = ras_weights_posterior(t([[0.01, NAN, NAN, NAN]]), t([0.0]))
    close(w, [1.0028209])


def test_ras_posterior_agrees_in_sign_with_delta():
    # a group above its prior gets w > 1, below gets w < 1, on random data
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(64, 8, generator=g)
    priors = torch.randn(64, generator=g)
    w = ras_weights_posterior(rewards, priors)
    delta = prior_delta(rewards, priors)
    assert torch.isfinite(w).all()
    assert ((w > 1) == (delta > 0)).all()


@pytest.mark.parametrize("kwargs", [{"alpha": -1.0}, {"prior_var": 0.0}])
def test_ras_posterior_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ras_weights_posterior(torch.zeros(2, 3), torch.zeros(2), **kwargs)


# ---------------------------------------------------------------------------------------------- CRT (paper)


def test_crt_paper_by_hand():
    # lambda 2, prior 1:
    # R = 0: [2 (0 - 1) + 0] * e^0 = -2;  R = 1: [0 + 0] * e = 0 (strict indicator);
    # R = 2: [2 (2 - 1) + 1] * e^2 = 3 * 7.389056 = 22.167168;  NaN stays NaN
    out = crt_transform_paper(t([[0.0, 1.0, 2.0, NAN]]), t([1.0]), lam=2.0)
    close(out, [[-2.0, 0.0, 22.167168, NAN]])


def test_crt_paper_broadcasts_one_prior_per_group():
    # group 0 prior 0, group 1 prior 1, lambda 1, R = 1 in both:
    # group 0: [1 * 1 + 1] * e = 2e = 5.436564; group 1: [0 + 0] * e = 0
    out = crt_transform_paper(t([[1.0, 1.0], [1.0, 1.0]]), t([0.0, 1.0]), lam=1.0)
    assert out.shape == (2, 2)
    close(out, [[5.436564, 5.436564], [0.0, 0.0]])


def test_crt_paper_sign_and_monotonic_above_prior():
    prior = 0.3
    r = torch.linspace(-2.0, 2.0, 401, dtype=torch.float64).unsqueeze(0)
    out = crt_transform_paper(r, t([prior], torch.float64), lam=5.0)
    below, above = r < prior, r > prior
    assert (out[below] < 0).all() and (out[above] > 0).all()
    up = out[above]
    assert (up[1:] > up[:-1]).all()
    # the jump at the prior is exp(prior) = exp(0.3) = 1.3498588
    assert out[above].min().item() > math.exp(prior) - 1e-9


# ------------------------------------------------------------------------------------------ CRT (reference)


def test_crt_reference_by_hand():
    # a 50, tau 5, prior 1:
    # R = 2:   [50 * 1 + 1] * sigmoid(0.4) * 2 = 51 * 0.5986877 * 2 = 61.066141
    # R = 0.5: [50 * (-0.5) + 0] * sigmoid(0.1) * 0.5 = -25 * 0.5249792 * 0.5 = -6.562240
    # R = 1:   [0 + 0] * ... = 0;  R = 0: ... * 0 = 0;  NaN stays NaN
    out = crt_transform_reference(t([[2.0, 0.5, 1.0, 0.0, NAN]]), t([1.0]))
    close(out, [[61.066141, -6.562240, 0.0, 0.0, NAN]], atol=1e-4, rtol=1e-6)


def test_crt_reference_exponent_clamp():
    # R = -1000, tau 5: R / tau = -200 is clamped to -30: sigmoid(-30) = e^-30 / (1 + e^-30) = 9.357623e-14;
    # [50 (-1000 - 1) + 0] * 9.357623e-14 * (-1000) = 50050 * 1000 * 9.357623e-14 = 4.683490e-6
    # (without the clamp sigmoid(-200) ~ 1.4e-87 and the result would be ~ 7e-80)
    # R = 1000: R / tau = 200 -> 30: sigmoid(30) = 1 - 9.4e-14; [50 * 999 + 1] * 1 * 1000 = 49951000
    out = crt_transform_reference(t([[-1000.0, 1000.0]], torch.float64), t([1.0], torch.float64))
    torch.testing.assert_close(out, t([[4.683490e-6, 49951000.0]], torch.float64), rtol=1e-6, atol=0.0)


def test_crt_reference_sign_behaviour():
    # positive rewards: the sign of R - prior; negative rewards: the sign is flipped by the trailing R.
    # R = -1, prior -2 (above the prior): [50 + 1] * sigmoid(-0.2) * (-1) = -51 * 0.4501660 = -22.958466
    out = crt_transform_reference(t([[-1.0]]), t([-2.0]))
    close(out, [[-22.958466]], atol=1e-4, rtol=1e-6)
    prior = 0.4
    r = torch.linspace(0.01, 2.0, 200, dtype=torch.float64).unsqueeze(0)
    out = crt_transform_reference(r, t([prior], torch.float64))
    assert (out[r < prior] < 0).all() and (out[r > prior] > 0).all()
    up = out[r > prior]
    assert (up[1:] > up[:-1]).all()


def test_crt_reference_custom_a_tau():
    # a 1, tau 1, prior 0, R = 2: [1 * 2 + 1] * sigmoid(2) * 2 = 3 * 0.8807971 * 2 = 5.2847825
    close(crt_transform_reference(t([[2.0]]), t([0.0]), a=1.0, tau=1.0), [[5.2847825]])


# ----------------------------------------------------------------------------------------------------- EMA


def test_ema_batch_update_by_hand():
    # decay 0.9:
    # unseen (NaN) prior, mean 0.5 -> first visit takes the mean: 0.5
    # prior 1, mean 3 -> 0.9 * 1 + 0.1 * 3 = 1.2
    # prior 2, mean NaN (all rewards missing) -> unchanged 2
    # unseen prior, mean NaN -> still unseen (NaN)
    priors = t([NAN, 1.0, 2.0, NAN])
    means = t([0.5, 3.0, NAN, NAN])
    new = update_ema_prior(priors, means, decay=0.9)
    close(new, [0.5, 1.2, 2.0, NAN])
    # inputs untouched
    close(priors, [NAN, 1.0, 2.0, NAN])
    close(means, [0.5, 3.0, NAN, NAN])


def test_ema_sequence_of_visits():
    # means 1, 2, 3 with decay 0.9: 1 (first visit) -> 0.9 * 1 + 0.1 * 2 = 1.1 -> 0.9 * 1.1 + 0.1 * 3 = 1.29
    p = t([NAN])
    seen = []
    for m in (1.0, 2.0, 3.0):
        p = update_ema_prior(p, t([m]), decay=0.9)
        seen.append(p.item())
    assert seen == pytest.approx([1.0, 1.1, 1.29], abs=1e-6)


def test_ema_decay_limits():
    priors, means = t([1.0, NAN]), t([4.0, 4.0])
    close(update_ema_prior(priors, means, decay=0.0), [4.0, 4.0])  # no memory: the new mean
    close(update_ema_prior(priors, means, decay=1.0), [1.0, 4.0])  # frozen after the first visit


def test_ema_rejects_bad_arguments():
    with pytest.raises(ValueError, match="decay"):
        update_ema_prior(t([1.0]), t([1.0]), decay=1.5)
    with pytest.raises(ValueError, match="same shape"):
        update_ema_prior(t([1.0, 2.0]), t([1.0]), decay=0.5)


# -------------------------------------------------------------------------------------- shapes and finiteness


@pytest.mark.parametrize("n,g", [(1, 2), (3, 2), (5, 8), (4, 12)])
def test_shapes_and_finite_outputs(n, g):
    gen = torch.Generator().manual_seed(n * 100 + g)
    rewards = torch.rand(n, g, generator=gen)
    rewards[0, 0] = NAN  # a missing reward anywhere must not spread to the other outputs
    priors = torch.rand(n, generator=gen)
    delta = prior_delta(rewards, priors)
    assert delta.shape == (n,) and torch.isfinite(delta).all()
    w_sig = ras_weights_sigmoid(delta, scale=batch_reward_scale(rewards))
    w_post = ras_weights_posterior(rewards, priors)
    assert w_sig.shape == (n,) and torch.isfinite(w_sig).all()
    assert w_post.shape == (n,) and torch.isfinite(w_post).all()
    for out in (crt_transform_paper(rewards, priors, lam=1.0), crt_transform_reference(rewards, priors)):
        assert out.shape == (n, g)
        assert torch.isnan(out[0, 0]) and torch.isfinite(out.flatten()[1:]).all()
    new = update_ema_prior(torch.full((n,), NAN), torch.nanmean(rewards, dim=-1), decay=0.9)
    assert new.shape == (n,) and torch.isfinite(new).all()


def test_scalar_prior_broadcasts_to_every_group():
    rewards = t([[1.0, 3.0], [5.0, 7.0]])
    close(prior_delta(rewards, torch.tensor(2.0)), [0.0, 4.0])
    close(
        crt_transform_paper(rewards, 2.0, lam=1.0),
        crt_transform_paper(rewards, t([2.0, 2.0]), lam=1.0).tolist(),
    )


# -- the released pairing: the posterior RAS reads the transformed rewards (issue 13, item 4) ----------------------
def _groups_near(mean: float, spread: float, num_groups: int = 256, group_size: int = 8):
    """Rewards ``(N, G)`` and priors ``(N,)`` of one reward model's scale: each group's level and each prior
    scatter by ``spread`` around ``mean``, and so do the rewards inside a group."""
    generator = torch.Generator().manual_seed(0)
    levels = mean + spread * torch.randn(num_groups, 1, generator=generator)
    priors = mean + spread * torch.randn(num_groups, generator=generator)
    rewards = levels + spread * torch.randn(num_groups, group_size, generator=generator)
    return rewards, priors


def test_released_posterior_ras_on_transformed_rewards_misjudges_hpsv2_groups():
    """HPSv2's scale (0.25 ± 0.02), released settings (α 1, v_0 1, a 50, τ 5): read on the raw rewards, every
    group above its prior gets w > 1; read on R̃ (as the released code does), R̃ ≈ 0.13 (50 Δ + 1) sits
    below the raw prior for about half of them (measured: 47 %), which get w < 1, mostly the floor 0.5."""
    rewards, priors = _groups_near(0.25, 0.02)
    above = rewards.mean(dim=1) > priors
    raw = ras_weights_posterior(rewards, priors, alpha=1.0, prior_var=1.0)
    released = ras_weights_posterior(crt_transform_reference(rewards, priors, 50.0, 5.0), priors, 1.0, 1.0)
    assert (raw[above] > 1).all() and (raw[~above] < 1).all()
    misjudged = (released[above] < 1).float().mean().item()
    assert 0.3 < misjudged < 0.7, misjudged
    assert (released[~above] < 1).all()
    assert released[above].mean() < raw[above].mean() - 0.2


def test_released_posterior_ras_on_transformed_rewards_is_flat_at_pickscore_scale():
    """PickScore's scale (22 ± 1): R̃ spreads over about ±1000, so the posterior barely moves from the prior
    and every weight stays near 1 (measured: mean |w − 1| 0.005 vs 0.41 on the raw rewards): RAS is off."""
    rewards, priors = _groups_near(22.0, 1.0)
    raw = ras_weights_posterior(rewards, priors, alpha=1.0, prior_var=1.0)
    released = ras_weights_posterior(crt_transform_reference(rewards, priors, 50.0, 5.0), priors, 1.0, 1.0)
    assert (raw - 1).abs().mean() > 0.3
    assert (released - 1).abs().mean() < 0.02
    assert (released - 1).abs().max() < 0.15


# ---------------------------------------------------------------------------------------- uncertainty-aware RAS
def test_ras_uncertainty_by_hand():
    """u = 1 + α (1 − 2ρ): ρ = (0, 0.5, 1) at α = 0.5 → (1.5, 1, 0.5), mean 1 already."""
    close(ras_weights_uncertainty(t([0.0, 0.5, 1.0]), 0.5), [1.5, 1.0, 0.5])
    # renormalized to mean 1: (1.5, 1.5, 1.0, 0.5) / 1.125
    close(ras_weights_uncertainty(t([0.0, 0.0, 0.5, 1.0]), 0.5), [4 / 3, 4 / 3, 8 / 9, 4 / 9])
    # with z = (0, 2): 2Φ(0) = 1, 2Φ(2) = 1.9544997; u = (1.5, 1.9544997) / their mean
    u = t([1.5, 1.9544997])
    close(ras_weights_uncertainty(t([0.0, 0.5]), 0.5, t([0.0, 2.0])), (u / u.mean()).tolist())
    close(ras_weights_uncertainty(t([1.0, 1.0]), 1.0), [1.0, 1.0])  # all u = 0: every group keeps 1
    with pytest.raises(ValueError, match="alpha must be in"):
        ras_weights_uncertainty(t([0.0]), 1.5)


def test_anchor_consistency_by_hand():
    """z = (R̄ − m) / sqrt(s²/G + v/K): group (1, 3): R̄ = 2, s² = 2, G = 2; m = 1, v = 4, K = 4 → 1 / sqrt(2)."""
    rewards = t([[1.0, 3.0], [0.0, 0.0], [NAN, NAN]])
    z = anchor_consistency(rewards, t([1.0, 0.0, 0.0]), t([4.0, 0.0, 1.0]), num_rollouts=4)
    close(z, [1 / math.sqrt(2), 0.0, 0.0])  # no spread anywhere, or no reward: 0
    with pytest.raises(ValueError, match="num_rollouts"):
        anchor_consistency(rewards, 0.0, 1.0, 0)


def ranks(values):
    """Average ranks (ties share the mean of their positions), for Spearman's correlation."""
    order = values.argsort()
    result = torch.empty_like(values)
    result[order] = torch.arange(len(values), dtype=values.dtype)
    for value in values.unique():
        tied = values == value
        result[tied] = result[tied].mean()
    return result


def spearman(a, b):
    ra, rb = ranks(a) - ranks(a).mean(), ranks(b) - ranks(b).mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def synthetic_groups(seed=0, groups=256, size=8, draws=4, rollouts=8):
    """Half the prompts with a reliable reward (each of ``draws`` interpretations = true quality + 0.1 noise),
    half with an ambiguous one (+ 2.0 noise per interpretation); the true quality of both halves rises by 0.3
    from the base model's (which gives the anchor from ``rollouts`` samples). Returns the training groups'
    rewards and interpretation variances, the anchors, and each group's true reliability (the correlation of its
    rewards with the true quality)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.cat([torch.full((groups // 2,), 0.1), torch.full((groups // 2,), 2.0)]).double()
    level = torch.randn(groups, generator=generator, dtype=torch.float64)

    def sample(shift, count):
        quality = (
            level[:, None] + shift + torch.randn(groups, count, generator=generator, dtype=torch.float64)
        )
        draws_ = quality[..., None] + noise[:, None, None] * torch.randn(
            groups, count, draws, generator=generator, dtype=torch.float64
        )
        mean, variance = interpretation_mean_var(draws_.reshape(-1, draws))
        return quality, mean.reshape(groups, count), variance.reshape(groups, count)

    quality, rewards, variance = sample(0.3, size)
    _, base, _ = sample(0.0, rollouts)
    q, r = quality - quality.mean(1, keepdim=True), rewards - rewards.mean(1, keepdim=True)
    reliability = (q * r).sum(1) / (q.norm(dim=1) * r.norm(dim=1))
    return rewards, variance, base.mean(1), base.var(1), reliability


def test_uncertainty_ras_tracks_reliability_on_synthetic_groups():
    """Issue 24's acceptance test: without the consistency factor the weights' Spearman correlation with the
    groups' true reliability is ≥ 0.75 (0.856 here); with and without it, the ambiguous half's mean weight is at
    most 0.8× the reliable half's (0.63 and 0.52 here). The published forms on the same groups stay near
    +0.1 (the issue's review), which is what this mode fixes."""
    rewards, variance, anchor, anchor_var, reliability = synthetic_groups()
    share = ambiguity_share(rewards, variance)
    plain = ras_weights_uncertainty(share, 0.5)
    consistent = ras_weights_uncertainty(share, 0.5, anchor_consistency(rewards, anchor, anchor_var, 8))
    assert spearman(plain, reliability) >= 0.75
    half = len(rewards) // 2
    for weights in (plain, consistent):
        assert weights[half:].mean() <= 0.8 * weights[:half].mean()
        assert weights.mean().item() == pytest.approx(1.0, abs=1e-12)
    sigmoid = ras_weights_sigmoid(
        prior_delta(rewards, anchor), 0.5, DEFAULT_RAS_K, batch_reward_scale(rewards)
    )
    assert spearman(sigmoid, reliability) < 0.5


# The published forms' outputs on fixed inputs, recorded from the code before the uncertainty mode was added
# (float64): they must not move by more than 1e-12.
FIXED_REWARDS = [[0.1, 0.4, 0.35, 0.9], [1.2, 1.1, 1.3, 1.25], [-0.5, 0.2, 0.0, 0.1]]
FIXED_PRIORS = [0.3, 1.0, 0.2]
PUBLISHED = {
    "sigmoid_batch_std": [1.1184319857297151, 1.1783713142201266, 0.793593114630917],
    "sigmoid_literal": [1.068319983478248, 1.1046790847140093, 0.8775406687981454],
    "posterior": [1.2908487421083952, 1.4999996696218816, 0.5560209475188769],
    "crt_paper": [
        [-11.051709180756477, 8.950948185847624, 4.9667364200763995, 76.24769644586546],
        [36.521286150102014, 18.024996143678614, 58.70874668190791, 47.119629925734856],
        [-21.22857308994217, 0.0, -10.0, -5.525854590378239],
    ],
    "crt_reference": [
        [-0.5049998333399998, 1.247974416373397, 0.6339287506413274, 15.202121097222888],
        [7.388220170326945, 3.661542951707621, 11.744434869503008, 9.486728452447842],
        [8.31286421911855, 0.0, -0.0, -0.2524999166699999],
    ],
}


def test_published_forms_are_unchanged_to_1e12():
    r, p = t(FIXED_REWARDS, torch.float64), t(FIXED_PRIORS, torch.float64)
    delta = prior_delta(r, p)
    outputs = {
        "sigmoid_batch_std": ras_weights_sigmoid(delta, 0.5, 2.0, batch_reward_scale(r)),
        "sigmoid_literal": ras_weights_sigmoid(delta, 0.5, 2.0),
        "posterior": ras_weights_posterior(r, p, 1.0, 1.0),
        "crt_paper": crt_transform_paper(r, p, 50.0),
        "crt_reference": crt_transform_reference(r, p),
    }
    for name, output in outputs.items():
        torch.testing.assert_close(output, t(PUBLISHED[name], torch.float64), atol=1e-12, rtol=0, msg=name)
