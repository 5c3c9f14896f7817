"""Video rewards: any image reward averaged over frames, and a CLIP video-text alignment score.

A video reward receives ``videos``, float in ``[0, 1]`` of shape ``(B, T, 3, H, W)``::

    reward(prompts: list[str], images=None, *, videos: Tensor, **columns) -> list[float]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trl_visual.rewards.clip_rewards import CLIPScoreReward, RewardModel
from trl_visual.rewards.registry import register_reward


def check_video_batch(
    images: Tensor | None, videos: Tensor | None, num_prompts: int, reward_name: str
) -> Tensor:
    """Return the ``(B, T, 3, H, W)`` video batch, accepting it as ``videos`` or as 5-D ``images``.

    Raises a ``ValueError`` naming the problem when no video is given, the shape is wrong, or the number of videos
    differs from the number of prompts.
    """
    if videos is None and images is not None and images.ndim == 5:
        videos = images
    if videos is None:
        raise ValueError(
            f"The video reward {reward_name!r} needs `videos` of shape (B, T, 3, H, W), float in [0, 1]."
        )
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(
            f"The video reward {reward_name!r} expects (B, T, 3, H, W) videos; got {tuple(videos.shape)}."
        )
    if videos.shape[0] != num_prompts:
        raise ValueError(
            f"The video reward {reward_name!r} got {num_prompts} prompts for {videos.shape[0]} videos; "
            "pass one prompt per video."
        )
    return videos


def _repeat_column(value: Any, batch: int, frames: int) -> Any:
    """Repeat each entry of a per-sample column ``frames`` times, so it lines up with the flattened frames.

    Anything that is not a list/tuple of length ``batch`` is passed through unchanged.
    """
    if isinstance(value, list | tuple) and len(value) == batch:
        return [item for item in value for _ in range(frames)]
    return value


class VideoScorer(RewardModel):
    """A video reward model: :meth:`score_batch` checks the batch (:func:`check_video_batch`) and returns
    :meth:`score_videos`, so subclasses only say how a batch is scored. With ``images_as_frames``, 4-D
    ``images`` are scored as one-frame videos."""

    name: str = "video_scorer"
    images_as_frames: bool = False

    def score_batch(
        self, prompts: list[str], images: Tensor | None, videos: Tensor | None, columns: dict[str, Any]
    ) -> list[float | None]:
        """The score of each (prompt, video) pair; videos ``(B, T, 3, H, W)``, float in ``[0, 1]``."""
        if self.images_as_frames and videos is None and images is not None and images.ndim == 4:
            videos = images.unsqueeze(1)
        videos = check_video_batch(images, videos, len(prompts), self.name)
        return self.score_videos(prompts, videos, **columns)

    def score_videos(self, prompts: list[str], videos: Tensor, **columns: Any) -> list[float | None]:
        """Hook: the scores of a checked batch of videos with their prompts and dataset columns."""
        raise NotImplementedError


class FrameAveraged(VideoScorer):
    """Turn an image reward into a video reward: the mean of its scores over a video's frames.

    The ``T`` frames of each of the ``B`` videos are scored as one batch of ``B * T`` images (the wrapped reward
    batches them with its own ``batch_size``), each frame with its video's prompt and dataset columns. When
    a frame's score is ``None`` the video's score is ``None``.

    If the wrapped reward is an ``nn.Module`` it becomes a submodule, so ``FrameAveraged(...).to(device)``
    moves it.

    Args:
        image_reward: any image reward ``f(prompts, images, **columns) -> list[float | None]``.
        name: the metric name; defaults to ``"<image reward's name>_frames"``.

    Example:
        ```python
        video_reward = FrameAveraged(PickScoreReward())
        video_reward(["a cat surfing"], videos=videos)  # videos: (1, T, 3, H, W)
        ```
    """

    name: str = "frame_averaged"
    images_as_frames = True  # 4-D images are scored as one-frame videos

    def __init__(self, image_reward: Callable[..., list[float | None]], name: str | None = None) -> None:
        super().__init__()
        self.image_reward = image_reward
        inner = getattr(image_reward, "name", None) or getattr(
            image_reward, "__name__", type(image_reward).__name__
        )
        self.name = name or f"{inner}_frames"
        self.eval()

    def score_videos(self, prompts: list[str], videos: Tensor, **columns: Any) -> list[float | None]:
        """Per-video mean of the image reward over frames."""
        batch, frames = videos.shape[:2]
        frame_prompts = [prompt for prompt in prompts for _ in range(frames)]
        frame_columns = {key: _repeat_column(value, batch, frames) for key, value in columns.items()}
        scores = list(self.image_reward(frame_prompts, videos.flatten(0, 1), **frame_columns))
        return [_mean_or_none(scores[i * frames : (i + 1) * frames]) for i in range(batch)]


def _mean_or_none(values: list[float | None]) -> float | None:
    """The mean of ``values``, or ``None`` if any of them is ``None``."""
    if any(value is None for value in values):
        return None
    return float(sum(values) / len(values))  # type: ignore[arg-type]


@register_reward("clipscore_video")
class CLIPVideoScoreReward(VideoScorer, CLIPScoreReward):
    """Video-text alignment with an image CLIP: ``scale * cosine(mean frame embedding, text embedding)``.

    Each frame's unit-norm CLIP image embedding is averaged over the video, the mean is normalized again, and
    its cosine with the prompt's embedding is the score (same range as :class:`CLIPScoreReward`, about
    0.15-0.40 with ``openai/clip-vit-large-patch14``). Unlike ``FrameAveraged(CLIPScoreReward())``, which averages
    per-frame cosines, pooling first rewards videos whose frames together cover the prompt. Dedicated video
    reward models (VideoCLIP-XL, VideoAlign) follow the same contract and can replace it.

    Takes the arguments of :class:`CLIPScoreReward`.
    """

    name = "clipscore_video"

    @torch.no_grad()
    def embed_videos(self, videos: Tensor) -> Tensor:
        """Unit-norm float32 video embeddings ``(B, D)``: the renormalized mean of the frame embeddings."""
        batch, frames = videos.shape[:2]
        frame_embeddings = self.embed_images(videos.flatten(0, 1)).view(batch, frames, -1)
        return F.normalize(frame_embeddings.mean(dim=1), dim=-1)

    def score_videos(self, prompts: list[str], videos: Tensor, **columns: Any) -> list[float | None]:
        """``scale * cosine(video embedding, prompt embedding)`` for each (prompt, video) pair."""
        similarity = (self.embed_videos(videos) * self.embed_prompts(prompts)).sum(dim=-1)
        return (self.score_scale() * similarity).tolist()
