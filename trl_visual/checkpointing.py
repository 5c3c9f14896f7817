"""Checks that a checkpoint folder is complete, readable and fits the model, before anything is loaded.

``transformers.Trainer`` resumes whatever it finds: a checkpoint without ``optimizer.pt`` or
``scheduler.pt`` silently restarts AdamW and the learning-rate schedule, one without ``rng_state.pth``
silently draws other random numbers, and a truncated file fails deep inside ``torch.load`` or
``safetensors`` with an error that names no file. :func:`check_checkpoint` looks at every file a
checkpoint of this package holds, as :meth:`DiffusionGRPOTrainer._save_checkpoint` and
``Trainer._save_checkpoint`` write them:

============================================  ============================================================
file                                          what it holds
============================================  ============================================================
``pytorch_lora_weights.safetensors``          the LoRA, in diffusers' format (or ``<denoiser>/``, the
                                              full denoiser's ``save_pretrained`` folder, without LoRA)
``optimizer.pt``                              AdamW's moments (``optimizer.bin`` or an ``optimizer*``
                                              folder under FSDP, a ``global_step*`` folder under DeepSpeed)
``scheduler.pt``                              the learning-rate schedule's position
``trainer_state.json``                        the step count and the log history
``rng_state.pth`` / ``rng_state_<rank>.pth``  the random generators (one file per process when several)
``trl_visual_state.safetensors``              the method's own state (BPGO's priors, the per-prompt record), when it has one
``ema_state.safetensors``                     the EMA of the weights (``use_ema``; checked when present)
``scaler.pt``                                 fp16's loss scale (checked only when present)
============================================  ============================================================

Only headers, archive directories and pickle records are read (a safetensors header, a zip's central directory
and its pickle, unpickled with the tensors memory-mapped rather than read, a small JSON), so the check costs well
under a second whatever the size of the files. It catches missing, truncated and planted files; it does not
prove that every byte of a tensor is intact.

Nothing in a checkpoint may run code when read. Our own state files are safetensors
(:mod:`trl_visual.state_files`); the ``torch.save`` files that ``transformers.Trainer`` writes and reads (the
optimizer, the scheduler, the generators, the loss scale) are unpickled here with ``weights_only=True`` and
transformers' own allow-list (tensors mapped, not read), so a pickle that names any other function (a planted
payload) is refused, naming the file, before ``Trainer`` opens it. Pickled state files of earlier versions
(``trl_visual_state.pt``, ``ema_state.pt``) are refused by name, never unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from transformers.trainer_callback import TrainerState
from transformers.trainer_pt_utils import safe_globals

from .state_files import check_state_file

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METHOD_STATE_NAME = "trl_visual_state.safetensors"
#: the EMA of the weights (``use_ema``), written by :class:`~trl_visual.trainer.ema.EMAMixin`
EMA_STATE_NAME = "ema_state.safetensors"
#: pickled state files (``torch.save``) of earlier versions of trl_visual: refused, never unpickled
LEGACY_STATE_NAMES = ("trl_visual_state.pt", "ema_state.pt")
TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
WEIGHTS_ONLY_FLAG = "resume_weights_only=True"

_WHAT_STARTS_AFRESH = {
    OPTIMIZER_NAME: "AdamW's moments",
    SCHEDULER_NAME: "the learning-rate schedule (warm-up and decay start again from step 0)",
    METHOD_STATE_NAME: "the method's state (BPGO's priors, the per_prompt_stat_tracking record)",
    "rng_state": "the random generators",
}


class CheckpointError(ValueError):
    """A checkpoint to resume from is incomplete, unreadable, or does not fit the model."""


def rng_state_name(process_index: int, world_size: int) -> str:
    """The RNG file ``Trainer._save_rng_state`` writes for one process: ``rng_state.pth`` for a single
    process, ``rng_state_<process_index>.pth`` for each of several."""
    return "rng_state.pth" if world_size <= 1 else f"rng_state_{process_index}.pth"


def check_torch_archive(path: str) -> str | None:
    """Why the ``torch.save`` file at ``path`` cannot be read, or ``None`` when it can.

    ``torch.save`` writes a zip archive: its central directory sits at the end of the file (a truncated
    file has none), every member must lie inside the file, and the pickle record (``*/data.pkl``) must
    pass its CRC check. The tensors' bytes are not read.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            size = os.path.getsize(path)
            if any(m.header_offset + m.compress_size > size for m in members):
                return "a member lies past the end of the file (truncated)"
            records = [m.filename for m in members if m.filename.endswith("data.pkl")]
            if not records:
                return "it holds no pickle record (data.pkl)"
            archive.read(records[0])  # raises BadZipFile on a CRC mismatch
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"not a readable torch.save archive ({error}); the file is truncated or corrupt"
    return check_weights_only(path)


