"""The ``trl-visual`` command: ``trl-visual grpo|bpgo|vipo [--config file.yaml] [--flag value ...]``.

Arguments are parsed with :class:`trl.TrlParser`, as TRL's own command line does: a YAML file given
with ``--config`` sets the values, and flags on the command line override them. Three groups of
arguments are accepted (see ``trl-visual grpo --help``):

* :class:`ScriptArguments`: the prompt set (``--dataset_name``, ``--dataset_config``, ``--dataset_split``)
  and the rewards (``--reward_funcs``: registered names such as ``pickscore``, or ``module.path:function``);
* :class:`ModelArguments`: ``--model_name_or_path`` (a Hub id, a local folder, or ``tiny:sd3``), the
  loading dtype and revision, and the LoRA flags (``--use_peft``, ``--lora_r``, ``--lora_alpha``,
  ``--lora_dropout``, ``--lora_target_modules``) under TRL's names;
* every field of the method's config (:class:`~trl_visual.DiffusionGRPOConfig`, ``BPGOConfig`` or
  ``ViPOConfig``, all of ``transformers.TrainingArguments`` included): ``--prompt_column``,
  ``--num_generations``, ``--learning_rate``, ``--reward_weights``, ``--push_to_hub``, …

Example::

    trl-visual grpo --config examples/configs/tiny_quickstart.yaml
    trl-visual grpo --config examples/configs/tiny_quickstart.yaml --max_steps 10 --output_dir short-run
    trl-visual bpgo --model_name_or_path tiny:sd3 --reward_funcs red_channel --max_steps 20 --output_dir out

The run trains, then saves the result in ``output_dir`` (the LoRA as
``pytorch_lora_weights.safetensors``, loadable with ``pipe.load_lora_weights(output_dir)``), and pushes
it to the Hub when ``push_to_hub`` is set. In Python, :func:`main` takes the argument list
(``main(["grpo", "--config", "run.yaml"])``).

``trl-visual grpo --help`` lists the method's own flags, grouped, and the common ``TrainingArguments``
ones; ``--help-all`` lists every flag. Both texts are rendered from the real parser once per installed
version and source of the configs, then read from a cache file, so help needs neither torch nor
transformers; the ``--help`` text is also shipped for the versions CI tests (:func:`shipped_help`), so even the
first call after an install needs neither. ``trl-visual env`` prints the versions to paste into a bug report.

A mistake in the arguments, the YAML file, the prompt set or a reward spec (a ``ValueError``,
``TypeError`` or missing file raised before training starts) is printed as one line,
``trl-visual: error: <message>``, with exit status 2; an error raised during training keeps its traceback.

``--accelerate_config NAME|PATH`` (a shipped config: ``multi_gpu``, ``fsdp``, ``zero2``, ``zero3``, or an
``accelerate config`` file) and the launch flags ``--num_processes``, ``--num_machines``, ``--machine_rank``,
``--main_process_ip``, … re-launch the command through ``accelerate launch`` (:mod:`trl_visual.launcher`)::

    trl-visual grpo --accelerate_config zero2 --num_processes 4 --config examples/configs/sd35_pickscore_grpo.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__
from .launcher import (
    ACCELERATE_CONFIG_FLAG,
    LAUNCH_FLAGS,
    accelerate_launch_args,
    flag_or_config_value,
    run_accelerate_launch,
    wants_launch,
    with_yaml_accelerate_config,
)
from .miniature import MINIATURE_MODELS
from .preflight import cached_names, names_cache_path, preflight, unknown_names_message, write_names

COMMANDS: dict[str, tuple[str, str, str]] = {
    "grpo": (
        "trl_visual.trainer.diffusion_grpo_config:DiffusionGRPOConfig",
        "trl_visual.trainer.diffusion_grpo_trainer:DiffusionGRPOTrainer",
        "GRPO for flow-matching diffusion models (Flow-GRPO / DanceGRPO style).",
    ),
    "bpgo": (
        "trl_visual.trainer.bpgo_config:BPGOConfig",
        "trl_visual.trainer.bpgo_trainer:BPGOTrainer",
        "BPGO: GRPO with a per-prompt prior reward (reliability-adaptive scaling, contrastive rewards).",
    ),
    "vipo": (
        "trl_visual.trainer.vipo_config:ViPOConfig",
        "trl_visual.trainer.vipo_trainer:ViPOTrainer",
        "ViPO: GRPO whose advantage is a perceptual map over latent positions.",
    ),
}
"""Sub-command → (config class, trainer class, one-line description). Classes are imported on use only,
so one method's missing or broken module never stops the others."""

DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
"""Attention projections, named alike in diffusers' SD3, FLUX and Wan transformers."""


@dataclass
class ScriptArguments:
    """Where the prompts come from and how samples are scored."""

    reward_funcs: list[str] = field(
        metadata={
            "help": "Reward functions: registered names (red_channel, jpeg_compressibility, pickscore, hpsv2, "
            "clipscore, aesthetic, clipscore_video, …) or 'module.path:function' / 'path/to/file.py:function' "
            "for your own (a class there is instantiated with no arguments). Weights: --reward_weights."
        },
    )
    dataset_name: str = field(
        default="builtin:drawbench-mini",
        metadata={
            "help": "Prompt set: a Hub data set id, a local folder, a .txt (one prompt per line), .json/.jsonl, "
            ".csv/.tsv or .parquet file, or a built-in list ('builtin:drawbench-mini', 48 prompts)."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of the Hub data set, if it has several."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None,
        metadata={
            "help": "Split of the same data set to evaluate on, when --eval_strategy is not 'no' (--eval_strategy "
            "no turns evaluation off, --eval_on_start included)."
        },
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "The engine, for YAML configs: a shipped accelerate config (multi_gpu, fsdp, zero2, zero3) or "
            "an accelerate config file; the run is launched through `accelerate launch`, as with the "
            "--accelerate_config flag (which wins over this key)."
        },
    )
    torch_num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads for torch (torch.set_num_threads); torch's default when unset. The tiny "
            "offline models run several times faster on 1 thread."
        },
    )


@dataclass
class ModelArguments:
    """The model to train and its LoRA adapter.

    The names are those of TRL's ``ModelConfig``, so a TRL user's YAML keys carry over. ``ModelConfig``
    itself is not reused: its quantization, ``attn_implementation`` and ``lora_task_type`` options mean
    nothing for a diffusers pipeline, and it turns a single ``--lora_target_modules`` value into a string,
    which ``peft`` reads as a regular expression over full module names.
    """

    model_name_or_path: str = field(
        metadata={
            "help": "Diffusers pipeline to train: a Hub id (stabilityai/stable-diffusion-3.5-medium), a local "
            "folder, or a built-in tiny offline model ('tiny:sd3')."
        },
    )
    model_revision: str | None = field(
        default=None, metadata={"help": "Branch, tag or commit of the Hub model."}
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Dtype to load the pipeline in (sets model_init_kwargs['torch_dtype']); the checkpoint's "
            "own when unset.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    use_peft: bool = field(
        default=False,
        metadata={
            "help": "Train a LoRA adapter on the denoiser (saved in diffusers' LoRA format) instead of all of "
            "its weights."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={
            "help": "Module names that get a LoRA (suffixes of the denoiser's module names). Default: the "
            "attention projections to_q to_k to_v to_out.0."
        },
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilized LoRA (scale alpha / √r)."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})

    def __post_init__(self) -> None:
        """The LoRA flags are checked as they are parsed, before anything is loaded or written."""
        if self.use_peft:
            from .trainer.setup_checks import check_lora_config

            check_lora_config(self.lora_config())

    def lora_config(self) -> Any:
        """The ``peft.LoraConfig`` these flags describe, or ``None`` without ``--use_peft``."""
        if not self.use_peft:
            return None
        from peft import LoraConfig

        targets = self.lora_target_modules
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=[targets] if isinstance(targets, str) else list(targets),
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
        )

    def model_init_kwargs(self, existing: dict[str, Any] | None) -> dict[str, Any] | None:
        """``model_init_kwargs`` with ``--dtype`` and ``--model_revision`` added (a conflict is an error)."""
        kwargs = dict(existing or {})
        for key, value in (("torch_dtype", self.dtype), ("revision", self.model_revision)):
            if value is None:
                continue
            if key in kwargs and kwargs[key] != value:
                flag = "--dtype" if key == "torch_dtype" else "--model_revision"
                raise ValueError(
                    f"{flag} {value!r} disagrees with model_init_kwargs[{key!r}] = {kwargs[key]!r}; set one of them."
                )
            kwargs[key] = value
        return kwargs or existing


def _import(path: str) -> Any:
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


class UsageError(ValueError):
    """A mistake on the command line that :func:`main` reports as one line with exit status 2."""


def _check_command(command: str) -> None:
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)} (or env).")


