"""The finite-update guard: NaN/inf never reaches the weights, the optimizer state or a saved file.

* :func:`nonfinite_parameters` and :func:`nonfinite_cause`: which weights are NaN/inf, and what most likely
  made a training step non-finite, so that the error names the setting to change.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import gather

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

    from .diffusion_grpo_config import DiffusionGRPOConfig
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


class FiniteUpdateGuard:
    """The trainer's guard that NaN/inf never reaches the weights, the optimizer state or a saved file.

    A rollout or loss that is non-finite records its stage (:meth:`note`); just before ``optimizer.step()``
    (``Trainer._get_grad_norm``) :meth:`guard` lets the step through only if every process was finite, else skips
    it without touching the weights or AdamW's moments. :meth:`check_savable` refuses non-finite weights before
    ``save_model`` writes them.
    """

    def __init__(self, accelerator: Accelerator, args: DiffusionGRPOConfig):
        self.accelerator = accelerator
        self.args = args
        #: where this optimizer step first went NaN/inf, if it did
        self.stage: str | None = None
        self.consecutive = 0

    def note(self, stage: str) -> None:
        """Record that this optimizer step went non-finite at ``stage``, unless an earlier stage already did."""
        self.stage = self.stage or stage

    def rollouts_are_finite(self, rollouts: Rollouts) -> bool:
        """Whether every process's samples and stored log-probs are finite (all processes take the same
        decision). When not, the stage is recorded for :meth:`guard` and the rewards are not called: they would
        score NaN images, and be blamed for it."""
        local = torch.stack(
            [torch.isfinite(rollouts.samples).all(), torch.isfinite(rollouts.log_probs).all()]
        )
        samples_finite, log_probs_finite = (
            gather(local[None].float().to(self.accelerator.device)).min(dim=0).values
        )
        if samples_finite and log_probs_finite:
            return True
        self.note("log_probs" if samples_finite else "samples")
        return False

    def guard(
        self,
        model: torch.nn.Module,
        grad_norm: Any,
        global_step: int,
        skipped: list[float],
        save_before_stopping: Callable[[], str],
    ) -> None:
        """Let the coming optimizer step through only if this step's samples, log-probs, loss and gradients
        were all finite on every process; otherwise skip it (:meth:`skip_update`). Skipped steps are counted
        in ``skipped`` (the ``nonfinite_steps`` metric, a count per logging interval);
        ``max_consecutive_nonfinite_steps`` in a row raise :class:`NonFiniteTrainingError` naming the likely cause,
        after ``save_before_stopping()`` (whose sentence the error carries)."""
        stage, self.stage = self.stage, None
        if stage is None and self.accelerator.scaler is None and not math.isfinite(float(grad_norm)):
            stage = "gradients"  # under fp16's GradScaler, overflowing gradients are the scaler's to skip
        skip = bool(gather(torch.tensor([float(stage is not None)], device=self.accelerator.device)).any())
        skipped[:] = [(skipped[0] if skipped else 0.0) + skip]
        if not skip:
            self.consecutive = 0
            return
        self.skip_update(model)
        self.consecutive += 1
        steps_before = global_step + 1 - self.consecutive
        cause = nonfinite_cause(stage or "gradients", self.args, steps_before, nonfinite_parameters(model))
        limit = self.args.max_consecutive_nonfinite_steps
        logger.warning(
            f"Step {global_step + 1} skipped: non-finite {stage or 'values on another process'} "
            f"({self.consecutive}/{limit} in a row); likely cause: {cause}"
        )
        if self.consecutive >= limit:
            raise NonFiniteTrainingError(
                f"{limit} optimizer steps in a row were non-finite (NaN/inf), so training stops at step "
                f"{global_step}; none of them changed the weights, and the checkpoints already written "
                f"are kept.{save_before_stopping()} Likely cause: {cause} "
                "(`max_consecutive_nonfinite_steps` sets how many are tolerated.)"
            )

    def skip_update(self, model: torch.nn.Module) -> None:
        """Make the coming ``optimizer.step()`` a no-op. Every gradient is dropped (``p.grad = None``): torch's
        optimizers skip such parameters, so the weights *and* AdamW's moments and step counts stay as they were.
        Under fp16's ``GradScaler`` (which refuses a step without gradients) they are made NaN instead, and the
        scaler skips the step as it does its own overflows."""
        for parameter in model.parameters():
            if self.accelerator.scaler is not None and parameter.requires_grad:
                parameter.grad = torch.full_like(parameter, float("nan"))
            else:
                parameter.grad = None

    def check_savable(self, denoiser: torch.nn.Module, output_dir: str, global_step: int) -> None:
        """Refuse to save non-finite weights: a NaN/inf weight is never written, so the last checkpoint written
        stays the last good one."""
        bad = nonfinite_parameters(denoiser)
        if bad:
            raise NonFiniteTrainingError(
                f"Refusing to save to {output_dir}: the weights {bad} are NaN/inf. "
                f"Likely cause: {nonfinite_cause('gradients', self.args, global_step, bad)} Resume "
                "from the last checkpoint (`resume_from_checkpoint=True`) with that fixed."
            )