def check_weights_only(path: str) -> str | None:
    """Why ``torch.load(path, weights_only=True)`` refuses the file, or ``None``: its pickle may build only
    tensors, containers and the NumPy types of transformers' allow-list (``safe_globals``, what ``Trainer``
    loads ``rng_state.pth`` with). Tensors are memory-mapped, not read. A pickle naming any other function is
    what a planted payload looks like: it is never called."""
    try:
        with safe_globals():
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any failure means Trainer could not load it either
        named = re.search(r"GLOBAL (\S+)", str(error))
        if named:
            return (
                f"its pickle calls {named.group(1)}, which loading with weights_only=True refuses: transformers "
                "and trl_visual never write that, so the file was made or altered by someone else (it was not "
                "loaded)"
            )
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"torch.load(weights_only=True) cannot read it ({type(error).__name__}: {first_line[:200]})"
    return None


def check_safetensors(path: str) -> str | None:
    """Why the safetensors file at ``path`` cannot be read, or ``None``. safetensors checks that the
    header parses and that the tensors it lists cover the file exactly (a truncated file fails)."""
    try:
        with safe_open(path, framework="pt"):
            return None
    except (SafetensorError, OSError) as error:
        return f"its safetensors header is unreadable ({error}); the file is truncated or corrupt"