def load_command(command: str) -> tuple[type, type]:
    """The (config class, trainer class) of a sub-command, imported now.

    Raises:
        UsageError: unknown command.
        SystemExit: a method whose module this installation lacks.
    """
    _check_command(command)
    config_path, trainer_path, _ = COMMANDS[command]
    try:
        return _import(config_path), _import(trainer_path)
    except (ModuleNotFoundError, AttributeError) as error:
        raise SystemExit(
            f"trl-visual {command}: this installation of trl_visual has no {command} trainer ({error})."
        ) from error


def make_parser(command: str, config_class: type) -> Any:
    """A :class:`trl.TrlParser` over the script, config and model arguments of ``command``, whose YAML values are
    checked as flags are (:func:`_checked_parser_class`)."""
    return _checked_parser_class()(
        dataclass_types=[ScriptArguments, config_class, ModelArguments],
        prog=f"trl-visual {command}",
        description=COMMANDS[command][2] + " Values come from --config file.yaml, then from the flags.",
    )


def parser_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every name the parser accepts, as a YAML key or a flag without its dashes (``--no_x`` twins included), plus
    the command line's own (``config``, the launch flags)."""
    names = {action.dest for action in parser._actions}
    names |= {
        option[2:]
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    }
    return (
        names
        | {"config", FULL_HELP_FLAG[2:], ACCELERATE_CONFIG_FLAG[2:]}
        | {flag[2:] for flag in LAUNCH_FLAGS}
    )


def yaml_value(action: argparse.Action, value: Any) -> Any:
    """A YAML value for ``action``, as the flag would give it: a single string where a list is expected becomes a
    one-element list (``reward_funcs: red_channel``), a reward given as a mapping (``{vlm_judge: {batch_size: 8}}``)
    becomes its spec string (``vlm_judge(batch_size=8)``); a float for an integer field is refused (argparse converts
    only strings, so ``max_steps: 2.7`` would otherwise reach the trainer as a float)."""
    if action.nargs in ("+", "*") and isinstance(value, str | dict):
        value = [value]
    if action.dest.endswith("reward_funcs") and isinstance(value, list):
        from .rewards.arguments import reward_entry_spec

        try:  # {vlm_judge: {batch_size: 8}} -> "vlm_judge(batch_size=8)"
            value = [reward_entry_spec(entry) for entry in value]
        except ValueError as error:
            raise UsageError(f"`{action.dest}` in the YAML config: {error}") from None
    if action.nargs in ("+", "*"):
        return value
    if action.type is int and isinstance(value, float):
        whole = f" Write {int(value)}." if value.is_integer() else ""
        raise UsageError(f"`{action.dest}` must be a whole number; got {value!r} in the YAML config.{whole}")
    return value


def _checked_parser_class() -> type:
    """:class:`trl.TrlParser` with one-line errors: unknown YAML keys and flags name the closest field, and YAML
    values are checked by :func:`yaml_value`."""
    from trl import TrlParser

    class CheckedParser(TrlParser):
        def set_defaults_with_config(self, **kwargs: Any) -> list[str]:
            actions = {action.dest: action for action in self._actions}
            unknown = [key for key in kwargs if key not in actions]
            if unknown:
                raise UsageError(unknown_names_message(unknown, parser_names(self), "YAML key"))
            return super().set_defaults_with_config(
                **{k: yaml_value(actions[k], v) for k, v in kwargs.items()}
            )

        def parse_args_into_dataclasses(self, args: Any = None, **kwargs: Any) -> Any:
            _, remaining = self.parse_known_args(args=args)
            flags = [token[2:].partition("=")[0] for token in remaining if token.startswith("--")]
            if flags:
                raise UsageError(unknown_names_message(flags, parser_names(self), "flag"))
            return super().parse_args_into_dataclasses(args=args, **kwargs)

    return CheckedParser


EVALUATION_SETTINGS = (
    "dataset_test_split",
    "eval_strategy",
    "eval_steps",
    "eval_on_start",
    "per_device_eval_batch_size",
)
"""Model defaults that evaluate on the test split of the defaults' own prompt set: dropped when the run trains
on another prompt set, which may have no such split (its own evaluation is asked for with these flags)."""


