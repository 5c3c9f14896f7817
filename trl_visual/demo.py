"""Watching a run live: what the Colab notebooks and the Gradio Space (``spaces/trl-visual-demo``) share.

The demos train on the miniature world (``tiny:shapes``, the ``shapes_adherence`` reward, the ViPO backbone
``tiny:shapes-features``; see ``docs/miniature.md``) through the trainers' public API, and watch the run with a
:class:`LiveProgressCallback`: a ``transformers.TrainerCallback`` that collects the reward curve from the logs
and, every few steps, samples a few fixed prompts from fixed seeds with the policy being trained (ViPO: with
the samples' perceptual maps; BPGO: with each prompt's latest RAS weight). It hands each :class:`LiveUpdate`
to a function of yours (a notebook's display, the Space's stream) and can stop the run at a time limit or on
request.

The run's settings live in one place, :data:`SHAPES_SETTINGS` and :data:`SHAPES_LORA`: every notebook and the
Space start from them.

Example::

    from trl_visual.demo import LiveProgressCallback, make_demo_trainer

    trainer = make_demo_trainer("BPGO", ["a red circle on the left", "a blue square"], output_dir="out")
    trainer.add_callback(LiveProgressCallback(trainer, ["a red circle on the left"], on_update=print))
    trainer.train()
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .core.vipo import heat_overlay
from .images import to_pil
from .miniature.classifier import shapes_backbone
from .trainer import (
    BPGOConfig,
    BPGOTrainer,
    DiffusionGRPOConfig,
    DiffusionGRPOTrainer,
    ViPOConfig,
    ViPOTrainer,
)
from .trainer.hooks import Advantages

#: the methods a demo can train, by their names in the papers
METHODS = ("GRPO", "BPGO", "ViPO")

#: settings of the demo runs on ``tiny:shapes`` (32×32 images): the one place to tune them. Fields of
#: :class:`~trl_visual.DiffusionGRPOConfig` (and of its BPGO/ViPO subclasses). The LoRA recipe for ``tiny:shapes``
#: (``examples/configs/shapes_grpo_lora.yaml``): 8 prompts × 8 samples at 4 sampling steps, CFG 1, batch-scaled
#: advantages, the first half of the steps trained, a constant learning rate; only ``max_steps`` is the demos'.
#: Measured against the lr-0 run: ``docs/miniature.md``, "The demos' settings".
SHAPES_SETTINGS: dict[str, Any] = {
    "num_generations": 8,
    "per_device_train_batch_size": 64,  # 8 prompts × 8 samples per step (fewer with fewer prompts)
    "learning_rate": 3e-4,
    "lr_scheduler_type": "constant",
    "max_steps": 30,
    "num_inference_steps": 4,
    "guidance_scale": 1.0,  # at CFG 4.5 the full prompts already score ~0.95: no headroom to show
    "scale_rewards": "batch",
    "timestep_fraction": 0.5,
    "height": 32,
    "width": 32,
    "max_sequence_length": 8,  # the miniature T5 was trained on 8 tokens
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
}

#: the LoRA of the demo runs (``peft.LoraConfig`` arguments): the LoRA recipe's, on every linear layer of the
#: joint blocks (attention of both streams, both feed-forwards, the adaLN modulations) and the output layers
SHAPES_LORA: dict[str, Any] = {
    "r": 16,
    "lora_alpha": 32,
    "target_modules": [
        *("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
        *("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
        *("norm1.linear", "norm1_context.linear", "norm_out.linear", "proj_out"),
    ],
}


class RASRecordingBPGOTrainer(BPGOTrainer):
    """:class:`~trl_visual.BPGOTrainer` that also keeps each training prompt's latest RAS weight (sigmoid RAS,
    the default) in :attr:`ras_weights_by_prompt`: the ``w_i = 1 + α (2 sigmoid(k Δ_i / s) − 1)`` its group's
    loss was multiplied by at the prompt's latest step, with ``Δ_i = R̄_i − R_prior,i``."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.ras_weights_by_prompt: dict[str, float] = {}
        super().__init__(*args, **kwargs)

    def compute_advantages(self, rewards_per_func: torch.Tensor, inputs: list[dict[str, Any]]) -> Advantages:
        """BPGO's advantages, unchanged; the weights are noted on the way."""
        out = super().compute_advantages(rewards_per_func, inputs)
        weights = out.weight  # the per-sample RAS weights (None without sigmoid RAS)
        if weights is not None:
            prompts = [row[self.args.prompt_column] for row in inputs]
            self.ras_weights_by_prompt.update(zip(prompts, weights.tolist()))
        return out


