"""accelerate's engines on one CPU: the shipped accelerate configs, `--accelerate_config`, the DeepSpeed config the
trainer would run with, deferred gradient syncing, and saving from a gathered state dict.

The multi-process runs (DDP against one process, resuming, the LoRA gathered from FSDP2 shards) are in
test_distributed.py."""

import dataclasses
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from test_trainer import make_config, make_trainer
from transformers import Trainer

from trl_visual.checkpointing import METHOD_STATE_NAME
from trl_visual.cli import main, parse_args
from trl_visual.launcher import (
    SHIPPED_CONFIGS,
    accelerate_launch_args,
    resolve_accelerate_config,
    shipped_config_path,
)
from trl_visual.state_files import save_state_file
from trl_visual.testing import tiny_sd3_pipeline
from trl_visual.trainer.engines import (
    check_engine_settings,
    constant_trained_timesteps,
    deepspeed_gradient_accumulation,
    trained_timesteps_per_micro_step,
)

ENGINES = {
    "multi_gpu": DistributedType.MULTI_GPU,
    "fsdp": DistributedType.FSDP,
    "zero2": DistributedType.DEEPSPEED,
    "zero3": DistributedType.DEEPSPEED,
}


# ----------------------------------------------------------------------------------------------------------------
# The shipped configs and --accelerate_config
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ENGINES))
def test_shipped_configs_load_with_accelerate(name):
    assert name in SHIPPED_CONFIGS
    config = load_config_from_file(str(shipped_config_path(name)))  # accelerate's own reader and checks
    assert config.distributed_type == ENGINES[name]
    assert config.num_machines == 1 and config.num_processes == 8


def test_shipped_configs_keep_what_saving_needs():
    fsdp = load_config_from_file(str(shipped_config_path("fsdp"))).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    zero3 = load_config_from_file(str(shipped_config_path("zero3"))).deepspeed_config
    assert zero3["zero_stage"] == 3 and zero3["zero3_save_16bit_model"] is True


def test_shipped_configs_are_package_data():
    with open(os.path.join(os.path.dirname(__file__), "..", "setup.cfg")) as handle:
        assert "trl_visual = accelerate_configs/*.yaml" in handle.read()


def test_accelerate_config_resolves_a_name_or_a_path(tmp_path):
    assert resolve_accelerate_config("zero2") == shipped_config_path("zero2")
    own = tmp_path / "zero2"  # a file wins over the shipped name
    own.write_text("distributed_type: MULTI_GPU\n")
    assert resolve_accelerate_config(str(own)) == own
    with pytest.raises(
        ValueError, match="'zero9' is neither a file nor a shipped config; use one of multi_gpu"
    ):
        resolve_accelerate_config("zero9")


def test_accelerate_launch_arguments_parse_with_accelerates_parser():
    argv = ["grpo", "--config", "run.yaml", "--accelerate_config", "fsdp", "--num_processes=16"]
    argv += [
        "--num_machines",
        "2",
        "--machine_rank",
        "1",
        "--main_process_ip",
        "10.0.0.1",
        "--max_steps",
        "3",
    ]
    args = launch_command_parser().parse_args(accelerate_launch_args(argv))
    assert args.config_file == str(shipped_config_path("fsdp"))
    assert (args.num_processes, args.num_machines, args.machine_rank) == (16, 2, 1)
    assert args.main_process_ip == "10.0.0.1"
    assert args.module and args.training_script == "trl_visual.cli"
    assert args.training_script_args == ["grpo", "--config", "run.yaml", "--max_steps", "3"]


def test_main_hands_the_command_to_accelerate_launch(monkeypatch, tmp_path):
    launched = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", launched.append)
    config = _run_yaml(tmp_path)  # the command's files are checked before launching
    assert main(["grpo", "--accelerate_config", "zero3", "--config", config]) == 0
    assert launched[0].config_file == str(shipped_config_path("zero3"))
    assert launched[0].training_script_args == ["grpo", "--config", config]


def _run_yaml(tmp_path, **extra):
    path = tmp_path / "run.yaml"
    keys = {"model_name_or_path": "tiny:sd3", "reward_funcs": "[red_channel]", **extra}
    path.write_text("".join(f"{key}: {value}\n" for key, value in keys.items()))
    return str(path)


