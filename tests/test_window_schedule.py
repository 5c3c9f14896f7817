"""``sde_window_schedule='progressive'`` (MixGRPO's sliding window): hand-worked schedules, the ODE prefix shared by
each group wherever the window sits, the default unchanged, configuration errors, and exact resume."""

import pytest
import torch
from helpers import lora_weights, make_config, make_trainer

from trl_visual.core.timesteps import progressive_window_start
from trl_visual.trainer.rollout import _stochastic_steps


def test_progressive_schedule_by_hand():
    """Window 2 of 8 steps, starts allowed in [0, 6) → 0…5. Shift 2 every 3 steps: steps 0–2 start at 0, 3–5 at 2,
    6–8 at 4, then 6 mod 6 = 0: back to the high-noise end (wrap)."""
    starts = [progressive_window_start(2, (0, 6), 8, "flow_grpo", t, shift=2, interval=3) for t in range(12)]
    assert starts == [0, 0, 0, 2, 2, 2, 4, 4, 4, 0, 0, 0]
    # shift 1 every step over [2, 5): 2, 3, 4, 2, 3
    assert [progressive_window_start(1, (2, 5), 8, "flow_grpo", t) for t in range(5)] == [2, 3, 4, 2, 3]
    # the range is clipped so the window fits: cps's last step is never stochastic, so window 2 of 6 starts ≤ 3
    assert [progressive_window_start(2, (0, 99), 6, "cps", t) for t in range(5)] == [0, 1, 2, 3, 0]


def test_the_progressive_window_reads_the_step_and_the_random_one_the_seed(tmp_path):
    progressive = make_config(
        tmp_path, num_inference_steps=8, sde_window_size=2, sde_window_range=[0, 6],
        sde_window_schedule="progressive", sde_window_shift=2, sde_window_interval=3,
    )  # fmt: skip
    assert [_stochastic_steps(progressive, seed, True, step=4) for seed in range(3)] == [[2, 3]] * 3
    assert _stochastic_steps(progressive, 0, True, step=6) == [4, 5]
    assert _stochastic_steps(progressive, 0, False, step=6) == []  # evaluation: deterministic
    default = make_config(tmp_path, num_inference_steps=8, sde_window_size=2, sde_window_range=[0, 6])
    assert default.sde_window_schedule == "random"
    by_seed = {tuple(_stochastic_steps(default, seed, True, step=0)) for seed in range(20)}
    assert len(by_seed) > 2  # today's behaviour: the start drawn from the round's seed


def test_each_group_shares_its_ode_prefix_wherever_the_window_is(tmp_path):
    """Two groups of 4, the window at step 1 then step 3 (shift 2 each step): the states entering the window are
    equal within a group and differ between groups; the stored σ are those of the window's steps."""
    trainer = make_trainer(
        tmp_path, sde_window_size=1, sde_window_range=[1, 4], sde_window_schedule="progressive",
        sde_window_shift=2, sde_window_interval=1,
    )  # fmt: skip
    sigmas = trainer.sampling_sigmas()
    prompts, group_ids = ["a cat"] * 4 + ["a dog"] * 4, torch.arange(8) // 4
    for step, start in ((0, 1), (1, 3)):
        trainer.state.global_step = step
        rollouts = trainer.sample(prompts, group_ids, seed=7)
        torch.testing.assert_close(rollouts.sigmas, sigmas[start : start + 1].to(rollouts.sigmas))
        entering = rollouts.latents[:, 0]
        for group in (slice(0, 4), slice(4, 8)):
            assert all(torch.equal(entering[group][0], row) for row in entering[group])
        assert not torch.equal(entering[0], entering[4])
        assert not torch.equal(rollouts.next_latents[0, 0], rollouts.next_latents[1, 0])  # the SDE branches


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(sde_window_schedule="sliding"),
            r"`sde_window_schedule` must be one of 'random', 'progressive'",
        ),
        (dict(sde_window_schedule="progressive"), r"sde_window_size` is 0"),
        (dict(sde_window_size=1, sde_window_shift=0), r"`sde_window_shift` must be an integer ≥ 1"),
        (dict(sde_window_size=1, sde_window_interval=0), r"`sde_window_interval` must be an integer ≥ 1"),
    ],
)
def test_window_schedule_config_errors_are_one_line(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        make_config(tmp_path, **overrides)
    assert "\n" not in str(error.value)


def test_a_progressive_window_run_resumes_exactly(tmp_path):
    """The window moves every step (starts 0, 1, 2); the run resumed from checkpoint-1 ends with the straight run's
    weights: the schedule is read off the restored global step, not off anything the checkpoint lacks."""
    config = dict(
        sde_window_size=1, sde_window_range=[0, 3], sde_window_schedule="progressive", sde_window_interval=1,
        max_steps=3, save_strategy="steps", save_steps=1, learning_rate=3e-2, seed=2,
    )  # fmt: skip
    straight = make_trainer(tmp_path / "straight", **config)
    straight.train()
    resumed = make_trainer(tmp_path / "resumed", **config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "out" / "checkpoint-1"))
    expected, got = lora_weights(straight), lora_weights(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
