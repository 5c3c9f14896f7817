"""BPGO's trust weights on ViPO's perceptual advantage maps."""

from __future__ import annotations

from dataclasses import dataclass

from .bpgo_config import BPGOConfig
from .bpgo_trainer import BPGOTrainer
from .vipo_config import ViPOConfig
from .vipo_trainer import ViPOTrainer


@dataclass
class BPGOViPOConfig(BPGOConfig, ViPOConfig):
    """Every field of :class:`BPGOConfig` (priors, RAS, CRT) and of :class:`ViPOConfig` (backbone, maps).

    ``map_target="reward"`` is refused: BPGO already decides how rewards become advantages (CRT, RAS), and
    multiplying the rewards by the maps on top would make two incompatible reward transforms.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.multi_objective_loss != "sum":
            raise ValueError(
                "BPGOViPOConfig needs multi_objective_loss='sum': BPGO's prior, RAS and CRT act on one combined "
                "reward per sample."
            )
        if self.map_target != "advantage":
            raise ValueError(
                "BPGOViPOConfig needs map_target='advantage': BPGO turns the rewards into advantages (CRT, RAS) "
                "and ViPO's maps then shape those advantages."
            )


class BPGOViPOTrainer(ViPOTrainer, BPGOTrainer):
    """BPGO and ViPO together: BPGO's priors, RAS and CRT decide each sample's advantage, ViPO's map spreads it
    over the latent positions, and the loss is ViPO's dense one.

    Per sample, with ``M`` the perceptual map, ``w`` the sigmoid-RAS group weight (1 otherwise; posterior
    RAS is already inside ``A``) and ``Ã`` the auxiliary-CRT advantage:

    ``L = w · L_dense(M · A) + ς · L_dense(M · Ã)``

    with ``L_dense`` the per-position clipped objective (:func:`~trl_visual.core.vipo.dense_policy_loss`),
    or GRPO's scalar one on ``mean(M) · A`` with ``dense_level="sample"``.

    From :class:`BPGOTrainer`: ``compute_advantages`` (the weight ``w`` and the auxiliary objective ``ς · L(Ã)``
    of its :class:`~trl_visual.trainer.hooks.Advantages`), the priors (``_before_train``) and the checkpointed
    state; from :class:`ViPOTrainer`: the backbone (``backbone=``), ``expand_advantages`` (which spreads ``A``
    and ``Ã`` over the same maps), the dense ``clipped_objective`` and the map metrics. The base
    ``policy_loss`` combines them: nothing is overridden here.
    """

    _tag_names = ["trl-visual", "diffusion-grpo", "bpgo", "vipo"]
    _method_name = "BPGO-ViPO"
    _citations = ["BPGO", "ViPO", "DanceGRPO", "Flow-GRPO"]
    config_class = BPGOViPOConfig
