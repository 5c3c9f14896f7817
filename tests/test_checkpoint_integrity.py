"""Issue 12 (items 6, 7, 9): incomplete or corrupt checkpoints, a stale or corrupt BPGO prior cache and
degenerate inputs are refused (or repaired) with a message naming the file or field and the fix, before
anything is loaded or sampled."""

import json
import logging
import os
import shutil

import pytest
import torch
from datasets import Dataset
from helpers import PROMPTS, TARGETS, make_config, make_trainer
from peft import LoraConfig
from safetensors.torch import load_file
from test_bpgo_trainer import make_trainer as make_bpgo
from test_vipo_trainer import make_trainer as make_vipo
from transformers import Trainer

from trl_visual.checkpointing import CheckpointError, check_checkpoint
from trl_visual.cli import build_trainer, parse_args
from trl_visual.trainer import diffusion_grpo_trainer
from trl_visual.trainer.bpgo_estimation import PriorEstimator
from trl_visual.trainer.bpgo_priors import PRIOR_CACHE_NAME
from trl_visual.trainer.diffusion_grpo_trainer import DiffusionGRPOTrainer
from trl_visual.trainer.vipo_trainer import ViPOTrainer

LORA = "pytorch_lora_weights.safetensors"
RUN = dict(save_strategy="steps", save_steps=2, max_steps=2, learning_rate=3e-2, seed=3)


@pytest.fixture(scope="module")
def grpo_checkpoint(tmp_path_factory):
    """checkpoint-2 of a finished 2-step GRPO run (LoRA trained away from its zero initialisation)."""
    root = tmp_path_factory.mktemp("grpo")
    make_trainer(root, **RUN).train()
    return root / "out" / "checkpoint-2"


@pytest.fixture
def checkpoint(grpo_checkpoint, tmp_path):
    """A private copy of the GRPO checkpoint, free to damage."""
    return shutil.copytree(grpo_checkpoint, tmp_path / "copy" / "checkpoint-2")