def check_trainer_state(path: str) -> str | None:
    """Why ``trainer_state.json`` at ``path`` cannot be restored, or ``None``: it must be JSON that
    ``TrainerState`` accepts, with a ``global_step``."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("global_step"), int):
            return "it is JSON but holds no integer `global_step`"
        TrainerState(**data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"it is not valid JSON ({error}); the file is truncated or corrupt"
    except TypeError as error:
        return f"transformers' TrainerState cannot read it ({error})"
    return None


def lora_key_mismatch(path: str, expected: Mapping[str, Sequence[int]], prefix: str) -> str | None:
    """How the LoRA tensors in ``path`` differ from the model's, or ``None`` when they match.

    ``expected`` maps the model's LoRA state-dict keys (as ``get_peft_model_state_dict`` names them) to
    their shapes; the file's keys carry ``prefix`` (``"transformer."``), as diffusers'
    ``save_lora_weights`` writes them. Modules are named without the ``.lora_A.weight`` ending.
    """
    with safe_open(path, framework="pt") as f:
        found = {key.removeprefix(prefix): tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    wanted = {key: tuple(shape) for key, shape in expected.items()}
    only_model = _modules(set(wanted) - set(found))
    only_file = _modules(set(found) - set(wanted))
    resized = [
        f"{k} {found[k]} in the file, {wanted[k]} in the model"
        for k in sorted(wanted)
        if found.get(k, wanted[k]) != wanted[k]
    ]
    problems = []
    if only_model:
        problems.append(f"LoRA modules in the model but not in the file: {_first(only_model)}")
    if only_file:
        problems.append(f"LoRA modules in the file but not in the model: {_first(only_file)}")
    if resized:
        problems.append(f"different shapes (LoRA rank): {_first(resized)}")
    return "; ".join(problems) or None


def _modules(keys: set[str]) -> list[str]:
    """LoRA module names of state-dict keys: ``a.b.lora_A.weight`` → ``a.b``."""
    return sorted({key.split(".lora_")[0] for key in keys})


def _first(items: list[str], count: int = 5) -> str:
    more = f" and {len(items) - count} more" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def _require(path: str, check: Callable[[str], str | None], fix: str) -> None:
    """Raise a :class:`CheckpointError` naming ``path``, why it cannot be used (missing, or what ``check``
    found) and ``fix``, unless the file is there and readable."""
    reason = check(path) if os.path.isfile(path) else "missing"
    if reason:
        raise CheckpointError(f"Cannot resume from {os.path.dirname(path)}: {path}: {reason}. {fix}")


def _subfolders(folder: str, prefix: str) -> bool:
    """Whether ``folder`` has a subfolder whose name starts with ``prefix``."""
    return any(
        name.startswith(prefix) and os.path.isdir(os.path.join(folder, name)) for name in os.listdir(folder)
    )


def _has_optimizer(folder: str) -> bool:
    """Optimizer state as ``Trainer`` would find it: ``optimizer.pt``/``.bin``, an ``optimizer*`` folder
    (FSDP) or a ``global_step*`` folder (DeepSpeed, which keeps the optimizer there)."""
    return any(
        os.path.isfile(os.path.join(folder, name)) for name in (OPTIMIZER_NAME, "optimizer.bin")
    ) or any(_subfolders(folder, prefix) for prefix in ("optimizer", "global_step"))


def _check_denoiser_folder(folder: str) -> list[tuple[str, str]]:
    """Problems of a full denoiser's ``save_pretrained`` folder: its ``config.json`` and every
    safetensors file (a sharded one's index must list files that exist)."""
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        return [(config, "missing")]
    problems = []
    try:
        with open(config, encoding="utf-8") as f:
            json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problems.append((config, f"not valid JSON ({error})"))
    weights = [name for name in os.listdir(folder) if name.endswith((".safetensors", ".bin"))]
    if not weights:
        problems.append((folder, "holds no weights file (*.safetensors)"))
    for name in weights:
        check = check_safetensors if name.endswith(".safetensors") else check_torch_archive
        reason = check(os.path.join(folder, name))
        if reason:
            problems.append((os.path.join(folder, name), reason))
    return problems


def check_checkpoint(
    folder: str,
    *,
    lora_shapes: Mapping[str, Sequence[int]] | None,
    denoiser_name: str = "transformer",
    expects_method_state: bool = False,
    weights_only: bool = False,
    process_index: int = 0,
    world_size: int = 1,
) -> list[str]:
    """Refuse a checkpoint that cannot be resumed exactly, before anything is loaded from it.

    Args:
        folder: the checkpoint folder (``output_dir/checkpoint-N``).
        lora_shapes: the model's LoRA state-dict keys and shapes (``get_peft_model_state_dict``); the
            file's LoRA must hold exactly these. ``None`` when training without LoRA: the full
            denoiser's folder ``<folder>/<denoiser_name>/`` is checked instead.
        denoiser_name: the pipeline's name of the trained model (``"transformer"``).
        expects_method_state: the method saves ``trl_visual_state.safetensors`` (BPGO).
        weights_only: ``resume_weights_only``: a missing optimizer, scheduler, RNG or method-state file
            is allowed (what it held starts afresh, and a warning says so).
        process_index, world_size: which ``rng_state*.pth`` this process reads.

    Returns:
        The files that are missing but allowed by ``weights_only`` (empty otherwise).

    Raises:
        CheckpointError: naming every missing or unreadable file and the fix. Missing or unreadable
        weights, an unreadable ``trainer_state.json`` and LoRA modules that differ from the model's are
        refused even with ``weights_only``; so are corrupt files (delete one to resume without it).
    """
    if not os.path.isdir(folder):
        raise CheckpointError(
            f"resume_from_checkpoint={folder!r} is not a folder. Pass an existing checkpoint folder "
            "(output_dir/checkpoint-N), True for the last one in output_dir, or nothing to start a new run."
        )
    _refuse_legacy_state(folder)
    _check_weights(folder, lora_shapes, denoiser_name)
    _require(
        os.path.join(folder, TRAINER_STATE_NAME),
        check_trainer_state,
        "It holds the step count and the log history, without which the run cannot continue; restore it from a "
        "copy, or resume from another checkpoint (resume_from_checkpoint='<output_dir>/checkpoint-N').",
    )
    missing, corrupt = _check_training_state(folder, expects_method_state, process_index, world_size)
    if corrupt:
        listed = "; ".join(f"{path}: {why}" for path, why in corrupt)
        raise CheckpointError(
            f"Cannot resume from {folder}: {listed}. Resume from another checkpoint, or delete the file and set "
            f"`{WEIGHTS_ONLY_FLAG}` to resume the weights without it (what it holds then starts afresh)."
        )
    if missing and not weights_only:
        listed = ", ".join(os.path.join(folder, name) for name in missing)
        raise CheckpointError(
            f"Cannot resume from {folder} exactly: {listed} missing. Without them "
            f"{_what_starts_afresh(missing)} would silently start afresh.{_rng_hint(folder, missing)} Resume from "
            f"a complete checkpoint, or set `{WEIGHTS_ONLY_FLAG}` (`--resume_weights_only true`) to resume the "
            "weights and the step count on purpose. (A checkpoint saved with `save_only_model=True` holds the "
            "weights only.)"
        )
    if missing:
        logger.warning(
            f"Resuming the weights of {folder} only ({WEIGHTS_ONLY_FLAG}): {', '.join(missing)} missing, so "
            f"{_what_starts_afresh(missing)} start afresh."
        )
    return missing


def _refuse_legacy_state(folder: str) -> None:
    """A pickled state file of an earlier trl_visual is refused by name: unpickling it could run any code."""
    found = [
        os.path.join(folder, name)
        for name in LEGACY_STATE_NAMES
        if os.path.exists(os.path.join(folder, name))
    ]
    if found:
        raise CheckpointError(
            f"Cannot resume from {folder}: {', '.join(found)} is a pickled state file of an earlier trl_visual, and "
            "unpickling a file can run any code, so it is not read. Resume from a checkpoint written by this "
            f"version (its state files are .safetensors), or delete the file and set `{WEIGHTS_ONLY_FLAG}` to "
            "resume the weights and the step count without the state it held."
        )


def _rng_hint(folder: str, missing: list[str]) -> str:
    """Why this process's RNG file may be missing: the checkpoint was written by another number of processes."""
    others = sorted(n for n in os.listdir(folder) if n.startswith("rng_state") and n.endswith(".pth"))
    if not others or not any(name.startswith("rng_state") for name in missing):
        return ""
    return (
        f" The checkpoint has {', '.join(others)}: it was written by a run with another number of processes."
    )


def _what_starts_afresh(missing: list[str]) -> str:
    """What the missing files held. ``Trainer`` loads ``optimizer.pt`` and ``scheduler.pt`` only together, so
    either one missing restarts both."""
    keys = {name if name in _WHAT_STARTS_AFRESH else "rng_state" for name in missing}
    if keys & {OPTIMIZER_NAME, SCHEDULER_NAME}:
        keys |= {OPTIMIZER_NAME, SCHEDULER_NAME}
    return ", ".join(text for key, text in _WHAT_STARTS_AFRESH.items() if key in keys)


def _check_weights(folder: str, lora_shapes: Mapping[str, Sequence[int]] | None, denoiser_name: str) -> None:
    """The trained weights must be there, readable, and (LoRA) hold exactly the model's LoRA modules."""
    if lora_shapes is None:
        denoiser = os.path.join(folder, denoiser_name)
        problems = _check_denoiser_folder(denoiser) if os.path.isdir(denoiser) else [(denoiser, "missing")]
        if problems:
            listed = "; ".join(f"{path}: {why}" for path, why in problems)
            raise CheckpointError(
                f"Cannot resume from {folder}: the trained {denoiser_name} is unreadable ({listed}). Without the "
                "weights there is nothing to resume; resume from another checkpoint."
            )
        return
    path = os.path.join(folder, LORA_WEIGHTS_NAME)
    _require(
        path,
        check_safetensors,
        "These are the LoRA weights: without them there is nothing to resume; resume from another checkpoint "
        "(resume_from_checkpoint='<output_dir>/checkpoint-N').",
    )
    mismatch = lora_key_mismatch(path, lora_shapes, f"{denoiser_name}.")
    if mismatch:
        raise CheckpointError(
            f"The LoRA in {path} does not fit the model's LoRA adapter: {mismatch}. Resume with the LoraConfig "
            "the checkpoint was trained with (the same `target_modules` and `r`), or start a new run in another "
            "output_dir to train a different adapter."
        )


def _check_training_state(
    folder: str, expects_method_state: bool, process_index: int, world_size: int
) -> tuple[list[str], list[tuple[str, str]]]:
    """Missing file names, and ``(path, reason)`` of unreadable ones, among the optimizer, scheduler,
    RNG, scaler and method-state files."""
    missing, corrupt = [], []
    if not _has_optimizer(folder):
        missing.append(OPTIMIZER_NAME)
    required = [rng_state_name(process_index, world_size)]
    if not _subfolders(folder, "global_step"):  # DeepSpeed keeps its own scheduler with the optimizer
        required.append(SCHEDULER_NAME)
    if expects_method_state:
        required.append(METHOD_STATE_NAME)
    missing += [name for name in required if not os.path.isfile(os.path.join(folder, name))]
    checks = {name: check_torch_archive for name in [OPTIMIZER_NAME, SCALER_NAME, *required]}
    checks.update({METHOD_STATE_NAME: check_state_file, EMA_STATE_NAME: check_state_file})
    for name, check in checks.items():
        path = os.path.join(folder, name)
        reason = check(path) if os.path.isfile(path) else None
        if reason:
            corrupt.append((path, reason))
    return missing, corrupt
