"""Checkpoints, exact resume, model cards and Hub pushing on the tiny SD3."""

import json
import os

import pytest
import torch
import yaml
from datasets import Dataset
from helpers import PROMPTS, TARGETS, logged, make_config, make_trainer, pipeline_images
from huggingface_hub import ModelCard
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback

from trl_visual import DiffusionGRPOTrainer
from trl_visual.testing import tiny_sd3_pipeline


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step
        return control


def lora_weights(directory):
    return load_file(os.path.join(directory, "pytorch_lora_weights.safetensors"))


LORA_CONFIGS = {
    "r8-alpha8": dict(r=8, lora_alpha=8),
    "r4-alpha32-dora": dict(r=4, lora_alpha=32, use_dora=True, alpha_pattern={"to_k": 7}),
}


def lora_trainer(tmp_path, lora, **settings):
    return DiffusionGRPOTrainer(
        model="tiny:sd3",
        reward_funcs="red_channel",
        args=make_config(tmp_path, **settings),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(target_modules=TARGETS, **lora),
    )


@pytest.mark.parametrize("lora", LORA_CONFIGS.values(), ids=LORA_CONFIGS.keys())
def test_resume_continues_the_same_run_exactly(tmp_path, lora):
    """4 steps straight, and the same run cut off after its step-2 checkpoint then resumed for 2 more, give the
    same LoRA weights (max abs difference under 1e-6) and the same logged rewards, learning rates and norms;
    also for a DoRA adapter with alpha != r (the checkpoint is read through diffusers' ``lora_state_dict``)."""
    settings = dict(save_strategy="steps", save_steps=2, learning_rate=3e-2, max_steps=4, seed=3)
    straight = lora_trainer(tmp_path / "a", lora, **settings)
    straight.train()
    straight.save_model(str(tmp_path / "a" / "final"))

    interrupted = lora_trainer(tmp_path / "b", lora, **settings)
    interrupted.add_callback(StopAfter(2))
    interrupted.train()
    assert interrupted.state.global_step == 2
    resumed = lora_trainer(tmp_path / "b", lora, **settings)
    resumed.train(resume_from_checkpoint=True)  # picks output_dir/checkpoint-2
    resumed.save_model(str(tmp_path / "b" / "final"))

    a, b = lora_weights(tmp_path / "a" / "final"), lora_weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    step_2 = lora_weights(tmp_path / "b" / "out" / "checkpoint-2")
    assert max((a[k] - step_2[k]).abs().max().item() for k in a) > 1e-4  # steps 3-4 did train
    # the resumed trainer's history holds the restored steps 1-2 and its own steps 3-4
    for key in ("reward", "learning_rate", "grad_norm"):
        assert logged(resumed, key) == pytest.approx(logged(straight, key), abs=1e-7), key


def test_a_crash_during_a_save_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=1, max_steps=2, learning_rate=3e-2)
    calls = {"n": 0}
    original = type(trainer)._save_rng_state

    def crash_on_second_save(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return original(self, output_dir)

    monkeypatch.setattr(type(trainer), "_save_rng_state", crash_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    out = tmp_path / "out"
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-1"]
    from transformers.trainer_utils import get_last_checkpoint

    assert get_last_checkpoint(str(out)).endswith("checkpoint-1")
    assert set(os.listdir(out / "checkpoint-1")) >= {
        "pytorch_lora_weights.safetensors",
        "optimizer.pt",
        "trainer_state.json",
    }


def test_save_total_limit_is_honoured(tmp_path):
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=1, max_steps=3, save_total_limit=2)
    trainer.train()
    assert sorted(p for p in os.listdir(tmp_path / "out") if p.startswith("checkpoint")) == [
        "checkpoint-2",
        "checkpoint-3",
    ]
    assert not (tmp_path / "out" / ".staging").exists()


def constant_score(prompts, images, **kwargs):
    return [1.0] * len(prompts)


@pytest.mark.parametrize("load_best", [False, True])
def test_the_best_checkpoint_is_named_where_it_lands_and_kept(tmp_path, load_best):
    """With ``metric_for_best_model``, ``Trainer`` looks the best checkpoint up under the folder it writes to,
    which is the staging folder here: the state and every ``trainer_state.json`` must name the renamed folder, and
    ``save_total_limit`` must keep it. A constant metric makes step 1 the best (a tie is not an improvement)."""
    trainer = make_trainer(
        tmp_path,
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:2]}),
        trainer_kwargs={"eval_reward_funcs": constant_score},
        **dict(save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1, max_steps=3),
        **dict(save_total_limit=2, metric_for_best_model="eval_rewards/constant_score/mean"),
        **dict(greater_is_better=True, load_best_model_at_end=load_best),
    )
    trainer.train()
    out = tmp_path / "out"
    assert trainer.state.best_global_step == 1
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-1")
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == [
        "checkpoint-1",
        "checkpoint-3",
    ]
    for step in (1, 3):
        state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert state["best_model_checkpoint"] == str(out / "checkpoint-1")
    assert not (out / ".staging").exists()


def test_model_card_and_offline_push(tmp_path):
    trainer = make_trainer(tmp_path, learning_rate=3e-2, max_steps=3, hub_model_id="user/tiny-grpo")
    trainer.train()
    with pytest.raises(RuntimeError, match=r"Could not push to the Hub .*saved in .*hf auth login"):
        trainer.push_to_hub()  # the tests run with HF_HUB_OFFLINE=1
    out = tmp_path / "out"
    assert {
        "README.md",
        "samples_before.png",
        "samples_after.png",
        "reward_curve.png",
        "pytorch_lora_weights.safetensors",
        "images",
    } <= set(os.listdir(out))
    assert {f"{kind}_{i}.png" for kind in ("before", "after") for i in range(4)} == set(
        os.listdir(out / "images")
    )

    text = (out / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert ModelCard(text).data.to_dict() == metadata
    assert "base_model" not in metadata  # `tiny:sd3` is no Hub repo: the Hub would reject it
    assert metadata["license"] == "other"
    assert [entry["output"]["url"] for entry in metadata["widget"]] == [
        f"images/after_{i}.png" for i in range(4)
    ]
    assert 'pipe = load_pipeline("tiny:sd3")' in text
    assert metadata["library_name"] == "diffusers"
    assert metadata["pipeline_tag"] == "text-to-image"
    assert {"trl-visual", "grpo", "lora"} <= set(metadata["tags"])
    assert 'pipe.load_lora_weights("user/tiny-grpo")' in text
    assert "Flow-GRPO" in text and "DanceGRPO" in text and "`red_channel`" in text
    assert "| `learning_rate` | `0.03` |" in text

    # the folder that would be uploaded reproduces the trained model
    fresh = tiny_sd3_pipeline()
    fresh.load_lora_weights(str(out))

    torch.testing.assert_close(
        pipeline_images(fresh, PROMPTS[0], seed=1),
        pipeline_images(trainer.pipeline, PROMPTS[0], seed=1),
        atol=1e-6,
        rtol=0,
    )
