"""The ``trl-visual`` command and the prompt-set loader, on the tiny offline SD3 pipeline."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trl_visual
from trl_visual.cli import help_cache_path, main, parse_args, render_help, run
from trl_visual.data import load_prompts
from trl_visual.rewards.spec import resolve_reward_spec

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


def test_reward_errors(tmp_path, monkeypatch):
    (tmp_path / "needs_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # the user's module exists but its own import fails: that error, and its traceback, reach the user
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        resolve_reward_spec("needs_dep:f")
    with pytest.raises(ValueError, match="Unknown reward 'nope'.*red_channel.*module.path:function"):
        resolve_reward_spec("nope")
    with pytest.raises(ValueError, match="cannot import module"):
        resolve_reward_spec("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="cannot import module 'trl_visual.no_such_module'"):
        resolve_reward_spec("trl_visual.no_such_module:f")
    with pytest.raises(ValueError, match="has no attribute"):
        resolve_reward_spec("trl_visual.rewards:no_such_reward")
    assert callable(resolve_reward_spec("trl_visual.rewards.builtin:red_channel"))


def test_usage(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "grpo" in out and "env" in out


def _cli_subprocess(args, cwd, cache, executable=(sys.executable, "-m", "trl_visual.cli")):
    env = {**os.environ, "TRL_VISUAL_CACHE": str(cache), "PYTHONWARNINGS": "default"}
    return subprocess.run([*executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_help_is_quiet_cached_and_equals_the_live_parser(tmp_path):
    """The first --help (the shipped text when it is current, else rendered from the real parser) is cached;
    later ones read the cache without importing torch. Neither prints a warning, and both print what the live
    parser renders now."""
    cold = _cli_subprocess(["grpo", "--help"], tmp_path, tmp_path / "cache")
    assert cold.returncode == 0 and cold.stderr == ""
    assert help_cache_path("grpo").name in os.listdir(tmp_path / "cache" / "help")
    warm_code = (
        "import sys; from trl_visual.cli import main; code = main(['grpo', '--help']); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; sys.exit(code)"
    )
    warm = _cli_subprocess(["-c", warm_code], tmp_path, tmp_path / "cache", executable=(sys.executable,))
    assert warm.returncode == 0 and warm.stderr == ""
    live = render_help("grpo")
    assert cold.stdout == warm.stdout == live
    # short: our fields and the common TrainingArguments ones; --help-all: every flag
    full = render_help("grpo", full=True)
    assert "--num_generations" in live and "--output_dir" in live and "--adam_beta1" not in live
    assert "--adam_beta1" in full and "--help-all" in live
    assert live.count("\n") < full.count(
        "\n"
    )  # (a half at transformers 5.25, whose TrainingArguments is larger)


def _shipped_or_skip(command):
    """The shipped help of ``command``; the test is skipped where it was made for other versions than the
    installed ones (the floors job, a newer transformers: there the help is rendered live, and still correct)."""
    from trl_visual.cli import SHIPPED_HELP_DIR, _rendering_versions

    shipped = json.loads((SHIPPED_HELP_DIR / f"{command}.json").read_text(encoding="utf-8"))
    if shipped["versions"] != _rendering_versions():
        pytest.skip(f"the shipped help was rendered for {shipped['versions']}, not {_rendering_versions()}")
    return shipped


@pytest.mark.parametrize("command", ["grpo", "bpgo", "vipo"])
def test_the_shipped_help_is_what_the_live_parser_renders(command):
    """``trl_visual/cli_help/<command>.json`` holds the help and the names the real parser gives now, made from
    the sources it records: a changed config field, default or help string fails here until it is made again."""
    from trl_visual.cli import COMMANDS, _import, _source_digest, make_parser, parser_names

    shipped = _shipped_or_skip(command)
    refresh = 'python -c "from trl_visual.cli import write_shipped_help; write_shipped_help()"'
    changed = [path for path, digest in shipped["sources"].items() if _source_digest(path) != digest]
    assert not changed, f"{changed} changed since the shipped help was made: run {refresh}"
    assert shipped["help"] == render_help(command), f"the shipped help is stale: run {refresh}"
    names = parser_names(make_parser(command, _import(COMMANDS[command][0])))
    assert shipped["names"] == sorted(names), f"the shipped names are stale: run {refresh}"


def test_a_first_help_and_a_first_typo_need_no_torch(tmp_path):
    """Right after an install (an empty cache): ``--help`` prints the shipped text, and a misspelt flag is one line
    naming the closest flag, both before torch or transformers is imported."""
    _shipped_or_skip("grpo")
    code = (
        "import sys; from trl_visual.cli import main; codes = (main(['grpo', '--help']), "
        "main(['grpo', '--learning_rat', '1e-4'])); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; print(codes)"
    )
    first = _cli_subprocess(["-c", code], tmp_path, tmp_path / "cache", executable=(sys.executable,))
    assert first.returncode == 0, first.stderr
    assert first.stdout.endswith("(0, 2)\n") and first.stdout.startswith(render_help("grpo"))
    assert "unknown flag --learning_rat (did you mean --learning_rate?)" in first.stderr


def test_a_shipped_help_from_other_sources_is_not_used(tmp_path, monkeypatch):
    """A shipped help whose recorded source bytes or versions differ from what runs now is ignored: the help is
    rendered from the real parser instead."""
    from trl_visual import cli

    shipped = json.loads((cli.SHIPPED_HELP_DIR / "grpo.json").read_text(encoding="utf-8"))
    monkeypatch.setattr(cli, "SHIPPED_HELP_DIR", tmp_path)
    monkeypatch.setenv("TRL_VISUAL_CACHE", str(tmp_path / "cache"))
    current = {**shipped, "versions": cli._rendering_versions(), "help": "shipped text\n"}
    current["sources"] = {path: cli._source_digest(path) for path in current["sources"]}
    (tmp_path / "grpo.json").write_text(json.dumps(current))
    assert cli.shipped_help("grpo")["help"] == "shipped text\n"
    edited = {**current, "sources": {**current["sources"], "cli.py": "0" * 64}}
    (tmp_path / "grpo.json").write_text(json.dumps(edited))
    assert cli.shipped_help("grpo") is None
    other = {**current, "versions": {**current["versions"], "transformers": "0.0.1"}}
    (tmp_path / "grpo.json").write_text(json.dumps(other))
    assert cli.shipped_help("grpo") is None
    assert cli.command_help("grpo") == render_help("grpo")


@pytest.mark.parametrize("command", ["grpo", "bpgo", "vipo"])
def test_full_help_lists_every_flag_of_the_parser(command):
    from trl_visual.cli import load_command, make_parser

    parser = make_parser(command, load_command(command)[0])
    full = render_help(command, full=True)
    flags = [action.option_strings[0] for action in parser._actions]
    missing = [flag for flag in flags if not re.search(re.escape(flag) + r"(?![\w-])", full)]
    assert not missing


def test_bpgo_help_lists_its_own_fields_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRL_VISUAL_CACHE", str(tmp_path))
    assert main(["bpgo", "--help"]) == 0
    text = capsys.readouterr().out
    assert (
        text.index("BPGOConfig fields")
        < text.index("--prior_source")
        < text.index("DiffusionGRPOConfig fields")
    )
    assert text.index("--num_generations") < text.index("transformers.TrainingArguments")


def test_env_lists_versions(capsys):
    import diffusers
    import torch
    import transformers

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"- PyTorch version: {torch.__version__.split('+')[0]}" in out
    assert f"- Transformers version: {transformers.__version__}" in out
    assert f"- Diffusers version: {diffusers.__version__}" in out
    assert f"- trl_visual version: {trl_visual.__version__}" in out
    assert "- Accelerator(s): " in out and "- Python version: " in out


def test_imports_are_lazy_and_public_paths_work(tmp_path):
    code = (
        "import sys, trl_visual, trl_visual.rewards as r\n"
        "assert 'transformers' not in sys.modules and 'trl_visual.rewards.clip_rewards' not in sys.modules\n"
        "assert 'pickscore' in r.REWARD_REGISTRY and 'trl_visual.rewards.clip_rewards' not in sys.modules\n"
        "from trl_visual.rewards import PickScoreReward\n"
        "assert r.REWARD_REGISTRY['pickscore'] is PickScoreReward\n"
        "from trl_visual import DiffusionGRPOTrainer, BPGOConfig\n"
    )
    result = _cli_subprocess(["-c", code], tmp_path, tmp_path / "cache", executable=(sys.executable,))
    assert result.returncode == 0, result.stderr
    assert "torchvision" not in result.stderr


def _user_error_cases(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("a cat\nun caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"\n')
    (tmp_path / "nulls.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": null}\n{"prompt": ""}\n')
    (tmp_path / "ints.csv").write_text("prompt\n1\n2\n")
    (tmp_path / "caption.csv").write_text("caption\na cat\n")
    (tmp_path / "good.txt").write_text("a cat\n")
    (tmp_path / "bad.yaml").write_text("max_steps: [1\n")
    data, reward = "--dataset_name", ["--reward_funcs", "red_channel"]
    return {
        "unknown command": (["ppo"], "unknown command 'ppo'"),
        "latin-1 file": ([*reward, data, str(tmp_path / "latin1.txt")], "latin1.txt' is not UTF-8.*line 2"),
        "empty file": ([*reward, data, str(tmp_path / "empty.txt")], "empty.txt' is empty"),
        "broken json line": (
            [*reward, data, str(tmp_path / "broken.jsonl")],
            "broken.jsonl', line 2: not valid",
        ),
        "null prompts": (
            [*reward, data, str(tmp_path / "nulls.jsonl")],
            r"row 1: None.*row 2: an empty string",
        ),
        "int prompts": ([*reward, data, str(tmp_path / "ints.csv")], r"row 0: 1 \(int\)"),
        "missing column": ([*reward, data, str(tmp_path / "caption.csv")], r"\['caption'\].*--prompt_column"),
        "missing file": ([*reward, data, "no_such_prompts.txt"], "No prompt file 'no_such_prompts.txt'"),
        "missing model folder": (
            [*reward, "--model_name_or_path", "./no_model"],
            "'./no_model': no such folder",
        ),
        "test split of a file": (
            [
                *reward,
                data,
                str(tmp_path / "good.txt"),
                *"--dataset_test_split test --eval_strategy steps".split(),
            ],
            "--dataset_test_split 'test'.*one split.*--eval_strategy no",
        ),
        "unknown reward": (["--reward_funcs", "nope"], "Unknown reward 'nope'.*red_channel"),
        "missing reward file": (["--reward_funcs", "nofile.py:f"], "no file 'nofile.py'"),
        "missing config": (["--config", str(tmp_path / "none.yaml")], "none.yaml"),
        "broken yaml": (["--config", str(tmp_path / "bad.yaml")], "flow sequence"),
        "config validation": ([*reward, "--num_generations", "3"], "divisible by `num_generations` \\(3\\)"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown command", "latin-1 file", "empty file", "broken json line", "null prompts", "int prompts",
        "missing column", "missing file", "missing model folder", "test split of a file", "unknown reward", "missing reward file",
        "missing config", "broken yaml", "config validation",
    ],
)  # fmt: skip
def test_user_errors_are_one_line_and_exit_2(case, tmp_path, capsys):
    args, culprit = _user_error_cases(tmp_path)[case]
    argv = args if case == "unknown command" else fast_args(tmp_path, *args)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trl-visual: error: ")
    assert re.search(culprit, err[0]), err[0]
    assert not (tmp_path / "out").exists()  # stopped before training wrote anything


def test_error_during_training_keeps_its_traceback(tmp_path):
    (tmp_path / "boom.py").write_text("def boom(prompts, images, **columns):\n    raise ValueError('boom')\n")
    with pytest.raises(RuntimeError, match="raised ValueError: boom"):  # not turned into exit status 2
        main(fast_args(tmp_path, "--reward_funcs", f"{tmp_path / 'boom.py'}:boom"))


def test_console_script_finds_reward_module_in_working_directory(tmp_path):
    """docs/cli.md: `--reward_funcs my_rewards:f` finds my_rewards.py in the working directory, with the
    installed `trl-visual` script too (whose sys.path does not start with the working directory)."""
    (tmp_path / "my_rewards.py").write_text(
        "open('imported.flag', 'w').close()\ndef f(prompts, images, **columns):\n    return [0.0] * len(prompts)\n"
    )
    (tmp_path / "empty.txt").write_text("")
    script = Path(sys.executable).parent / "trl-visual"
    args = ["grpo", "--model_name_or_path", "tiny:sd3", "--reward_funcs", "my_rewards:f"]
    result = _cli_subprocess([*args, "--dataset_name", "empty.txt"], tmp_path, tmp_path, executable=(script,))
    # the reward resolved (its module ran), then the prompt set's check stopped the run before any model loaded
    assert (tmp_path / "imported.flag").exists()
    assert result.returncode == 2 and "'empty.txt' is empty" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "command, name",
    [
        ("grpo", "tiny_quickstart.yaml"),
        ("grpo", "sd35_pickscore_grpo.yaml"),
        ("grpo", "shapes_grpo_lora.yaml"),
        ("bpgo", "flux_hpsv2_bpgo.yaml"),
        ("vipo", "flux_hpsv2_vipo.yaml"),
        ("bpgo", "wan_video_bpgo.yaml"),
        ("bpgo", "sd35_vlm_judge_bpgo.yaml"),
    ],
)
def test_example_configs_parse(command, name, tmp_path):
    """Every example YAML names only real fields (bf16 is switched off: this runs on a CPU), and its rewards
    resolve (a reward with arguments, written as a YAML mapping, becomes the configured object)."""
    argv = [command, "--config", str(CONFIGS / name), "--bf16", "false", "--output_dir", str(tmp_path)]
    _, script_args, config, model_args = parse_args(argv)
    assert script_args.reward_funcs and model_args.model_name_or_path
    assert config.num_generations >= 2
    if name == "sd35_vlm_judge_bpgo.yaml":  # the served judge is only built here: no request is sent
        judge = resolve_reward_spec(script_args.reward_funcs[0])
        assert judge.url == "http://localhost:8000/v1/chat/completions" and len(judge.templates) == 2
        assert judge.max_concurrency == 16 and config.ras_mode == "uncertainty"


def test_bpgo_command_runs(tmp_path, capsys):
    out = str(tmp_path / "out")
    run(["bpgo", *FAST, "--output_dir", out, "--reward_funcs", "red_channel"])
    assert os.path.exists(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert f"load the LoRA with pipe.load_lora_weights({out!r})" in capsys.readouterr().out


def test_full_fine_tuning_summary_names_the_loader_that_reads_what_was_saved(tmp_path, capsys):
    """Without LoRA (the tiny:shapes recipe trains the whole denoiser) the closing line must not send the user to
    load_lora_weights: it names DiffusionPipeline.from_pretrained on the output folder, and that call loads the
    pipeline with the trained weights."""
    from diffusers import DiffusionPipeline

    out = str(tmp_path / "out")
    trainer = run(
        ["grpo", *FAST, "--use_peft", "false", "--output_dir", out, "--reward_funcs", "red_channel"]
    )
    printed = capsys.readouterr().out
    assert f"load the fine-tuned pipeline with DiffusionPipeline.from_pretrained({out!r})" in printed
    assert "load_lora_weights" not in printed
    assert "reward: " in printed and "eval reward" not in printed  # no eval set, no eval line
    reloaded = DiffusionPipeline.from_pretrained(out).transformer
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[name].to(tensor.dtype)), name


def test_vipo_command_runs_with_tiny_backbone(tmp_path):
    argv = ["vipo", *FAST, "--output_dir", str(tmp_path / "out"), "--reward_funcs", "red_channel"]
    run([*argv, "--backbone", "tiny:dinov2"])
    assert os.path.exists(tmp_path / "out" / "pytorch_lora_weights.safetensors")


def test_tiny_shapes_run_prints_the_eval_reward_before_and_after_training(tmp_path, capsys):
    """tiny:shapes' defaults evaluate on builtin:shapes' test split at the start and at the end (also when
    max_steps is not a multiple of eval_steps); the summary prints both and their difference."""
    argv = "grpo --model_name_or_path tiny:shapes --max_steps 2 --per_device_train_batch_size 16".split()
    trainer = run([*argv, "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true"])
    evaluations = [entry for entry in trainer.state.log_history if "eval_reward" in entry]
    assert [entry["step"] for entry in evaluations] == [0, 2]
    before, after = evaluations[0]["eval_reward"], evaluations[-1]["eval_reward"]
    expected = f"eval reward (48 prompts × 4 fixed samples): {before:.3f} at step 0 -> {after:.3f} at step 2"
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("eval reward"))
    assert line == f"{expected} ({after - before:+.3f})"


@pytest.mark.parametrize("command", ["grpo", "bpgo"])
def test_tiny_shapes_defaults_evaluate_only_on_their_own_prompt_set(command, tmp_path):
    """The defaults evaluate on builtin:shapes' test split. Another prompt set (a user's one-split file,
    builtin:shapes-ambiguous), named by a flag or in the YAML, trains without an eval set instead of failing."""
    from trl_visual.cli import build_trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a {colour} circle\n" for colour in ("red", "green", "blue", "yellow") * 2))
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model_name_or_path: tiny:shapes\ndataset_name: builtin:shapes-ambiguous\n")
    base = [command, "--output_dir", str(tmp_path / "out")]
    for flags in (
        ["--model_name_or_path", "tiny:shapes", "--dataset_name", str(prompts)],
        ["--model_name_or_path", "tiny:shapes", "--dataset_name=builtin:shapes-ambiguous"],
        ["--config", str(yaml_file)],
    ):
        _, script_args, config, model_args = parse_args([*base, *flags])
        assert (
            script_args.dataset_test_split is None
            and config.eval_strategy == "no"
            and not config.eval_on_start
        )
        assert config.learning_rate == 2e-5  # the rest of the recipe still applies
        if flags[-1] == str(prompts):
            trainer = build_trainer(command, script_args, config, model_args)
            assert trainer.eval_dataset is None
    _, script_args, config, _ = parse_args([*base, "--model_name_or_path", "tiny:shapes"])
    assert script_args.dataset_test_split == "test" and config.eval_on_start


def test_bpgo_uncertainty_from_the_command_line_with_an_ensemble_and_judge_draws(tmp_path):
    """The interpretation sources from the CLI: two rewards as an ensemble (`--reward_ensemble`), and a judge with 4
    draws named as `file.py:judge`; both train the uncertainty RAS against base-model priors."""
    ensemble = run(
        ["bpgo", *FAST, "--output_dir", str(tmp_path / "ensemble"), "--reward_funcs", "red_channel",
         "jpeg_compressibility", "--reward_ensemble", "true", "--ras_mode", "uncertainty", "--prior_source",
         "base_model", "--prior_num_rollouts", "2", "--ras_consistency", "true"]
    )  # fmt: skip
    history = ensemble.state.log_history
    assert ensemble.args.reward_ensemble and any("interpretation_var_mean" in entry for entry in history)
    example = Path(__file__).resolve().parent.parent / "examples" / "train_bpgo_uncertainty.py"
    judged = run(
        ["bpgo", *FAST, "--model_name_or_path", "tiny:shapes", "--height", "16", "--width", "16",
         "--dataset_name", "builtin:shapes-ambiguous", "--use_peft", "false", "--output_dir",
         str(tmp_path / "judge"), "--reward_funcs", f"{example}:judge", "--ras_mode", "uncertainty",
         "--prior_source", "base_model", "--prior_num_rollouts", "2"]
    )  # fmt: skip
    shares = [
        entry["ambiguity_share_mean"] for entry in judged.state.log_history if "ambiguity_share_mean" in entry
    ]
    assert shares and all(0 <= share <= 1 for share in shares)
