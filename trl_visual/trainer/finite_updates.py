"""The finite-update guard: NaN/inf never reaches the weights, the optimizer state or a saved file.

* :func:`nonfinite_parameters` and :func:`nonfinite_cause`: which weights are NaN/inf, and what most likely
  made a training step non-finite, so that the error names the setting to change.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import gather

if TYPE_CHECKING:  # pragma: no cover
    from .rollout import Rollouts

logger = logging.getLogger(__name__)

#: where a non-finite value was first seen in a training step, from the earliest stage to the latest
NONFINITE_STAGES = ("samples", "log_probs", "loss", "gradients")


class NonFiniteTrainingError(FloatingPointError):
    """Too many optimizer steps in a row had NaN/inf samples, losses or gradients; or the weights to save are
    non-finite."""


def nonfinite_parameters(module: torch.nn.Module, limit: int = 3) -> list[str]:
    """Names of up to ``limit`` trainable parameters holding a NaN or ±inf."""
    names = []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad and not bool(torch.isfinite(parameter.detach()).all()):
            names.append(name)
            if len(names) == limit:
                break
    return names


#: sampling settings → the value above which a non-finite sample is blamed on them, and their usual range
UNUSUAL_SAMPLING_SETTINGS = {
    "guidance_scale": (20.0, "1 to 15"),
    "time_shift": (20.0, "3 to 8"),
    "noise_level": (1.5, "0.3 to 1"),
}


def unusual_sampling_settings(args: Any) -> str:
    """``"`guidance_scale` (1e+04) is far above the usual 1 to 15"``-style phrases for each sampling setting far
    outside its usual range (:data:`UNUSUAL_SAMPLING_SETTINGS`), joined; ``""`` when none is."""
    phrases = []
    for name, (limit, usual) in UNUSUAL_SAMPLING_SETTINGS.items():
        value = getattr(args, name, None)
        if value is not None and not value <= limit:  # NaN counts as unusual
            phrases.append(f"`{name}` ({value:g}) is far above the usual {usual}")
    return "; ".join(phrases)


def nonfinite_cause(stage: str, args: Any, global_step: int, bad_weights: list[str]) -> str:
    """The likely cause of a non-finite training step, and what to change.

    ``stage`` is where the non-finite value first appeared (one of :data:`NONFINITE_STAGES`), ``global_step``
    how many optimizer steps came before the non-finite ones; ``bad_weights`` are trainable parameters that are
    already non-finite (:func:`nonfinite_parameters`).
    """
    lr = f"`learning_rate` ({args.learning_rate:g})"
    if bad_weights:
        return (
            f"the trained weights themselves are non-finite ({', '.join(bad_weights)}): an update overflowed. "
            f"Lower {lr}, keep `max_grad_norm` > 0, and train in float32 or bf16 rather than fp16."
        )
    unusual = unusual_sampling_settings(args)
    if unusual and (stage == "log_probs" or (stage == "samples" and global_step == 0)):
        return f"{unusual}: the sampler's steps overflow. Bring it back to its usual range."
    if stage == "samples" and global_step == 0:
        return (
            "the model's own predictions are non-finite before any update: check the pipeline's dtype (fp16 "
            "overflows: load it in bfloat16 or float32) and that its scheduler is a flow-matching one."
        )
    if stage == "samples":
        return (
            f"the samples became non-finite after {global_step} optimizer step(s): {lr} is probably too high for this "
            "model; lower it (and keep `max_grad_norm` > 0)."
        )
    if stage == "log_probs":
        return (
            f"the sampler's log-probabilities are non-finite while the samples are not: `noise_level` "
            f"({args.noise_level}) must be > 0 and the scheduler's sigmas must lie in [0, 1] (a flow-matching "
            f"scheduler), so that every stochastic step (`sde_type` {args.sde_type!r}) has a positive variance."
        )
    clip = args.max_grad_norm
    return (
        f"the policy loss or its gradients overflowed: lower {lr}, keep `max_grad_norm` > 0 (now {clip:g}), and "
        "use bf16 rather than fp16."
    )


class FiniteUpdatesMixin:
    """The trainer's guard that NaN/inf never reaches the weights, the optimizer state or a saved file.

    A rollout or loss that is non-finite records its stage (``self._nonfinite_stage``); just before
    ``optimizer.step()`` the step is let through only if every process was finite, else skipped without
    touching the weights or AdamW's moments. Mixed into :class:`~trl_visual.trainer.DiffusionGRPOTrainer`
    before :class:`transformers.Trainer`, whose ``_get_grad_norm`` and ``save_model`` it extends.
    """

    _nonfinite_stage: str | None = None  # where this optimizer step first went NaN/inf, if it did
    _consecutive_nonfinite_steps = 0
    _stopped_checkpoint: str | None = None  # where `_save_before_stopping` saved this run's stop checkpoint

    def _rollouts_are_finite(self, rollouts: Rollouts) -> bool:
        """Whether every process's samples and stored log-probs are finite (all processes take the same
        decision). When not, the stage is recorded for :meth:`_guard_update` and the rewards are not called:
        they would score NaN images, and be blamed for it."""
        local = torch.stack(
            [torch.isfinite(rollouts.samples).all(), torch.isfinite(rollouts.log_probs).all()]
        )
        samples_finite, log_probs_finite = (
            gather(local[None].float().to(self.accelerator.device)).min(dim=0).values
        )
        if samples_finite and log_probs_finite:
            return True
        self._nonfinite_stage = self._nonfinite_stage or ("log_probs" if samples_finite else "samples")
        return False

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        """``Trainer`` computes the global gradient norm just before ``optimizer.step()``; the step is then
        guarded (:meth:`_guard_update`).
        Private ``Trainer`` override, checked against transformers 5.3.0 (the floor) and 5.25.0."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._guard_update(model, grad_norm)
        return grad_norm

    def _guard_update(self, model: torch.nn.Module, grad_norm: Any) -> None:
        """Let the coming optimizer step through only if this step's samples, log-probs, loss and gradients
        were all finite on every process; otherwise skip it (:meth:`_skip_update`). Skipped steps are counted
        in the ``nonfinite_steps`` metric (per logging interval); ``max_consecutive_nonfinite_steps`` in a row
        raise :class:`~trl_visual.trainer.guards.NonFiniteTrainingError` naming the likely cause."""
        stage, self._nonfinite_stage = self._nonfinite_stage, None
        if stage is None and self.accelerator.scaler is None and not math.isfinite(float(grad_norm)):
            stage = "gradients"  # under fp16's GradScaler, overflowing gradients are the scaler's to skip
        skip = bool(gather(torch.tensor([float(stage is not None)], device=self.accelerator.device)).any())
        interval = self._metrics["train"]["nonfinite_steps"]
        interval[:] = [(interval[0] if interval else 0.0) + skip]  # a count per log, not an average
        if not skip:
            self._consecutive_nonfinite_steps = 0
            return
        self._skip_update(model)
        self._consecutive_nonfinite_steps += 1
        steps_before = self.state.global_step + 1 - self._consecutive_nonfinite_steps
        cause = nonfinite_cause(stage or "gradients", self.args, steps_before, nonfinite_parameters(model))
        limit = self.args.max_consecutive_nonfinite_steps
        logger.warning(
            f"Step {self.state.global_step + 1} skipped: non-finite {stage or 'values on another process'} "
            f"({self._consecutive_nonfinite_steps}/{limit} in a row); likely cause: {cause}"
        )
        if self._consecutive_nonfinite_steps >= limit:
            raise NonFiniteTrainingError(
                f"{limit} optimizer steps in a row were non-finite (NaN/inf), so training stops at step "
                f"{self.state.global_step}; none of them changed the weights, and the checkpoints already written "
                f"are kept.{self._save_before_stopping()} Likely cause: {cause} "
                "(`max_consecutive_nonfinite_steps` sets how many are tolerated.)"
            )

    def _skip_update(self, model: torch.nn.Module) -> None:
        """Make the coming ``optimizer.step()`` a no-op. Every gradient is dropped (``p.grad = None``): torch's
        optimizers skip such parameters, so the weights *and* AdamW's moments and step counts stay as they were.
        Under fp16's ``GradScaler`` (which refuses a step without gradients) they are made NaN instead, and the
        scaler skips the step as it does its own overflows."""
        for parameter in model.parameters():
            if self.accelerator.scaler is not None and parameter.requires_grad:
                parameter.grad = torch.full_like(parameter, float("nan"))
            else:
                parameter.grad = None

    def _save_before_stopping(self) -> str:
        """Save what the run trained as a checkpoint ``output_dir/stopped-at-step-N`` before an error stops it,
        so that a run without checkpoints (``save_strategy="no"``) is not lost; returns a sentence for the error
        (empty when nothing could be saved). Saved once per run: a second call returns the same sentence.

        The checkpoint is a whole one, written like ``checkpoint-N`` (staged, then renamed into place; not
        rotated, not pushed): the weights of the last completed optimizer step, AdamW's state, the schedule,
        the step count, the method's state and, inside an iteration, its rollouts; ``resume_from_checkpoint``
        takes it. Only finite weights are saved, and only in a single-process run: saving may need every
        process, and the others may be waiting elsewhere (they stop when this one exits)."""
        if self.accelerator.num_processes > 1 or not self.args.should_save:
            return ""
        if self._stopped_checkpoint is None:
            name = f"stopped-at-step-{self.state.global_step}"
            self._stop_checkpoint_name = name
            try:
                self._save_checkpoint(self.model_wrapped, trial=None)
            except Exception as error:  # the error that stops the run is the one to report
                logger.warning(f"Could not save the weights before stopping: {type(error).__name__}: {error}")
                return ""
            finally:
                self._stop_checkpoint_name = None
            self._stopped_checkpoint = os.path.join(self.args.output_dir, name)
        directory = self._stopped_checkpoint
        return (
            f" The weights trained so far were saved to {directory}, with the optimizer and the run's state: "
            f"resume with `resume_from_checkpoint={directory!r}` (`--resume_from_checkpoint {directory}`)."
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the trained weights (see :meth:`_save`), refusing non-finite ones: a NaN/inf weight is never
        written, so the last checkpoint written stays the last good one."""
        bad = nonfinite_parameters(self.accelerator.unwrap_model(self.model))
        if bad:
            raise NonFiniteTrainingError(
                f"Refusing to save to {output_dir or self.args.output_dir}: the weights {bad} are NaN/inf. "
                f"Likely cause: {nonfinite_cause('gradients', self.args, self.state.global_step, bad)} Resume "
                "from the last checkpoint (`resume_from_checkpoint=True`) with that fixed."
            )
        super().save_model(output_dir, _internal_call=_internal_call)
