"""The pieces ``benchmarks/miniature_results.py`` adds for the ``vipo_structure*`` parts (issue 25): the second
global reward, the reward lookup and the run files' names. The experiment itself is a benchmark, not a test."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "miniature_results.py"


@pytest.fixture(scope="module")
def results():
    spec = importlib.util.spec_from_file_location("miniature_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_saturation_is_the_mean_channel_range(results):
    """Pure red has range 1, grey 0; an image half red (1, 0, 0) and half (0.5, 0.25, 0.75) scores
    ½·1 + ½·(0.75 − 0.25) = 0.75."""
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    grey = torch.full((1, 3, 4, 4), 0.4)
    mixed = red.clone()
    mixed[..., 2:] = torch.tensor([0.5, 0.25, 0.75])[:, None, None]
    scores = results.saturation(["a"] * 3, torch.cat([red, grey, mixed]))
    assert scores == pytest.approx([1.0, 0.0, 0.75])


def test_structure_rewards_by_name(results):
    from trl_visual.rewards import red_channel

    assert results.structure_reward("red_channel") is red_channel
    assert results.structure_reward("saturation") is results.saturation
    with pytest.raises(ValueError, match="Unknown structure reward 'blue'.*saturation"):
        results.structure_reward("blue")
    for part, (reward, _, _) in results.STRUCTURE_PARTS.items():
        assert part in results.PARTS and reward in ("red_channel", "saturation", "scenes_adherence")


def test_structure_file_names_carry_the_chosen_arms(results, monkeypatch):
    assert (
        results.structure_file_name("vipo_structure", [0, 1], 100) == "vipo_structure_seeds0-1_steps100.json"
    )
    monkeypatch.setattr(results, "STRUCTURE_ONLY", ["grpo", "vipo"])
    name = results.structure_file_name("vipo_structure_adherence", [3], 30)
    assert name == "vipo_structure_adherence_seeds3_grpo-vipo_steps30.json"
    assert set(results.STRUCTURE_METHOD_KEYS) == set(results.STRUCTURE_METHODS)