def test_a_yaml_accelerate_config_key_launches_like_the_flag(monkeypatch, tmp_path):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    launched = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", launched.append)
    config = _run_yaml(tmp_path, accelerate_config="zero2")
    assert main(["grpo", "--config", config]) == 0
    assert launched[-1].config_file == str(shipped_config_path("zero2"))
    assert launched[-1].training_script_args == ["grpo", "--config", config]
    # the flag wins over the key
    assert main(["grpo", "--config", config, "--accelerate_config", "fsdp"]) == 0
    assert launched[-1].config_file == str(shipped_config_path("fsdp"))
    # a bad value in the YAML is the same one-line error as on the command line
    assert main(["grpo", "--config", _run_yaml(tmp_path, accelerate_config="zero9")]) == 2


def test_a_launched_process_parses_the_key_and_does_not_launch_again(monkeypatch, tmp_path):
    """Inside `accelerate launch` (which sets ACCELERATE_MIXED_PRECISION) the YAML key is read and left alone."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    launched = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", launched.append)
    monkeypatch.setattr("trl_visual.cli.prepare", lambda argv: launched.append(("prepared", argv)))
    monkeypatch.setattr("trl_visual.cli.train", lambda trainer: None)
    config = _run_yaml(tmp_path, accelerate_config="zero2")
    assert main(["grpo", "--config", config]) == 0
    assert launched == [("prepared", ["grpo", "--config", config])]
    _, script_args, _, _ = parse_args(["grpo", "--config", config, "--output_dir", str(tmp_path / "out")])
    assert script_args.accelerate_config == "zero2"


def test_usage_points_at_the_engines(capsys):
    assert main([]) == 2
    assert "--accelerate_config multi_gpu|fsdp|zero2|zero3|FILE" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["grpo", "--accelerate_config", "zero9"],
            "--accelerate_config 'zero9' is neither a file nor a shipped",
        ),
        (["grpo", "--accelerate_config"], "--accelerate_config needs a value."),
        (["grop", "--accelerate_config", "zero2"], "unknown command 'grop'"),
    ],
)
def test_a_bad_launch_is_one_error_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("trl-visual: error: ") and message in err and err.count("\n") == 1


def test_accelerate_config_runs_the_command_through_accelerate_launch(tmp_path):
    """The real launcher: a user's accelerate config (one CPU process) and a tiny run, saved where asked."""
    config = tmp_path / "cpu.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\nuse_cpu: true\n"
    )
    flags = [
        "--model_name_or_path",
        "tiny:sd3",
        "--reward_funcs",
        "red_channel",
        "--use_peft",
        "--max_steps",
        "1",
    ]
    flags += [
        "--num_generations",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--height",
        "32",
        "--width",
        "32",
    ]
    flags += ["--num_inference_steps", "2", "--max_sequence_length", "16", "--report_to", "none"]
    flags += ["--save_strategy", "no", "--output_dir", str(tmp_path / "out"), "--torch_num_threads", "1"]
    command = [sys.executable, "-m", "trl_visual.cli", "grpo", "--accelerate_config", str(config), *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Some specified arguments are not used" not in result.stderr
    assert load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed: the config the trainer would run with (no deepspeed needed)
# ----------------------------------------------------------------------------------------------------------------
def shipped_deepspeed_plugin(name, **overrides):
    """The DeepSpeed plugin accelerate builds from a shipped config's ``deepspeed_config`` section."""
    section = load_config_from_file(str(shipped_config_path(name))).deepspeed_config
    fields = {field.name for field in dataclasses.fields(DeepSpeedPlugin)}
    return DeepSpeedPlugin(**{k: v for k, v in {**section, **overrides}.items() if k in fields})


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_deepspeed_counts_one_micro_step_per_backward(tmp_path, name):
    """The config of a shipped DeepSpeed engine, with the ``auto`` values filled from the TrainingArguments as
    ``Trainer`` fills them (its filler needs the deepspeed package), then counted in backwards by the trainer:
    ``gradient_accumulation_steps × K``, with ``train_batch_size`` consistent, as DeepSpeed checks."""
    args = make_config(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=3)
    world_size = 8
    config = shipped_deepspeed_plugin(name).deepspeed_config
    assert config["gradient_accumulation_steps"] == config["train_batch_size"] == "auto"
    config.update(
        train_micro_batch_size_per_gpu=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        train_batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
    )
    deepspeed_gradient_accumulation(config, args.gradient_accumulation_steps, 5, world_size)
    assert config["gradient_accumulation_steps"] == 3 * 5
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["train_batch_size"] == 4 * 3 * 5 * world_size
    assert config["zero_optimization"]["stage"] == int(name[-1])


def test_trained_timesteps_per_micro_step(tmp_path):
    adapter = make_trainer(tmp_path, max_steps=1).adapter
    latent_shape = (4, 4, 4)

    def counts(**settings):
        return trained_timesteps_per_micro_step(adapter, make_config(tmp_path, **settings), latent_shape)

    assert counts(num_inference_steps=4, timestep_fraction=0.5) == {2}
    assert counts(num_inference_steps=6, sde_window_size=2, sde_window_range=[0, 4]) == {2}
    # a window that may cover the step landing on σ = 0, which exclude_last_step drops: K is 1 or 2
    assert counts(
        num_inference_steps=4, sde_window_size=2, sde_window_range=[0, 3], exclude_last_step=True
    ) == {
        1,
        2,
    }


def test_deepspeed_refuses_a_varying_number_of_trained_timesteps(tmp_path):
    trainer = make_trainer(
        tmp_path, max_steps=1, sde_window_size=2, sde_window_range=[0, 3], exclude_last_step=True
    )
    with pytest.raises(ValueError, match=r"train \[1, 2\] depending on where the SDE window falls"):
        constant_trained_timesteps(trainer.adapter, trainer.args, trainer.latent_shape)


def test_engine_settings_that_could_not_save_the_lora_are_refused():
    sharded = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    with pytest.raises(ValueError, match="Set `fsdp_state_dict_type: FULL_STATE_DICT`"):
        check_engine_settings(SimpleNamespace(fsdp_plugin=sharded))
    ungathered = shipped_deepspeed_plugin("zero3", zero3_save_16bit_model=False)
    with pytest.raises(ValueError, match="Set `zero3_save_16bit_model: true`"):
        check_engine_settings(SimpleNamespace(deepspeed_plugin=ungathered))
    full = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT")
    check_engine_settings(
        SimpleNamespace(fsdp_plugin=full, deepspeed_plugin=shipped_deepspeed_plugin("zero3"))
    )
    check_engine_settings(SimpleNamespace(deepspeed_plugin=shipped_deepspeed_plugin("zero2")))


# ----------------------------------------------------------------------------------------------------------------
# Several backwards per micro-step, on one process
# ----------------------------------------------------------------------------------------------------------------
def test_only_the_last_backward_of_the_syncing_micro_step_syncs(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    state = trainer.accelerator.gradient_state

    def observed(syncs):
        state._set_sync_gradients(syncs)
        flags = [trainer.accelerator.sync_gradients for _ in trainer.engine.backward_steps(trainer.model, 3)]
        return flags, trainer.accelerator.sync_gradients

    assert observed(True) == ([False, False, True], True)
    assert observed(False) == ([False, False, False], False)  # Trainer defers this whole micro-step


def test_backward_scale_is_ours_or_deepspeeds(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, gradient_accumulation_steps=2)
    assert trainer.engine.backward_scale(3, 2) == 6
    trainer.engine.deepspeed_timesteps = 3  # DeepSpeed divides by its own accumulation, 2 × 3
    assert trainer.engine.backward_scale(3, 2) == 1
    with pytest.raises(RuntimeError, match="trains 2 timesteps, DeepSpeed was set up for 3"):
        trainer.engine.backward_scale(2, 2)


# ----------------------------------------------------------------------------------------------------------------
# Saving from the state dict Trainer.save_model gathered
# ----------------------------------------------------------------------------------------------------------------
def test_save_takes_the_lora_from_the_gathered_state_dict(tmp_path):
    """Under FSDP / ZeRO-3 the live model holds shards: ``_save`` must write the gathered tensors, not its own."""
    trainer = make_trainer(tmp_path, max_steps=1)
    gathered = {key: value.clone() for key, value in trainer.model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    lora_keys = [key for key in gathered if "lora_" in key]
    for key in lora_keys:
        gathered[key] = torch.randn(gathered[key].shape, generator=generator)
    trainer._save(str(tmp_path / "gathered"), state_dict=gathered)
    saved = load_file(tmp_path / "gathered" / "pytorch_lora_weights.safetensors")
    assert len(saved) == len(lora_keys) > 0
    for key in lora_keys:
        torch.testing.assert_close(
            saved["transformer." + key.replace(".default", "")], gathered[key], rtol=0, atol=0
        )
    pipeline = tiny_sd3_pipeline()
    pipeline.load_lora_weights(str(tmp_path / "gathered"))
    for key in lora_keys:
        loaded = pipeline.transformer.get_parameter(key.replace(".default.", ".default_0."))
        torch.testing.assert_close(loaded.detach(), gathered[key], rtol=0, atol=0)


def test_full_fine_tuning_saves_the_gathered_weights(tmp_path):
    """The gathered weights (not the live, sharded model's) go into transformer/, and the folder around them is a
    whole pipeline: ``DiffusionPipeline.from_pretrained`` loads them."""
    from diffusers import DiffusionPipeline

    trainer = make_trainer(tmp_path, max_steps=1, peft=False)
    gathered = {key: value + 1 for key, value in trainer.model.state_dict().items()}
    trainer._save(str(tmp_path / "full"), state_dict=gathered)
    reloaded = type(trainer.model).from_pretrained(str(tmp_path / "full" / "transformer"))
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, gathered[key], rtol=0, atol=0)
    pipeline = DiffusionPipeline.from_pretrained(str(tmp_path / "full"))
    for key, value in pipeline.transformer.state_dict().items():
        torch.testing.assert_close(value, gathered[key], rtol=0, atol=0)


def test_a_full_checkpoint_loads_shard_by_shard_into_the_denoiser(tmp_path):
    """Resuming full fine-tuning reads the denoiser's safetensors shards straight into the model (no second
    whole copy built with ``from_pretrained``): every weight lands, from one file or from several."""
    from huggingface_hub import save_torch_state_dict

    from trl_visual.lora_io import DENOISER_FILES

    trainer = make_trainer(tmp_path, max_steps=1, peft=False)
    saved = {key: value + 1 for key, value in trainer.model.state_dict().items()}
    trainer._save(str(tmp_path / "one"), state_dict=saved)
    sharded = tmp_path / "many" / "transformer"
    sharded.mkdir(parents=True)
    save_torch_state_dict(saved, sharded, filename_pattern=DENOISER_FILES, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    for folder in ("one", "many"):
        fresh = make_trainer(tmp_path / folder / "run", max_steps=1, peft=False)
        fresh.checkpoints.load_weights(str(tmp_path / folder), fresh.model)
        for key, value in fresh.model.state_dict().items():
            torch.testing.assert_close(value, saved[key], rtol=0, atol=0)


@pytest.mark.parametrize("shards", [True, False])
def test_model_card_samples_on_every_rank_only_when_the_weights_are_sharded(tmp_path, monkeypatch, shards):
    """Under FSDP / ZeRO-3 each of the card's forwards is a collective: every rank samples, rank 0 alone writes."""
    trainer = make_trainer(tmp_path, max_steps=1)
    monkeypatch.setattr(type(trainer), "shards_parameters", property(lambda self: shards))
    monkeypatch.setattr(trainer, "is_world_process_zero", lambda: False)
    sampled = []
    monkeypatch.setattr(trainer.model_card, "pictures_for", lambda rows, gallery: sampled.append(rows) or {})
    trainer.create_model_card()
    assert bool(sampled) == shards
    assert not os.path.exists(os.path.join(trainer.args.output_dir, "README.md"))


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed", None])
def test_resume_loads_what_the_engine_does_not(tmp_path, monkeypatch, engine):
    """Under FSDP the LoRA is loaded into the model before the engine shards it (``Trainer`` would load it into
    the shards after); under DeepSpeed, which restores the weights from its own folder, the method's state is
    loaded after the wrapping. Elsewhere ``Trainer`` loads both before (``_prepare_for_training`` adds nothing)."""
    make_trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1, learning_rate=1e-1).train()
    checkpoint = str(tmp_path / "out" / "checkpoint-1")
    save_state_file({"prior": 1.0}, os.path.join(checkpoint, METHOD_STATE_NAME))
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.is_fsdp_enabled, trainer.is_deepspeed_enabled = engine == "fsdp", engine == "deepspeed"
    events = []

    def engine_wrapping(self, max_steps, train_dataloader, resume_from_checkpoint):
        lora = get_peft_model_state_dict(self.model)
        events.append(("wrap", {key: value.clone() for key, value in lora.items()}))
        if self.is_fsdp_enabled:  # what Trainer does under FSDP once the model is sharded
            self._load_from_checkpoint(resume_from_checkpoint, self.model)
        return self.model, train_dataloader

    monkeypatch.setattr(Trainer, "_prepare_for_training", engine_wrapping)
    monkeypatch.setattr(trainer, "load_method_state", lambda state: events.append(("method_state", state)))
    trainer._prepare_for_training(1, None, checkpoint)
    saved = load_file(os.path.join(checkpoint, "pytorch_lora_weights.safetensors"))
    wrapped_lora = events[0][1]
    loaded_before = all(torch.equal(wrapped_lora[key], saved["transformer." + key]) for key in wrapped_lora)
    assert loaded_before == (engine == "fsdp")
    method_states = [event for event in events if event[0] == "method_state"]
    assert method_states == ([] if engine is None else [("method_state", {"prior": 1.0})])