def model_defaults(command: str, flags: Sequence[str]) -> dict[str, Any]:
    """The ``command``'s training defaults for the model the flags name, or ``{}``: a model whose settings differ
    from the configs' defaults brings them (the pretrained miniature world learns with other steps than a LoRA on
    SD3.5: :data:`trl_visual.miniature.MINIATURE_MODELS`); a ``--config`` YAML file and the flags override them.
    Without their :data:`EVALUATION_SETTINGS` when the flags or the YAML name another ``dataset_name``."""
    name = flag_or_config_value(flags, "model_name_or_path")
    if name not in MINIATURE_MODELS:
        return {}
    defaults = dict(MINIATURE_MODELS[name].method_defaults().get(command, {}))
    dataset = flag_or_config_value(flags, "dataset_name")
    if dataset is not None and dataset != defaults.get("dataset_name"):
        defaults = {key: value for key, value in defaults.items() if key not in EVALUATION_SETTINGS}
    return defaults


def parse_args(argv: Sequence[str]) -> tuple[str, ScriptArguments, Any, ModelArguments]:
    """Parse ``[command, *flags]`` into the command and its three argument objects: the model's own defaults
    (:func:`model_defaults`), then the ``--config`` file, then the flags."""
    command, *rest = argv
    config_class, _ = load_command(command)
    parser = make_parser(command, config_class)
    names_path = names_cache_path(help_cache_path(command))
    if cached_names(names_path) is None:
        write_names(names_path, parser_names(parser))  # so that the next run checks names before importing
    parser.set_defaults_with_config(**model_defaults(command, rest))
    script_args, config, model_args = parser.parse_args_and_config(rest)
    return command, script_args, config, model_args


def check_before_importing(argv: Sequence[str]) -> None:
    """:func:`trl_visual.preflight.preflight` on ``[command, *flags]``: names (when a previous run cached them, or
    the shipped help is current), the prompt set, the output folder and the trackers, before torch or the trainer
    is imported."""
    _check_command(argv[0])
    names = cached_names(names_cache_path(help_cache_path(argv[0])))
    if names is None:
        shipped = shipped_help(argv[0])
        names = None if shipped is None else set(shipped["names"])
    preflight(argv, names, {})


