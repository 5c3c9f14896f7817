"""The ``trl-visual`` command and the prompt-set loader, on the tiny offline SD3 pipeline."""

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from trl_visual.cli import main, parse_args, resolve_reward_spec, run
from trl_visual.data import load_prompts

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"

# Two fast steps: 2 prompts × 2 samples, 2 sampling steps, no CFG, 32×32.
FAST = [
    "--model_name_or_path", "tiny:sd3",
    "--max_steps", "2",
    "--num_generations", "2",
    "--per_device_train_batch_size", "4",
    "--num_inference_steps", "2",
    "--guidance_scale", "1",
    "--max_sequence_length", "8",
    "--height", "32",
    "--width", "32",
    "--use_peft",
    "--lora_r", "4",
    "--lora_alpha", "4",
    "--save_strategy", "no",
    "--report_to", "none",
    "--disable_tqdm", "true",
]  # fmt: skip


def fast_args(tmp_path, *extra):
    return ["grpo", *FAST, "--output_dir", str(tmp_path / "out"), *extra]


def test_flags_builtin_prompts_train_and_save_lora(tmp_path):
    code = main(
        fast_args(tmp_path, "--reward_funcs", "red_channel", "--dataset_name", "builtin:drawbench-mini")
    )
    assert code == 0
    weights = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("transformer.") for key in weights)


def test_yaml_values_overridden_by_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model_name_or_path: tiny:sd3\n"
        "reward_funcs: [red_channel, jpeg_compressibility]\n"
        "reward_weights: [1.0, 0.0]\n"
        "max_steps: 40\n"
        "learning_rate: 1.0e-3\n"
        "lora_r: 8\n"
        "lora_target_modules: [to_q]\n"
    )
    _, script_args, config_obj, model_args = parse_args(
        ["grpo", "--config", str(config), "--max_steps", "3", "--output_dir", str(tmp_path / "o")]
    )
    assert config_obj.max_steps == 3  # the flag wins
    assert config_obj.learning_rate == 1e-3  # the YAML value stays
    assert config_obj.reward_weights == [1.0, 0.0]
    assert script_args.reward_funcs == ["red_channel", "jpeg_compressibility"]
    assert model_args.lora_r == 8 and model_args.use_peft is False
    # one target module stays a list (a bare string would be a regex for peft)
    model_args.use_peft = True
    assert model_args.lora_config().target_modules == {"to_q"}

    # and a real run from a YAML file, with flags on top
    config.write_text("reward_funcs: [red_channel]\nmax_steps: 40\nlearning_rate: 1.0e-3\n")
    trainer = run(fast_args(tmp_path, "--config", str(config)))
    assert trainer.state.global_step == 2 and trainer.args.learning_rate == 1e-3


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    (tmp_path / "p.jsonl").write_text(
        "\n".join(json.dumps({"prompt": p, "prior": i}) for i, p in enumerate(["a cat", "a dog"]))
    )
    (tmp_path / "p.csv").write_text("caption,score\na cat,1\na dog,2\n")
    assert load_prompts(str(tmp_path / "p.txt"))["prompt"] == ["a cat", "a dog"]
    assert load_prompts(str(tmp_path / "p.jsonl")).column_names == ["prompt", "prior"]
    assert load_prompts(str(tmp_path / "p.csv"), prompt_column="caption")["caption"] == ["a cat", "a dog"]
    builtin = load_prompts("builtin:drawbench-mini")
    assert len(builtin) >= 40 and {"prompt", "category"} <= set(builtin.column_names)
    assert {"colors", "counting", "spatial", "text", "rare_words"} <= set(builtin["category"])
    assert "a red car" in load_prompts("builtin:objects")["prompt"]
    with pytest.raises(ValueError, match="builtin:drawbench-mini"):
        load_prompts("builtin:nope")
    with pytest.raises(ValueError, match="unknown file type"):
        (tmp_path / "p.xml").write_text("<a/>")
        load_prompts(str(tmp_path / "p.xml"))


def test_txt_and_jsonl_runs_with_module_reward(tmp_path, monkeypatch):
    """A `module.path:function` reward, and dataset columns passed to it by name."""
    (tmp_path / "my_rewards.py").write_text(
        "SEEN = []\n"
        "def red(prompts, images, **columns):\n"
        "    SEEN.append(sorted(columns))\n"
        "    return images[:, 0].mean(dim=(1, 2)).tolist()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "p.jsonl").write_text(
        "\n".join(json.dumps({"caption": p, "tag": i}) for i, p in enumerate(["a cat", "a dog"]))
    )
    args = ["--reward_funcs", "my_rewards:red", "--dataset_name", str(tmp_path / "p.jsonl")]
    trainer = run(fast_args(tmp_path, *args, "--prompt_column", "caption"))
    import my_rewards

    assert trainer.state.global_step == 2 and my_rewards.SEEN and "tag" in my_rewards.SEEN[0]

    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    reward_file = f"{tmp_path / 'my_rewards.py'}:red"
    run(fast_args(tmp_path, "--reward_funcs", reward_file, "--dataset_name", str(tmp_path / "p.txt")))
    assert os.path.exists(tmp_path / "out" / "pytorch_lora_weights.safetensors")


def test_missing_column_is_a_clear_error(tmp_path):
    (tmp_path / "p.csv").write_text("caption\na cat\n")
    with pytest.raises(ValueError, match=r"no 'prompt' column.*\['caption'\].*--prompt_column"):
        main(fast_args(tmp_path, "--reward_funcs", "red_channel", "--dataset_name", str(tmp_path / "p.csv")))


def test_reward_errors():
    with pytest.raises(ValueError, match="Unknown reward 'nope'.*red_channel.*module.path:function"):
        resolve_reward_spec("nope")
    with pytest.raises(ValueError, match="cannot import module"):
        resolve_reward_spec("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute"):
        resolve_reward_spec("trl_visual.rewards:no_such_reward")
    assert callable(resolve_reward_spec("trl_visual.rewards.builtin:red_channel"))


def test_usage_and_unknown_command(capsys):
    assert main([]) == 2
    assert "grpo" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown command 'ppo'"):
        main(["ppo"])


@pytest.mark.parametrize(
    "command, name",
    [
        ("grpo", "tiny_quickstart.yaml"),
        ("grpo", "sd35_pickscore_grpo.yaml"),
        ("bpgo", "flux_hpsv2_bpgo.yaml"),
        ("vipo", "flux_hpsv2_vipo.yaml"),
        ("bpgo", "wan_video_bpgo.yaml"),
    ],
)
def test_example_configs_parse(command, name, tmp_path):
    """Every example YAML names only real fields (bf16 is switched off: this runs on a CPU)."""
    argv = [command, "--config", str(CONFIGS / name), "--bf16", "false", "--output_dir", str(tmp_path)]
    _, script_args, config, model_args = parse_args(argv)
    assert script_args.reward_funcs and model_args.model_name_or_path
    assert config.num_generations >= 2


def test_bpgo_command_runs(tmp_path):
    run(["bpgo", *FAST, "--output_dir", str(tmp_path / "out"), "--reward_funcs", "red_channel"])
    assert os.path.exists(tmp_path / "out" / "pytorch_lora_weights.safetensors")


def test_vipo_command_runs_with_tiny_backbone(tmp_path):
    argv = ["vipo", *FAST, "--output_dir", str(tmp_path / "out"), "--reward_funcs", "red_channel"]
    run([*argv, "--backbone", "tiny:dinov2"])
    assert os.path.exists(tmp_path / "out" / "pytorch_lora_weights.safetensors")
