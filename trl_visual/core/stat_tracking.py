"""Per-prompt statistics tracking (Flow-GRPO's ``per_prompt_stat_tracking``): advantages against a running record
of each prompt's recent rewards instead of the current group alone.

For a sample ``j`` of prompt ``p`` with reward ``R``, the buffer ``H_p`` holds the last ``buffer_size`` finite rewards
of ``p`` over training, the current batch's included (added before the statistics are taken), oldest first. Then

    ``A = (R − mean(H_p)) / (std(H_p) + eps)``, clamped to ``±clip``,

with ``std`` the unbiased standard deviation of the buffer (``scale_rewards="group"``, the same estimator as the
group's, so that a buffer holding exactly the current group gives GRPO's advantages), the finite rewards of the
whole batch (``"batch"``) or 1 (``"none"``). NaN and ±inf rewards are not recorded and get advantage 0.

The buffers are training state: :meth:`PerPromptStatTracker.state_dict` is a list of prompts and one float32
tensor, which :mod:`trl_visual.state_files` writes without pickles, and :meth:`~PerPromptStatTracker.load_state_dict`
restores it exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from .advantages import invalid_to_nan, nan_std


class PerPromptStatTracker:
    """The last ``buffer_size`` finite rewards of every prompt seen, oldest first."""

    def __init__(self, buffer_size: int):
        if buffer_size < 1:
            raise ValueError(f"`per_prompt_stat_tracking_buffer_size` must be at least 1; got {buffer_size}.")
        self.buffer_size = buffer_size
        self.buffers: dict[str, list[float]] = {}

    def record(self, prompts: list[str], rewards: torch.Tensor) -> None:
        """Append each finite reward to its prompt's buffer, in batch order, keeping the last ``buffer_size``."""
        for prompt, value in zip(prompts, rewards.tolist()):
            if value == value and abs(value) != float("inf"):  # NaN and ±inf are missing samples
                buffer = self.buffers.setdefault(prompt, [])
                buffer.append(value)
                del buffer[: -self.buffer_size]

    def statistics(self, prompts: list[str], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean(H_p), std(H_p))`` for each sample's prompt, in ``like``'s dtype and device (NaN and 0 for a
        prompt without a recorded reward)."""
        stats: dict[str, tuple[float, float]] = {}
        for prompt in dict.fromkeys(prompts):
            history = torch.tensor(self.buffers.get(prompt, []), dtype=like.dtype)
            mean = history.mean() if len(history) else torch.tensor(float("nan"))
            stats[prompt] = (float(mean), float(nan_std(history)) if len(history) else 0.0)
        mean = torch.tensor([stats[p][0] for p in prompts], dtype=like.dtype, device=like.device)
        std = torch.tensor([stats[p][1] for p in prompts], dtype=like.dtype, device=like.device)
        return mean, std

    def advantages(
        self,
        prompts: list[str],
        rewards: torch.Tensor,
        scale_rewards: str = "group",
        eps: float = 1e-4,
        clip: float | None = 5.0,
    ) -> torch.Tensor:
        """Record the batch's ``(B,)`` ``rewards`` (:meth:`record`), then ``A = (R − mean(H_p)) / (scale + eps)``
        clamped to ``±clip``, ``scale`` being ``std(H_p)`` (``"group"``), the batch's std (``"batch"``) or 1
        (``"none"``: no ``eps`` either, as GRPO's)."""
        if len(prompts) != len(rewards):
            raise ValueError(
                f"{len(prompts)} prompts for {len(rewards)} rewards: one prompt per sample is needed."
            )
        rewards = invalid_to_nan(rewards)
        self.record(prompts, rewards)
        mean, std = self.statistics(prompts, rewards)
        centred = rewards - mean
        if scale_rewards == "group":
            centred = centred / (std + eps)
        elif scale_rewards == "batch":
            centred = centred / (nan_std(rewards) + eps)
        advantages = torch.nan_to_num(centred, nan=0.0)
        return advantages.clamp(-clip, clip) if clip is not None else advantages

    def state_dict(self) -> dict[str, Any]:
        """The buffers as JSON and one tensor: ``prompts`` (in first-seen order) and ``rewards``, a ``(P,
        buffer_size)`` float32 tensor, each row a prompt's buffer oldest first, padded with NaN."""
        rewards = torch.full((len(self.buffers), self.buffer_size), float("nan"), dtype=torch.float32)
        for row, buffer in enumerate(self.buffers.values()):
            rewards[row, : len(buffer)] = torch.tensor(buffer, dtype=torch.float32)
        return {"buffer_size": self.buffer_size, "prompts": list(self.buffers), "rewards": rewards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; a saved buffer longer than ``buffer_size`` keeps its newest."""
        rewards = state["rewards"]
        if len(state["prompts"]) != len(rewards):
            raise ValueError(
                f"The per-prompt statistics hold {len(state['prompts'])} prompts but {len(rewards)} reward rows: "
                "the checkpoint's trl_visual_state.safetensors is corrupt; resume from another checkpoint."
            )
        self.buffers = {
            prompt: [v for v in row.tolist() if v == v][-self.buffer_size :]
            for prompt, row in zip(state["prompts"], rewards)
        }
