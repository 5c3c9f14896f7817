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
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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

TINY_BACKBONE = "tiny:dinov2"


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
            "help": "Split of the same data set to evaluate on (used when --eval_strategy is not 'no')."
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


def load_command(command: str) -> tuple[type, type]:
    """The (config class, trainer class) of a sub-command, imported now.

    Raises:
        SystemExit: unknown command, or a method whose module this installation lacks.
    """
    if command not in COMMANDS:
        raise SystemExit(f"trl-visual: unknown command {command!r}; choose one of {', '.join(COMMANDS)}.")
    config_path, trainer_path, _ = COMMANDS[command]
    try:
        return _import(config_path), _import(trainer_path)
    except (ModuleNotFoundError, AttributeError) as error:
        raise SystemExit(
            f"trl-visual {command}: this installation of trl_visual has no {command} trainer ({error})."
        ) from error


def make_parser(command: str, config_class: type) -> Any:
    """A :class:`trl.TrlParser` over the script, config and model arguments of ``command``."""
    from trl import TrlParser

    return TrlParser(
        dataclass_types=[ScriptArguments, config_class, ModelArguments],
        prog=f"trl-visual {command}",
        description=COMMANDS[command][2] + " Values come from --config file.yaml, then from the flags.",
    )


def parse_args(argv: Sequence[str]) -> tuple[str, ScriptArguments, Any, ModelArguments]:
    """Parse ``[command, *flags]`` into the command and its three argument objects."""
    command, *rest = argv
    config_class, _ = load_command(command)
    script_args, config, model_args = make_parser(command, config_class).parse_args_and_config(rest)
    return command, script_args, config, model_args


def _module_from_file(path: str, spec: str) -> Any:
    if not os.path.isfile(path):
        raise ValueError(f"Reward {spec!r}: no file {path!r}.")
    name = "trl_visual_user_reward_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def resolve_reward_spec(spec: str) -> Callable[..., Any]:
    """A reward from the command line: a registered name, or ``module.path:function`` (also
    ``path/to/file.py:function``). A class found this way is instantiated with no arguments.

    Raises:
        ValueError: an unknown name, or a module or attribute that cannot be found (the message says
            which, and lists the registered names).
    """
    from .rewards import REWARD_REGISTRY, resolve_reward

    if spec in REWARD_REGISTRY:
        return resolve_reward(spec)
    known = ", ".join(sorted(REWARD_REGISTRY))
    if ":" not in spec:
        raise ValueError(
            f"Unknown reward {spec!r}. Registered rewards: {known}. For your own function pass "
            "'module.path:function' (importable) or 'path/to/file.py:function'."
        )
    location, _, attribute = spec.rpartition(":")
    if location.endswith(".py"):
        module = _module_from_file(location, spec)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise ValueError(
                f"Reward {spec!r}: cannot import module {location!r} ({error}). Is it on PYTHONPATH?"
            ) from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"Reward {spec!r}: {location!r} has no attribute {attribute!r}.")
        target = getattr(target, part)
    if inspect.isclass(target):
        target = target()
    if not callable(target):
        raise ValueError(f"Reward {spec!r} is a {type(target).__name__}, not a callable.")
    return target


def _tiny_backbone() -> Any:
    """A random-weight DINOv2 built in code (:func:`trl_visual.testing.tiny_dinov2`), so ``vipo`` runs offline."""
    from .backbones import IMAGENET_MEAN, IMAGENET_STD, VisionBackbone
    from .testing import tiny_dinov2

    return VisionBackbone(tiny_dinov2(), image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def build_trainer(command: str, script_args: ScriptArguments, config: Any, model_args: ModelArguments) -> Any:
    """Load the prompts, resolve the rewards and build the trainer of ``command`` (no training yet)."""
    from .data import load_prompts

    _, trainer_class = load_command(command)
    rewards = [resolve_reward_spec(spec) for spec in script_args.reward_funcs]
    train_dataset = load_prompts(
        script_args.dataset_name, script_args.dataset_config, script_args.dataset_split, config.prompt_column
    )
    eval_dataset = None
    if script_args.dataset_test_split is not None and config.eval_strategy != "no":
        eval_dataset = load_prompts(
            script_args.dataset_name,
            script_args.dataset_config,
            script_args.dataset_test_split,
            config.prompt_column,
        )
    config.model_init_kwargs = model_args.model_init_kwargs(config.model_init_kwargs)
    kwargs: dict[str, Any] = {}
    backbone = getattr(config, "backbone", None)
    if (
        "backbone" in inspect.signature(trainer_class).parameters
        and isinstance(backbone, str)
        and backbone.startswith("tiny:")
        and getattr(config, "aggregation", None) != "ones"
    ):
        if backbone != TINY_BACKBONE:
            raise ValueError(f"Unknown tiny backbone {backbone!r}; the built-in one is {TINY_BACKBONE!r}.")
        kwargs["backbone"] = _tiny_backbone()
    return trainer_class(
        model=model_args.model_name_or_path,
        reward_funcs=rewards,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=model_args.lora_config(),
        **kwargs,
    )


def _resume_value(value: Any) -> str | bool | None:
    """``--resume_from_checkpoint true`` (or YAML ``true``) means the last checkpoint in output_dir."""
    if isinstance(value, str) and value.lower() in ("true", "yes", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", ""):
        return None
    return value


def run(argv: Sequence[str]) -> Any:
    """Parse ``[command, *flags]``, train, save to ``output_dir`` (and push when ``push_to_hub``); return
    the trainer."""
    command, script_args, config, model_args = parse_args(argv)
    if script_args.torch_num_threads is not None:
        import torch

        torch.set_num_threads(script_args.torch_num_threads)
    trainer = build_trainer(command, script_args, config, model_args)
    trainer.train(resume_from_checkpoint=_resume_value(config.resume_from_checkpoint))
    trainer.save_model(config.output_dir)  # pushes to the Hub too when push_to_hub is set
    if trainer.is_world_process_zero():
        print(_summary(trainer, config.output_dir))
    return trainer


def _summary(trainer: Any, output_dir: str) -> str:
    """Reward at the start and the end of the run, and where the weights are."""
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    lines = []
    if rewards:
        window = max(1, min(5, len(rewards) // 2))
        first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
        lines.append(f"reward: {first:.4f} (mean of the first {window} logs) -> {last:.4f} (last {window})")
    lines.append(f"saved to {output_dir} (load a LoRA with pipe.load_lora_weights({output_dir!r}))")
    return "\n".join(lines)


def _usage() -> str:
    lines = ["usage: trl-visual {" + ",".join(COMMANDS) + "} [--config file.yaml] [--flag value ...]", ""]
    lines += [f"  {name:<6} {description}" for name, (_, _, description) in COMMANDS.items()]
    lines += ["", "Flags of one command: trl-visual grpo --help. Docs: docs/cli.md."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trl-visual``; ``argv`` defaults to ``sys.argv[1:]``. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(f"trl_visual {__version__}")
        return 0
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
