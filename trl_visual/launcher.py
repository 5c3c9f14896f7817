"""``trl-visual <command> --accelerate_config NAME|PATH``: re-launch the command through ``accelerate launch``.

The command line of a run stays the one command a user types; ``--accelerate_config`` picks the engine. The
value is the name of a config shipped in ``trl_visual/accelerate_configs/`` (:data:`SHIPPED_CONFIGS`) or the
path of the user's own ``accelerate config`` file. The launch itself is accelerate's: its own parser reads the
launch flags, and its own ``launch_command`` starts the processes, which run ``python -m trl_visual.cli`` with
the remaining arguments. So::

    trl-visual grpo --accelerate_config zero2 --num_processes 4 --config run.yaml

runs exactly what this runs::

    accelerate launch --config_file <trl_visual>/accelerate_configs/zero2.yaml --num_processes 4 \\
        -m trl_visual.cli grpo --config run.yaml

The launch flags of :data:`LAUNCH_FLAGS` (process count, machines, the main node's address) may stand
anywhere on the command line; they override the config file, as they do for ``accelerate launch`` (alone,
without ``--accelerate_config``, they apply to accelerate's default config, the one ``accelerate config``
wrote).

A YAML config may name the engine too (``accelerate_config: zero2``), so that a run stays one file; the flag wins
over the key. A process that ``accelerate launch`` started never launches again, whatever its YAML says.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

ACCELERATE_CONFIG_FLAG = "--accelerate_config"

#: shipped config name → what it runs (the file is ``trl_visual/accelerate_configs/<name>.yaml``)
SHIPPED_CONFIGS: dict[str, str] = {
    "multi_gpu": "DDP: the whole model on every GPU",
    "fsdp": "FSDP2: the denoiser's weights sharded across the GPUs",
    "zero2": "DeepSpeed ZeRO-2: optimizer states and gradients partitioned",
    "zero3": "DeepSpeed ZeRO-3: weights, gradients and optimizer states partitioned",
}

#: ``accelerate launch`` flags (taking a value) accepted next to ``--accelerate_config``
LAUNCH_FLAGS = (
    "--num_processes",
    "--num_machines",
    "--machine_rank",
    "--main_process_ip",
    "--main_process_port",
    "--rdzv_backend",
    "--mixed_precision",
    "--gpu_ids",
)


def shipped_config_path(name: str) -> Path:
    """The file of the shipped config ``name`` (it may not exist)."""
    return Path(str(resources.files("trl_visual").joinpath("accelerate_configs", f"{name}.yaml")))


def resolve_accelerate_config(value: str) -> Path:
    """The accelerate config file that ``--accelerate_config value`` means: an existing file, else a shipped
    config of that name.

    Raises:
        ValueError: neither a file nor a shipped name (the message lists the shipped names).
    """
    if Path(value).is_file():
        return Path(value)
    if value in SHIPPED_CONFIGS:
        return shipped_config_path(value)
    raise ValueError(
        f"--accelerate_config {value!r} is neither a file nor a shipped config; use one of "
        f"{', '.join(SHIPPED_CONFIGS)}, or the path of a file written by `accelerate config`."
    )


def split_launch_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``[command, *flags]`` into ``accelerate launch`` arguments (``--config_file FILE`` and the
    :data:`LAUNCH_FLAGS` given) and the command's own arguments. ``--flag=value`` spellings are accepted.

    Raises:
        ValueError: a launch flag (or ``--accelerate_config``) without a value, or a config that cannot be
            resolved (:func:`resolve_accelerate_config`).
    """
    launch: list[str] = []
    command: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        flag, has_inline_value, inline_value = args[i].partition("=")
        if flag != ACCELERATE_CONFIG_FLAG and flag not in LAUNCH_FLAGS:
            command.append(args[i])
            i += 1
            continue
        if has_inline_value:
            value, i = inline_value, i + 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 2
        else:
            raise ValueError(f"{flag} needs a value.")
        if flag == ACCELERATE_CONFIG_FLAG:
            launch[:0] = ["--config_file", str(resolve_accelerate_config(value))]
        else:
            launch += [flag, value]
    return launch, command


def accelerate_launch_args(argv: Sequence[str]) -> list[str]:
    """The full ``accelerate launch`` argument list that runs ``[command, *flags]`` as a module on every
    process: ``[--config_file FILE, *launch flags, -m, trl_visual.cli, command, *flags]``."""
    launch, command = split_launch_args(argv)
    return [*launch, "-m", "trl_visual.cli", *command]


def wants_launch(flags: Sequence[str]) -> bool:
    """Whether a command's flags ask for ``accelerate launch``: ``--accelerate_config`` or a launch flag."""
    names = {flag.partition("=")[0] for flag in flags}
    return bool(names & {ACCELERATE_CONFIG_FLAG, *LAUNCH_FLAGS})


def launched_by_accelerate() -> bool:
    """Whether this process was started by ``accelerate launch`` (every accelerate launcher sets
    ``ACCELERATE_MIXED_PRECISION`` in the environment of the processes it starts)."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ


def _flag_value(flags: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` among ``flags`` (``--flag VALUE`` or ``--flag=VALUE``), if given."""
    for i, given in enumerate(flags):
        name, has_inline_value, value = given.partition("=")
        if name == flag:
            return value if has_inline_value else (flags[i + 1] if i + 1 < len(flags) else None)
    return None


def flag_or_config_value(flags: Sequence[str], key: str) -> Any:
    """``--<key>`` from the flags, else ``key`` from the ``--config`` YAML file; ``None`` if neither has it.

    Read before the argument parser runs (to choose defaults or a launch); a missing YAML is left to the parser,
    which reports it.
    """
    value = _flag_value(flags, f"--{key}")
    if value is not None:
        return value
    path = _flag_value(flags, "--config")
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    return config.get(key) if isinstance(config, dict) else None


def with_yaml_accelerate_config(flags: Sequence[str]) -> list[str]:
    """``flags`` plus ``--accelerate_config VALUE`` when the ``--config`` YAML names ``accelerate_config`` and
    neither the command line nor an enclosing ``accelerate launch`` already chose how to run."""
    flags = list(flags)
    if launched_by_accelerate() or wants_launch(flags):
        return flags
    value = flag_or_config_value(flags, "accelerate_config")  # the flag is absent: this is the YAML's key
    return flags if value is None else [*flags, ACCELERATE_CONFIG_FLAG, str(value)]


def run_accelerate_launch(launch_args: Sequence[str]) -> None:
    """Parse ``launch_args`` (from :func:`accelerate_launch_args`) with accelerate's own ``launch`` parser and
    run its ``launch_command``, which starts the processes and waits for them (a failed rank ends the launch
    with its exit status)."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_command(launch_command_parser().parse_args(list(launch_args)))
