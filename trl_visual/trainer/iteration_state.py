"""What a checkpoint written in the middle of an iteration needs: the rollouts the next micro-steps reuse.

With ``num_iterations = μ > 1`` one batch of rollouts (sampled once, scored once) is trained on for μ
micro-steps: micro-step ``m`` samples when ``m mod μ = 0`` and reuses the rollouts of iteration ``⌊m / μ⌋``
otherwise. A checkpoint at optimizer step ``N`` resumes at micro-step ``m = N · gradient_accumulation_steps``
(:func:`is_mid_iteration`). When ``m mod μ ≠ 0``, the next micro-steps train on rollouts that the weights of an
earlier step sampled: the checkpoint's weights cannot sample them again (they would draw other trajectories, get
other rewards, and the resumed run would drift from the uninterrupted one).

So such a checkpoint keeps them (:func:`save_rollouts`): every process writes its own rollouts as a safetensors
file (``rollouts.safetensors``, or ``rollouts_<process>.safetensors`` for several processes) whose metadata holds
the structure as JSON. Reading it back (:func:`load_rollouts`) runs no code: tensors come from safetensors,
everything else from JSON, and only the dataclasses of :data:`ROLLOUT_TYPES` are rebuilt. Checkpoints at an
iteration boundary (every checkpoint when ``μ = 1``) hold no such file: the next step samples afresh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..checkpointing import TRAINER_STATE_NAME, CheckpointError
from .hooks import Advantages, AuxiliaryObjective
from .rollout import Rollouts

if TYPE_CHECKING:  # pragma: no cover
    from .diffusion_grpo_config import DiffusionGRPOConfig

logger = logging.getLogger(__name__)

#: the safetensors metadata key holding the rollouts' structure (JSON)
STRUCTURE_KEY = "trl_visual_rollouts"
#: the only classes a rollouts file may name: the rollouts and what scoring stores in them
ROLLOUT_TYPES: dict[str, type] = {
    "Rollouts": Rollouts,
    "Advantages": Advantages,
    "AuxiliaryObjective": AuxiliaryObjective,
}


def rollouts_file_name(process_index: int, world_size: int) -> str:
    """``rollouts.safetensors`` for a single process, ``rollouts_<process_index>.safetensors`` for each of
    several (as ``rng_state*.pth``)."""
    return "rollouts.safetensors" if world_size <= 1 else f"rollouts_{process_index}.safetensors"


def is_mid_iteration(global_step: int, gradient_accumulation_steps: int, num_iterations: int) -> bool:
    """Whether a checkpoint at optimizer step ``global_step`` falls inside an iteration: its next micro-step
    ``m = global_step · gradient_accumulation_steps`` reuses rollouts (``m mod num_iterations ≠ 0``)."""
    return (global_step * gradient_accumulation_steps) % num_iterations != 0


def iteration_of(micro_step: int, num_iterations: int) -> int:
    """``⌊m / μ⌋``: the iteration (generation round) micro-step ``m`` belongs to."""
    return micro_step // num_iterations


def checkpoint_step(checkpoint: str | None) -> int:
    """The ``global_step`` in ``checkpoint``'s ``trainer_state.json`` (checked readable beforehand by
    :func:`~trl_visual.checkpointing.check_checkpoint`); 0 for a new run (``None``)."""
    if checkpoint is None:
        return 0
    with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as f:
        return int(json.load(f)["global_step"])


def _allowed_type(value: Any) -> str:
    """The name in :data:`ROLLOUT_TYPES` that ``value`` is an instance of (a subclass is saved as its listed
    base, fields of its own dropped with a warning)."""
    for name, cls in ROLLOUT_TYPES.items():
        if type(value) is cls:
            return name
    for name, cls in ROLLOUT_TYPES.items():
        if isinstance(value, cls):
            logger.warning(
                f"Saving a {type(value).__name__} in a checkpoint's rollouts as its base class {name}: fields of "
                "its own are not kept."
            )
            return name
    raise TypeError(f"Cannot save a {type(value).__name__} in a checkpoint's rollouts.")


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, its tensors moved (copied) to the CPU into ``tensors`` under ``path``."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": path, "cpu": value.device.type == "cpu"}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, AuxiliaryObjective) or dataclasses.is_dataclass(value):
        name = _allowed_type(value)
        cls = ROLLOUT_TYPES[name]
        names = cls._fields if name == "AuxiliaryObjective" else [f.name for f in dataclasses.fields(cls)]
        return {
            "type": name,
            "fields": {f: _encode(getattr(value, f), f"{path}.{f}", tensors) for f in names},
        }
    if isinstance(value, list | tuple):
        return {"list": [_encode(item, f"{path}.{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {"dict": {key: _encode(item, f"{path}.{key}", tensors) for key, item in value.items()}}
    raise TypeError(f"Cannot save {type(value).__name__} ({path}) in a checkpoint's rollouts.")


def _decode(node: Any, tensors: dict[str, torch.Tensor], device: torch.device) -> Any:
    """The value :func:`_encode` wrote; only :data:`ROLLOUT_TYPES` are constructed."""
    if not isinstance(node, dict):
        return node
    if "tensor" in node:
        tensor = tensors[node["tensor"]]
        return tensor if node.get("cpu") else tensor.to(device)
    if "list" in node:
        return [_decode(item, tensors, device) for item in node["list"]]
    if "dict" in node:
        return {key: _decode(item, tensors, device) for key, item in node["dict"].items()}
    cls = ROLLOUT_TYPES[node["type"]]  # KeyError: not a listed type
    return cls(**{key: _decode(item, tensors, device) for key, item in node["fields"].items()})


def save_rollouts(rollouts: Rollouts, path: str, info: dict[str, int]) -> None:
    """Write ``rollouts`` to the safetensors file ``path``: its tensors, and in the metadata its structure and
    ``info`` (the step, iteration and settings it belongs to, checked by :func:`load_rollouts`)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(rollouts, "rollouts", tensors)
    metadata = {STRUCTURE_KEY: json.dumps({"info": info, "rollouts": structure})}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(tensors, path, metadata=metadata)


