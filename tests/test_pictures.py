"""The pictures the trainer writes: tensors as PIL images (diffusers' conversion), sample grids whose captions are
drawn whole, and a reward curve with labelled axes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trl_visual.hub import CURVE_MARGINS, reward_curve_image
from trl_visual.images import to_pil
from trl_visual.trainer.logging_utils import (
    CAPTION_FONT_SIZE,
    MIN_CELL_WIDTH,
    caption_font,
    captioned_grid,
    wrap_caption,
)

LONG_CAPTION = "a small red circle on the left and a big blue square on the right | 0.873"


def test_to_pil_rounds_clamps_and_takes_a_videos_first_frame():
    """round(255 x) after clamping to [0, 1]: 0.5 → 127.5 → 128 (half to even), 1.2 → 255, −0.1 → 0."""
    values = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1, 0.25])
    image = values.view(1, 1, 6).expand(3, 1, 6)
    assert np.asarray(to_pil(image))[0, :, 0].tolist() == [0, 128, 255, 255, 0, 64]
    video = torch.stack([image, torch.ones_like(image)])  # (T, 3, H, W): the first frame is shown
    assert np.asarray(to_pil(video)).tolist() == np.asarray(to_pil(image)).tolist()


def _ink_rows(cell: np.ndarray, top: int) -> list[int]:
    """Rows at or below ``top`` holding a dark pixel."""
    return [row for row in range(top, cell.shape[0]) if (cell[row] < 128).any()]


def test_a_long_caption_is_drawn_whole_under_a_small_image():
    """A 32×32 sample is enlarged to MIN_CELL_WIDTH; its 72-character caption wraps into lines that each fit the
    cell, that put together give the caption back, and that are all drawn (ink in every line's band)."""
    font = caption_font()
    lines = wrap_caption(LONG_CAPTION, MIN_CELL_WIDTH - 8, font)
    assert len(lines) > 1 and " ".join(lines) == LONG_CAPTION
    assert all(font.getlength(line) <= MIN_CELL_WIDTH - 8 for line in lines)

    image = Image.new("RGB", (32, 32), (200, 30, 30))
    grid = captioned_grid([image, image], [LONG_CAPTION, "a cat | 0.5"])
    assert grid.size[0] == 2 * MIN_CELL_WIDTH
    cell = np.asarray(grid.convert("L"))[:, :MIN_CELL_WIDTH]
    line_height = CAPTION_FONT_SIZE + 2
    ink = _ink_rows(cell, MIN_CELL_WIDTH)
    for i in range(len(lines)):  # every line of the caption left ink in its own band
        band = range(MIN_CELL_WIDTH + i * line_height, MIN_CELL_WIDTH + (i + 1) * line_height + 2)
        assert any(row in band for row in ink), f"line {i} ({lines[i]!r}) was not drawn"
    assert grid.size[1] >= MIN_CELL_WIDTH + len(lines) * line_height


def test_captions_keep_their_own_line_breaks_and_cut_only_words_wider_than_a_line():
    font = caption_font()
    assert wrap_caption("a cat\n0.5", 200, font) == ["a cat", "0.5"]
    word = "abcdefghijklmnopqrstuvwxyz" * 2
    lines = wrap_caption(word, 60, font)
    assert len(lines) > 2 and "".join(lines) == word and all(font.getlength(line) <= 60 for line in lines)


def _dark_pixels(image: Image.Image, box: tuple[int, int, int, int]) -> int:
    return int((np.asarray(image.convert("L").crop(box)) < 128).sum())


@pytest.mark.parametrize("rewards", [[0.2, 0.5, 0.4, 0.9], [0.3]])
def test_reward_curve_labels_both_axes(rewards):
    """The y-axis label is drawn in the left margin beside the plot and "step" under it: remove either label and
    those regions go blank."""
    width, height = 480, 240
    left, top, right, bottom = CURVE_MARGINS
    labelled = reward_curve_image(rewards, steps=[10 * (i + 1) for i in range(len(rewards))])
    unlabelled = reward_curve_image(rewards, y_label="", steps=[10 * (i + 1) for i in range(len(rewards))])
    y_label_box = (0, top + 20, 16, height - bottom - 20)  # beside the plot, clear of the min/max values
    x_label_box = (left + 40, height - 16, width - right - 40, height)  # under the tick labels
    assert _dark_pixels(labelled, y_label_box) > 20 and _dark_pixels(unlabelled, y_label_box) == 0
    assert _dark_pixels(labelled, x_label_box) > 10
