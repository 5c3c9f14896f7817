"""Synthetic scenes: one coloured shape on a dark background, with captions that describe it fully, partly or
hardly at all.

A scene is four attributes, each a word of the caption grammar::

    colour   red | green | blue | yellow
    shape    circle | square | triangle
    size     small | big
    position left | right | top | bottom

A *full* caption names all four ("a small red circle on the left"); a *partial* caption names a subset ("a red
shape", "a big triangle", "a blue square at the top"); the *vaguest* names none ("a shape"). Every caption
follows one grammar, ``a [size] [colour] (shape | "shape") [position phrase]``, so :func:`parse_prompt` reads
back exactly the attributes a caption names.

Rendering is procedural and deterministic: :func:`render_scene` draws a scene by signed-distance tests on the
pixel grid, with a small position jitter taken from a seeded generator, so a seed fixes every pixel.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import torch
from datasets import Dataset

IMAGE_SIZE = 32
BACKGROUND = (0.12, 0.12, 0.12)

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.15, 0.15),
    "green": (0.15, 0.8, 0.2),
    "blue": (0.2, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 5.0, "big": 9.0}
"""Size word → half-extent of the shape in pixels (radius of a circle, half side of a square)."""
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (16.0, 9.0),
    "right": (16.0, 23.0),
    "top": (9.0, 16.0),
    "bottom": (23.0, 16.0),
}
"""Position word → centre ``(row, column)`` of the shape on the 32×32 canvas."""
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}
"""Attribute name → its values, in a fixed order (the classifier's class indices)."""
JITTER = 2.0
"""Largest shift (pixels) of a shape's centre from its nominal position."""


class PromptGrammarError(ValueError):
    """A prompt that the scene grammar cannot read."""


@dataclass(frozen=True)
class Scene:
    """One shape: its colour, shape, size and position words."""

    colour: str
    shape: str
    size: str
    position: str

    def caption(self, named: tuple[str, ...] = ("size", "colour", "shape", "position")) -> str:
        """The caption naming the attributes in ``named`` (all four by default); unnamed ones are left out."""
        words = ["a"]
        if "size" in named:
            words.append(self.size)
        if "colour" in named:
            words.append(self.colour)
        words.append(self.shape if "shape" in named else "shape")
        if "position" in named:
            words.append(POSITION_PHRASES[self.position])
        return " ".join(words)


def all_scenes() -> list[Scene]:
    """Every combination of the attribute values (4 × 3 × 2 × 4 = 96 scenes)."""
    return [
        Scene(colour, shape, size, position)
        for colour in ATTRIBUTES["colour"]
        for shape in ATTRIBUTES["shape"]
        for size in ATTRIBUTES["size"]
        for position in ATTRIBUTES["position"]
    ]


def random_scene(rng: random.Random) -> Scene:
    """A scene with each attribute drawn uniformly."""
    return Scene(*(rng.choice(values) for values in ATTRIBUTES.values()))


def _shape_mask(shape: str, rows: torch.Tensor, cols: torch.Tensor, extent: float) -> torch.Tensor:
    """Soft (one-pixel antialiased) inside-mask of ``shape`` centred at the origin of ``rows``/``cols``.

    Each shape is a signed distance ``d`` (negative inside); the mask is ``clamp(0.5 − d, 0, 1)``.
    """
    if shape == "circle":
        distance = torch.sqrt(rows**2 + cols**2) - extent
    elif shape == "square":
        distance = torch.maximum(rows.abs(), cols.abs()) - extent * 0.85
    else:  # an upward triangle: base at row +extent, apex at row −extent
        sides = (cols.abs() - 0.5 * (rows + extent)) * (2 / math.sqrt(5))  # half-width (row + extent) / 2
        distance = torch.maximum(rows - extent, sides)
    return (0.5 - distance).clamp(0, 1)


def render_scene(scene: Scene, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``scene`` as a float image ``(3, 32, 32)`` in [0, 1].

    The centre is the nominal position plus a jitter uniform in ``[−2, 2]`` pixels per axis, drawn from
    ``generator`` (no jitter without one).
    """
    row, col = POSITIONS[scene.position]
    if generator is not None:
        row, col = (c + (torch.rand((), generator=generator).item() * 2 - 1) * JITTER for c in (row, col))
    grid = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    rows, cols = torch.meshgrid(grid - row, grid - col, indexing="ij")
    mask = _shape_mask(scene.shape, rows, cols, SIZES[scene.size])
    background = torch.tensor(BACKGROUND).view(3, 1, 1)
    colour = torch.tensor(COLOURS[scene.colour]).view(3, 1, 1)
    return background + (colour - background) * mask


PARTIAL_SUBSETS: tuple[tuple[str, ...], ...] = (
    ("colour",),
    ("shape",),
    ("colour", "shape"),
    ("size", "shape"),
    ("colour", "position"),
    ("shape", "position"),
    ("colour", "shape", "position"),
)
"""The attribute subsets that partial captions name."""


def random_caption(scene: Scene, rng: random.Random, detail: str = "mixed") -> str:
    """A caption of ``scene``: ``"full"`` names every attribute, ``"partial"`` a subset from
    :data:`PARTIAL_SUBSETS`, ``"none"`` none ("a shape"); ``"mixed"`` picks full, partial or none with
    probabilities 0.5, 0.4, 0.1."""
    if detail == "mixed":
        detail = rng.choices(("full", "partial", "none"), weights=(0.5, 0.4, 0.1))[0]
    if detail == "full":
        return scene.caption()
    if detail == "partial":
        return scene.caption(rng.choice(PARTIAL_SUBSETS))
    if detail == "none":
        return scene.caption(())
    raise ValueError(f"detail must be 'full', 'partial', 'none' or 'mixed', got {detail!r}.")


def shapes_dataset(num_scenes: int = 1024, seed: int = 0, detail: str = "mixed") -> Dataset:
    """A ``datasets.Dataset`` of rendered scenes: columns ``image`` (PIL), ``prompt`` (a caption at the given
    ``detail``, see :func:`random_caption`) and one column per attribute (``colour``, ``shape``, ``size``,
    ``position``). The same ``seed`` gives the same rows."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {"image": [], "prompt": [], **{name: [] for name in ATTRIBUTES}}
    for _ in range(num_scenes):
        scene = random_scene(rng)
        rows["image"].append(_to_pil(render_scene(scene, generator)))
        rows["prompt"].append(random_caption(scene, rng, detail))
        for name, value in asdict(scene).items():
            rows[name].append(value)
    return Dataset.from_dict(rows)


def render_batch(
    num_scenes: int, generator: torch.Generator, rng: random.Random
) -> tuple[torch.Tensor, list[Scene]]:
    """``num_scenes`` random scenes as a tensor ``(N, 3, 32, 32)`` and their :class:`Scene` records (the
    training scripts' fast path: no PIL round trip)."""
    scenes = [random_scene(rng) for _ in range(num_scenes)]
    return torch.stack([render_scene(s, generator) for s in scenes]), scenes


def _to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array)


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a caption names, e.g. ``"a red circle at the top"`` → ``{"colour": "red", "shape":
    "circle", "position": "top"}``; ``"a shape"`` → ``{}``.

    Raises:
        PromptGrammarError: ``prompt`` does not follow ``a [size] [colour] (shape | "shape") [position]``.
    """
    words = prompt.lower().strip().rstrip(".").split()
    named: dict[str, str] = {}
    phrases = {phrase: name for name, phrase in POSITION_PHRASES.items()}
    rest = " ".join(words[-3:])
    if rest in phrases:
        named["position"] = phrases[rest]
        words = words[:-3]
    if words[:1] == ["a"]:
        words = words[1:]
    if words and words[0] in SIZES:
        named["size"] = words.pop(0)
    if words and words[0] in COLOURS:
        named["colour"] = words.pop(0)
    if len(words) == 1 and words[0] in SHAPES:
        named["shape"] = words[0]
    elif words != ["shape"]:
        raise PromptGrammarError(
            f"Cannot read the prompt {prompt!r} as a scene: the shapes world understands "
            "'a [small|big] [red|green|blue|yellow] (circle|square|triangle|shape) "
            "[on the left|on the right|at the top|at the bottom]'. Use the prompt sets builtin:shapes or "
            "builtin:shapes-ambiguous."
        )
    return named


def full_prompts() -> list[str]:
    """The full caption of every scene (96 prompts): the ``builtin:shapes`` prompt set."""
    return [scene.caption() for scene in all_scenes()]


def ambiguous_prompts() -> list[str]:
    """Every distinct partial caption, and "a shape": the ``builtin:shapes-ambiguous`` prompt set."""
    captions = [scene.caption(subset) for scene in all_scenes() for subset in PARTIAL_SUBSETS]
    return list(dict.fromkeys(captions + [Scene("red", "circle", "small", "left").caption(())]))


VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "shape", "on", "the", "at"]
        + [w for values in ATTRIBUTES.values() for w in values]
        + [w for phrase in POSITION_PHRASES.values() for w in phrase.split()]
    )
)
"""Every word the captions use: the tokenizers' vocabulary."""
