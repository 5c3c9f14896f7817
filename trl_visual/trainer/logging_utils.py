"""Sending sample images and videos, with their prompts and rewards, to the trackers and to disk; and making a
diffusers model's config readable by transformers' tracker callbacks.

Images: a captioned grid PNG in ``output_dir/samples/``, the images to tensorboard, wandb and trackio, the grid to
MLflow. Videos (``(B, T, 3, H, W)`` samples): an animated captioned grid GIF in ``output_dir/samples/``
(diffusers' ``export_to_gif``: Pillow only, so no torchvision, moviepy or ffmpeg is needed), the GIF to wandb and
trackio as a video and to MLflow as an artifact, and the grid's frames to tensorboard as an image sequence
(tensorboard's ``add_video`` needs moviepy). Media wait in a :class:`PendingMedia` until their step's metrics
are logged, and go out under that step.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import export_to_gif, make_image_grid
from PIL import Image, ImageDraw, ImageFont

from ..images import to_pil

if TYPE_CHECKING:  # pragma: no cover
    from transformers.trainer_callback import CallbackHandler, TrainerState

    from .rollout import Rollouts


#: font size in pixels of the captions under the images of a grid
CAPTION_FONT_SIZE = 11
#: the narrowest cell of a grid: smaller images are enlarged (nearest neighbour, by a whole factor) to this width, so
#: that their captions wrap into a few readable lines
MIN_CELL_WIDTH = 128


def caption_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at :data:`CAPTION_FONT_SIZE` pixels (its bitmap font where FreeType is missing)."""
    return ImageFont.load_default(size=CAPTION_FONT_SIZE)


def _fitting_prefix(word: str, width: int, font: Any) -> int:
    """The length of the longest start of ``word`` (at least one character) no wider than ``width`` pixels."""
    length = len(word)
    while length > 1 and font.getlength(word[:length]) > width:
        length -= 1
    return length


def wrap_caption(caption: str, width: int, font: Any) -> list[str]:
    """``caption`` in lines no wider than ``width`` pixels in ``font``: greedily filled with whole words (a word wider
    than a line is cut across lines), each of the caption's own lines starting a new one. Every character of the
    caption is drawn, none cut off."""
    lines = []
    for paragraph in caption.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                candidate = word
            while font.getlength(candidate) > width and len(candidate) > 1:
                cut = _fitting_prefix(candidate, width, font)
                lines.append(candidate[:cut])
                candidate = candidate[cut:]
            line = candidate
        lines.append(line)
    return lines


def _cell(image: Image.Image, lines: list[str], num_lines: int, font: Any) -> Image.Image:
    """``image`` (enlarged to :data:`MIN_CELL_WIDTH` when narrower) above a white strip of ``num_lines`` lines
    holding ``lines``."""
    scale = max(1, math.ceil(MIN_CELL_WIDTH / image.width))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    line_height = CAPTION_FONT_SIZE + 2
    cell = Image.new("RGB", (image.width, image.height + num_lines * line_height + 4), "white")
    cell.paste(image, (0, 0))
    ImageDraw.Draw(cell).multiline_text(
        (2, image.height + 2), "\n".join(lines), fill="black", font=font, spacing=2
    )
    return cell


def captioned_grid(images: list[Image.Image], captions: list[str], columns: int = 4) -> Image.Image:
    """Images with their whole captions underneath (wrapped to the cell's width by :func:`wrap_caption`), laid out
    by diffusers' ``make_image_grid`` in rows of at most ``columns`` (a last row that is not full is padded with
    white). Images narrower than :data:`MIN_CELL_WIDTH` are enlarged by a whole factor."""
    font = caption_font()
    widths = [image.width * max(1, math.ceil(MIN_CELL_WIDTH / image.width)) for image in images]
    wrapped = [wrap_caption(caption, width - 8, font) for caption, width in zip(captions, widths)]
    num_lines = max(len(lines) for lines in wrapped)
    cells = [_cell(image, lines, num_lines, font) for image, lines in zip(images, wrapped)]
    columns = min(columns, len(cells))
    rows = math.ceil(len(cells) / columns)
    cells += [Image.new("RGB", cells[0].size, "white")] * (rows * columns - len(cells))
    return make_image_grid(cells, rows, columns)


#: frames per second of the sample GIFs
GIF_FPS = 8


