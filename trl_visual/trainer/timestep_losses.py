"""The losses of one micro-step: one forward and one backward per trained timestep, so that memory does not grow
with the number of timesteps ``K`` (what :meth:`~trl_visual.trainer.DiffusionGRPOTrainer.training_step` runs once
the micro-step's rollouts are scored)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch

from ..core.policy_loss import gaussian_kl
from ..models import DiffusionAdapter
from .diffusion_grpo_config import DiffusionGRPOConfig
from .engines import Engine
from .hooks import Advantages, PolicyLoss
from .rollout import Rollouts, rescore_transition, transition_at
from .step_weighting import policy_log_probs, step_loss_weights

#: ``policy_loss(log_prob, old_log_prob, advantages)``: the method's hook
PolicyLossHook = Callable[[torch.Tensor, torch.Tensor, Advantages], PolicyLoss]


def timestep_losses(
    adapter: DiffusionAdapter,
    model: torch.nn.Module,
    rollouts: Rollouts,
    args: DiffusionGRPOConfig,
    engine: Engine,
    policy_loss: PolicyLossHook,
    reference_model: Callable[[torch.nn.Module], contextlib.AbstractContextManager[torch.nn.Module]],
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    backward: Callable[[torch.Tensor], None],
    gradient_accumulation_steps: int,
) -> dict[str, torch.Tensor]:
    """For each trained timestep ``k`` of ``rollouts``: re-score the stored transition under the current weights,
    ``L_k = policy_loss(…)`` (plus ``β · KL(π_θ ‖ π_ref)`` to the LoRA-disabled ``reference_model`` when
    ``beta > 0``, exact between the two Gaussian steps), and ``backward(mean(L_k) / scale)`` with ``engine``'s
    scale, under its deferred gradient syncs. The per-step options (:mod:`~trl_visual.trainer.step_weighting`)
    swap the log-ratio for GRPO-Guard's ``log r̂`` (``ratio_norm``) and multiply ``policy_loss(…)`` by each step's
    weight (``noise_aware_weight``, ``dt_invariant_weight``). Returns each figure's mean over the samples and the ``K``
    timesteps (``loss``, ``policy_loss``, ``clip_ratio``, ``kl``, the hook's metrics), detached, on the device:
    one host sync per figure, by the caller."""
    num_trained = rollouts.train_steps.shape[1]
    scale = engine.backward_scale(num_trained, gradient_accumulation_steps)
    weights = step_loss_weights(rollouts, args)
    sums: dict[str, torch.Tensor] = {}  # detached running sums: one device sync per metric, not per step

    def add(name: str, value: torch.Tensor) -> None:
        sums[name] = sums.get(name, 0) + value.detach().mean() / num_trained

    for k in engine.backward_steps(model, num_trained):  # gradients reduced at the window's last backward
        transition = transition_at(rollouts, k)
        with autocast():
            step = rescore_transition(adapter, model, rollouts, transition, args)
            result = policy_loss(*policy_log_probs(step, transition, args), rollouts.advantages)
            loss, clipped = result.loss, result.clipped
            if weights is not None:
                loss = loss * weights[:, k]
            for name, term in {"policy_loss": loss, **result.metrics}.items():
                add(name, term)
            if args.beta > 0:
                with torch.no_grad(), reference_model(model) as reference:
                    # the stored v_u is the policy's: the reference predicts its own
                    unguided = replace(transition, uncond_velocity=None)
                    reference_step = rescore_transition(adapter, reference, rollouts, unguided, args)
                kl = gaussian_kl(step.mean, reference_step.mean, step.std).flatten(1).mean(dim=1)
                loss = loss + args.beta * kl
                add("kl", kl)
            loss = loss.mean()
        backward(loss / scale)
        add("loss", loss)
        add("clip_ratio", clipped)
    return sums


@contextlib.contextmanager
def adapter_disabled(
    model: torch.nn.Module, unwrap: Callable[[torch.nn.Module], torch.nn.Module]
) -> Iterator[torch.nn.Module]:
    """The reference policy: the same network with its LoRA adapter disabled."""
    unwrapped = unwrap(model)
    unwrapped.disable_adapters()
    try:
        yield unwrapped
    finally:
        unwrapped.enable_adapters()
