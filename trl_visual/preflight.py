"""Checks of a command line that run before torch, transformers or a model is imported: one line each, fast.

``trl-visual`` imports the trainer (torch, transformers, diffusers: seconds on a quiet machine, more on a busy one)
only once the arguments look sane. What can be judged from the argument list, the YAML file, the file system and the
installed packages alone is judged here first (:func:`preflight`):

* unknown YAML keys and flag typos, with the closest field's name (:func:`unknown_names_message`), against the field
  names cached beside the help text (:func:`cached_names`); TRL names that mean something else here
  (:data:`TRL_NAMES`) say what to use instead;
* ``--dataset_name``: a local path that does not exist, a bare name whose file has an extension
  (``my_prompts`` for ``my_prompts.txt``), a Hub id that is neither cached nor reachable (one quick try, no retries);
* ``--output_dir``: writable, without creating it;
* ``--report_to``: the tracker's package is installed, and wandb has a login (or runs offline).

Each failure is a :class:`PreflightError` (a ``ValueError``), which the command line prints as one line.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import netrc
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

TRL_NAMES: dict[str, str] = {
    "steps_per_generation": (
        "TRL's `steps_per_generation` reuses one generation round for several optimizer steps; here each optimizer "
        "step samples its own rollouts. Reuse rollouts with `num_iterations` (optimizer passes over each batch of "
        "rollouts) and accumulate micro-batches with `gradient_accumulation_steps`."
    ),
    "temperature": "diffusion samplers have no temperature: the SDE's randomness is `noise_level`.",
    "max_completion_length": (
        "a sample's size is `height` and `width` (and `num_frames` for video), its number of denoising steps "
        "`num_inference_steps`."
    ),
    "max_prompt_length": "the prompt's token length is `max_sequence_length`.",
    "use_vllm": "vLLM serves language models only; diffusion rollouts are sampled in the training process.",
}
"""Names of TRL's ``GRPOConfig`` with no counterpart here → what to use instead (said when a user gives one)."""

#: trackers of ``report_to`` → the module that must be importable (any one of them)
TRACKER_MODULES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "trackio": ("trackio",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "swanlab": ("swanlab",),
    "neptune": ("neptune",),
}


class PreflightError(ValueError):
    """A mistake found before anything heavy was imported; the message names it and the fix."""


# ----------------------------------------------------------------------------------------------------
# Names: unknown keys and flags, with the closest known name
# ----------------------------------------------------------------------------------------------------
def unknown_names_message(unknown: Sequence[str], known: Iterable[str], where: str) -> str:
    """``unknown YAML key 'max_stepz' in run.yaml (did you mean 'max_steps'?)``: one phrase per unknown name, with
    the closest known name (difflib), or what to use instead of a TRL name (:data:`TRL_NAMES`). ``where`` is
    ``"flag"`` or ``"YAML key … in FILE"``-style text naming the source."""
    known = sorted(set(known))
    parts = []
    for name in unknown:
        shown = f"--{name}" if where == "flag" else repr(name)
        if name in TRL_NAMES:
            parts.append(f"{shown} is not a setting here: {TRL_NAMES[name]}")
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" (did you mean {'--' + close[0] if where == 'flag' else repr(close[0])}?)" if close else ""
        parts.append(f"unknown {where} {shown}{hint}")
    text = "; ".join(parts)
    return text if text.endswith(".") else text + " (`--help-all` lists every setting)."


def flag_names(argv: Sequence[str]) -> list[str]:
    """The names of the ``--flag`` / ``--flag=value`` tokens of ``argv`` (negative numbers are values)."""
    names = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            names.append(token[2:].partition("=")[0])
    return names


def names_cache_path(help_path: Path) -> Path:
    """Where the field names of a command are cached: beside its help text, same key."""
    return help_path.with_name(help_path.name.replace(".txt", ".names.json"))


def write_names(path: Path, names: Iterable[str]) -> None:
    """Cache the accepted names (a cache that cannot be written is skipped)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8") as file:
            json.dump(sorted(set(names)), file)
        os.replace(file.name, path)
    except OSError:
        pass


def cached_names(path: Path) -> set[str] | None:
    """The accepted names cached at ``path``, or ``None`` when there is no cache yet."""
    try:
        return set(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def read_yaml_config(path: str) -> dict[str, Any]:
    """The mapping of a ``--config`` file.

    Raises:
        FileNotFoundError: no such file. PreflightError: not a YAML mapping.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r}: no such file.")
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise PreflightError(
            f"--config {path!r} must hold a YAML mapping (`key: value` lines); got a {type(config).__name__}."
        )
    return config