def load_rollouts(path: str, device: torch.device) -> tuple[Rollouts, dict[str, int]]:
    """The rollouts :func:`save_rollouts` wrote to ``path`` (tensors on ``device``, or the CPU where they were
    there), and their ``info``.

    Raises:
        CheckpointError: naming the file, when it is unreadable or not a rollouts file of this package.
    """
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            content = json.loads((f.metadata() or {})[STRUCTURE_KEY])
        rollouts = _decode(content["rollouts"], tensors, device)
        if not isinstance(rollouts, Rollouts):
            raise TypeError(f"it holds a {type(rollouts).__name__}, not rollouts")
        return rollouts, content["info"]
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"Cannot resume from {os.path.dirname(path)}: {path} (the rollouts the next steps of this iteration "
            f"reuse) is unreadable ({type(error).__name__}: {error}). Resume from another checkpoint, or set "
            "`resume_weights_only=True` to resume without it (the next step then samples afresh, so the run is no "
            "longer exactly the uninterrupted one)."
        ) from error


def iteration_info(global_step: int, args: DiffusionGRPOConfig) -> dict[str, int]:
    """Where a checkpoint at ``global_step`` stands, as its rollouts file records it (and a resume checks): the
    step, the iteration of its next micro-step, and the settings that place the iteration boundaries."""
    return {
        "global_step": global_step,
        "iteration": iteration_of(global_step * args.gradient_accumulation_steps, args.num_iterations),
        "num_iterations": args.num_iterations,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": args.world_size,
    }


def save_iteration_rollouts(
    rollouts: Rollouts | None,
    rollouts_iteration: int,
    folder: str,
    global_step: int,
    args: DiffusionGRPOConfig,
) -> None:
    """Save this process's ``rollouts`` (sampled for iteration ``rollouts_iteration``) into the checkpoint
    ``folder`` written at ``global_step``, when it falls inside an iteration; nothing at a boundary. Rollouts of
    another iteration (an error stopped the run after the next iteration sampled) are not saved: the
    checkpoint then needs ``resume_weights_only`` (a warning says so)."""
    if not is_mid_iteration(global_step, args.gradient_accumulation_steps, args.num_iterations):
        return
    info = iteration_info(global_step, args)
    if rollouts is None or rollouts_iteration != info["iteration"]:
        logger.warning(
            f"The checkpoint at step {global_step} falls inside an iteration but that iteration's rollouts are "
            "gone; it is saved without them (resuming it needs resume_weights_only=True)."
        )
        return
    save_rollouts(
        rollouts, os.path.join(folder, rollouts_file_name(args.process_index, args.world_size)), info
    )


def restore_rollouts(
    checkpoint: str | None, args: DiffusionGRPOConfig, device: torch.device
) -> tuple[Rollouts | None, int]:
    """The rollouts (and their iteration) that the micro-steps after ``checkpoint`` reuse, when it was written
    inside an iteration; ``(None, -1)`` for a new run or a checkpoint at a boundary (the next step samples).

    Raises:
        CheckpointError: a checkpoint inside an iteration without its rollouts file (unless
        ``args.resume_weights_only``: then a warning, and the next step samples afresh), or with the rollouts of
        another step or other settings.
    """
    if checkpoint is None:
        return None, -1
    step = checkpoint_step(checkpoint)
    if not is_mid_iteration(step, args.gradient_accumulation_steps, args.num_iterations):
        return None, -1
    path = os.path.join(checkpoint, rollouts_file_name(args.process_index, args.world_size))
    where = (
        f"{checkpoint} was written at step {step}, in the middle of an iteration (num_iterations="
        f"{args.num_iterations}, gradient_accumulation_steps={args.gradient_accumulation_steps}: its next "
        "micro-steps train on rollouts sampled by earlier weights)"
    )
    if not os.path.isfile(path):
        message = (
            f"{where}, but {path}, the rollouts they reuse, is missing (a checkpoint written with other "
            "`num_iterations` or `gradient_accumulation_steps`, or by an older version?)."
        )
        if not args.resume_weights_only:
            raise CheckpointError(
                f"Cannot resume exactly: {message} Resume from a checkpoint at an iteration boundary, with the "
                "settings it was written with, or set `resume_weights_only=True` to resume anyway (the next step "
                "then samples afresh)."
            )
        logger.warning(f"{message} The next step samples afresh (resume_weights_only=True).")
        return None, -1
    rollouts, info = load_rollouts(path, device)
    expected = iteration_info(step, args)
    if info != expected:
        raise CheckpointError(
            f"Cannot resume exactly: {where}, and {path} holds the rollouts of {info}, not of {expected}. Resume "
            "with the settings the checkpoint was written with."
        )
    return rollouts, info["iteration"]
