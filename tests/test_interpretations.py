"""Rewards with several interpretations per sample (issue 24 §1): the math, what a reward may return, the three
sources (judge draws, prompt variants, reward ensembles), and the flow through GRPO, BPGO and ViPO."""

from __future__ import annotations

import math

import helpers
import pytest
import torch
from datasets import Dataset
from helpers import PROMPTS, logged

from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer
from trl_visual.core.interpretations import ambiguity_share, ensemble_interpretations, interpretation_mean_var
from trl_visual.rewards.builtin import red_channel
from trl_visual.rewards.variants import prompt_variants
from trl_visual.trainer.bpgo_config import BPGOConfig
from trl_visual.trainer.bpgo_trainer import BPGOTrainer
from trl_visual.trainer.reward_calls import check_reward_interpretations, check_reward_output


# -- the math ------------------------------------------------------------------------------------------------------
def test_interpretation_mean_and_variance_of_the_mean_by_hand():
    values = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 6.0]])
    mean, var = interpretation_mean_var(values)
    assert mean.tolist() == [2.0, 2.0, 3.0]
    # S² = Σ (r − R)² / (M − 1): 2, 0, 18; divided by M = 2
    assert var.tolist() == [1.0, 0.0, 9.0]
    _, single = interpretation_mean_var(torch.tensor([[0.5], [0.2]]))
    assert torch.isnan(single).all()  # one value: no interpretations


def test_ambiguity_share_by_hand_and_clamped():
    rewards = torch.tensor([[0.0, 2.0], [0.0, 2.0], [1.0, 1.0], [1.0, 1.0]])
    interp = torch.tensor([[0.5, 0.5], [4.0, 6.0], [0.0, 0.0], [0.1, 0.3]])
    # s² = 2 for the first two groups: 0.5 / 2, min(5 / 2, 1); no spread: 0 without and 1 with interpretations
    assert ambiguity_share(rewards, interp).tolist() == [0.25, 1.0, 0.0, 1.0]
    none = torch.full_like(rewards, float("nan"))
    assert ambiguity_share(rewards, none).tolist() == [0.0] * 4  # a reward without interpretations: ρ = 0
    with_missing = torch.tensor([[0.0, 2.0, float("nan")]])
    assert ambiguity_share(with_missing, torch.tensor([[1.0, 1.0, 100.0]])).tolist() == [0.5]


def test_ensemble_standardizes_each_function_then_averages():
    rewards = torch.tensor([[1.0, 20.0], [3.0, 24.0], [2.0, 22.0], [2.0, 18.0]])
    reward, var = ensemble_interpretations(rewards)
    first = (rewards[:, 0] - 2.0) / math.sqrt(0.5)  # population std of [1, 3, 2, 2]
    second = (rewards[:, 1] - 21.0) / math.sqrt(5.0)
    torch.testing.assert_close(reward, (first + second) / 2)
    torch.testing.assert_close(var, (first - second) ** 2 / 2 / 2)  # S² of two values = (a − b)² / 2, / M
    scaled, _ = ensemble_interpretations(rewards * torch.tensor([100.0, 0.01]))
    torch.testing.assert_close(scaled, reward)  # the units of each function do not matter


# -- what a reward may return -------------------------------------------------------------------------------------
def test_plain_rewards_keep_one_column_and_interpretations_give_m():
    assert check_reward_interpretations([0.1, None, 0.3], "r", 3).shape == (3, 1)
    torch.testing.assert_close(
        check_reward_output([0.1, None], "r", 2), torch.tensor([0.1, math.nan]), equal_nan=True
    )
    lists = check_reward_interpretations([[0.0, 1.0], None, [2.0, 2.0]], "r", 3)
    assert lists.shape == (3, 2) and torch.isnan(lists[1]).all()
    assert check_reward_interpretations(torch.ones(4, 3), "r", 4).shape == (4, 3)
    skipped = torch.tensor([[1.0, 2.0], [float("nan")] * 2])
    assert torch.isnan(check_reward_interpretations(skipped, "r", 2)[1]).all()  # a NaN row skips its sample
    assert check_reward_interpretations(torch.ones(4, 1), "r", 4).shape == (4, 1)
    assert check_reward_output([[0.0, 1.0], [2.0, 4.0]], "r", 2).tolist() == [0.5, 3.0]