def check_names(
    argv: Sequence[str], config: Mapping[str, Any], config_path: str | None, known: set[str]
) -> None:
    """Every YAML key and flag is a known name (``env`` is TRL's key for environment variables)."""
    unknown_keys = [key for key in config if key not in known and key != "env"]
    if unknown_keys:
        raise PreflightError(unknown_names_message(unknown_keys, known, f"YAML key in {config_path}:"))
    bad_flags = [name for name in flag_names(argv) if name not in known and name != "config"]
    if bad_flags:
        raise PreflightError(unknown_names_message(bad_flags, known, "flag"))


# ----------------------------------------------------------------------------------------------------
# Files, folders, packages
# ----------------------------------------------------------------------------------------------------
def _nearest_existing(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_dir(output_dir: str) -> None:
    """``output_dir`` (or the nearest folder above it that exists) accepts a file; nothing is created."""
    target = _nearest_existing(output_dir)
    if os.path.isfile(target):
        raise PreflightError(
            f"`output_dir` {output_dir!r}: {target!r} is a file, not a folder. Choose another `output_dir`."
        )
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".trl-visual-write-test-"):
            pass
    except OSError as error:
        raise PreflightError(
            f"`output_dir` {os.path.abspath(output_dir)!r} is not writable ({error.strerror or error}: {target!r}): "
            "checkpoints and the trained weights could not be saved there. Choose another `output_dir`, or make "
            "that folder writable."
        ) from error


def report_to_list(value: Any) -> list[str]:
    """``report_to`` as a list of tracker names (``"none"``/``None`` → ``[]``)."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else list(value)
    names = [part.strip() for name in names for part in str(name).split(",") if part.strip()]
    return [] if names in (["none"], ["None"]) else names


def wandb_logged_in() -> bool:
    """Whether wandb can find a key without asking: ``WANDB_API_KEY``, or a ``~/.netrc`` entry for its server
    (what ``wandb login`` writes). ``WANDB_MODE=offline|disabled`` needs none."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def module_installed(name: str) -> bool:
    """Whether ``name`` can be imported (found without importing it)."""
    return importlib.util.find_spec(name) is not None


def check_trackers(report_to: Any) -> None:
    """Each ``report_to`` tracker's package is installed; wandb is logged in or offline."""
    for name in report_to_list(report_to):
        if name == "all":
            continue
        modules = TRACKER_MODULES.get(name, ())
        if modules and not any(module_installed(module) for module in modules):
            raise PreflightError(
                f"--report_to {name}: the {modules[0]} package is not installed. Install it (`pip install {modules[0]}`), "
                "or log elsewhere (e.g. --report_to none, or trackio)."
            )
        if name == "wandb" and not wandb_logged_in():
            raise PreflightError(
                "--report_to wandb: wandb has no login on this machine. Run `wandb login` (or set WANDB_API_KEY), "
                "or set WANDB_MODE=offline to log locally, or choose another --report_to."
            )


def _files_named(stem: str) -> list[str]:
    folder = os.path.dirname(stem) or "."
    base = os.path.basename(stem)
    try:
        return sorted(f for f in os.listdir(folder) if os.path.splitext(f)[0] == base and f != base)
    except OSError:
        return []


