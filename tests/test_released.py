"""The papers' released settings stay one option away: the time-shifted sampling schedule of the released
samplers, and the released recipes (examples/configs/*_released.yaml)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from PIL import Image

from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer
from trl_visual.models import get_adapter
from trl_visual.models.base import shift_sigmas
from trl_visual.testing import load_tiny_pipeline

FAMILIES = ["sd3", "flux", "wan", "wan-i2v"]


def released_schedule(num_steps: int, shift: float) -> torch.Tensor:
    """The released samplers' σ, written out independently: ``s σ / (1 + (s − 1) σ)`` on ``linspace(1, 0, T+1)``."""
    sigmas = [1 - i / num_steps for i in range(num_steps + 1)]
    return torch.tensor([shift * s / (1 + (shift - 1) * s) for s in sigmas], dtype=torch.float64)


def tiny_trainer(tmp_path, model: str, **overrides) -> DiffusionGRPOTrainer:
    data = {"prompt": ["a cat", "a dog"]}
    if model == "wan-i2v":
        data["image"] = [Image.new("RGB", (32, 32), (200, 30, 30))] * 2
    settings = dict(
        output_dir=str(tmp_path / model), num_generations=2, per_device_train_batch_size=4, max_steps=1,
        height=32, width=32, num_frames=5, num_inference_steps=16, max_sequence_length=16,
        guidance_scale=1.0, report_to="none", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    settings.update(overrides)
    return DiffusionGRPOTrainer(
        model=f"tiny:{model}",
        reward_funcs="red_channel",
        args=DiffusionGRPOConfig(**settings),
        train_dataset=Dataset.from_dict(data),
    )


@pytest.mark.parametrize("model", FAMILIES)
def test_time_shift_gives_the_released_schedule_for_every_family(tmp_path, model):
    """``time_shift=s``: ``sampling_sigmas()`` is the shift formula on ``linspace(1, 0, T + 1)`` (s = 3, 5, 8 of the
    released runs), whatever the family's own scheduler does; ``None`` keeps the scheduler's schedule."""
    trainer = tiny_trainer(tmp_path, model, time_shift=3.0)
    for shift in (3.0, 5.0, 8.0):
        trainer.args.time_shift = shift
        sigmas = trainer.sampling_sigmas()
        assert sigmas.shape == (17,)
        torch.testing.assert_close(sigmas.double(), released_schedule(16, shift), atol=1e-6, rtol=0)
    trainer.args.time_shift = None
    adapter = get_adapter(load_tiny_pipeline(f"tiny:{model}"))
    own = adapter.scheduler_sigmas(16, trainer.latent_shape)
    torch.testing.assert_close(trainer.sampling_sigmas(), own)
    assert not torch.allclose(own.double(), released_schedule(16, 5.0), atol=1e-3)


def test_rollouts_sample_on_the_shifted_schedule(tmp_path):
    """The transitions a rollout stores sit on ``sampling_sigmas()``: σ and σ' of each step are consecutive values."""
    trainer = tiny_trainer(tmp_path, "sd3", time_shift=5.0, num_inference_steps=4)
    rollouts = trainer.sample(["a cat", "a cat"], torch.tensor([0, 0]), seed=0)
    expected = released_schedule(4, 5.0).float()
    torch.testing.assert_close(rollouts.sigmas, expected[:-1])
    torch.testing.assert_close(rollouts.sigmas_next, expected[1:])


def test_shift_sigmas_formula_and_errors():
    sigmas = torch.tensor([1.0, 0.5, 0.25, 0.0])
    torch.testing.assert_close(shift_sigmas(sigmas, 3.0), torch.tensor([1.0, 0.75, 0.5, 0.0]))
    torch.testing.assert_close(shift_sigmas(sigmas, 1.0), sigmas)
    with pytest.raises(ValueError, match="positive"):
        shift_sigmas(sigmas, 0.0)
    with pytest.raises(ValueError, match="time_shift.*positive"):
        DiffusionGRPOConfig(output_dir="/tmp/x", time_shift=-1.0, report_to="none")