def video_grid_frames(videos: torch.Tensor, captions: list[str], columns: int = 4) -> list[Image.Image]:
    """``(B, T, 3, H, W)`` videos → T captioned grid frames (frame t of every video, side by side)."""
    return [
        captioned_grid([to_pil(video[t]) for video in videos], captions, columns)
        for t in range(videos.shape[1])
    ]


# -- a diffusers model config that transformers' trackers can read ---------------------------------------------
def _plain(value: Any) -> Any:
    """A config value as plain JSON data (as diffusers' ``ConfigMixin.to_json_string`` saves it)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return _plain(value.to_dict())
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


class TrackerReadableConfig(FrozenDict):
    """A diffusers model's config (a ``FrozenDict``) that also answers what transformers' logging integrations
    ask of a ``PretrainedConfig``: ``to_dict()`` (wandb, trackio, MLflow, Comet, Neptune, SwanLab) and
    ``to_json_string()`` (tensorboard). diffusers still sees the ``FrozenDict`` it made."""

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON data."""
        return {key: _plain(value) for key, value in self.items()}

    def to_json_string(self, use_diff: bool = True) -> str:
        """The config as indented JSON (``use_diff`` is accepted for ``PretrainedConfig``'s signature)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n"


def make_config_readable_by_trackers(model: torch.nn.Module) -> None:
    """Give a diffusers model a :class:`TrackerReadableConfig`, so ``report_to`` works with every tracker.

    ``Trainer`` hands its model to the tracker callbacks, which read ``model.config`` as if it were a
    transformers config: tensorboard's callback calls ``to_json_string()`` and a diffusers ``FrozenDict`` has
    none, so training crashed before its first step. diffusers keeps the config in ``_internal_dict``."""
    config = getattr(model, "_internal_dict", None)
    if isinstance(config, FrozenDict) and not isinstance(config, TrackerReadableConfig):
        model._internal_dict = TrackerReadableConfig(config)


# -- what a logging step shows ---------------------------------------------------------------------------------
@dataclass
class SampleBatch:
    """The first samples of a batch of rollouts with their prompts and rewards: what a logging step shows.

    A small copy, so that the rollouts themselves are not kept alive until the step's metrics are logged."""

    prompts: list[str]
    samples: torch.Tensor
    rewards: torch.Tensor | None = None

    @classmethod
    def of(cls, rollouts: Rollouts | SampleBatch, count: int) -> SampleBatch:
        """The first ``count`` samples of ``rollouts`` (anything with ``prompts``, ``samples`` and ``rewards``)."""
        count = min(count, len(rollouts.prompts))
        rewards = rollouts.rewards[:count].detach().clone() if rollouts.rewards is not None else None
        return cls(list(rollouts.prompts[:count]), rollouts.samples[:count].detach().clone(), rewards)

    def captions(self) -> list[str]:
        """``"<prompt> | <reward>"`` per sample (``nan`` before the rewards are known)."""
        rewards = self.rewards.tolist() if self.rewards is not None else [float("nan")] * len(self.prompts)
        return [f"{prompt} | {reward:.3g}" for prompt, reward in zip(self.prompts, rewards)]


class PendingMedia:
    """Media made while an optimizer step runs, held until that step's metrics are logged.

    Rollouts are sampled before the optimizer step, but ``Trainer`` logs a step's metrics after it, under the
    incremented ``state.global_step``. Sending the samples when they are made would file them under the previous
    step; queued here and sent from :meth:`DiffusionGRPOTrainer.log`, they land under the step of the metrics they
    explain. Per name, the first media of a step are kept (one grid per logging step, also with gradient
    accumulation), and a newer step's replace an older step's that were never sent.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[int, Callable[[], object]]] = {}

    def add(self, name: str, made_in_step: int, send: Callable[[], object]) -> None:
        """Keep ``send`` (a call that writes and sends the media) for the next log."""
        kept = self._waiting.get(name)
        if kept is None or kept[0] != made_in_step:
            self._waiting[name] = (made_in_step, send)

    def flush(self) -> None:
        """Send everything waiting (at the trainer's current step) and forget it."""
        waiting, self._waiting = self._waiting, {}
        for _, send in waiting.values():
            send()


# -- sending media to the trackers -----------------------------------------------------------------------------
@dataclass
class Media:
    """Images (or a video's grid frames) to send under ``key``, with their captions and the file written for
    them in ``output_dir/samples/``; ``grid`` is the captioned grid of an image batch (``None`` for a video)."""

    key: str
    images: list[Image.Image]
    captions: list[str]
    path: str
    grid: Image.Image | None = None

    @property
    def is_video(self) -> bool:
        return self.grid is None


def _to_tensorboard(callback: Any, media: Media, step: int) -> None:
    writer = getattr(callback, "tb_writer", None)
    if writer is None:
        return
    pixels = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in media.images])
    writer.add_images(f"{media.key}/frames" if media.is_video else media.key, pixels, step)
    writer.add_text(f"{media.key}/captions", "\n\n".join(media.captions), step)
    writer.flush()