def _check_local_model(name: str) -> None:
    """A path (``./``, ``../``, ``/``, ``~``) that is not a folder is a typo, not a Hub id to look up."""
    if name.startswith(("./", "../", "/", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise FileNotFoundError(
            f"--model_name_or_path {name!r}: no such folder. A local model is a diffusers pipeline folder (with "
            "model_index.json); a Hub model is an id such as 'stabilityai/stable-diffusion-3.5-medium'."
        )


def build_trainer(command: str, script_args: ScriptArguments, config: Any, model_args: ModelArguments) -> Any:
    """Load the prompts, resolve the rewards and build the trainer of ``command`` (no training yet)."""
    from .data import is_single_split, load_prompts
    from .rewards.spec import resolve_reward_spec

    _, trainer_class = load_command(command)
    _check_local_model(model_args.model_name_or_path)
    evaluating = config.eval_strategy != "no"
    config.eval_on_start = config.eval_on_start and evaluating  # --eval_strategy no: no evaluation at all
    test_split = script_args.dataset_test_split if evaluating else None
    if test_split is not None and is_single_split(script_args.dataset_name):
        raise UsageError(
            f"--dataset_test_split {test_split!r}: {script_args.dataset_name!r} has one split, 'train'. Drop "
            "--dataset_test_split (or pass --eval_strategy no to train without evaluating), or point "
            "--dataset_name at a folder or Hub data set with that split."
        )
    rewards = [resolve_reward_spec(spec) for spec in script_args.reward_funcs]
    train_dataset = load_prompts(
        script_args.dataset_name, script_args.dataset_config, script_args.dataset_split, config.prompt_column
    )
    eval_dataset = None
    if test_split is not None:
        eval_dataset = load_prompts(
            script_args.dataset_name,
            script_args.dataset_config,
            test_split,
            config.prompt_column,
        )
    config.model_init_kwargs = model_args.model_init_kwargs(config.model_init_kwargs)
    return trainer_class(
        model=model_args.model_name_or_path,
        reward_funcs=rewards,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=model_args.lora_config(),
    )


def _resume_value(value: Any) -> str | bool | None:
    """``--resume_from_checkpoint true`` (or YAML ``true``) means the last checkpoint in output_dir."""
    if isinstance(value, str) and value.lower() in ("true", "yes", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", ""):
        return None
    return value


def prepare(argv: Sequence[str]) -> Any:
    """Parse ``[command, *flags]`` and build the trainer (prompts loaded, rewards resolved, model loaded)."""
    command, script_args, config, model_args = parse_args(argv)
    if script_args.torch_num_threads is not None:
        import torch

        torch.set_num_threads(script_args.torch_num_threads)
    return build_trainer(command, script_args, config, model_args)


def train(trainer: Any) -> Any:
    """Train, save to ``output_dir`` (and push when ``push_to_hub``), print the summary; return the trainer."""
    config = trainer.args
    trainer.train(resume_from_checkpoint=_resume_value(config.resume_from_checkpoint))
    try:
        trainer.save_model(config.output_dir)  # pushes to the Hub too when push_to_hub is set
    finally:  # a failed push comes after the local save: the summary still says where the weights are
        if trainer.is_world_process_zero():
            print(_summary(trainer, config.output_dir))
    return trainer


def run(argv: Sequence[str]) -> Any:
    """Parse ``[command, *flags]``, train, save to ``output_dir`` (and push when ``push_to_hub``); return
    the trainer."""
    return train(prepare(argv))


def _summary(trainer: Any, output_dir: str) -> str:
    """Training reward at the start and the end of the run, the evaluation reward at the first and the last
    evaluation (when the run has an eval set), and where the weights are."""
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    lines = []
    if rewards:
        window = max(1, min(5, len(rewards) // 2))
        first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
        lines.append(f"reward: {first:.4f} (mean of the first {window} logs) -> {last:.4f} (last {window})")
    evaluations = [entry for entry in trainer.state.log_history if "eval_reward" in entry]
    if evaluations:
        lines.append(_eval_line(evaluations, trainer.eval_dataset, trainer.args.prompt_column))
    lines.append(f"saved to {output_dir} ({_loading_hint(trainer, output_dir)})")
    return "\n".join(lines)


def _eval_line(evaluations: list[dict[str, float]], eval_dataset: Any, prompt_column: str) -> str:
    """``eval reward (48 prompts × 4 fixed samples): 0.737 at step 0 -> 0.778 at step 24 (+0.041)``: the first and
    the last logged ``eval_reward``. Evaluation samples deterministically from the same noise every time, so
    the difference is the training's effect, not a draw of prompts or noise."""
    first, last = evaluations[0], evaluations[-1]
    size = _eval_set_size(eval_dataset, prompt_column)
    text = f"eval reward ({size}): {first['eval_reward']:.3f} at step {first['step']}"
    if len(evaluations) > 1:
        gain = last["eval_reward"] - first["eval_reward"]
        text += f" -> {last['eval_reward']:.3f} at step {last['step']} ({gain:+.3f})"
    return text


def _eval_set_size(eval_dataset: Any, prompt_column: str) -> str:
    """``48 prompts × 4 fixed samples`` (one sample per row), or ``192 fixed samples of 50 prompts``."""
    prompts = eval_dataset[prompt_column] if eval_dataset is not None else []
    counts = set(Counter(prompts).values())
    if len(counts) == 1:
        per_prompt = counts.pop()
        return f"{len(set(prompts))} prompts × {per_prompt} fixed sample{'s' if per_prompt > 1 else ''}"
    return f"{len(prompts)} fixed samples of {len(set(prompts))} prompts"


def _loading_hint(trainer: Any, output_dir: str) -> str:
    """How to load what :meth:`save_model` wrote: a LoRA into the pipeline, or the fine-tuned pipeline."""
    if trainer.is_peft:
        return f"load the LoRA with pipe.load_lora_weights({output_dir!r})"
    return f"load the fine-tuned pipeline with DiffusionPipeline.from_pretrained({output_dir!r})"


# ----------------------------------------------------------------------------------------------------
# Help: rendered from the real parser, cached per version of the code that shapes it
# ----------------------------------------------------------------------------------------------------
HELP_FLAGS = ("-h", "--help")
FULL_HELP_FLAG = "--help-all"
HELP_WIDTH = 100
"""Help is rendered at a fixed width, so the cached text does not depend on the terminal it was made in."""

COMMON_TRAINING_FIELDS = (
    "output_dir",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "bf16",
    "activation_checkpointing",
    "logging_steps",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "eval_strategy",
    "eval_steps",
    "report_to",
    "run_name",
    "seed",
    "resume_from_checkpoint",
    "push_to_hub",
    "hub_model_id",
    "hub_private_repo",
)
"""The ``TrainingArguments`` fields that the short ``--help`` lists; ``--help-all`` lists all of them."""


def _own_field_groups(config_class: type) -> list[tuple[str, list[str]]]:
    """(class name, fields it declares) for the config and its bases up to ``TrainingArguments``: the
    method's own fields (and the ``TrainingArguments`` defaults it changes), most specific class first."""
    groups = []
    for cls in config_class.__mro__:
        if cls.__name__ == "TrainingArguments" or not dataclasses.is_dataclass(cls):
            break
        declared = [
            name for name in cls.__dict__.get("__annotations__", {}) if name in cls.__dataclass_fields__
        ]
        if declared:
            groups.append((cls.__name__, declared))
    return groups


def _actions_for(parser: argparse.ArgumentParser, names: Iterable[str]) -> list[argparse.Action]:
    """The parser's actions for the fields ``names``, in that order (a bool field may have a ``--no_`` twin)."""
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        by_dest.setdefault(action.dest, []).append(action)
    return [action for name in names for action in by_dest.get(name, [])]


def render_help(command: str, full: bool = False) -> str:
    """The help of ``trl-visual <command>``, rendered from the :class:`trl.TrlParser` that parses real runs.

    Sections: prompts and rewards, model and LoRA, the method's own config fields (one section per config
    class), then the common ``TrainingArguments`` fields, or all of them when ``full``.
    """
    _check_command(command)
    config_class = _import(COMMANDS[command][0])  # the config alone: the trainer is not needed to list flags
    parser = make_parser(command, config_class)
    write_names(
        names_cache_path(help_cache_path(command)), parser_names(parser)
    )  # for the checks of later runs
    formatter = parser.formatter_class(prog=parser.prog, width=HELP_WIDTH)
    formatter.add_usage(f"trl-visual {command} [--config FILE.yaml] [--flag VALUE ...]", [], [])
    formatter.add_text(parser.description)
    own = {name for _, names in _own_field_groups(config_class) for name in names}
    sections = [
        ("prompts and rewards", [f.name for f in dataclasses.fields(ScriptArguments)]),
        ("model and LoRA (TRL's ModelConfig names)", [f.name for f in dataclasses.fields(ModelArguments)]),
        *((f"{name} fields", names) for name, names in _own_field_groups(config_class)),
    ]
    inherited = [f.name for f in dataclasses.fields(config_class) if f.name not in own]
    shown = inherited if full else [name for name in COMMON_TRAINING_FIELDS if name in inherited]
    sections.append(("transformers.TrainingArguments" + ("" if full else " (common)"), shown))
    sections.append(("help", ["help"]))
    for title, names in sections:
        formatter.start_section(title)
        formatter.add_arguments(_actions_for(parser, names))
        formatter.end_section()
    if full:
        epilog = "YAML keys are these flags without the dashes."
    else:
        epilog = (
            f"{len(inherited) - len(shown)} more TrainingArguments flags are accepted: "
            f"trl-visual {command} --help-all lists them. YAML keys are the flags without the dashes."
        )
    formatter.add_text(epilog + " Docs: docs/cli.md.")
    return formatter.format_help()


def _help_cache_key() -> str:
    """Changes with whatever shapes the help: Python (argparse's layout), the installed transformers and trl,
    and the bytes of this package's sources (an edited checkout never shows stale help; reading them takes
    a few milliseconds)."""
    digest = hashlib.sha256(f"python {sys.version_info[:2]};".encode())
    for package in ("transformers", "trl"):
        digest.update(f"{package}=={importlib.metadata.version(package)};".encode())
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def help_cache_path(command: str, full: bool = False) -> Path:
    """Where the rendered help is kept: ``$TRL_VISUAL_CACHE`` or ``$XDG_CACHE_HOME/trl_visual`` (default
    ``~/.cache/trl_visual``), one file per command, variant and :func:`_help_cache_key`."""
    root = os.environ.get("TRL_VISUAL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "trl_visual"
    )
    variant = "-all" if full else ""
    return Path(root) / "help" / f"{command}{variant}-{_help_cache_key()}.txt"


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8") as file:
        file.write(text)
    os.chmod(file.name, 0o644)  # a temporary file is private (0600); the text is not
    os.replace(file.name, path)


PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_HELP_DIR = PACKAGE_DIR / "cli_help"
"""Each command's ``--help`` text and accepted names, rendered for the Python, transformers and trl versions CI
tests and shipped with the package (:func:`write_shipped_help`), so that the first ``trl-visual grpo --help``
after an install, and the first run's name checks, need neither torch nor transformers."""


def _rendering_versions() -> dict[str, str]:
    """What shapes a rendered help besides our sources: Python's minor version (argparse's layout), transformers
    (``TrainingArguments``) and trl (``TrlParser``)."""
    versions = {package: importlib.metadata.version(package) for package in ("transformers", "trl")}
    return {"python": "{}.{}".format(*sys.version_info[:2]), **versions}


def _source_digest(relative: str) -> str:
    return hashlib.sha256((PACKAGE_DIR / relative).read_bytes()).hexdigest()


def shipped_help(command: str) -> dict[str, Any] | None:
    """The shipped help of ``command`` (``{"help", "names", "versions", "sources"}``) when it was rendered from
    what runs now: the same :func:`_rendering_versions`, and the same bytes of every module of ours the rendering
    imported. ``None`` otherwise (then the help is rendered from the real parser)."""
    try:
        shipped = json.loads((SHIPPED_HELP_DIR / f"{command}.json").read_text(encoding="utf-8"))
        sources_match = all(_source_digest(path) == digest for path, digest in shipped["sources"].items())
        current = shipped["versions"] == _rendering_versions() and sources_match
    except (OSError, ValueError, KeyError):
        return None
    return shipped if current else None


def write_shipped_help() -> None:
    """Render every command's ``--help`` from the real parser and write it, with the accepted names, the versions
    and the digests of the modules of ours the rendering imported, to ``trl_visual/cli_help/<command>.json``.
    Run after changing a config field or upgrading transformers or trl (``tests/test_cli_help.py`` says when)::

        python -c "from trl_visual.cli import write_shipped_help; write_shipped_help()"
    """
    rendered = {command: render_help(command) for command in COMMANDS}
    ours = sorted(
        Path(module.__file__).resolve().relative_to(PACKAGE_DIR).as_posix()
        for module in list(sys.modules.values())
        if _is_ours(module)
    )
    sources = {path: _source_digest(path) for path in ours}
    SHIPPED_HELP_DIR.mkdir(exist_ok=True)
    for command, text in rendered.items():
        names = sorted(parser_names(make_parser(command, _import(COMMANDS[command][0]))))
        shipped = {"versions": _rendering_versions(), "sources": sources, "help": text, "names": names}
        _write_atomically(SHIPPED_HELP_DIR / f"{command}.json", json.dumps(shipped, indent=1) + "\n")


def _is_ours(module: Any) -> bool:
    """A module of this package loaded from a file under it."""
    path = getattr(module, "__file__", None)
    return bool(path) and Path(path).resolve().is_relative_to(PACKAGE_DIR)


def command_help(command: str, full: bool = False) -> str:
    """The help text of ``command``: from the cache, else the shipped text when it is current
    (:func:`shipped_help`, not for ``--help-all``), else rendered with :func:`render_help`; then cached (a cache
    that cannot be written is skipped)."""
    _check_command(command)
    path = help_cache_path(command, full)
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        pass
    shipped = None if full else shipped_help(command)
    if shipped is not None:
        write_names(names_cache_path(path), shipped["names"])
    text = render_help(command, full) if shipped is None else shipped["help"]
    try:
        _write_atomically(path, text)
    except OSError:
        pass
    return text


# ----------------------------------------------------------------------------------------------------
# trl-visual env
# ----------------------------------------------------------------------------------------------------
ENV_PACKAGES = (
    ("accelerate", "Accelerate"),
    ("diffusers", "Diffusers"),
    ("transformers", "Transformers"),
    ("trl", "TRL"),
    ("peft", "PEFT"),
    ("datasets", "Datasets"),
    ("huggingface_hub", "HF Hub"),
    ("safetensors", "safetensors"),
)
OPTIONAL_ENV_PACKAGES = (
    ("bitsandbytes", "bitsandbytes"),
    ("deepspeed", "DeepSpeed"),
    ("wandb", "wandb"),
    ("tensorboard", "TensorBoard"),
    ("trackio", "trackio"),
    ("open_clip_torch", "open_clip"),
    ("torchvision", "torchvision"),
)
"""Listed by ``trl-visual env`` only when installed."""


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _accelerators() -> str:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        backend = f"HIP {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        return f"{', '.join(names)} ({backend})"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return f"{torch.xpu.device_count()} XPU device(s)"
    if torch.backends.mps.is_available():
        return "Apple MPS"
    return (
        f"none (CPU only; torch built with CUDA {torch.version.cuda})"
        if torch.version.cuda
        else "none (CPU only)"
    )


def env_report() -> str:
    """Versions of the platform, Python, torch (and the accelerators it sees), the Hugging Face libraries and
    trl_visual, as ``- name: value`` lines to paste into a bug report."""
    rows = [
        ("Platform", platform.platform()),
        ("Python version", platform.python_version()),
        ("PyTorch version", _installed_version("torch") or "not installed"),
        ("Accelerator(s)", _accelerators()),
    ]
    rows += [
        (f"{label} version", _installed_version(name) or "not installed") for name, label in ENV_PACKAGES
    ]
    rows += [
        (f"{label} version", version)
        for name, label in OPTIONAL_ENV_PACKAGES
        if (version := _installed_version(name))
    ]
    rows.append(("trl_visual version", __version__))
    lines = ["Copy-paste the following information when reporting an issue:", ""]
    lines += [f"- {label}: {value}" for label, value in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------
def _usage() -> str:
    lines = ["usage: trl-visual {" + ",".join(COMMANDS) + ",env} [--config file.yaml] [--flag value ...]", ""]
    lines += [f"  {name:<6} {description}" for name, (_, _, description) in COMMANDS.items()]
    lines += [
        f"  {'env':<6} Versions of Python, torch, CUDA and the Hugging Face libraries, for bug reports."
    ]
    lines += [
        "",
        "Flags of one command: trl-visual grpo --help (all of them: --help-all). Docs: docs/cli.md.",
        "Several GPUs: add --accelerate_config multi_gpu|fsdp|zero2|zero3|FILE [--num_processes N]. Docs: "
        "docs/distributed.md.",
    ]
    return "\n".join(lines)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input when raised before training starts: printed as one line."""
    import yaml

    errors = [ValueError, TypeError, FileNotFoundError, IsADirectoryError, yaml.YAMLError]
    model_card = sys.modules.get("trl_visual.trainer.model_card")  # only raised once it is imported
    return (*errors, *([model_card.HubRepositoryError] if model_card else []))


def _fail(error: BaseException, status: int = 2) -> int:
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"trl-visual: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trl-visual``; ``argv`` defaults to ``sys.argv[1:]``. Returns the exit status: 0, 2 for
    bad input (one ``trl-visual: error:`` line on stderr), or 1 when the run trained and saved but the push to the
    Hub failed (one line too). Any other error during training propagates."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in HELP_FLAGS:
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"trl_visual {__version__}")
        return 0
    if argv[0] == "env":
        print(env_report())
        return 0
    try:
        if FULL_HELP_FLAG in argv[1:] or any(flag in argv[1:] for flag in HELP_FLAGS):
            print(command_help(argv[0], full=FULL_HELP_FLAG in argv[1:]), end="")
            return 0
        argv = [argv[0], *with_yaml_accelerate_config(argv[1:])]  # the YAML key acts as the flag
        check_before_importing(argv)
        launching = wants_launch(argv[1:])  # --accelerate_config or a launch flag: accelerate launch runs it
        if launching:
            _check_command(argv[0])
            launch_args = accelerate_launch_args(argv)
        else:
            trainer = prepare(argv)
    except _user_errors() as error:
        return _fail(error)
    if launching:
        run_accelerate_launch(launch_args)  # every process runs `python -m trl_visual.cli` without the flags
        return 0
    from .trainer.model_card import HubPushError

    try:
        train(trainer)
    except HubPushError as error:  # trained and saved; only the upload failed: one line, exit status 1
        return _fail(error, status=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
