"""The typed contract between :class:`~trl_visual.trainer.DiffusionGRPOTrainer` and the methods built on it.

A method changes GRPO through three hooks, which exchange the small dataclasses defined here, never dicts
with string keys:

- ``compute_advantages(rewards_per_func, inputs) -> Advantages``: the whole global batch's rewards become
  per-sample advantages, with an optional per-sample loss weight and auxiliary objectives;
- ``expand_advantages(advantages, rollouts) -> Advantages``: this process's advantages get their shape
  (a scalar per sample, or a map over latent positions);
- ``policy_loss(log_prob, old_log_prob, advantages) -> PolicyLoss``: the method's whole per-sample loss of
  one transition, from one :meth:`clipped_objective` per set of advantages.

Hooks compute; they do not log. Each returns its figures as detached tensors in ``metrics``, and the trainer
records them once per micro-step (one host sync for all of them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch


class AuxiliaryObjective(NamedTuple):
    """A term ``coefficient · L(advantages)`` added to the per-sample loss, ``L`` the same clipped objective on
    the same log-ratio as the main term (BPGO's auxiliary CRT: ``ς · L(Ã)``). ``name``, when given, is the
    metric under which the unweighted ``L(advantages)`` is logged."""

    coefficient: float
    advantages: torch.Tensor
    name: str | None = None


@dataclass
class Advantages:
    """What :meth:`compute_advantages` returns, and (sliced to this process, shaped by
    :meth:`expand_advantages`) what :meth:`policy_loss` reads from ``rollouts.advantages``.

    The per-sample loss it describes is ``L = w · L(A) + Σ_j c_j · L(A_j)``: ``A`` the ``advantages``, ``w``
    the ``weight`` (1 when ``None``) and ``(c_j, A_j)`` the ``auxiliary`` objectives. With ``per_reward``,
    ViPO's ``multi_objective_loss="per_reward"`` replaces ``L(A)`` by ``Σ_f w_f L(A_f)``.

    Every tensor field is per sample (first dimension the batch); ``metrics`` holds detached scalars for the
    log.
    """

    #: ``(B,)`` the aggregated reward of each sample (logged as ``reward``)
    reward: torch.Tensor
    #: ``(B,)`` per-sample advantages; ``(B, *grid)`` once ViPO's maps spread them over latent positions
    advantages: torch.Tensor
    #: ``(B,)`` multiplies each sample's main term (BPGO's sigmoid RAS group weight); ``None`` for 1
    weight: torch.Tensor | None = None
    #: extra clipped objectives on the same log-ratio (BPGO's auxiliary CRT)
    auxiliary: list[AuxiliaryObjective] = field(default_factory=list)
    #: ``(B, F)`` (then ``(B, F, *grid)``) each reward function's own advantages (ViPO's ``per_reward`` loss)
    per_reward: torch.Tensor | None = None
    #: ``(B, *grid)`` the perceptual maps the advantages were spread with (ViPO), for inspection and logging
    maps: torch.Tensor | None = None
    #: ``(B,)`` the interpretation variance of each sample's reward (rewards returning several interpretations,
    #: or ``reward_ensemble``; NaN for a sample without); ``None`` when no reward has interpretations
    interpretation_var: torch.Tensor | None = None
    #: detached scalar tensors to log under their names, recorded once by the trainer
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    def local(self, rows: slice) -> Advantages:
        """This process's samples: every per-sample tensor sliced to ``rows`` of the global batch (the metrics,
        figures of the whole batch, are kept as they are)."""

        def cut(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[rows]

        return replace(
            self,
            reward=self.reward[rows],
            advantages=self.advantages[rows],
            weight=cut(self.weight),
            auxiliary=[term._replace(advantages=term.advantages[rows]) for term in self.auxiliary],
            per_reward=cut(self.per_reward),
            maps=cut(self.maps),
            interpretation_var=cut(self.interpretation_var),
        )

    def reshaped(self, shape: Callable[[torch.Tensor], torch.Tensor]) -> Advantages:
        """The same advantages with ``shape`` applied to every set of them (the main ones, each auxiliary
        objective's, each reward's): how ViPO spreads all of them over its maps, so that methods compose."""
        per_reward = None
        if self.per_reward is not None:
            per_reward = torch.stack([shape(column) for column in self.per_reward.unbind(dim=1)], dim=1)
        return replace(
            self,
            advantages=shape(self.advantages),
            auxiliary=[term._replace(advantages=shape(term.advantages)) for term in self.auxiliary],
            per_reward=per_reward,
        )


@dataclass
class PolicyLoss:
    """What :meth:`policy_loss` returns for one transition: the per-sample loss ``(B,)`` to minimise, the
    fraction of each sample's ratios that were clipped ``(B,)`` (logged as ``clip_ratio``) and detached
    per-sample figures to log (averaged over samples and trained timesteps, e.g. ``bpgo/crt_loss``)."""

    loss: torch.Tensor
    clipped: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def host_values(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each scalar tensor of ``metrics`` as a float, with one host sync for all of them."""
    if not metrics:
        return {}
    device = next(iter(metrics.values())).device
    values = torch.stack(
        [value.detach().float().reshape(()).to(device) for value in metrics.values()]
    ).tolist()
    return dict(zip(metrics, values))


def record_metrics(store: dict[str, list[float]], metrics: dict[str, torch.Tensor]) -> None:
    """Append each scalar in ``metrics`` to ``store[name]``, with one host sync for all of them."""
    for name, value in host_values(metrics).items():
        store[name].append(value)


def weighted_policy_loss(
    clipped_objective: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
    ],
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: Advantages,
) -> PolicyLoss:
    """The default ``policy_loss``: ``L = w · L(A) + Σ_j c_j · L(A_j)``, each ``L`` one ``clipped_objective`` on the
    same log-ratio (``w`` = ``advantages.weight``, 1 when absent; ``(c_j, A_j)`` = ``advantages.auxiliary``). The
    clipped fraction is the main term's; each named auxiliary term's unweighted ``L(A_j)`` goes to ``metrics``."""
    loss, clipped = clipped_objective(log_prob, old_log_prob, advantages.advantages)
    if advantages.weight is not None:
        loss = loss * advantages.weight
    metrics = {}
    for term in advantages.auxiliary:
        value, _ = clipped_objective(log_prob, old_log_prob, term.advantages)
        loss = loss + term.coefficient * value
        if term.name:
            metrics[term.name] = value.detach()
    return PolicyLoss(loss, clipped, metrics)