def _to_wandb(callback: Any, media: Media, step: int) -> None:
    import wandb

    if wandb.run is None:
        return
    if media.is_video:
        value: Any = wandb.Video(media.path, caption="\n".join(media.captions), format="gif")
    else:
        value = [wandb.Image(image, caption=caption) for image, caption in zip(media.images, media.captions)]
    # the x-axis transformers' WandbCallback declares for every key (define_metric(step_metric=...))
    wandb.log({media.key: value, "train/global_step": step})


def _to_trackio(callback: Any, media: Media, step: int) -> None:
    import trackio

    # trackio takes one image or video per key, not a list: the captioned grid, or the GIF
    caption = "\n".join(media.captions)
    value = (
        trackio.Video(media.path, caption=caption)
        if media.is_video
        else trackio.Image(media.grid, caption=caption)
    )
    trackio.log({media.key: value, "train/global_step": step})


def _to_mlflow(callback: Any, media: Media, step: int) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    if media.is_video:
        mlflow.log_artifact(media.path, artifact_path=media.key)
    else:
        mlflow.log_image(media.grid, key=media.key, step=step)


#: transformers' logging callbacks (by class name, so that no tracker is imported) → how media reach them
MEDIA_SINKS: dict[str, Callable[[Any, Media, int], None]] = {
    "TensorBoardCallback": _to_tensorboard,
    "WandbCallback": _to_wandb,
    "TrackioCallback": _to_trackio,
    "MLflowCallback": _to_mlflow,
}


class LoggingTrainer(Protocol):
    """What sending media needs from a trainer (``transformers.Trainer`` has it): the run's ``args``
    (``output_dir``, ``num_images_to_log``), its ``state`` (``global_step``) and its tracker callbacks."""

    args: Any
    state: TrainerState
    callback_handler: CallbackHandler


def _sink_of(callback: Any) -> Callable[[Any, Media, int], None] | None:
    return next((MEDIA_SINKS[c.__name__] for c in type(callback).__mro__ if c.__name__ in MEDIA_SINKS), None)


def send_media(trainer: LoggingTrainer, media: Media) -> None:
    """Send ``media`` to every active tracker at the trainer's current step: tensorboard (images, or a video's
    frames, and the captions as text), wandb (captioned images, or the GIF as a video), trackio (the captioned
    grid, or the GIF as a video), MLflow (the grid as a step image, or the GIF as an artifact). Comet and the
    other trackers get the metrics only."""
    for callback in trainer.callback_handler.callbacks:
        sink = _sink_of(callback)
        if sink is not None:
            sink(callback, media, trainer.state.global_step)


def log_samples(
    trainer: LoggingTrainer,
    batch: Rollouts | SampleBatch,
    key: str = "samples",
    file_prefix: str = "step",
) -> str:
    """Write the samples with their prompts and rewards to ``output_dir/samples/<file_prefix>_<global step>``
    and send them to the active trackers under ``key`` (:func:`send_media`): a captioned grid PNG for images, an
    animated grid GIF for videos. Returns the written file's path."""
    batch = SampleBatch.of(batch, trainer.args.num_images_to_log)
    captions = batch.captions()
    folder = os.path.join(trainer.args.output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"{file_prefix}_{trainer.state.global_step:06d}")
    if batch.samples.ndim == 5:
        frames = video_grid_frames(batch.samples, captions)
        media = Media(key, frames, captions, export_to_gif(frames, f"{stem}.gif", fps=GIF_FPS))
    else:
        images = [to_pil(sample) for sample in batch.samples]
        grid = captioned_grid(images, captions)
        grid.save(f"{stem}.png")
        media = Media(key, images, captions, f"{stem}.png", grid)
    send_media(trainer, media)
    return media.path
