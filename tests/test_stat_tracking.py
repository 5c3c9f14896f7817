"""Per-prompt statistics tracking (``per_prompt_stat_tracking``, Flow-GRPO): hand-worked advantages, the buffer's
eviction, its checkpoint (no pickle) and the exact resume of a run that uses it, and its configuration errors."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import logged, lora_weights, make_config, make_trainer

from trl_visual.core.advantages import group_advantages
from trl_visual.core.stat_tracking import PerPromptStatTracker
from trl_visual.state_files import load_state_file, save_state_file

EPS = 1e-4


def test_a_prompt_seen_twice_is_normalized_over_both_groups():
    """Round 1: "a" gets [1, 3] (mean 2, unbiased std √2), "b" gets [0, 0] (std 0 → advantage 0). Round 2: "a"
    gets [5, 7]; its buffer is [1, 3, 5, 7]: mean 4, std √(20/3), so 5 → 1/√(20/3) and 7 → 3/√(20/3)."""
    tracker = PerPromptStatTracker(buffer_size=8)
    first = tracker.advantages(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 0.0, 0.0]))
    root2 = math.sqrt(2)
    torch.testing.assert_close(first, torch.tensor([-1 / (root2 + EPS), 1 / (root2 + EPS), 0.0, 0.0]))
    second = tracker.advantages(["a", "a"], torch.tensor([5.0, 7.0]))
    std = math.sqrt(20 / 3)
    torch.testing.assert_close(second, torch.tensor([1 / (std + EPS), 3 / (std + EPS)]))
    # the group alone would give ±1/√2 ≈ ±0.707: the history is what moved them
    assert tracker.buffers == {"a": [1.0, 3.0, 5.0, 7.0], "b": [0.0, 0.0]}


def test_the_buffer_keeps_the_newest_rewards():
    """``buffer_size=3``: after [1, 3] then [5, 7], "a" holds [3, 5, 7] (mean 5, std 2): 5 → 0, 7 → 1."""
    tracker = PerPromptStatTracker(buffer_size=3)
    tracker.advantages(["a", "a"], torch.tensor([1.0, 3.0]))
    second = tracker.advantages(["a", "a"], torch.tensor([5.0, 7.0]))
    assert tracker.buffers["a"] == [3.0, 5.0, 7.0]
    torch.testing.assert_close(second, torch.tensor([0.0, 2 / (2 + EPS)]))


def test_a_buffer_of_one_group_gives_grpo_advantages_and_scales_follow_scale_rewards():
    rewards = torch.tensor([0.2, 0.9, 0.4, 0.1, 0.7, 0.7, 0.3, 0.8])
    prompts = ["p", "p", "p", "p", "q", "q", "q", "q"]
    for scale in ("group", "batch", "none"):
        tracker = PerPromptStatTracker(buffer_size=4)
        tracker.advantages(prompts, torch.rand(8))  # evicted entirely by the next batch
        got = tracker.advantages(prompts, rewards, scale)
        torch.testing.assert_close(got, group_advantages(rewards, 4, scale))
    # "none": the centred reward itself; clamped at ±clip
    tracker = PerPromptStatTracker(buffer_size=4)
    got = tracker.advantages(["p", "p"], torch.tensor([0.0, 100.0]), "none", clip=5.0)
    assert got.tolist() == [-5.0, 5.0]


def test_missing_rewards_are_not_recorded_and_get_zero_advantage():
    tracker = PerPromptStatTracker(buffer_size=4)
    got = tracker.advantages(["a", "a", "a"], torch.tensor([1.0, float("nan"), float("inf")]))
    assert tracker.buffers == {"a": [1.0]}
    assert got.tolist() == [0.0, 0.0, 0.0]  # one recorded reward: its own mean, std 0
    with pytest.raises(ValueError, match="2 prompts for 3 rewards"):
        tracker.advantages(["a", "a"], torch.zeros(3))


def test_the_record_round_trips_through_a_state_file_exactly(tmp_path):
    tracker = PerPromptStatTracker(buffer_size=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        tracker.advantages(["a", "b", "a", "c"], torch.rand(4, generator=generator))
    path = str(tmp_path / "state.safetensors")
    save_state_file({"per_prompt_stats": tracker.state_dict()}, path)
    restored = PerPromptStatTracker(buffer_size=3)
    restored.load_state_dict(load_state_file(path)["per_prompt_stats"])
    assert restored.buffers == tracker.buffers and list(restored.buffers) == ["a", "b", "c"]
    batch = torch.rand(4, generator=generator)
    assert torch.equal(
        restored.advantages(["a", "b", "a", "c"], batch), tracker.advantages(["a", "b", "a", "c"], batch)
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(per_prompt_stat_tracking_buffer_size=3),
            r"`per_prompt_stat_tracking_buffer_size` must be at least",
        ),
        (dict(multi_objective_aggregation="normalize_then_sum"), "needs multi_objective_aggregation="),
        (dict(trajectory_branching="all"), "`trajectory_branching` both set the advantages' baseline"),
    ],
)
def test_stat_tracking_config_errors_are_one_line(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        make_config(tmp_path, per_prompt_stat_tracking=True, **overrides)
    assert "\n" not in str(error.value)


def test_a_run_with_stat_tracking_resumes_exactly(tmp_path):
    """Three steps with a checkpoint after each: the record is saved in ``trl_visual_state.safetensors`` (no
    pickle), and the run resumed from step 2 ends with the same weights, rewards and record as the straight one.
    The same prompts recur (4 prompts, one group each per step), so the record spans steps."""
    from test_exact_resume import settings  # a checkpoint after every step

    config = {
        **settings(num_iterations=1, accumulation=1, steps=3),
        **dict(per_prompt_stat_tracking=True, per_prompt_stat_tracking_buffer_size=8, seed=5),
        **dict(per_device_train_batch_size=8, num_generations=4),
    }
    straight = make_trainer(tmp_path / "straight", **config)
    straight.train()
    record = straight.stat_tracker.buffers
    assert max(len(b) for b in record.values()) == 8  # a prompt drawn in two steps: both groups kept
    checkpoint = tmp_path / "straight" / "out" / "checkpoint-2"
    saved = load_state_file(str(checkpoint / "trl_visual_state.safetensors"))["per_prompt_stats"]
    assert saved["rewards"].shape[1] == 8 and len(saved["prompts"]) == len(saved["rewards"])
    resumed = make_trainer(tmp_path / "resumed", **config)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = lora_weights(straight), lora_weights(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert logged(resumed, "reward") == logged(straight, "reward")
    assert resumed.stat_tracker.buffers == record


def test_two_processes_keep_one_record_of_every_rank_s_rewards(tmp_path):
    """A group of 8 split 4 + 4 over two ranks, the same prompt twice: both ranks hold the same 16 rewards, and the
    second step's advantages, rank 0's then rank 1's, are its 8 rewards against the mean and std of all 16."""
    from test_distributed import SCRIPT, run_two_processes

    run_two_processes(str(Path(SCRIPT).with_name("two_process_stat_tracking.py")), tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["buffers"] == ranks[1]["buffers"] and len(ranks[0]["buffers"]["a cat"]) == 16
    history = torch.tensor(ranks[0]["buffers"]["a cat"])
    expected = ((history[8:] - history.mean()) / (history.std() + EPS)).clamp(-5, 5)
    got = torch.tensor(ranks[0]["local_advantages"] + ranks[1]["local_advantages"])
    torch.testing.assert_close(got, expected)
