"""Sending sample images and videos, with their prompts and rewards, to the loggers and to disk.

Images: a captioned grid PNG in ``output_dir/samples/`` and the images to tensorboard, wandb and trackio.
Videos (``(B, T, 3, H, W)`` samples): an animated captioned grid GIF in ``output_dir/samples/`` (diffusers'
``export_to_gif``: Pillow only, so no torchvision, moviepy or ffmpeg is needed), the GIF to wandb and trackio as a video, and the
grid's frames to tensorboard as an image sequence (tensorboard's ``add_video`` needs moviepy).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers.utils import export_to_gif, make_image_grid
from PIL import Image, ImageDraw

if TYPE_CHECKING:  # pragma: no cover
    from .diffusion_grpo_trainer import DiffusionGRPOTrainer, Rollouts


def to_pil(image: torch.Tensor) -> Image.Image:
    """A ``(3, H, W)`` float image in ``[0, 1]`` (or the first frame of a ``(T, 3, H, W)`` video) as PIL."""
    if image.ndim == 4:
        image = image[0]
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


#: height in pixels of the caption strip under each image of a grid
CAPTION_HEIGHT = 14


def _with_caption(image: Image.Image, caption: str) -> Image.Image:
    """``image`` above a white strip holding the start of ``caption``."""
    width, height = image.size
    cell = Image.new("RGB", (width, height + CAPTION_HEIGHT), "white")
    cell.paste(image, (0, 0))
    ImageDraw.Draw(cell).text((1, height), caption[: max(4, width // 6)], fill="black")
    return cell


def captioned_grid(images: list[Image.Image], captions: list[str], columns: int = 4) -> Image.Image:
    """Images with their captions underneath, laid out by diffusers' ``make_image_grid`` in rows of at most
    ``columns`` (a last row that is not full is padded with white)."""
    cells = [_with_caption(image, caption) for image, caption in zip(images, captions)]
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


def _callback_of(trainer: DiffusionGRPOTrainer, class_name: str) -> Any:
    return next((cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == class_name), None)


def _captions(rollouts: Rollouts, count: int) -> list[str]:
    rewards = rollouts.rewards[:count].tolist() if rollouts.rewards is not None else [float("nan")] * count
    return [f"{p} | {r:.3g}" for p, r in zip(rollouts.prompts[:count], rewards)]


def log_samples(trainer: DiffusionGRPOTrainer, rollouts: Rollouts) -> str:
    """Write the samples with their prompts and rewards to ``output_dir/samples/`` and the active loggers
    (tensorboard, wandb, trackio): a captioned grid PNG for images, an animated grid GIF for videos.
    Returns the written file's path."""
    count = min(trainer.args.num_images_to_log, len(rollouts.prompts))
    captions = _captions(rollouts, count)
    step = trainer.state.global_step
    folder = os.path.join(trainer.args.output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    if rollouts.samples.ndim == 5:
        return _log_videos(trainer, rollouts.samples[:count], captions, folder, step)
    images = [to_pil(rollouts.samples[i]) for i in range(count)]
    path = os.path.join(folder, f"step_{step:06d}.png")
    grid = captioned_grid(images, captions)
    grid.save(path)

    tensorboard = _callback_of(trainer, "TensorBoardCallback")
    if tensorboard is not None and getattr(tensorboard, "tb_writer", None) is not None:
        # np.array copies: a PIL image's own buffer is read-only, which torch.from_numpy warns about
        pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
        tensorboard.tb_writer.add_images("samples", pixels, step)
        tensorboard.tb_writer.add_text("samples/captions", "\n\n".join(captions), step)
    if _callback_of(trainer, "WandbCallback") is not None:
        import wandb

        if wandb.run is not None:
            wandb.log({"samples": [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)
    if _callback_of(trainer, "TrackioCallback") is not None:
        import trackio

        trackio.log({"samples": [trackio.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)
    return path


def _log_videos(
    trainer: DiffusionGRPOTrainer, videos: torch.Tensor, captions: list[str], folder: str, step: int
) -> str:
    """Videos: an animated grid GIF on disk, sent as a video to wandb/trackio, as frames to tensorboard."""
    frames = video_grid_frames(videos, captions)
    path = export_to_gif(frames, os.path.join(folder, f"step_{step:06d}.gif"), fps=GIF_FPS)
    caption = "\n".join(captions)
    tensorboard = _callback_of(trainer, "TensorBoardCallback")
    if tensorboard is not None and getattr(tensorboard, "tb_writer", None) is not None:
        pixels = torch.stack([torch.from_numpy(np.array(frame)).permute(2, 0, 1) for frame in frames])
        tensorboard.tb_writer.add_images("samples/frames", pixels, step)
        tensorboard.tb_writer.add_text("samples/captions", "\n\n".join(captions), step)
    if _callback_of(trainer, "WandbCallback") is not None:
        import wandb

        if wandb.run is not None:
            wandb.log({"samples": wandb.Video(path, caption=caption, format="gif")}, step=step)
    if _callback_of(trainer, "TrackioCallback") is not None:
        import trackio

        trackio.log({"samples": trackio.Video(path, caption=caption)}, step=step)
    return path
