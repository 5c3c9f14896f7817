"""``trl_visual.demo``: the live view of a run that the notebooks and the Space share, on the miniature world."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import logged

from trl_visual.demo import (
    SHAPES_LORA,
    SHAPES_SETTINGS,
    LiveProgressCallback,
    make_demo_trainer,
    map_overlays,
    sample_prompts,
)

#: one group of 8 per step, short sampling: seconds per run
FAST = {"per_device_train_batch_size": 8, "num_inference_steps": 4}
PROMPTS = ["a red circle on the left", "a big blue square"]


def watched_run(method, tmp_path, max_steps, **callback_kwargs):
    trainer = make_demo_trainer(method, PROMPTS, str(tmp_path / method), max_steps=max_steps, **FAST)
    watcher = LiveProgressCallback(trainer, PROMPTS[:1], **callback_kwargs)
    trainer.add_callback(watcher)
    trainer.train()
    return trainer, watcher


def test_settings_come_from_one_place_and_can_be_overridden(tmp_path):
    trainer = make_demo_trainer("GRPO", PROMPTS, str(tmp_path), learning_rate=1e-3)
    assert trainer.args.learning_rate == 1e-3 != SHAPES_SETTINGS["learning_rate"]
    for name in ("num_generations", "num_inference_steps", "guidance_scale", "max_steps"):
        assert getattr(trainer.args, name) == SHAPES_SETTINGS[name]
    # fewer prompts than a step of SHAPES_SETTINGS samples: each step samples every prompt once
    assert (
        trainer.args.per_device_train_batch_size
        == len(PROMPTS) * 8
        < SHAPES_SETTINGS["per_device_train_batch_size"]
    )
    with pytest.raises(ValueError, match="GRPO, BPGO, ViPO"):
        make_demo_trainer("PPO", PROMPTS, str(tmp_path))


def test_demo_trains_with_the_shipped_lora_recipe():
    """The demos' LoRA and training settings are the LoRA recipe's (``examples/configs/shapes_grpo_lora.yaml``, as
    the CLI reads it), so the demos show settings measured to learn; only the batch and step count are theirs."""
    from trl_visual.cli import parse_args

    recipe = Path(__file__).resolve().parent.parent / "examples" / "configs" / "shapes_grpo_lora.yaml"
    _, _, config, model_args = parse_args(["grpo", "--config", str(recipe)])
    lora = model_args.lora_config()
    assert (lora.r, lora.lora_alpha) == (SHAPES_LORA["r"], SHAPES_LORA["lora_alpha"])
    assert set(lora.target_modules) == set(SHAPES_LORA["target_modules"])
    shared = [
        "num_generations",
        "num_inference_steps",
        "guidance_scale",
        "learning_rate",
        "lr_scheduler_type",
    ]
    for name in [*shared, "scale_rewards", "timestep_fraction"]:
        assert getattr(config, name) == SHAPES_SETTINGS[name], name


def test_bpgo_run_streams_curve_samples_and_weights(tmp_path):
    received = []
    trainer, watcher = watched_run("BPGO", tmp_path, max_steps=3, on_update=received.append, sample_every=2)

    assert received == watcher.updates
    first, last = watcher.updates[0], watcher.updates[-1]
    assert (first.step, first.rewards, first.finished) == (0, [], False)
    assert [image.size for image in first.images] == [(32, 32)]
    # the curve is the trainer's own logged reward, step by step
    assert last.rewards == list(zip([1, 2, 3], logged(trainer, "reward")))
    assert (last.step, last.finished, last.stop_reason) == (3, True, None)
    assert [update.finished for update in watcher.updates].count(True) == 1
    # sampled from fixed seeds: the end of the run is what the trained policy draws now
    samples, rewards = sample_prompts(trainer, PROMPTS[:1])
    again, _ = sample_prompts(trainer, PROMPTS[:1])
    assert torch.equal(samples, again)
    assert rewards == pytest.approx(last.sample_rewards)
    # 3 steps of one prompt each over 2 prompts: one prompt came back, so its RAS weight left 1
    assert set(last.ras_weights) == set(PROMPTS)
    assert all(0 < weight < 2 for weight in last.ras_weights.values())  # 1 ± α with α = 1
    assert any(abs(weight - 1) > 1e-4 for weight in last.ras_weights.values())
    assert first.ras_weights == {}


def test_time_limit_stops_the_run_cleanly(tmp_path):
    trainer, watcher = watched_run("GRPO", tmp_path, max_steps=5, time_limit=0.0)
    assert trainer.state.global_step == 1
    last = watcher.updates[-1]
    assert last.finished and "time limit" in last.stop_reason and last.step == 1
    assert last.images, "the stopped run still shows its final samples"


def test_request_stop_ends_the_run_after_the_current_step(tmp_path):
    def stop_at_first_log(update):
        if update.rewards:
            watcher.request_stop()

    trainer = make_demo_trainer("GRPO", PROMPTS, str(tmp_path), max_steps=5, **FAST)
    watcher = LiveProgressCallback(trainer, PROMPTS, on_update=stop_at_first_log)
    trainer.add_callback(watcher)
    trainer.train()
    # step 1 is logged after its own end-of-step check, so the stop lands at the end of step 2
    assert trainer.state.global_step == 2
    assert "on request" in watcher.updates[-1].stop_reason


def test_vipo_overlays_put_each_sample_beside_its_map(tmp_path):
    trainer = make_demo_trainer("ViPO", PROMPTS, str(tmp_path), **FAST)
    samples, _ = sample_prompts(trainer, PROMPTS)
    overlays = map_overlays(trainer, samples)
    assert [overlay.size for overlay in overlays] == [(64, 32)] * 2
    left = torch.tensor(list(overlays[0].crop((0, 0, 32, 32)).getdata()), dtype=torch.float32)
    expected = (samples[0].clamp(0, 1) * 255).round().permute(1, 2, 0).reshape(-1, 3)
    assert torch.allclose(left, expected, atol=1)
    right = torch.tensor(list(overlays[0].crop((32, 0, 64, 32)).getdata()), dtype=torch.float32)
    assert not torch.allclose(right, expected, atol=8)  # the heat map is blended in
    grpo = make_demo_trainer("GRPO", PROMPTS, str(tmp_path / "grpo"), **FAST)
    assert map_overlays(grpo, samples) == []
