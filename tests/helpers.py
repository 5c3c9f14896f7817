"""What the trainer tests share: the tiny run's settings, a config and a trainer built from them, and what a
run logged. Imported by ``conftest.py`` and by the test files (``from helpers import ...``)."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainingArguments

from trl_visual import DiffusionGRPOTrainer

#: the four training prompts the trainer tests share (one group each at batch 8, G 2)
PROMPTS = ["a cat", "a dog", "a red car", "a tree"]
#: LoRA targets of the tiny SD3/FLUX/Wan transformers, with the output projection so small runs can learn
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]
#: a two-step run on the tiny SD3 at 32×32 (8×8 latents), four sampling steps, no CFG, nothing saved or reported
TINY_RUN = dict(
    num_generations=4,
    per_device_train_batch_size=8,
    max_steps=2,
    height=32,
    width=32,
    num_inference_steps=4,
    max_sequence_length=16,
    guidance_scale=1.0,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
)


#: activation checkpointing on, under the name the installed transformers uses (`gradient_checkpointing` is its
#: deprecated alias since transformers 5, which warns)
CHECKPOINTING = {
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing": True
}


def make_config(tmp_path, config_class: type | None = None, **overrides: Any):
    """``config_class`` (GRPO's by default) with :data:`TINY_RUN`, writing to ``tmp_path/out``; ``overrides``
    win."""
    config_class = config_class or DiffusionGRPOTrainer.config_class
    return config_class(**{"output_dir": str(tmp_path / "out"), **TINY_RUN, **overrides})


def make_trainer(
    tmp_path,
    reward: Any = "red_channel",
    dataset: Dataset | None = None,
    model: Any = "tiny:sd3",
    peft: bool | LoraConfig = True,
    trainer_class: type | None = None,
    *,
    config_class: type | None = None,
    eval_dataset: Dataset | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    **overrides: Any,
):
    """A ``trainer_class`` (GRPO by default) on ``model`` over :data:`PROMPTS` (or ``dataset``), with the
    config of :func:`make_config` (of the trainer's own config class unless ``config_class`` is given).

    ``peft``: ``True`` for rank-8 LoRA on :data:`TARGETS`, ``False`` for full fine-tuning, or a
    ``LoraConfig``. ``trainer_kwargs`` go to the trainer (``backbone=``, ``eval_reward_funcs=``).
    """
    trainer_class = trainer_class or DiffusionGRPOTrainer
    if peft is True:
        peft = LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS)
    return trainer_class(
        model=model,
        reward_funcs=reward,
        args=make_config(tmp_path, config_class or trainer_class.config_class, **overrides),
        train_dataset=dataset if dataset is not None else Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=eval_dataset,
        peft_config=peft or None,
        **(trainer_kwargs or {}),
    )


def logged(trainer, key: str) -> list[float]:
    """Every value logged under ``key`` during ``trainer``'s run, in order."""
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    """A copy of the trainer's trainable (LoRA) weights, by name."""
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


def pipeline_images(pipeline, prompt: str, seed: int) -> torch.Tensor:
    """The pipeline's own sampling (``__call__``) at the tiny run's size and steps, deterministic."""
    return pipeline(
        prompt,
        height=TINY_RUN["height"],
        width=TINY_RUN["width"],
        num_inference_steps=TINY_RUN["num_inference_steps"],
        guidance_scale=TINY_RUN["guidance_scale"],
        max_sequence_length=TINY_RUN["max_sequence_length"],
        output_type="pt",
        generator=torch.Generator().manual_seed(seed),
    ).images


class RecordingTrainer(DiffusionGRPOTrainer):
    """Records how far recomputed log-probs are from the ones stored at sampling time, and their size."""

    max_log_prob_gap = 0.0
    max_log_prob = 0.0

    def policy_loss(self, log_prob, old_log_prob, advantages):
        gap = (log_prob.detach() - old_log_prob).abs().max().item()
        self.max_log_prob_gap = max(self.max_log_prob_gap, gap)
        self.max_log_prob = max(self.max_log_prob, old_log_prob.abs().max().item())
        return super().policy_loss(log_prob, old_log_prob, advantages)

    def log_probs_match(self) -> bool:
        """Whether the recomputed log-probs equal the stored ones up to float32 rounding: a gap under 1e-5 of
        their size (at least 1). Sampling and training batch the guided forward differently, and guidance
        multiplies the difference of the two branches' rounding by its scale: 3.9e-5 on log-probs of size 7.4
        at CFG 4.5 on an AVX-512/AMX CPU. A wrong timestep or guidance in training gives gaps of 1e-2 and more."""
        return 0 <= self.max_log_prob_gap < 1e-5 * max(1.0, self.max_log_prob)


def hub_connect_error(message: str = "[Errno -2] Name or service not known") -> Exception:
    """A connection error of the HTTP library the installed huggingface_hub uses (``httpx`` up to 1.x,
    ``httpx2`` from 2.0), as an unreachable Hub raises it."""
    import importlib

    from huggingface_hub.errors import HTTPError

    return importlib.import_module(HTTPError.__module__.split(".")[0]).ConnectError(message)


def patch_hub_api(monkeypatch, name: str, replacement) -> None:
    """Replace ``HfApi.<name>`` wherever the installed libraries reach it: on the class, and in the module-level
    aliases bound to huggingface_hub's default ``HfApi()`` at import time (``huggingface_hub.create_repo``, which
    transformers before 5.x's own ``HfApi`` calls imports by name)."""
    import sys
    import types

    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, name, replacement)
    for module in list(sys.modules.values()):
        bound = vars(module).get(name) if hasattr(module, "__dict__") else None
        if isinstance(bound, types.MethodType) and isinstance(bound.__self__, HfApi):
            monkeypatch.setattr(module, name, types.MethodType(replacement, bound.__self__))


def eval_on_five_prompts(output_dir: Any, **overrides: Any) -> Any:
    """A GRPO trainer whose evaluation set is 5 prompts in batches of 2 (3 batches: uneven over 2 processes)."""
    from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer

    prompts = ["a cat", "a dog", "a red car", "a tree", "a blue house"]
    return DiffusionGRPOTrainer(
        model="tiny:sd3",
        reward_funcs="red_channel",
        args=DiffusionGRPOConfig(
            output_dir=str(output_dir), **TINY_RUN, per_device_eval_batch_size=2, **overrides
        ),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        eval_dataset=Dataset.from_dict({"prompt": prompts}),
        peft_config=LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS),
    )
