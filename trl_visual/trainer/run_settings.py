"""What a resumed run must agree on with the run that wrote the checkpoint.

:class:`RunSettingsCallback` records the method, ``num_generations`` and ``seed`` in every checkpoint's
``trainer_state.json`` (transformers' own place for callback state, ``stateful_callbacks``: JSON, nothing that
runs code). :func:`check_resumed_settings` reads them back before a resume:

* another method (a BPGO checkpoint resumed by GRPO) is refused: its state (BPGO's priors) would be dropped;
* another ``num_generations`` or ``seed`` is a warning, as transformers warns about another batch size: the run
  goes on, but it is no longer the run that wrote the checkpoint (other groups, other noise);
* a ``trainer_state.json`` whose ``global_step`` disagrees with its folder's name (``checkpoint-3`` saying 5) is
  refused: the file was edited or copied from another checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..checkpointing import METHOD_STATE_NAME

logger = logging.getLogger(__name__)

#: the settings recorded, with what a change means
WARNED_SETTINGS = {
    "num_generations": "the groups (and so the advantages) differ from the original run's",
    "seed": "the rollouts after the resume sample other noise than the original run would have",
}


class RunSettingsCallback(TrainerCallback, ExportableState):
    """Keeps the method and the settings of :data:`WARNED_SETTINGS` in each checkpoint's ``trainer_state.json``."""

    def __init__(self, method: str = "", num_generations: int = 0, seed: int = 0):
        self.method, self.num_generations, self.seed = method, num_generations, seed

    def state(self) -> dict[str, Any]:
        return {
            "args": {"method": self.method, "num_generations": self.num_generations, "seed": self.seed},
            "attributes": {},
        }


def _stored_settings(trainer_state: dict[str, Any]) -> dict[str, Any] | None:
    stored = (trainer_state.get("stateful_callbacks") or {}).get(RunSettingsCallback.__name__)
    if isinstance(stored, list):
        stored = stored[0] if stored else None
    return stored.get("args") if isinstance(stored, dict) else None


def check_step_matches_folder(checkpoint: str, trainer_state: dict[str, Any]) -> None:
    """``checkpoint-N/trainer_state.json`` must say ``global_step: N``."""
    match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(checkpoint)))
    step = trainer_state.get("global_step")
    if match and step != int(match.group(1)):
        raise ValueError(
            f"{os.path.join(checkpoint, 'trainer_state.json')} says global_step {step}, but the folder is "
            f"{os.path.basename(os.path.normpath(checkpoint))}: the file was edited or comes from another checkpoint, "
            "and resuming would continue from the wrong step. Restore the file, or resume from another checkpoint."
        )


def check_resumed_settings(checkpoint: str, current: RunSettingsCallback, has_method_state: bool) -> None:
    """Compare the checkpoint's recorded settings with ``current`` (see the module docstring).

    ``has_method_state`` says whether the current method keeps state of its own (``trl_visual_state.safetensors``): a
    checkpoint without recorded settings that has such a file, resumed by a method without state, is refused too.

    Raises:
        ValueError: another method, or a ``global_step`` that disagrees with the folder's name.
    """
    path = os.path.join(checkpoint, "trainer_state.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        trainer_state = json.load(handle)
    check_step_matches_folder(checkpoint, trainer_state)
    stored = _stored_settings(trainer_state)
    if stored is None:
        if os.path.exists(os.path.join(checkpoint, METHOD_STATE_NAME)) and not has_method_state:
            raise ValueError(
                f"{checkpoint} holds {METHOD_STATE_NAME}, the state of a method such as BPGO, which "
                f"{current.method} does not have. Resume it with the method that wrote it (e.g. `trl-visual bpgo`)."
            )
        return
    if stored.get("method") and stored["method"] != current.method:
        raise ValueError(
            f"{checkpoint} was written by {stored['method']}, not {current.method}: resuming it with {current.method} "
            f"would drop what {stored['method']} keeps (its priors, its advantages). Resume it with the method that "
            f"wrote it ({stored['method']}), or start a new run in another `output_dir`."
        )
    for name, consequence in WARNED_SETTINGS.items():
        before, now = stored.get(name), getattr(current, name)
        if before is not None and before != now:
            logger.warning(
                f"Resuming {checkpoint} with {name}={now}, but it was trained with {name}={before}: {consequence}. "
                f"Pass {name}={before} to continue the same run."
            )
