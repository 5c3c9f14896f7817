"""The rollout engine on its own: sampling and choosing the trained steps over an adapter and a denoiser,
with no ``Trainer`` built."""

from __future__ import annotations

import pytest
import torch
from helpers import PROMPTS, make_config

from trl_visual.models import get_adapter
from trl_visual.models.loading import load_pipeline
from trl_visual.trainer.rollout import (
    BatchPlacement,
    PromptEncoder,
    SamplingContext,
    sample_rollouts,
    select_train_steps,
    trainable_steps,
)


@pytest.fixture(scope="module")
def adapter():
    return get_adapter(load_pipeline("tiny:sd3"))


def sampling_context(adapter, config, batch_size: int) -> SamplingContext:
    latent_shape = adapter.latent_shape(config.height, config.width)
    return SamplingContext(
        args=config,
        encoder=PromptEncoder(adapter, config.max_sequence_length, config.negative_prompt),
        placement=BatchPlacement(process_index=0, num_processes=1, per_device_batch_size=batch_size),
        sigmas=adapter.sigmas(config.num_inference_steps, latent_shape),
        latent_shape=latent_shape,
        device=torch.device("cpu"),
    )


def rollouts_of(adapter, config, seed: int):
    prompts = [p for p in PROMPTS[:2] for _ in range(config.num_generations)]
    group_ids = torch.arange(len(prompts)) // config.num_generations
    context = sampling_context(adapter, config, len(prompts))
    return sample_rollouts(adapter, adapter.denoiser, prompts, group_ids, seed, context)


def test_sample_rollouts_needs_no_trainer_and_is_seeded(adapter, tmp_path):
    config = make_config(tmp_path, num_generations=2, sde_window_size=0)
    first, again, other = (rollouts_of(adapter, config, seed) for seed in (3, 3, 4))

    assert first.samples.shape == (4, 3, 32, 32)
    # no SDE window: every one of the 4 sampling steps is stochastic and keeps its log-prob
    assert first.log_probs.shape[:2] == (4, 4) and torch.isfinite(first.log_probs).all()
    assert torch.equal(first.samples, again.samples) and torch.equal(first.log_probs, again.log_probs)
    assert not torch.allclose(first.samples, other.samples)


def test_trainable_steps_leave_out_the_step_landing_on_zero_only_when_asked(adapter):
    sigmas, sigmas_next = torch.tensor([0.75, 0.5, 0.25]), torch.tensor([0.5, 0.25, 0.0])

    assert trainable_steps(adapter, sigmas, sigmas_next, exclude_last_step=False).tolist() == [True] * 3
    assert trainable_steps(adapter, sigmas, sigmas_next, exclude_last_step=True).tolist() == [
        True,
        True,
        False,
    ]


def test_select_train_steps_picks_a_fraction_of_the_trainable_steps_from_the_round_seed(adapter, tmp_path):
    config = make_config(
        tmp_path, num_generations=2, sde_window_size=0, timestep_fraction=0.5, exclude_last_step=True
    )
    rollouts = rollouts_of(adapter, config, seed=0)

    steps = select_train_steps(adapter, rollouts, config, round_seed=5)

    # 3 trainable steps of 4 (the last lands on σ = 0), half of them rounded: 2 per sample, never the last
    assert steps.shape == (4, 2)
    assert int(steps.max()) < 3 and all(len(set(row)) == 2 for row in steps.tolist())
    assert torch.equal(steps, select_train_steps(adapter, rollouts, config, round_seed=5))


def test_select_train_steps_names_the_settings_when_nothing_can_be_trained(adapter, tmp_path):
    config = make_config(tmp_path, num_generations=2, sde_window_size=0, exclude_last_step=True)
    rollouts = rollouts_of(adapter, config, seed=0)
    rollouts.sigmas_next = torch.zeros_like(rollouts.sigmas_next)  # every step lands on σ = 0

    with pytest.raises(RuntimeError, match="exclude_last_step"):
        select_train_steps(adapter, rollouts, config, round_seed=0)
