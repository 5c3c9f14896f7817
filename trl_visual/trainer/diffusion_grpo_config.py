"""Configuration of :class:`~trl_visual.DiffusionGRPOTrainer`."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import TrainingArguments

from ..core.advantages import AGGREGATIONS, SCALE_REWARDS
from ..core.branching import BRANCH_MODES, num_branch_points
from ..core.sde import SDE_TYPES
from ..core.timesteps import SDE_WINDOW_SCHEDULES, TIMESTEP_SELECTIONS, window_starts
from ..core.validation import check_choice
from ..miniature import recipe_fields
from .optional_packages import check_optimizer_package, check_quantization_package

logger = logging.getLogger(__name__)

#: the largest ``noise_level`` each sampler accepts: CPS's ``a`` is an angle fraction (``sin(aπ/2)``), at most 1;
#: Flow-GRPO's ``a`` and DanceGRPO's ``η`` are 0.3 to 1 in the papers, and far beyond it the noise swamps samples
MAX_NOISE_LEVEL = {"flow_grpo": 5.0, "dance_grpo": 5.0, "cps": 1.0}
#: CFG scales above this are no setting anyone trains with (samples saturate, then overflow)
MAX_GUIDANCE_SCALE = 100.0
#: time shifts above this put every sampling step at σ ≈ 1 (the papers use 3 to 8)
MAX_TIME_SHIFT = 1000.0


def check_range(name: str, value: float, valid: bool, expected: str, hint: str = "") -> None:
    """Raise a ``ValueError`` naming the field, the range it must lie in and what it got, when ``valid`` is
    false or ``value`` is NaN or infinite."""
    if not valid or not math.isfinite(value):
        raise ValueError(f"`{name}` must be {expected}; got {value!r}.{' ' + hint if hint else ''}")


def check_bf16_device(args: TrainingArguments) -> None:
    """``bf16`` without a device that computes in bfloat16 (a real model's config on a CPU-only machine): our own
    one-line error with the fix, before transformers' "Your setup doesn't support bf16/gpu"."""
    if not (args.bf16 or args.bf16_full_eval) or args.use_cpu:
        return
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    if is_torch_bf16_gpu_available() or is_torch_xla_available():
        return
    raise ValueError(
        "`bf16` is set, but this machine has no GPU that computes in bfloat16 (the config is written for one). "
        "To run it here, turn it off (`--bf16 false`, or `bf16: false` in the YAML) and pick a model this machine "
        "can train (e.g. `--model_name_or_path tiny:sd3`); `--use_cpu true` keeps bf16 autocast on the CPU."
    )


@dataclass
class DiffusionGRPOConfig(TrainingArguments):
    r"""Configuration of GRPO for flow-matching diffusion models (Flow-GRPO and DanceGRPO style).

    It extends :class:`transformers.TrainingArguments`; fields whose concept exists in TRL's
    ``GRPOConfig`` keep TRL's name. Batch sizes count *samples* (images or videos), as in TRL:
    ``per_device_train_batch_size × num_processes`` samples form one generation batch of
    ``… / num_generations`` prompts, each sampled ``num_generations`` times.

    Example::

        DiffusionGRPOConfig(output_dir="out", num_generations=4, per_device_train_batch_size=8, max_steps=30)
    """

    # -- TrainingArguments defaults that suit RL on diffusion models ------------------------------
    learning_rate: float = field(
        default=1e-4,
        metadata={"help": "Initial AdamW learning rate (1e-4 suits LoRA; use ~1e-5 or less for full)."},
    )
    logging_steps: float = field(
        default=1,
        metadata={"help": "Log every N optimizer steps. RL steps are costly, so every step by default."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: every dataset column is passed to the reward functions by name."},
    )
    dataloader_pin_memory: bool = field(
        default=False,
        metadata={"help": "False: the data loader yields prompt strings, pinned memory cannot speed up."},
    )

    # -- model and data -----------------------------------------------------------------------------
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `DiffusionPipeline.from_pretrained` when `model` is a string. A frozen "
            "base quantised as it loads (QLoRA-style) is `quantization_config`: diffusers' "
            "`PipelineQuantizationConfig` or its dict form, e.g. {quant_backend: bitsandbytes_4bit, quant_kwargs: "
            "{load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_compute_dtype: bfloat16}, "
            "components_to_quantize: [transformer, text_encoder_2]}; its backend's package must be installed."
        },
    )
    prompt_column: str = field(
        default="prompt", metadata={"help": "Dataset column holding the text prompts."}
    )
    image_column: str = field(
        default="image",
        metadata={"help": "Dataset column holding the conditioning image (image-to-video models only)."},
    )
    resume_weights_only: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint that lacks optimizer.pt, scheduler.pt, rng_state*.pth or "
            "trl_visual_state.safetensors, on purpose: the weights and the step count are restored and what the missing "
            "files held (AdamW's moments, the LR schedule, the random generators, BPGO's priors) starts afresh. "
            "Off by default: such a checkpoint is refused, naming the missing files."
        },
    )

    # -- GRPO -----------------------------------------------------------------------------------------
    num_generations: int = field(
        default=8,
        metadata={"help": "Samples per prompt (the group size G). Must divide the global batch size."},
    )
    epsilon: float = field(
        default=1e-4,
        metadata={"help": "Clipping range of the policy ratio. Diffusion policies use ~1e-4, not LLMs' 0.2."},
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={
            "help": "Upper clipping bound (TRL's name; DAPO's asymmetric 'clip-higher'): the ratio is clipped to "
            "[1 − epsilon, 1 + epsilon_high]. None: epsilon on both sides."
        },
    )
    beta: float = field(
        default=0.0,
        metadata={
            "help": "KL coefficient to the reference (the LoRA-disabled model). 0 disables the KL term."
        },
    )
    num_iterations: int = field(
        default=1, metadata={"help": "Optimizer passes over each batch of rollouts (μ in the GRPO paper)."}
    )
    scale_rewards: str = field(
        default="group",
        metadata={"help": "Advantage scaling: 'group' std, 'batch' std (Flow-GRPO's global_std), or 'none'."},
    )
    per_prompt_stat_tracking: bool = field(
        default=False,
        metadata={
            "help": "Flow-GRPO's per-prompt statistics tracking (TRL's DDPOConfig name): each reward is centred on "
            "the mean of its prompt's last `per_prompt_stat_tracking_buffer_size` rewards over training (the current "
            "batch's included) and, with scale_rewards='group', divided by their std, instead of the current "
            "group's. The record is kept in checkpoints and resumed exactly."
        },
    )
    per_prompt_stat_tracking_buffer_size: int = field(
        default=32,
        metadata={
            "help": "How many of each prompt's most recent rewards `per_prompt_stat_tracking` keeps (at least "
            "`num_generations`, so that the current group always fits)."
        },
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function; all 1 when unset."}
    )
    eval_reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Rewards scored only by evaluate(), never trained on (the papers' out-of-domain metrics, e.g. "
            "'imagereward'): registered names or 'module.path:function' / 'path/to/file.py:function'. Each is "
            "logged as `eval_rewards/<name>/mean` and left out of `eval_reward`. The trainer's "
            "`eval_reward_funcs` argument (callables too) takes precedence."
        },
    )
    reward_ensemble: bool = field(
        default=False,
        metadata={
            "help": "Treat the reward functions as interpretations of ONE reward (an ensemble, e.g. PickScore + "
            "HPSv2 + CLIPScore): each is standardized over the batch, the reward is their mean and their spread its "
            "interpretation variance (read by BPGO's ras_mode='uncertainty'). Needs two or more reward functions "
            "of equal weight."
        },
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata={"help": "'sum_then_normalize' (weighted sum, then advantages) or 'normalize_then_sum'."},
    )
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages are clamped to ±adv_clip_max."})

    # -- sampling ---------------------------------------------------------------------------------------
    height: int | None = field(
        default=None, metadata={"help": "Image height; the model's default when unset."}
    )
    width: int | None = field(default=None, metadata={"help": "Image width; the model's default when unset."})
    num_frames: int | None = field(
        default=None,
        metadata={"help": "Frames per video (video models only); the model's default when unset."},
    )
    num_inference_steps: int = field(default=10, metadata={"help": "Sampling steps of each rollout."})
    time_shift: float | None = field(
        default=None,
        metadata={
            "help": "Time shift s of the sampling schedule: σ' = sσ / (1 + (s − 1)σ) on linspace(1, 0, T + 1), as the "
            "papers' released samplers do (5 in BPGO's reference runs). None: the model's own scheduler "
            "and shift (FLUX's depends on the resolution). See `DiffusionGRPOTrainer.sampling_sigmas()`."
        },
    )
    guidance_scale: float = field(
        default=4.5, metadata={"help": "Classifier-free guidance scale (1 disables CFG). SD3 uses 4.5."}
    )
    cfg_in_training: bool = field(
        default=True,
        metadata={
            "help": "Sample the training rollouts with CFG and take log-probs on the guided velocity (both passes "
            "batched in one forward). When False, rollouts are sampled and trained without CFG, and "
            "`guidance_scale` only applies to evaluation and logged samples."
        },
    )
    cfg_uncond_grad: bool = field(
        default=False,
        metadata={
            "help": "Under CFG in training, let the gradient flow through the unconditional branch too. False (as "
            "Flow-GRPO's released code): v_u is detached, so each trained timestep runs the denoiser with "
            "gradient on the conditional half only (B inputs, not 2B), reusing the v_u stored at sampling when "
            "num_iterations == 1, else recomputing it without gradient. True: both branches in one 2B forward "
            "and backward."
        },
    )
    negative_prompt: str = field(default="", metadata={"help": "Prompt of CFG's unconditional branch."})
    max_sequence_length: int = field(default=256, metadata={"help": "Maximum token length of the T5 prompt."})
    sde_type: str = field(
        default="flow_grpo", metadata={"help": "Stochastic sampler: 'flow_grpo', 'dance_grpo' or 'cps'."}
    )
    noise_level: float = field(
        default=0.7,
        metadata={"help": "SDE noise: `a` for flow_grpo and cps (0.7; FLUX 0.9), `η` for dance_grpo (0.3)."},
    )
    timestep_fraction: float = field(
        default=1.0, metadata={"help": "Fraction of the stochastic steps trained for each sample (0, 1]."}
    )
    timestep_selection: str = field(
        default="ordered",
        metadata={
            "help": "'ordered': the first steps (Flow-GRPO); 'random': a random subset per sample (DanceGRPO)."
        },
    )
    exclude_last_step: bool = field(
        default=False,
        metadata={
            "help": "Never train the last sampling step (the one landing on σ = 0); it is still sampled. BPGO's "
            "released code does this: with 16 steps and timestep_fraction 0.6 it trains 9 of the first 15."
        },
    )
    sde_window_size: int = field(
        default=0,
        metadata={
            "help": "Flow-GRPO-Fast / MixGRPO window: when > 0 only this many consecutive steps are stochastic and "
            "trained; the ODE prefix before them is computed once per group and branched."
        },
    )
    sde_window_range: list[int] | None = field(
        default=None,
        metadata={
            "help": "[low, high): where the window may start; [0, num_inference_steps // 2) when unset."
        },
    )
    sde_window_schedule: str = field(
        default="random",
        metadata={
            "help": "How the SDE window's start is placed each generation round: 'random' draws it uniformly from "
            "`sde_window_range` (Flow-GRPO-Fast); 'progressive' (MixGRPO) starts at the range's low end and moves "
            "`sde_window_shift` steps toward the low-noise end every `sde_window_interval` optimizer steps, "
            "wrapping back to the low end after the range's last start. Deterministic from the global step."
        },
    )
    sde_window_shift: int = field(
        default=1, metadata={"help": "Steps the 'progressive' window moves at each shift."}
    )
    sde_window_interval: int = field(
        default=25, metadata={"help": "Optimizer steps between two shifts of the 'progressive' window."}
    )
    init_same_noise: bool = field(
        default=False, metadata={"help": "All samples of a group start from the same noise (DanceGRPO)."}
    )

    # -- per-timestep options of the loss (TempFlow-GRPO, GRPO-Guard; see docs/grpo.md) -------------
    noise_aware_weight: bool = field(
        default=False,
        metadata={
            "help": "TempFlow-GRPO's noise-aware timestep weight: each trained step's clipped term × Norm(σ_t "
            "sqrt(Δt)), its transition std normalized to mean 1 over the trained steps (arXiv 2508.04324, Eq. 8). "
            "With dance_grpo's constant noise it is Norm(sqrt(Δt)) only."
        },
    )
    ratio_norm: bool = field(
        default=False,
        metadata={
            "help": "GRPO-Guard's RatioNorm: clip log r̂ = s (log r + Δμ² / (2s²)) = Δμ·ε instead of log r, which "
            "removes the ratio's step-dependent bias (arXiv 2510.22319, Eq. 8). Stores each transition's mean."
        },
    )
    dt_invariant_weight: bool = field(
        default=False,
        metadata={
            "help": "GRPO-Guard's gradient reweight: each step's policy loss × β / Δt (β = 1 for flow_grpo, "
            "1 + η²(1 − t)/(2t) for dance_grpo), so the gradient does not scale with the step size "
            "(arXiv 2510.22319, Eq. 12). Scales the loss by about num_inference_steps: see docs/grpo.md."
        },
    )
    trajectory_branching: str = field(
        default="none",
        metadata={
            "help": "TempFlow-GRPO's trajectory branching (arXiv 2508.04324, Def. 1): each sample runs the ODE to a "
            "branch step k, one SDE step at k, the ODE to the end, and trains step k only; each group is split into "
            "one sub-group per branch point, advantages normalized within it. Branch points: 'all' (every step but "
            "the last), 'first' (the first `num_branch_points`), 'sampled' (`num_branch_points` drawn per round); "
            "'none' turns it off. GRPO only."
        },
    )
    num_branch_points: int = field(
        default=2,
        metadata={
            "help": "How many branch points 'first' and 'sampled' use; must divide `num_generations` into "
            "sub-groups of at least 2 samples."
        },
    )

    # -- memory (see docs/distributed.md, "Memory") ------------------------------------------------
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Samples per sampling chunk on each device: the `per_device_train_batch_size` samples of a "
            "rollout (and each evaluation batch) are drawn and decoded in chunks of this many, then concatenated, "
            "so sampling holds one chunk's activations while training keeps its micro-batch. Every sample gets "
            "the noise it gets in one chunk: results change only by float rounding. Must divide "
            "`per_device_train_batch_size`; None samples the whole batch at once. (TRL's GRPOConfig counts "
            "the samples of a generation round over all processes with this name; here a round is always "
            "the global batch, and the field sets how it is split on a device.)"
        },
    )
    if (
        TrainingArguments.__dataclass_fields__.get("trackio_space_id", field(default=None)).default
        is not None
    ):
        # older transformers (5.3 checked) default to deploying trackio to a public Space ("trackio"): a Hub login
        # and publishes the run; newer releases log locally unless asked. Local by default on every release.
        trackio_space_id: str | None = field(
            default=None,
            metadata={
                "help": "The Hugging Face Space to deploy trackio to ('user/name' or 'name'); None logs to a local "
                "folder (the default here on every transformers release)."
            },
        )
    if "activation_checkpointing" not in TrainingArguments.__dataclass_fields__:
        # transformers < 5.23 has only `gradient_checkpointing`; the field lets the shipped YAMLs (which use the
        # newer name) run there too. The trainer reads either flag (`prepare_denoiser`).
        activation_checkpointing: bool = field(
            default=False,
            metadata={
                "help": "Recompute the denoiser's activations in the backward pass instead of keeping them "
                "(transformers 5.23's name for `gradient_checkpointing`, provided here for older releases)."
            },
        )
    offload_text_encoders: bool = field(
        default=False,
        metadata={
            "help": "Keep the text encoders (`text_encoder*`: T5-XXL is 4.7 B parameters) in CPU memory and "
            "encode prompts there; only the embeddings go to the accelerator. Pair it with "
            "`cache_prompt_embeds` so each prompt is encoded once. The model card's samples move them to the "
            "accelerator for the pipeline's own call and back."
        },
    )
    cache_prompt_embeds: bool = field(
        default=False,
        metadata={
            "help": "Keep each prompt's embeddings in CPU memory (least recently used dropped beyond "
            "`prompt_embeds_cache_size`), so a prompt is encoded once per run, not once per step (DanceGRPO "
            "precomputes them). Prompts are then encoded one at a time, so an embedding never depends on "
            "which prompts shared its batch."
        },
    )
    prompt_embeds_cache_size: int = field(
        default=1024,
        metadata={
            "help": "Prompts whose embeddings `cache_prompt_embeds` keeps: about 2.7 MB each for SD3 (333 "
            "tokens × 4096 in bf16), 4 MB for FLUX and Wan (512 T5 tokens)."
        },
    )
    vae_decode_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Decode at most this many samples per VAE call (the decoder's activations dominate decoding "
            "memory, for video most of all). None: a whole sampling chunk at once. `vae_slicing` is the VAE's "
            "own one-at-a-time equivalent."
        },
    )
    # -- EMA of the trained weights -----------------------------------------------------------------
    use_ema: bool = field(
        default=False,
        metadata={
            "help": "Keep an exponential moving average of the trained weights (diffusers' `EMAModel`, float32, "
            "stepped after every optimizer step): evaluation, the model card's samples and the exported LoRA "
            "(`save_model`, `push_to_hub`) use it; checkpoints keep the trained weights and the average "
            "(`ema_state.safetensors`). Costs one more float32 copy of the trainable weights."
        },
    )
    ema_decay: float = field(
        default=0.999,
        metadata={
            "help": "Decay d of the EMA: θ̄ ← d_t θ̄ + (1 − d_t) θ with d_t = min(d, (1 + s) / (10 + s)) at "
            "optimizer step s + 1 (diffusers' warm-up; d_1 = 0). 0.999 averages over ~1,000 steps."
        },
    )
    vae_tiling: bool = field(
        default=False,
        metadata={"help": "Decode with the VAE's tiling, where the pipeline offers it (videos)."},
    )
    vae_slicing: bool = field(
        default=False, metadata={"help": "Decode one sample at a time with the VAE's slicing, where offered."}
    )

    # -- logging ---------------------------------------------------------------------------------------
    log_images: bool = field(
        default=False,
        metadata={
            "help": "At each logging step, send samples to the loggers and a grid PNG to output_dir/samples/; "
            "at each evaluation, the first evaluation samples too (`eval_samples`, eval_step_<step>.png)."
        },
    )
    num_images_to_log: int = field(default=8, metadata={"help": "How many samples to log."})

    # -- reliability -----------------------------------------------------------------------------------
    reward_timeout: float | None = field(
        default=600.0,
        metadata={
            "help": "Seconds one call of a reward function may take before training stops with an error naming "
            "it (a hung reward server would otherwise hang the run). None waits forever."
        },
    )
    max_consecutive_nonfinite_steps: int = field(
        default=3,
        metadata={
            "help": "Optimizer steps whose samples, loss or gradients are NaN/inf are skipped (the weights and the "
            "optimizer state stay as they were) and counted in the `nonfinite_steps` metric; this many in a "
            "row stop training with an error naming the likely cause."
        },
    )

    @classmethod
    def from_recipe(cls, model_name: str, **overrides: Any) -> DiffusionGRPOConfig:
        """The config ``trl-visual <method> --model_name_or_path model_name`` trains with: the model's own
        recipe (for ``tiny:shapes``, :data:`trl_visual.miniature.GRPO_DEFAULTS`), with ``overrides`` on top.

        The recipe's prompt set, reward and test split are the trainer's arguments, not config fields
        (``builtin:shapes``, ``"shapes_adherence"``, ``split="test"`` as ``eval_dataset``)::

            args = DiffusionGRPOConfig.from_recipe("tiny:shapes", output_dir="tiny-shapes-grpo")
        """
        return cls(**{**recipe_fields(model_name, cls), **overrides})

    #: whether this method's advantages support ``trajectory_branching`` (GRPO's; BPGO's and ViPO's group by prompt)
    _branching_advantages: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_bf16_device(self)
        super().__post_init__()
        check_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        check_choice("multi_objective_aggregation", self.multi_objective_aggregation, AGGREGATIONS)
        check_choice("sde_type", self.sde_type, SDE_TYPES)
        check_choice("timestep_selection", self.timestep_selection, TIMESTEP_SELECTIONS)
        check_choice("sde_window_schedule", self.sde_window_schedule, SDE_WINDOW_SCHEDULES)
        check_choice("trajectory_branching", self.trajectory_branching, BRANCH_MODES)
        self._check_grpo_ranges()
        if self.num_generations < 2:
            raise ValueError(
                f"`num_generations` must be at least 2 to form groups; got {self.num_generations}."
            )
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"`timestep_fraction` must be in (0, 1]; got {self.timestep_fraction}.")
        if self.exclude_last_step and self.num_inference_steps < 2:
            raise ValueError(
                "`exclude_last_step` needs `num_inference_steps` >= 2: with one step there is nothing left to train."
            )
        if self.num_iterations < 1:
            raise ValueError(f"`num_iterations` must be at least 1; got {self.num_iterations}.")
        if self.sde_window_size < 0:
            raise ValueError(
                f"`sde_window_size` must be ≥ 0 (0 makes every step stochastic); got {self.sde_window_size}."
            )
        if self.sde_window_size >= self.num_inference_steps:
            raise ValueError(
                f"`sde_window_size` ({self.sde_window_size}) must be smaller than `num_inference_steps` "
                f"({self.num_inference_steps}); use 0 to make every step stochastic."
            )
        if self.sde_window_range is None:
            self.sde_window_range = [0, max(1, self.num_inference_steps // 2)]
        self._check_sde_window_range()
        self._check_window_schedule_and_stat_tracking()
        self._check_step_options()
        self._check_memory_options()
        global_batch = self.per_device_train_batch_size * self.world_size
        if global_batch % self.num_generations:
            raise ValueError(
                f"The global batch ({self.per_device_train_batch_size} per device × {self.world_size} processes = "
                f"{global_batch} samples) must be divisible by `num_generations` ({self.num_generations}). "
                f"Choose a `per_device_train_batch_size` that is a multiple of {self.num_generations}, "
                "or a `num_generations` that divides it."
            )

    def _check_step_options(self) -> None:
        """The per-timestep loss options fit the sampler: GRPO-Guard's ``β`` is defined for flow_grpo and
        dance_grpo only; TempFlow's weight is the paper's with flow_grpo's noise only (a warning otherwise)."""
        if self.dt_invariant_weight and self.sde_type == "cps":
            raise ValueError(
                "`dt_invariant_weight` is defined for sde_type 'flow_grpo' and 'dance_grpo' (GRPO-Guard's β), not "
                "'cps': set `sde_type` to one of them or `dt_invariant_weight=False`."
            )
        if self.noise_aware_weight and self.sde_type != "flow_grpo":
            degenerate = {"dance_grpo": "Norm(sqrt(Δt)) (η is constant)", "cps": "Norm(σ') (CPS's std)"}
            logger.warning(
                f"`noise_aware_weight` with sde_type={self.sde_type!r} weighs each step by "
                f"{degenerate[self.sde_type]}, not TempFlow-GRPO's Norm(σ_t sqrt(Δt)): use sde_type='flow_grpo' "
                "for the paper's weight."
            )
        if self.trajectory_branching != "none":
            self._check_branching()

    def _check_branching(self) -> None:
        """Trajectory branching: branch points that exist (never the last step), groups that split into
        sub-groups of at least 2 samples, and no setting that decides the stochastic steps otherwise."""
        mode, steps, generations = self.trajectory_branching, self.num_inference_steps, self.num_generations
        if not self._branching_advantages:
            raise ValueError(
                f"`trajectory_branching` is GRPO's (its advantages are per prompt and branch point); {type(self).__name__} "
                "groups by prompt: set `trajectory_branching='none'` or train with DiffusionGRPOConfig."
            )
        if self.sde_window_size > 0:
            raise ValueError(
                "`trajectory_branching` places the one SDE step of each sample itself: set `sde_window_size=0`."
            )
        if mode != "all" and not 1 <= self.num_branch_points <= steps - 1:
            raise ValueError(
                f"`num_branch_points` must be in [1, num_inference_steps − 1 = {steps - 1}] (the last step is never a "
                f"branch point); got {self.num_branch_points}."
            )
        points = num_branch_points(mode, steps, self.num_branch_points)
        fewer = ", or branch at fewer points (trajectory_branching='sampled')" if mode == "all" else ""
        if points < 1 or generations % points or generations // points < 2:
            raise ValueError(
                f"`trajectory_branching={mode!r}` splits each group of num_generations={generations} into {points} "
                f"branch sub-groups, which needs num_generations to be a multiple of {points} with at least 2 per "
                f"sub-group: set num_generations to a multiple of {points} (at least {2 * points}){fewer}."
            )
        if self.scale_rewards == "batch" or self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "`trajectory_branching` normalizes advantages per prompt and branch point: set "
                "`scale_rewards` to 'group' or 'none' and `multi_objective_aggregation='sum_then_normalize'`."
            )

    def _check_memory_options(self) -> None:
        """Chunk sizes that are positive and split the per-device batch evenly; a cache that holds something."""
        for name in ("generation_batch_size", "vae_decode_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be at least 1, or None for the whole batch; got {value}.")
        chunk, batch = self.generation_batch_size, self.per_device_train_batch_size
        if chunk is not None and batch % chunk:
            divisors = [d for d in range(1, batch + 1) if batch % d == 0]
            raise ValueError(
                f"`generation_batch_size` ({chunk}) must divide `per_device_train_batch_size` ({batch}) so that "
                f"every sampling chunk is full; choose one of {divisors}, or None to sample the batch at once."
            )
        check_optimizer_package(self.optim)
        check_quantization_package(self.model_init_kwargs)
        if self.use_ema:
            check_range("ema_decay", self.ema_decay, 0 < self.ema_decay < 1, "in (0, 1) (0.999 is usual)")
        if self.cache_prompt_embeds and self.prompt_embeds_cache_size < 1:
            raise ValueError(
                f"`prompt_embeds_cache_size` must be at least 1 with `cache_prompt_embeds`; got "
                f"{self.prompt_embeds_cache_size}."
            )

    def _check_grpo_ranges(self) -> None:
        """Refuse out-of-range hyper-parameters before any model is loaded (a negative ``epsilon`` clips every
        sample, ``noise_level = 0`` makes every log-probability NaN, ...); warn on a learning rate ≤ 0."""
        check_range("epsilon", self.epsilon, self.epsilon >= 0, "≥ 0 (diffusion GRPO uses ~1e-4)")
        if self.epsilon_high is not None:
            check_range(
                "epsilon_high",
                self.epsilon_high,
                self.epsilon_high >= self.epsilon,
                f"≥ `epsilon` ({self.epsilon:g}), or None for epsilon on both sides",
            )
        check_range("beta", self.beta, self.beta >= 0, "≥ 0 (0 disables the KL term)")
        check_range(
            "adv_clip_max", self.adv_clip_max, self.adv_clip_max > 0, "> 0 (advantages are clamped to ±it)"
        )
        check_range(
            "noise_level",
            self.noise_level,
            self.noise_level > 0,
            "> 0",
            "It is the SDE's noise scale: at 0 the sampler is deterministic and every log-probability is NaN "
            "(use 0.7 for flow_grpo and cps, 0.3 for dance_grpo).",
        )
        top = MAX_NOISE_LEVEL[self.sde_type] if self.sde_type in MAX_NOISE_LEVEL else math.inf
        check_range(
            "noise_level",
            self.noise_level,
            self.noise_level <= top,
            f"≤ {top:g} for sde_type {self.sde_type!r}",
            "Larger values swamp every sample in noise and make the steps non-finite (use 0.7 for flow_grpo and "
            "cps, 0.3 for dance_grpo).",
        )
        check_range(
            "num_inference_steps", self.num_inference_steps, self.num_inference_steps >= 1, "at least 1"
        )
        check_range(
            "guidance_scale",
            self.guidance_scale,
            0 <= self.guidance_scale <= MAX_GUIDANCE_SCALE,
            f"in [0, {MAX_GUIDANCE_SCALE:g}] (1 disables CFG; 3.5 to 7 is usual)",
        )
        if self.time_shift is not None:
            check_range(
                "time_shift",
                self.time_shift,
                0 < self.time_shift <= MAX_TIME_SHIFT,
                f"in (0, {MAX_TIME_SHIFT:g}] (3 to 8 in the papers' released runs), or None for the model's own "
                "scheduler",
            )
        self._check_sizes()
        if self.max_steps == 0:
            raise ValueError("`max_steps` must be positive (or -1 to train for `num_train_epochs`); got 0.")
        if self.reward_timeout is not None:
            check_range(
                "reward_timeout",
                self.reward_timeout,
                self.reward_timeout > 0,
                "> 0 seconds, or None to wait forever",
            )
        if self.max_consecutive_nonfinite_steps < 1:
            raise ValueError(
                f"`max_consecutive_nonfinite_steps` must be at least 1; got {self.max_consecutive_nonfinite_steps}."
            )
        if self.reward_weights is not None:
            if not all(math.isfinite(w) for w in self.reward_weights):
                raise ValueError(f"`reward_weights` must all be finite; got {self.reward_weights}.")
            if self.reward_weights and not any(self.reward_weights):
                raise ValueError(
                    f"`reward_weights` are all zero ({self.reward_weights}): every advantage would be 0 and nothing "
                    "would train. Give at least one reward a non-zero weight."
                )
        if self.reward_ensemble and self.reward_weights and len(set(self.reward_weights)) > 1:
            raise ValueError(
                f"`reward_ensemble=True` averages the standardized rewards as equal interpretations, but "
                f"`reward_weights` differ ({self.reward_weights}). Drop `reward_weights`, or set "
                "`reward_ensemble=False` for a weighted sum."
            )
        if self.reward_ensemble and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "`reward_ensemble=True` makes one reward of the functions, so `multi_objective_aggregation="
                f"{self.multi_objective_aggregation!r}` does not apply: leave it at 'sum_then_normalize'."
            )
        if not math.isfinite(self.learning_rate):
            raise ValueError(f"`learning_rate` must be a finite number; got {self.learning_rate}.")
        if self.per_device_train_batch_size < 1:
            raise ValueError(
                f"`per_device_train_batch_size` must be at least 1 (a multiple of `num_generations`); got "
                f"{self.per_device_train_batch_size}."
            )
        if not self.learning_rate > 0:
            logger.warning(f"`learning_rate` is {self.learning_rate}: the weights will not be trained.")

    def _check_sizes(self) -> None:
        """Counts and sizes that must be positive (or ≥ 0), checked before any model is loaded: a 0 or negative
        image size, token length or step count otherwise trains at the model's default, fails deep in torch or
        trains nothing without a word."""
        for name in ("height", "width", "num_frames"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(
                    f"`{name}` must be a positive number of pixels (frames for `num_frames`), or unset for the "
                    f"model's default; got {value!r}."
                )
        if self.max_sequence_length < 1:
            raise ValueError(
                f"`max_sequence_length` must be at least 1 token (256 for SD3, 512 for FLUX and Wan); got "
                f"{self.max_sequence_length}."
            )
        if self.num_images_to_log < 0:
            raise ValueError(f"`num_images_to_log` must be ≥ 0; got {self.num_images_to_log}.")
        for name in ("save", "eval", "logging"):
            strategy, steps = getattr(self, f"{name}_strategy"), getattr(self, f"{name}_steps")
            if str(getattr(strategy, "value", strategy)) == "steps" and steps is not None:
                check_range(
                    f"{name}_steps",
                    steps,
                    steps > 0,
                    "> 0 (a number of optimizer steps, or a fraction of the run below 1)",
                    f"Or set `{name}_strategy` to 'no'.",
                )
        if self.max_steps < 0 and not self.num_train_epochs > 0:
            raise ValueError(
                f"`num_train_epochs` must be > 0 when `max_steps` is unset (-1); got {self.num_train_epochs}: the run "
                "would train 0 steps. Set `num_train_epochs` or `max_steps`."
            )

    def _check_sde_window_range(self) -> None:
        """The SDE window must be able to start inside sampling: ``0 ≤ low < high`` and ``low`` at most the last
        start that leaves ``sde_window_size`` stochastic steps before the end."""
        if self.sde_window_size <= 0:
            return
        if len(self.sde_window_range) != 2:
            raise ValueError(
                f"`sde_window_range` must be two integers [low, high); got {self.sde_window_range}."
            )
        low, high = self.sde_window_range
        last = window_starts(
            self.sde_window_size, (0, self.num_inference_steps), self.num_inference_steps, self.sde_type
        )[-1]
        if not 0 <= low < high or low > last:
            raise ValueError(
                f"`sde_window_range` {self.sde_window_range} does not fit {self.num_inference_steps} sampling steps "
                f"with sde_window_size={self.sde_window_size} ({self.sde_type}): it needs 0 ≤ low < high and low ≤ "
                f"{last}. Use e.g. [0, {last + 1}], or raise `num_inference_steps`."
            )

    def _check_window_schedule_and_stat_tracking(self) -> None:
        """The progressive window needs a window and positive steps; per-prompt tracking a buffer that holds a
        group, on the one weighted reward it normalizes."""
        if self.sde_window_schedule == "progressive" and self.sde_window_size <= 0:
            raise ValueError(
                "`sde_window_schedule='progressive'` moves an SDE window, but `sde_window_size` is 0 (every step "
                "stochastic): set `sde_window_size` (e.g. 2), or leave the schedule 'random'."
            )
        for name in ("sde_window_shift", "sde_window_interval"):
            check_range(name, getattr(self, name), getattr(self, name) >= 1, "an integer ≥ 1")
        if not self.per_prompt_stat_tracking:
            return
        size = self.per_prompt_stat_tracking_buffer_size
        check_range(
            "per_prompt_stat_tracking_buffer_size",
            size,
            size >= self.num_generations,
            f"at least `num_generations` ({self.num_generations}) so that the current group fits",
        )
        if self.reward_ensemble or self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "`per_prompt_stat_tracking` normalizes the one weighted reward per sample: it needs "
                "multi_objective_aggregation='sum_then_normalize' and reward_ensemble=False."
            )
        if self.trajectory_branching != "none":
            raise ValueError(
                "`per_prompt_stat_tracking` and `trajectory_branching` both set the advantages' baseline (the prompt's "
                "record, the branch point's sub-group): choose one."
            )

    # -- no secret in a saved file ------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """What pickling keeps: every field, with the tokens redacted (:func:`redact_tokens`).

        ``Trainer`` saves the arguments as ``torch.save(args, "training_args.bin")`` beside the model, in every
        checkpoint and in every push to the Hub; ``to_dict`` redacts ``hub_token``, the pickle did not. Copies
        (``copy.copy``, ``copy.deepcopy``) keep the tokens."""
        return redact_tokens(self.__dict__)

    def __copy__(self) -> DiffusionGRPOConfig:
        copied = object.__new__(type(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def __deepcopy__(self, memo: dict[int, Any]) -> DiffusionGRPOConfig:
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied


def redact_tokens(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with every set ``*_token`` value replaced by ``"<NAME_TOKEN>"``, as
    ``TrainingArguments.to_dict`` writes ``hub_token``, and a ``token`` in ``model_init_kwargs`` (passed to
    ``from_pretrained``) by ``"<TOKEN>"``."""
    redacted = {
        key: f"<{key.upper()}>" if key.endswith("_token") and value is not None else value
        for key, value in fields.items()
    }
    init_kwargs = redacted.get("model_init_kwargs")
    if isinstance(init_kwargs, dict) and init_kwargs.get("token") not in (None, True, False):
        redacted["model_init_kwargs"] = {**init_kwargs, "token": "<TOKEN>"}
    return redacted