def hub_is_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set."""
    return any(
        os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers one HTTPS request within ``timeout`` seconds (no retries)."""
    if hub_is_offline():
        return False
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def in_hub_cache(repo_id: str, repo_type: str) -> bool:
    """Whether ``repo_id`` has a snapshot in the local Hugging Face cache (the datasets library's own cache too)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    folder = f"{repo_type}s--{repo_id.replace('/', '--')}"
    roots = [HF_HUB_CACHE, os.environ.get("HF_DATASETS_CACHE", "")]
    return any(root and os.path.isdir(os.path.join(root, folder, "snapshots")) for root in roots) or (
        repo_type == "dataset" and _in_datasets_cache(repo_id)
    )


def _in_datasets_cache(repo_id: str) -> bool:
    root = os.environ.get("HF_DATASETS_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"),
        "datasets",
    )
    return os.path.isdir(os.path.join(root, repo_id.replace("/", "___")))


def check_hub_id(repo_id: str, repo_type: str, flag: str) -> None:
    """A Hub id that is neither in the local cache nor reachable now: one line, at once, instead of the
    libraries' retries and traceback."""
    if in_hub_cache(repo_id, repo_type) or hub_reachable():
        return
    why = "HF_HUB_OFFLINE is set" if hub_is_offline() else "the Hugging Face Hub cannot be reached from here"
    raise PreflightError(
        f"{flag} {repo_id!r}: no local {'folder or file' if repo_type == 'dataset' else 'folder'} of that name, it is "
        f"not in the Hugging Face cache, and {why}. Download it where there is a network (`hf download "
        f"{'--repo-type dataset ' if repo_type == 'dataset' else ''}{repo_id}`), or pass a local path."
    )


def missing_prompt_file_message(name: str) -> str:
    """The error for a prompt file path that does not exist."""
    return (
        f"No prompt file {name!r} (relative paths start from {os.getcwd()!r}). Check the path; a Hub data set id has "
        "the form 'user/name', without a file extension."
    )


def check_dataset_name(name: str) -> None:
    """A prompt set that cannot be loaded: a missing local path, a bare name whose file has an extension, or a
    Hub id neither cached nor reachable."""
    if name.startswith("builtin:") or os.path.exists(os.path.expanduser(name)):
        return
    siblings = _files_named(name)
    if siblings:
        raise PreflightError(
            f"--dataset_name {name!r}: no file or folder of that name, but {', '.join(siblings)} exists: give the file "
            f"name with its extension (--dataset_name {os.path.join(os.path.dirname(name), siblings[0])})."
        )
    extension = os.path.splitext(name)[1].lower()
    looks_local = extension in (".txt", ".json", ".jsonl", ".csv", ".tsv", ".parquet") or name.startswith(
        ("./", "../", "/", "~")
    )
    if looks_local:
        raise FileNotFoundError(missing_prompt_file_message(name))
    check_hub_id(name, "dataset", "--dataset_name")


def check_model_name(name: str) -> None:
    """A model that is neither built in (``tiny:…``), a local folder, cached, nor reachable on the Hub."""
    if ":" in name or os.path.exists(os.path.expanduser(name)) or name.startswith(("./", "../", "/", "~")):
        return  # tiny:*, or a local path (a missing one is reported by the command line's own check)
    check_hub_id(name, "model", "--model_name_or_path")


def last_flag_value(flags: Sequence[str], flag: str) -> str | None:
    """The value of the last ``flag`` among ``flags`` (``--flag VALUE`` or ``--flag=VALUE``): argparse keeps the
    last one given."""
    found = None
    for i, given in enumerate(flags):
        name, has_inline_value, value = given.partition("=")
        if name == flag:
            found = value if has_inline_value else (flags[i + 1] if i + 1 < len(flags) else None)
    return found


def preflight(argv: Sequence[str], known_names: set[str] | None, model_defaults: Mapping[str, Any]) -> None:
    """Run the checks of this module on ``[command, *flags]`` (values: flags, then the ``--config`` YAML, then the
    model's own defaults ``model_defaults``). ``known_names`` are the command's accepted names, when cached."""
    flags = list(argv[1:])
    config_path = last_flag_value(flags, "--config")
    config = read_yaml_config(config_path) if config_path else {}
    if known_names is not None:
        check_names(flags, config, config_path, known_names)

    def value(key: str) -> Any:
        given = last_flag_value(flags, f"--{key}")
        if given is not None:
            return given
        return config.get(key, model_defaults.get(key))

    output_dir = value("output_dir")
    if output_dir:
        check_output_dir(str(output_dir))
    report_to = value("report_to")
    check_trackers(report_to if report_to is not None else "none")
    dataset = value("dataset_name")
    if isinstance(dataset, str):
        check_dataset_name(dataset)
    model = value("model_name_or_path")
    if isinstance(model, str):
        check_model_name(model)
