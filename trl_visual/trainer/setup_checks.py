"""The trainer's set-up: input checks that run before any expensive work, and preparing the denoiser.

Every check raises an error that names the problem and the fix while the trainer is being built, rather than
after a rollout has been paid for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from peft import LoraConfig

from ..core.timesteps import stochastic_step_indices, window_starts
from ..data import check_prompt_values
from ..models import DiffusionAdapter
from .diffusion_grpo_config import DiffusionGRPOConfig

logger = logging.getLogger(__name__)


def method_config(
    config_class: type[DiffusionGRPOConfig],
    trainer_name: str,
    method_name: str,
    model: str | Any,
    args: DiffusionGRPOConfig | None,
) -> DiffusionGRPOConfig:
    """``args``, or the method's default config writing to ``<model name>-<method>``; a config of the wrong
    class (a plain GRPO config given to BPGO, say) is a clear error."""
    if args is None:
        name = model if isinstance(model, str) else type(model).__name__
        return config_class(output_dir=f"{name.split('/')[-1].replace(':', '-')}-{method_name}")
    if not isinstance(args, config_class):
        raise TypeError(f"{trainer_name} needs a {config_class.__name__}, got {type(args).__name__}.")
    return args


def check_lora_config(peft_config: LoraConfig | None) -> None:
    """A LoRA that can train: ``lora_alpha`` ≠ 0 (the update is scaled by alpha / r, so 0 trains nothing), dropout
    in [0, 1) (1 drops every input of the LoRA branch)."""
    if peft_config is None:
        return
    alpha, dropout = getattr(peft_config, "lora_alpha", 1), getattr(peft_config, "lora_dropout", 0.0)
    if not alpha:
        raise ValueError(
            f"`lora_alpha` is {alpha}: the LoRA update is scaled by lora_alpha / r, so nothing would train. Use e.g. "
            f"lora_alpha = r ({getattr(peft_config, 'r', 8)}) or 2r."
        )
    if not 0 <= dropout < 1:
        raise ValueError(
            f"`lora_dropout` must be in [0, 1) (a probability; 0 is usual for diffusion LoRAs); got {dropout}."
        )


def check_kl_reference(beta: float, peft_config: LoraConfig | None) -> None:
    """``beta > 0`` needs a LoRA: the KL reference is the denoiser with its adapter disabled."""
    if beta > 0 and peft_config is None:
        raise ValueError(
            "`beta > 0` needs a `peft_config`: the KL reference is the same network with its LoRA adapter "
            "disabled, so no second copy of the model is held. Pass a LoraConfig or set beta=0."
        )


def check_reward_weights(weights: list[float] | None, reward_names: list[str]) -> torch.Tensor:
    """One weight per reward (``None``: all 1), as a float32 tensor."""
    if weights is None:
        return torch.ones(len(reward_names))
    if len(weights) != len(reward_names):
        raise ValueError(
            f"`reward_weights` has {len(weights)} values but there are {len(reward_names)} reward "
            f"functions ({', '.join(reward_names)}); give one weight per reward."
        )
    return torch.tensor(weights, dtype=torch.float32)


def missing_columns(dataset: Any, names: list[str]) -> list[str]:
    """The columns of ``names`` that ``dataset`` lacks; none when it does not list its columns (a streaming
    dataset without features is checked row by row instead)."""
    columns = getattr(dataset, "column_names", None)
    return [] if columns is None else [name for name in names if name not in columns]


def check_dataset(dataset: Any, split: str, args: DiffusionGRPOConfig) -> None:
    """The prompt column exists and holds non-empty strings; the training set has enough prompts for a step."""
    if dataset is None:
        return
    if missing_columns(dataset, [args.prompt_column]):
        raise ValueError(
            f"The {split} has no {args.prompt_column!r} column (its columns: {dataset.column_names}). Rename "
            f"the prompt column with `dataset.rename_column(old, {args.prompt_column!r})` or set `prompt_column`."
        )
    if getattr(dataset, "column_names", None) is not None and hasattr(dataset, "__len__"):
        check_prompt_values(dataset[args.prompt_column], f"the {split}'s {args.prompt_column!r} column")
    if split == "train_dataset" and hasattr(dataset, "__len__"):
        prompts_per_step = args.per_device_train_batch_size * args.world_size // args.num_generations
        if len(dataset) < prompts_per_step:
            raise ValueError(
                f"The train_dataset has {len(dataset)} prompts but each step needs {prompts_per_step} distinct "
                f"prompts (global batch / num_generations). Add prompts or lower the batch size."
            )


def check_reward_prompts(
    rewards: list[Any], names: list[str], datasets: dict[str, Any], prompt_column: str
) -> None:
    """Rewards that can only score some prompts (the shapes world's grammar) say so with a ``check_prompts(prompts)``
    method; each is called on every data set with a length before the model loads, so that a prompt it cannot read
    is refused now rather than in the first reward call."""
    for reward, name in zip(rewards, names):
        check = getattr(reward, "check_prompts", None)
        if not callable(check):
            continue
        for split, dataset in datasets.items():
            if (
                dataset is None
                or not hasattr(dataset, "__len__")
                or missing_columns(dataset, [prompt_column])
            ):
                continue
            try:
                check(list(dataset[prompt_column]))
            except ValueError as error:
                raise ValueError(
                    f"The reward {name!r} cannot score the {split}'s prompts: {error}"
                ) from error


def check_columns(dataset: Any, split: str, required: list[str], pipeline_name: str) -> None:
    """The columns the pipeline family needs beyond the prompt (Wan I2V's conditioning image) exist."""
    missing = missing_columns(dataset, required)
    if missing:
        raise ValueError(
            f"{pipeline_name} needs the column(s) {missing} in the {split} (its columns: "
            f"{dataset.column_names}). Add them, or point the config (e.g. `image_column`) at the right column."
        )


def check_scheduler(
    adapter: DiffusionAdapter, args: DiffusionGRPOConfig, latent_shape: tuple[int, ...]
) -> None:
    """The SDE samplers need a flow-matching schedule: another scheduler (DDIM, SD1/SDXL's Euler) is refused
    now, by name, rather than with an ``AttributeError`` or NaN log-probs after sampling."""
    check_flow_matching_sigmas(
        lambda: adapter.sigmas(args.num_inference_steps, latent_shape),
        adapter.pipeline.scheduler,
        args.num_inference_steps,
    )


def check_trained_steps(
    adapter: DiffusionAdapter, args: DiffusionGRPOConfig, latent_shape: tuple[int, ...]
) -> None:
    """Refuse, before any sampling, an SDE window that could fall where the trained denoiser never
    predicts (Wan2.2 A14B's frozen low-noise expert): such a step would cost a full rollout and train
    nothing. Only steps where :meth:`DiffusionAdapter.trains_at` holds are ever trained."""
    num_steps = args.num_inference_steps
    sigmas = adapter.sigmas(num_steps, latent_shape, args.time_shift)[:-1]
    trained = adapter.trains_at(sigmas).nonzero().flatten().tolist()
    if len(trained) == num_steps:
        return
    if not trained:
        raise ValueError(
            f"None of the {num_steps} sampling steps uses the trained {adapter.denoiser_name}: a frozen "
            "second expert predicts at every step (check the pipeline's `boundary_ratio`)."
        )
    if args.sde_window_size > 0:
        starts = window_starts(args.sde_window_size, tuple(args.sde_window_range), num_steps, args.sde_type)
    else:
        starts = [0]
    for start in starts:
        window = stochastic_step_indices(num_steps, args.sde_type, args.sde_window_size, start)
        if not set(window) & set(trained):
            raise ValueError(
                f"With num_inference_steps={num_steps}, the trained {adapter.denoiser_name} predicts only "
                f"at sampling steps {trained}; the others belong to a frozen second expert (Wan2.2's "
                f"transformer_2 below boundary_ratio). The stochastic steps {window} (sde_window_size="
                f"{args.sde_window_size}, sde_window_range={args.sde_window_range}) contain none of them, so "
                f"they would train nothing. Set `sde_window_range` to [0, {trained[-1] + 1}] or "
                "`sde_window_size` to 0, or swap the two experts in the pipeline to train the low-noise one."
            )
    logger.info(
        f"Training only sampling steps {trained} of {num_steps}: the others are predicted by a frozen expert."
    )


def check_flow_matching_sigmas(
    get_sigmas: Callable[[], torch.Tensor], scheduler: Any, num_steps: int
) -> None:
    """Check that ``get_sigmas()`` (the adapter's schedule for ``num_steps`` steps) is a flow-matching one:
    ``num_steps + 1`` values, decreasing, in ``[0, 1]``, ending at 0.

    Raises:
        ValueError: naming the scheduler's class and the fix, before anything is sampled.
    """
    name = type(scheduler).__name__
    fix = (
        f"The pipeline's scheduler is {name}, but trl_visual's samplers need a flow-matching scheduler "
        "(σ from 1 down to 0, velocity prediction). Set one before training, e.g. "
        "`pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_id, subfolder='scheduler')` "
        "with the model's original scheduler, or `FlowMatchEulerDiscreteScheduler(shift=3.0)` for SD3."
    )
    try:
        sigmas = get_sigmas().float()
    except (AttributeError, TypeError, ValueError) as error:
        raise ValueError(
            f"{fix} (It gave no flow-matching sigmas: {type(error).__name__}: {error}.)"
        ) from error
    valid = (
        sigmas.numel() == num_steps + 1
        and bool(torch.isfinite(sigmas).all())
        and float(sigmas.max()) <= 1 + 1e-6
        and float(sigmas[-1]) == 0.0
        and bool((sigmas[1:] < sigmas[:-1]).all())
    )
    if not valid:
        shown = [round(v, 3) for v in sigmas.tolist()[:4]]
        raise ValueError(
            f"{fix} (Its sigmas start {shown}, not a decreasing schedule in [0, 1] ending at 0.)"
        )


def check_inputs(
    args: DiffusionGRPOConfig,
    datasets: dict[str, Any],
    rewards: list[Any],
    reward_names: list[str],
    peft_config: LoraConfig | None,
) -> None:
    """Every check of the trainer's inputs that needs no model, in this order: each data set
    (:func:`check_dataset`), what the rewards need from their rows (:func:`check_reward_prompts`), the LoRA
    (:func:`check_lora_config`) and the KL's reference (:func:`check_kl_reference`)."""
    for split, dataset in datasets.items():
        check_dataset(dataset, split, args)
    check_reward_prompts(rewards, reward_names, datasets, args.prompt_column)
    check_lora_config(peft_config)
    check_kl_reference(args.beta, peft_config)


def check_sampling(
    adapter: DiffusionAdapter, args: DiffusionGRPOConfig, latent_shape: tuple[int, ...]
) -> None:
    """The checks of the loaded model's sampling: a flow-matching scheduler (:func:`check_scheduler`) and an SDE
    window that trains something (:func:`check_trained_steps`)."""
    check_scheduler(adapter, args, latent_shape)
    check_trained_steps(adapter, args, latent_shape)