@pytest.mark.parametrize(
    "output, message",
    [
        (torch.ones(2, 3, 1), r"'r' returned a tensor of shape \(2, 3, 1\).*\(B, M\)"),
        (
            [[0.1, 0.2], [0.3, 0.4, 0.5]],
            r"'r' returned 2 interpretations for some samples and 3 for others.*same",
        ),
        ([[0.1, float("nan")], [0.3, 0.4]], r"NaN or ±inf among them.*None for the whole sample"),
        ([[0.1, None], [0.3, 0.4]], r"interpretations must be a non-empty list of floats"),
        (
            torch.tensor([[0.1, float("nan")], [0.3, 0.4]]),
            r"sample 0, with NaN or ±inf among them",
        ),
        ([0.1, [0.3, 0.4]], r"one float for sample 0 but a list for others"),
        ([[0.1, 0.2]], r"returned 1 values for 2 samples"),
    ],
    ids=[
        "3d tensor",
        "M varies",
        "NaN interpretation",
        "None interpretation",
        "NaN in tensor",
        "mixed",
        "length",
    ],
)
def test_bad_interpretations_are_named_with_the_fix(output, message):
    with pytest.raises((ValueError, TypeError), match=message):
        check_reward_interpretations(output, "r", 2)


# -- prompt variants ----------------------------------------------------------------------------------------------
def test_prompt_variants_rows_and_errors():
    assert prompt_variants(["a", "b"], {}) is None
    assert prompt_variants(["a", "b"], {"prompt_variants": [None, []]}) is None
    assert prompt_variants(["a", "b"], {"prompt_variants": [["x", "y"], None]}) == [["x", "y"], ["b", "b"]]
    with pytest.raises(ValueError, match="2 paraphrases in some rows and 3 in others"):
        prompt_variants(["a", "b"], {"prompt_variants": [["x", "y"], ["x", "y", "z"]]})
    with pytest.raises(ValueError, match="must be a list of paraphrases"):
        prompt_variants(["a"], {"prompt_variants": ["x"]})


# -- the flow through the trainers --------------------------------------------------------------------------------
def red_draws(prompts, images, **columns):
    """red_channel of each image, and a second interpretation that disagrees by ±0.5 on "a cat" only."""
    red = red_channel(prompts, images)
    return [[r, r + (0.5 if p == "a cat" else 0.0)] for p, r in zip(prompts, red)]


def red_mean(prompts, images, **columns):
    """The mean of :func:`red_draws`' interpretations, as a plain reward."""
    return [sum(pair) / 2 for pair in red_draws(prompts, images)]


def test_grpo_trains_on_the_mean_of_the_interpretations_exactly(tmp_path):
    """A reward returning interpretations trains GRPO exactly as the plain reward of their mean, and logs the
    interpretation figures (which the plain reward does not)."""
    runs = {}
    for name, reward in (("draws", red_draws), ("mean", red_mean)):
        torch.manual_seed(0)
        runs[name] = helpers.make_trainer(
            tmp_path / name, reward, max_steps=1, per_device_train_batch_size=16
        )
        runs[name].train()
    for key in ("loss", "reward", "reward_std"):
        assert logged(runs["draws"], key) == logged(runs["mean"], key)
    assert not logged(runs["mean"], "interpretation_var_mean")
    # "a cat"'s samples: S² = 0.125 (two values 0.5 apart), / M = 0.0625; the other 3 groups 0
    assert logged(runs["draws"], "interpretation_var_mean")[0] == pytest.approx(0.0625 / 4)
    assert logged(runs["draws"], "frac_ambiguous_groups") == [0.25]  # the cat's group is all disagreement


def test_uncertainty_ras_weighs_the_ambiguous_group_down_and_vipo_takes_interpretations(
    tmp_path, dinov2_path
):
    dataset = Dataset.from_dict({"prompt": PROMPTS, "prior": [0.0] * 4, "prior_var": [1.0] * 4})
    torch.manual_seed(0)
    trainer = helpers.make_trainer(
        tmp_path / "bpgo",
        red_draws,
        dataset,
        trainer_class=BPGOTrainer,
        max_steps=1,
        per_device_train_batch_size=16,
        prior_source="column",
        ras_mode="uncertainty",
        crt_mode="none",
    )
    rows = [{"prompt": p, "prior": 0.0, "prior_var": 1.0} for p in PROMPTS for _ in range(4)]
    rewards = torch.linspace(0.0, 0.3, 16)[:, None]
    trainer.interpretation_var = torch.tensor([[1.0]] * 4 + [[0.0]] * 12)  # the cat's group: all disagreement
    scored = trainer.compute_advantages(rewards, rows)
    weights = scored.weight.reshape(4, 4)[:, 0]
    # ρ = (1, 0, 0, 0): u = (0.5, 1.5, 1.5, 1.5) / mean 1.25
    torch.testing.assert_close(weights, torch.tensor([0.4, 1.2, 1.2, 1.2]))
    trainer.train()  # and a whole step, with interpretations from the reward itself
    assert logged(trainer, "frac_ambiguous_groups") == [0.25]
    from trl_visual.trainer.vipo_trainer import ViPOTrainer

    torch.manual_seed(0)
    vipo = helpers.make_trainer(
        tmp_path / "vipo",
        red_draws,
        trainer_class=ViPOTrainer,
        max_steps=1,
        per_device_train_batch_size=16,
        trainer_kwargs={"backbone": dinov2_path},
    )
    vipo.train()
    assert math.isfinite(logged(vipo, "loss")[0]) and logged(vipo, "frac_ambiguous_groups") == [0.25]