#: trainer and config class of each of :data:`METHODS`
TRAINERS: dict[str, tuple[type, type]] = {
    "GRPO": (DiffusionGRPOTrainer, DiffusionGRPOConfig),
    "BPGO": (RASRecordingBPGOTrainer, BPGOConfig),
    "ViPO": (ViPOTrainer, ViPOConfig),
}


def demo_settings(prompts: Sequence[str], **settings: Any) -> dict[str, Any]:
    """:data:`SHAPES_SETTINGS` with ``settings`` over them, for a run on ``prompts``: unless ``settings`` set
    ``per_device_train_batch_size``, a step samples at most as many prompts as there are (a Space visitor may type
    fewer than a step of :data:`SHAPES_SETTINGS` holds)."""
    fields = {**SHAPES_SETTINGS, **settings}
    if "per_device_train_batch_size" not in settings:
        prompts_per_step = min(
            fields["per_device_train_batch_size"] // fields["num_generations"], len(set(prompts))
        )
        fields["per_device_train_batch_size"] = prompts_per_step * fields["num_generations"]
    return fields


def make_demo_trainer(
    method: str,
    prompts: Sequence[str],
    output_dir: str,
    reward: str = "shapes_adherence",
    model: str = "tiny:shapes",
    **settings: Any,
) -> DiffusionGRPOTrainer:
    """A trainer of ``method`` (one of :data:`METHODS`) on ``model`` with :data:`SHAPES_SETTINGS` (``settings``
    override them, see :func:`demo_settings`) and :data:`SHAPES_LORA`, training on ``prompts``; ViPO sees through
    ``tiny:shapes-features``."""
    if method not in TRAINERS:
        raise ValueError(f"Unknown method {method!r}: choose one of {', '.join(METHODS)}.")
    trainer_class, config_class = TRAINERS[method]
    extra = {"backbone": shapes_backbone()} if method == "ViPO" else {}
    return trainer_class(
        model=model,
        reward_funcs=reward,
        args=config_class(output_dir=output_dir, **demo_settings(prompts, **settings)),
        train_dataset=Dataset.from_dict({"prompt": list(prompts)}),
        peft_config=LoraConfig(**SHAPES_LORA),
        **extra,
    )


# -- what a watcher sees ---------------------------------------------------------------------------------------
@dataclass
class LiveUpdate:
    """The state of a run, as a watcher is shown it.

    ``rewards`` is the curve so far, ``(step, mean reward of the step)``; ``images`` the watched prompts sampled
    at ``step`` from the callback's fixed seeds (so successive updates differ only by training), with
    ``sample_rewards``; ``overlays`` (ViPO) each sample beside its perceptual map; ``ras_weights`` (BPGO) each
    training prompt's latest RAS weight. ``finished`` on the last update, with ``stop_reason`` when the run was
    stopped early (time limit, request)."""

    step: int
    max_steps: int
    rewards: list[tuple[int, float]]
    prompts: list[str]
    images: list[Image.Image] = field(default_factory=list)
    sample_rewards: list[float] = field(default_factory=list)
    overlays: list[Image.Image] = field(default_factory=list)
    ras_weights: dict[str, float] = field(default_factory=dict)
    finished: bool = False
    stop_reason: str | None = None


@torch.no_grad()
def sample_prompts(
    trainer: DiffusionGRPOTrainer, prompts: Sequence[str], seed: int = 0
) -> tuple[torch.Tensor, list[float]]:
    """One deterministic (ODE) sample per prompt with the policy being trained, from ``seed``, with the
    training reward of each: ``(samples (B, 3, H, W) in [0, 1], rewards)``. The trainer's own sampler, as in
    ``evaluate()``; the model is back in its previous mode afterwards."""
    prompts = list(prompts)
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        rows = [{trainer.args.prompt_column: prompt} for prompt in prompts]
        ids = torch.arange(len(prompts))
        rollouts = trainer.sample(prompts, ids, seed=seed, stochastic=False, training=False, rows=rows)
        per_func = trainer.compute_rewards(prompts, rollouts.samples, rows)
    finally:
        trainer.model.train(was_training)
    weights = trainer.reward_weights.to(per_func)
    return rollouts.samples.float().cpu(), (per_func * weights).sum(dim=1).tolist()