@pytest.fixture
def loads(monkeypatch):
    """Records every load from a checkpoint (weights, optimizer and scheduler, RNG), so a test can tell that
    a refusal came before any of them."""
    calls = []
    for cls, name in (
        (DiffusionGRPOTrainer, "_load_from_checkpoint"),
        (Trainer, "_load_optimizer_and_scheduler"),
        (Trainer, "_load_rng_state"),
    ):
        original = getattr(cls, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, spy)
    return calls


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def model_lora(trainer):
    """The trainer's LoRA tensors under the names the checkpoint file uses."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model))
    return {f"transformer.{key}": value.detach().clone() for key, value in state.items()}


# -- missing files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_missing_state_file_is_refused_before_anything_is_loaded(tmp_path, checkpoint, loads, name):
    os.remove(checkpoint / name)
    trainer = make_trainer(tmp_path, **RUN)
    with pytest.raises(CheckpointError) as error:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    message = str(error.value)
    assert str(checkpoint / name) in message
    assert "resume_weights_only=True" in message and "silently start afresh" in message
    assert loads == []
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_resume_weights_only_resumes_the_weights_on_purpose(tmp_path, checkpoint, caplog, name):
    os.remove(checkpoint / name)
    trainer = make_trainer(tmp_path, resume_weights_only=True, **RUN)
    fresh = model_lora(trainer)
    with caplog.at_level(logging.WARNING, logger="trl_visual.checkpointing"):
        trainer.train(resume_from_checkpoint=str(checkpoint))  # max_steps reached: nothing more is trained
    assert name in caplog.text and "resume_weights_only=True" in caplog.text
    assert trainer.state.global_step == 2  # the step count is restored
    saved, resumed = load_file(checkpoint / LORA), model_lora(trainer)
    assert saved.keys() == resumed.keys()
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)
    assert any(not torch.equal(saved[k], fresh[k]) for k in saved)  # the resume did change the weights


def test_weights_and_trainer_state_are_needed_even_weights_only(tmp_path, checkpoint, loads):
    trainer = make_trainer(tmp_path, resume_weights_only=True, **RUN)
    os.remove(checkpoint / "trainer_state.json")
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: missing\. It holds the step count"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    os.remove(checkpoint / LORA)
    with pytest.raises(CheckpointError, match=rf"{LORA}: missing\. These are the LoRA weights"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert loads == []


def test_resume_true_without_a_checkpoint_says_so(tmp_path):
    trainer = make_trainer(tmp_path, **RUN)
    with pytest.raises(
        ValueError, match=r"resume_from_checkpoint=True but .*out holds no checkpoint-N folder"
    ):
        trainer.train(resume_from_checkpoint=True)


def test_a_complete_checkpoint_resumes_as_before(tmp_path, checkpoint, loads):
    trainer = make_trainer(tmp_path, **{**RUN, "max_steps": 3})
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 3
    assert "_load_optimizer_and_scheduler" in loads and "_load_from_checkpoint" in loads


def test_another_number_of_processes_is_named(checkpoint):
    """A 1-process checkpoint resumed by rank 1 of 2: its RNG file is rng_state_1.pth, which is not there."""
    shapes = {
        key.removeprefix("transformer."): tuple(value.shape)
        for key, value in load_file(checkpoint / LORA).items()
    }
    with pytest.raises(
        CheckpointError, match=r"rng_state_1\.pth missing.*has rng_state\.pth: .*another number of proc"
    ):
        check_checkpoint(str(checkpoint), lora_shapes=shapes, process_index=1, world_size=2)
    assert check_checkpoint(str(checkpoint), lora_shapes=shapes) == []


def test_a_full_denoiser_checkpoint_is_checked_too(tmp_path, loads):
    """Without LoRA the checkpoint holds the denoiser's save_pretrained folder: a complete one resumes, a
    truncated weights file is named."""
    run = dict(RUN, learning_rate=1e-5)
    make_trainer(tmp_path / "run", peft=False, **run).train()
    checkpoint = tmp_path / "run" / "out" / "checkpoint-2"
    make_trainer(tmp_path / "ok", peft=False, **{**run, "max_steps": 3}).train(
        resume_from_checkpoint=str(checkpoint)
    )
    weights = checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"
    truncate(weights)
    loads.clear()
    with pytest.raises(CheckpointError, match=rf"{weights}: its safetensors header is unreadable"):
        make_trainer(tmp_path / "bad", peft=False, **run).train(resume_from_checkpoint=str(checkpoint))
    assert loads == []


# -- corrupt files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, reason",
    [
        (LORA, "safetensors header is unreadable"),
        ("optimizer.pt", "not a readable torch.save archive"),
        ("scheduler.pt", "not a readable torch.save archive"),
        ("rng_state.pth", "not a readable torch.save archive"),
        ("trainer_state.json", "not valid JSON"),
    ],
)
def test_a_truncated_file_is_named(tmp_path, checkpoint, loads, name, reason):
    truncate(checkpoint / name)
    trainer = make_trainer(tmp_path, resume_weights_only=True, **RUN)  # corrupt is refused even so
    with pytest.raises(CheckpointError) as error:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    message = str(error.value)
    assert str(checkpoint / name) in message and reason in message
    assert "another checkpoint" in message
    assert loads == []


def test_a_trainer_state_without_a_step_is_refused(tmp_path, checkpoint):
    (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": []}))
    with pytest.raises(
        CheckpointError, match=r"trainer_state\.json: it is JSON but holds no integer `global_step`"
    ):
        make_trainer(tmp_path, **RUN).train(resume_from_checkpoint=str(checkpoint))


# -- LoRA that does not fit -------------------------------------------------------------------------------------
def make_lora_trainer(tmp_path, targets=TARGETS, r=8):
    return DiffusionGRPOTrainer(
        model="tiny:sd3",
        reward_funcs="red_channel",
        args=make_config(tmp_path, **RUN),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=r, lora_alpha=r, target_modules=targets),
    )


def test_more_lora_targets_than_the_checkpoint_name_the_modules(tmp_path, checkpoint, loads):
    trainer = make_lora_trainer(tmp_path, targets=[*TARGETS, "add_k_proj"])
    with pytest.raises(CheckpointError) as error:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    message = str(error.value)
    assert "LoRA modules in the model but not in the file: transformer_blocks.0.attn.add_k_proj" in message
    assert "`target_modules` and `r`" in message and str(checkpoint / LORA) in message
    assert loads == []


def test_fewer_targets_and_another_rank_are_named_too(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match=r"in the file but not in the model: proj_out"):
        make_lora_trainer(tmp_path, targets=["to_q", "to_k", "to_v", "to_out.0"]).train(
            resume_from_checkpoint=str(checkpoint)
        )
    with pytest.raises(
        CheckpointError, match=r"different shapes \(LoRA rank\): .*\(8, 32\) in the file, \(4, 32\)"
    ):
        make_lora_trainer(tmp_path, r=4).train(resume_from_checkpoint=str(checkpoint))


# -- empty prompts ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["", "   \n", None])
def test_empty_prompts_are_refused_before_the_model_is_loaded(tmp_path, monkeypatch, prompt):
    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(diffusion_grpo_trainer, "load_pipeline", no_loading)
    dataset = Dataset.from_dict({"prompt": ["a cat", "a dog", prompt, "a tree"]})
    with pytest.raises(ValueError, match=r"train_dataset.s .prompt. column \(row 2.*non-empty string"):
        make_trainer(tmp_path, dataset=dataset)


# -- BPGO ---------------------------------------------------------------------------------------------------------
def test_bpgo_without_its_priors_is_refused_unless_weights_only(tmp_path, monkeypatch):
    settings = dict(save_strategy="steps", save_steps=2, prior_source="base_model", prior_num_rollouts=2)
    make_bpgo(tmp_path, **settings).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    os.remove(checkpoint / "trl_visual_state.safetensors")

    def no_estimation(*args, **kwargs):
        raise AssertionError("the priors were estimated before the checkpoint was checked")

    monkeypatch.setattr(PriorEstimator, "prompt_means", no_estimation)
    os.remove(tmp_path / "out" / PRIOR_CACHE_NAME)  # a resume would estimate the priors again first
    with pytest.raises(
        CheckpointError, match=r"trl_visual_state\.safetensors missing.*the method's state \(BPGO's priors"
    ):
        make_bpgo(tmp_path, **settings).train(resume_from_checkpoint=str(checkpoint))
    monkeypatch.undo()
    resumed = make_bpgo(tmp_path, resume_weights_only=True, **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))  # priors estimated again, on purpose
    assert set(resumed.method_state()["estimated_priors"]) == set(PROMPTS)


def test_a_corrupt_prior_cache_is_estimated_again_with_a_warning(tmp_path, caplog):
    settings = dict(max_steps=1, prior_source="base_model", prior_num_rollouts=2)
    reference = make_bpgo(tmp_path / "reference", **settings)
    reference.train()
    path = tmp_path / "out" / PRIOR_CACHE_NAME
    path.parent.mkdir(parents=True)
    text = (tmp_path / "reference" / "out" / PRIOR_CACHE_NAME).read_text()
    path.write_text(text[: len(text) // 2])  # truncated by a crash
    trainer = make_bpgo(tmp_path, **settings)
    with caplog.at_level(logging.WARNING, logger="trl_visual.trainer.bpgo_trainer"):
        trainer.train()
    assert str(path) in caplog.text and "unreadable (JSONDecodeError" in caplog.text
    expected = reference.method_state()["estimated_priors"]
    assert trainer.method_state()["estimated_priors"] == expected
    assert json.loads(path.read_text())["priors"] == expected  # the file is whole again


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_sequence_length", 8),
        ("model_init_kwargs", {"revision": "v2"}),
        ("sde_window_range", [1, 2]),
        ("init_same_noise", True),
        ("per_device_train_batch_size", 4),
    ],
)
def test_the_prior_fingerprint_covers_what_changes_the_estimate(tmp_path, field, value):
    base = make_bpgo(tmp_path / "a", prior_source="base_model", sde_window_size=1)
    other = make_bpgo(tmp_path / "b", prior_source="base_model", sde_window_size=1, **{field: value})
    assert base.prior_estimator.fingerprint() != other.prior_estimator.fingerprint()
    same = make_bpgo(tmp_path / "c", prior_source="base_model", sde_window_size=1)
    assert base.prior_estimator.fingerprint() == same.prior_estimator.fingerprint()


def test_a_prior_cache_from_another_max_sequence_length_is_not_reused(tmp_path, caplog):
    settings = dict(max_steps=1, prior_source="base_model", prior_num_rollouts=2)
    make_bpgo(tmp_path, **settings).train()
    calls = []
    trainer = make_bpgo(tmp_path, max_sequence_length=8, **settings)
    original = trainer.prior_estimator.prompt_means
    trainer.prior_estimator.prompt_means = lambda rows, k: calls.append(sorted(rows)) or original(rows, k)
    with caplog.at_level(logging.WARNING, logger="trl_visual.trainer.bpgo_trainer"):
        trainer.train()
    assert calls == [sorted(PROMPTS)] and "made with other settings" in caplog.text


# -- ViPO's backbone input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 5])
def test_a_backbone_input_under_two_patches_is_refused(tmp_path, dinov2_path, monkeypatch, size):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(ViPOTrainer, "sample", no_sampling)
    with pytest.raises(
        ValueError, match=rf"at 4×4 pixels \(backbone_image_size={size}\), a 1×1 grid .* at least 8"
    ):
        make_vipo(tmp_path, dinov2_path, backbone_image_size=size)


def test_tiny_dinov2_honours_backbone_image_size(tmp_path):
    """The CLI's built ``tiny:dinov2`` backbone takes --backbone_image_size, and its features have that grid."""
    argv = [
        "vipo",
        "--model_name_or_path",
        "tiny:sd3",
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "1",
    ]
    argv += [
        "--num_generations",
        "4",
        "--per_device_train_batch_size",
        "8",
        "--height",
        "32",
        "--width",
        "32",
    ]
    argv += [
        "--reward_funcs",
        "red_channel",
        "--backbone",
        "tiny:dinov2",
        "--report_to",
        "none",
        "--use_peft",
    ]
    command, script_args, config, model_args = parse_args([*argv, "--backbone_image_size", "16"])
    trainer = build_trainer(command, script_args, config, model_args)
    assert trainer.backbone.image_size == 16
    assert tuple(trainer.backbone(torch.rand(2, 3, 32, 32)).shape[1:3]) == (4, 4)  # 16 px / patch 4
    command, script_args, config, model_args = parse_args(argv)
    assert tuple(
        build_trainer(command, script_args, config, model_args).backbone(torch.rand(1, 3, 32, 32)).shape[1:3]
    ) == (8, 8)


def test_two_different_backbone_sizes_are_refused(tmp_path, dinov2_path):
    from trl_visual.backbones import VisionBackbone

    with pytest.raises(ValueError, match=r"`backbone_image_size=16` disagrees with the image_size=24"):
        make_vipo(tmp_path, VisionBackbone(dinov2_path, image_size=24), backbone_image_size=16)