def test_uncertainty_without_interpretations_warns_once(tmp_path, caplog):
    dataset = Dataset.from_dict({"prompt": PROMPTS, "prior": [0.0] * 4})
    trainer = helpers.make_trainer(
        tmp_path,
        "red_channel",
        dataset,
        trainer_class=BPGOTrainer,
        max_steps=2,
        prior_source="column",
        ras_mode="uncertainty",
        crt_mode="none",
    )
    with caplog.at_level("WARNING"):
        trainer.train()
    assert sum("no reward returned interpretations" in r.message for r in caplog.records) == 1
    assert logged(trainer, "bpgo/ras_weight_min") == logged(trainer, "bpgo/ras_weight_max") == [1.0, 1.0]


def test_reward_ensemble_trains_on_standardized_functions(tmp_path):
    def scaled_red(prompts, images, **columns):
        return [100.0 * r for r in red_channel(prompts, images)]

    torch.manual_seed(0)
    trainer = helpers.make_trainer(tmp_path, ["red_channel", scaled_red], max_steps=1, reward_ensemble=True)
    trainer.train()
    # two perfectly correlated functions: identical z-scores, no disagreement, reward mean 0 over the batch
    assert logged(trainer, "interpretation_var_mean")[0] == pytest.approx(0.0, abs=1e-9)
    assert logged(trainer, "reward")[0] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    "config_class, overrides, message",
    [
        (BPGOConfig, {"ras_mode": "uncertainty", "prior_source": "ema"}, "needs a fixed prior.*'base_model'"),
        (BPGOConfig, {"ras_consistency": True}, "factor of `ras_mode='uncertainty'`"),
        (
            DiffusionGRPOConfig,
            {"reward_ensemble": True, "reward_weights": [1.0, 2.0]},
            "Drop `reward_weights`",
        ),
        (
            DiffusionGRPOConfig,
            {"reward_ensemble": True, "multi_objective_aggregation": "normalize_then_sum"},
            "does not apply",
        ),
    ],
)
def test_bad_uncertainty_settings_name_the_fix(tmp_path, config_class, overrides, message):
    with pytest.raises(ValueError, match=message):
        config_class(output_dir=str(tmp_path), **overrides)


def test_consistency_with_a_column_prior_needs_its_variance_column(tmp_path):
    dataset = Dataset.from_dict({"prompt": PROMPTS, "prior": [0.0] * 4})
    with pytest.raises(ValueError, match="'prior_var' column.*prior_var_column"):
        helpers.make_trainer(
            tmp_path,
            "red_channel",
            dataset,
            trainer_class=BPGOTrainer,
            prior_source="column",
            ras_mode="uncertainty",
            ras_consistency=True,
        )


def test_grpo_and_the_trainer_class_without_interpretations_log_nothing_new(tmp_path):
    torch.manual_seed(0)
    trainer = helpers.make_trainer(tmp_path, "red_channel", trainer_class=DiffusionGRPOTrainer, max_steps=1)
    trainer.train()
    assert not logged(trainer, "ambiguity_share_mean")


@pytest.mark.parametrize("source", ["draws", "variants", "ensemble"])
def test_the_uncertainty_example_runs_each_source(tmp_path, source):
    """examples/train_bpgo_uncertainty.py: every interpretation source trains a step of the uncertainty RAS on
    tiny:shapes, with some ambiguity measured and weights spread around 1."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "train_bpgo_uncertainty.py"
    spec = importlib.util.spec_from_file_location("train_bpgo_uncertainty", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    figures = example.main(["--source", source, "--max_steps", "1", "--output_dir", str(tmp_path)])
    assert 0 < figures["ambiguity_share"] <= 1
    assert figures["weight_min"] < 1 < figures["weight_max"]