def to_images(samples: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` samples in ``[0, 1]`` as PIL images."""
    return [to_pil(sample) for sample in samples]


@torch.no_grad()
def map_overlays(trainer: DiffusionGRPOTrainer, samples: torch.Tensor) -> list[Image.Image]:
    """Each sample beside its ViPO perceptual map as a heat-map overlay (what ``ViPOTrainer`` weighs each
    latent position's advantage by, ``A(p) = M(p) · A``); empty for a trainer without maps."""
    if not hasattr(trainer, "compute_maps"):
        return []
    maps, _ = trainer.compute_maps(samples.to(trainer.accelerator.device))
    maps = maps.cpu()
    return [
        to_pil(torch.cat([image.clamp(0, 1), heat_overlay(image, heat)], dim=-1))
        for image, heat in zip(samples, maps)
    ]


class LiveProgressCallback(TrainerCallback):
    """Streams a run to ``on_update``: the reward curve at every log (``logging_steps=1``: every step), and the
    watched ``prompts`` sampled at the start, at the logs of every ``sample_every``-th step and at the end (with
    ViPO's maps and BPGO's weights).

    Stops the run (``control.should_training_stop``, so ``Trainer`` ends it cleanly and nothing trained is
    lost) once ``time_limit`` seconds have passed, or after :meth:`request_stop`. Holds its trainer, as TRL's
    completion-logging callbacks do: ``trainer.add_callback(LiveProgressCallback(trainer, prompts, ...))``.
    """

    def __init__(
        self,
        trainer: DiffusionGRPOTrainer,
        prompts: Sequence[str],
        on_update: Callable[[LiveUpdate], None] | None = None,
        sample_every: int = 5,
        time_limit: float | None = None,
        seed: int = 0,
    ):
        if not prompts:
            raise ValueError("LiveProgressCallback needs at least one prompt to watch.")
        if sample_every < 1:
            raise ValueError(f"`sample_every` must be at least 1, got {sample_every}.")
        self.trainer = trainer
        self.prompts = list(prompts)
        self.on_update = on_update
        self.sample_every = sample_every
        self.time_limit = time_limit
        self.seed = seed
        self.rewards: list[tuple[int, float]] = []
        self.updates: list[LiveUpdate] = []
        self.stop_reason: str | None = None
        self._started = 0.0
        self._stop_requested = False

    def request_stop(self) -> None:
        """Stop the run at the end of the current step (from any thread)."""
        self._stop_requested = True

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._started = time.monotonic()
        self._publish(state, finished=False)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ):
        if not logs or "reward" not in logs:
            return
        self.rewards.append((state.global_step, float(logs["reward"])))
        due = state.global_step % self.sample_every == 0 and state.global_step < state.max_steps
        self._publish(state, finished=False, with_samples=due and not control.should_training_stop)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._stop_requested:
            self.stop_reason = f"stopped on request after step {state.global_step}"
        elif self.time_limit is not None and time.monotonic() - self._started > self.time_limit:
            self.stop_reason = f"time limit of {self.time_limit:g} s reached after step {state.global_step}"
        if self.stop_reason:
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._publish(state, finished=True)

    def _publish(self, state: TrainerState, finished: bool, with_samples: bool = True) -> None:
        update = LiveUpdate(
            step=state.global_step,
            max_steps=state.max_steps,
            rewards=list(self.rewards),
            prompts=self.prompts,
            ras_weights=dict(getattr(self.trainer, "ras_weights_by_prompt", {})),
            finished=finished,
            stop_reason=self.stop_reason if finished else None,
        )
        if with_samples:
            samples, update.sample_rewards = sample_prompts(self.trainer, self.prompts, self.seed)
            update.images = to_images(samples)
            update.overlays = map_overlays(self.trainer, samples)
        elif self.updates:  # a log between two samplings: keep showing the latest samples
            last = self.updates[-1]
            update.images, update.sample_rewards, update.overlays = (
                last.images,
                last.sample_rewards,
                last.overlays,
            )
        self.updates.append(update)
        if self.on_update is not None:
            self.on_update(update)
