"""Configuration of :class:`~trl_visual.trainer.bpgo_trainer.BPGOTrainer`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ..core.bpgo import DEFAULT_RAS_K
from ..core.validation import check_choice
from .diffusion_grpo_config import DiffusionGRPOConfig

PRIOR_SOURCES = ("column", "base_model", "ema", "first_frame")
RAS_MODES = ("sigmoid", "posterior", "uncertainty", "none")
RAS_DELTA_SCALES = ("batch_std", "none")
CRT_MODES = ("auxiliary", "replace", "none")

DEFAULT_RAS_ALPHA = {"sigmoid": 0.5, "posterior": 1.0, "uncertainty": 0.5, "none": 0.0}
"""``ras_alpha`` when left unset: the paper's best α for its sigmoid, the released code's α for the posterior, and
0.5 for the uncertainty-aware form (weights 1.5 to 0.5 before renormalizing)."""


@dataclass
class BPGOConfig(DiffusionGRPOConfig):
    r"""Configuration of BPGO (Bayesian Prior-Guided Optimization, Liu et al., arXiv 2511.18919).

    Every :class:`~trl_visual.DiffusionGRPOConfig` field applies; the fields below choose where the
    per-prompt prior reward comes from and which form of the two BPGO mechanisms is used:

    - RAS (Reliability-Adaptive Scaling), one weight per group from ``Δ_i = R̄_i − R_prior,i``:
      ``"sigmoid"`` is the paper's Eq. 2, ``"posterior"`` the authors' released code.
    - CRT (Contrastive Reward Transformation) of the rewards against the prior: ``"auxiliary"`` is the
      paper's Eq. 4 with its auxiliary GRPO loss, ``"replace"`` the released code's gated transform.

    The defaults are the paper's form (sigmoid RAS, auxiliary CRT) with an EMA prior (the paper's
    text-to-image setting), which needs no extra data. To reproduce the released code instead::

        BPGOConfig(output_dir="out", prior_source="column", ras_mode="posterior", crt_mode="replace",
                   sde_type="dance_grpo", noise_level=0.3, timestep_fraction=0.6, init_same_noise=True)

    See ``docs/bpgo.md`` for the equations and how each default was chosen.
    """

    #: BPGO and ViPO normalize advantages per prompt group: no trajectory branching
    _branching_advantages: ClassVar[bool] = False

    # -- the prior ------------------------------------------------------------------------------------
    prior_source: str = field(
        default="ema",
        metadata={
            "help": "Where each prompt's prior reward R_prior comes from: 'column' (a numeric dataset column, "
            "`prior_column`; the released code's way), 'base_model' (the mean reward of `prior_num_rollouts` "
            "rollouts of the initial model per prompt, estimated before training and cached in output_dir), "
            "'ema' (a per-prompt moving average of its group means, `prior_ema_decay`; a prompt's first "
            "visit uses its own group mean; the paper's text-to-image setting), or 'first_frame' (image-to-video "
            "only: the reward of each row's conditioning image, as a still video, against its prompt; the paper's "
            "image-to-video setting; computed once before training and cached in output_dir)."
        },
    )
    prior_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "With `prior_source='base_model'`: estimate the priors with this model instead of the one "
            "being trained (a Hub id, a local path or a `tiny:` name; e.g. the SFT model the paper takes its "
            "prior from): its mean reward over `prior_num_rollouts` rollouts per prompt, sampled with the run's "
            "sampling settings. Loaded with the `torch_dtype` of `model_init_kwargs`, freed after estimation."
        },
    )
    prior_column: str = field(
        default="prior",
        metadata={"help": "Dataset column of numeric priors when `prior_source='column'`."},
    )
    prior_var_column: str = field(
        default="prior_var",
        metadata={
            "help": "Dataset column of the prior's variance v_i (the reward's variance over the anchor's samples) "
            "when `prior_source='column'` and `ras_mode='uncertainty'` with `ras_consistency`."
        },
    )
    prior_num_rollouts: int = field(
        default=8,
        metadata={
            "help": "Rollouts per prompt (K) used to estimate the prior when `prior_source='base_model'`."
        },
    )
    prior_ema_decay: float = field(
        default=0.9,
        metadata={
            "help": "Weight of the old prior in the EMA update P' = decay · P + (1 − decay) · group mean, in "
            "[0, 1] (`prior_source='ema'`)."
        },
    )

    # -- RAS: one weight per group ------------------------------------------------------------------------
    ras_mode: str = field(
        default="sigmoid",
        metadata={
            "help": "Reliability-Adaptive Scaling: 'sigmoid' (paper Eq. 2, w = 1 + α (2 sigmoid(k Δ) − 1), "
            "multiplies the group's GRPO loss), 'posterior' (released code: Normal–Normal posterior "
            "probability that the group beats its prior, w = clamp(1 + α (p − 0.5), 0.01, 10), multiplies "
            "the z-scored advantages), 'uncertainty' (our extension: w = 1 + α (1 − 2ρ), ρ the share of the "
            "group's reward variance that is disagreement between the reward's interpretations, times 2Φ(z) with "
            "`ras_consistency`, renormalized to mean 1; multiplies the group's GRPO loss; needs a fixed prior, "
            "`prior_source='column'`, 'base_model' or 'first_frame'), or 'none' (w = 1)."
        },
    )
    ras_consistency: bool = field(
        default=False,
        metadata={
            "help": "With `ras_mode='uncertainty'`: multiply each weight by 2Φ(z), z = (R̄ − m) / sqrt(s²/G + v/K) the "
            "group mean's distance above its fixed prior m (variance v from K = `prior_num_rollouts` rollouts, or "
            "the `prior_var_column`), in standard errors: the paper's 'groups consistent with the prior'."
        },
    )
    ras_alpha: float | None = field(
        default=None,
        metadata={
            "help": "RAS strength α. Unset: 0.5 for 'sigmoid' (the paper's best) and 1.0 for 'posterior' (the "
            "released code's)."
        },
    )
    ras_k: float = field(
        default=DEFAULT_RAS_K,
        metadata={
            "help": "Slope k of the sigmoid RAS. With `ras_delta_scale='batch_std'` (default) Δ is in batch "
            "reward stds and k = 2 gives w = 1 + α tanh(Δ / s); with 'none' k is in 1/reward units."
        },
    )
    ras_delta_scale: str = field(
        default="batch_std",
        metadata={
            "help": "Unit of Δ in the sigmoid RAS: 'batch_std' (Δ divided by the std of all rewards of the "
            "batch: scale-free, the same k for HPSv2 near 0.25 and PickScore near 22) or 'none' (the "
            "paper's literal Eq. 2). Only used by `ras_mode='sigmoid'`."
        },
    )
    ras_prior_var: float = field(
        default=1.0,
        metadata={
            "help": "Prior variance v_0 of the 'posterior' RAS, in squared reward units (released: 1.0)."
        },
    )

    # -- CRT: contrastive reward transformation ------------------------------------------------------------
    crt_mode: str = field(
        default="auxiliary",
        metadata={
            "help": "Contrastive Reward Transformation: 'auxiliary' (paper Eq. 4, "
            "R̃ = [λ (R − R_prior) + 1{R > R_prior}] exp(R), plus `crt_weight` × a GRPO loss on R̃'s "
            "advantages through the same clipped objective), 'replace' (released code, "
            "R̃ = [a (R − R_prior) + 1{R > R_prior}] sigmoid(R / τ) R replaces the rewards before the "
            "advantages, and RAS reads R̃: refused with `ras_mode='sigmoid'`, whose Δ would compare R̃ with "
            "the raw prior), or 'none'."
        },
    )
    crt_weight: float = field(
        default=0.5,
        metadata={
            "help": "ς: weight of the auxiliary CRT loss (`crt_mode='auxiliary'`); not given in the paper."
        },
    )
    crt_lambda: float = field(
        default=50.0,
        metadata={
            "help": "λ of the paper's CRT (`crt_mode='auxiliary'`); not given in the paper, so the default "
            "is the released code's contrast weight a = 50."
        },
    )
    crt_delta_scale: str = field(
        default="none",
        metadata={
            "help": "Unit of R − R_prior in the paper's CRT: 'none' (the literal Eq. 4, λ in reward units: 50 suits "
            "HPSv2's spread of ~0.02) or 'batch_std' (divided by the std of all rewards of the batch, as "
            "`ras_delta_scale` does: scale-free, use λ ≈ 1). Only used by `crt_mode='auxiliary'`."
        },
    )
    crt_a: float = field(
        default=50.0, metadata={"help": "a of the released code's CRT (`crt_mode='replace'`)."}
    )
    crt_tau: float = field(
        default=5.0, metadata={"help": "τ of the released code's sigmoid gate (`crt_mode='replace'`)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("prior_source", self.prior_source, PRIOR_SOURCES)
        check_choice("ras_mode", self.ras_mode, RAS_MODES)
        check_choice("ras_delta_scale", self.ras_delta_scale, RAS_DELTA_SCALES)
        check_choice("crt_delta_scale", self.crt_delta_scale, RAS_DELTA_SCALES)
        check_choice("crt_mode", self.crt_mode, CRT_MODES)
        if self.ras_alpha is None:
            self.ras_alpha = DEFAULT_RAS_ALPHA[self.ras_mode]
        self._check_ranges()
        self._check_ras_reads_raw_rewards()
        self._check_uncertainty_prior()
        self._check_prior_model()

    def _check_prior_model(self) -> None:
        """``prior_model_name_or_path`` names the model that ``prior_source="base_model"`` samples; any other
        source would silently ignore it."""
        if self.prior_model_name_or_path is not None and self.prior_source != "base_model":
            raise ValueError(
                f"`prior_model_name_or_path` is the model that `prior_source='base_model'` estimates the priors "
                f"with, but prior_source={self.prior_source!r} does not sample any model: set "
                "`prior_source='base_model'` or drop `prior_model_name_or_path`."
            )
        if self.prior_model_name_or_path is not None and not str(self.prior_model_name_or_path).strip():
            raise ValueError(
                "`prior_model_name_or_path` is empty: give a Hub id, a local path or a `tiny:` name, or leave it "
                "unset to estimate the priors with the model being trained."
            )

    def _check_uncertainty_prior(self) -> None:
        """The uncertainty RAS compares a group with a FIXED anchor (mean and variance of the prompt's reward). The
        EMA prior follows the group means it would be compared with, so ``z`` would be centred on 0 whatever the
        group does, and it has no variance ``v``: refused."""
        if self.ras_mode == "uncertainty" and self.prior_source == "ema":
            raise ValueError(
                "`ras_mode='uncertainty'` needs a fixed prior (a mean and a variance per prompt), but "
                "`prior_source='ema'` follows the group means it would be compared with and has no variance. Use "
                "`prior_source='base_model'` (estimated from `prior_num_rollouts` rollouts), 'first_frame' "
                "(image-to-video) or 'column' (with `prior_column` and `prior_var_column`)."
            )
        if self.ras_consistency and self.ras_mode != "uncertainty":
            raise ValueError(
                f"`ras_consistency=True` is a factor of `ras_mode='uncertainty'`, not of {self.ras_mode!r}: set "
                "`ras_mode='uncertainty'` or drop `ras_consistency`."
            )

    def _check_ras_reads_raw_rewards(self) -> None:
        """Refuse the sigmoid RAS under the released CRT: ``crt_mode="replace"`` hands RAS the transformed rewards
        R̃, and Eq. 2's ``Δ = mean(R̃) − R_prior`` would compare them with the untransformed prior, a difference in
        no unit at all. The released code pairs that CRT with the posterior RAS only (whose quirk is measured
        in ``docs/bpgo.md``)."""
        if self.ras_mode == "sigmoid" and self.crt_mode == "replace":
            raise ValueError(
                "`ras_mode='sigmoid'` cannot be combined with `crt_mode='replace'`: the released CRT replaces the "
                "rewards R by R̃ = [a (R − R_prior) + 1{R > R_prior}] sigmoid(R / τ) R before RAS reads them, and "
                "Δ = mean(R̃) − R_prior compares transformed rewards with a raw prior. Use `crt_mode='auxiliary'` "
                "(the paper's CRT, RAS reads the raw rewards) with the sigmoid RAS, or `ras_mode='posterior'` with "
                "`crt_mode='replace'` (the released code)."
            )

    def _check_ranges(self) -> None:
        """Numeric fields: each bad value gets an error naming the field and its valid range."""
        checks = [
            ("prior_num_rollouts", self.prior_num_rollouts >= 1, "at least 1"),
            ("prior_ema_decay", 0.0 <= self.prior_ema_decay <= 1.0, "in [0, 1]"),
            ("ras_k", self.ras_k > 0, "positive"),
            ("ras_prior_var", self.ras_prior_var > 0, "positive"),
            ("crt_weight", self.crt_weight >= 0, "non-negative"),
            ("crt_tau", self.crt_tau > 0, "positive"),
        ]
        if self.ras_mode in ("sigmoid", "uncertainty"):
            checks.append(
                ("ras_alpha", 0.0 <= self.ras_alpha <= 1.0, f"in [0, 1] for the {self.ras_mode} RAS")
            )
        else:
            checks.append(("ras_alpha", self.ras_alpha >= 0, "non-negative"))
        for name, ok, valid in checks:
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"`{name}` must be {valid}; got {value!r}.")
