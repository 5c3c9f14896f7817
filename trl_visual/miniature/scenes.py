"""Synthetic scenes: one or two coloured shapes on a dark background, with captions that describe them fully,
partly or hardly at all.

A scene is four attributes, each a word of the caption grammar::

    colour   red | green | blue | yellow
    shape    circle | square | triangle
    size     small | big
    position left | right | top | bottom

A *full* caption names all four ("a small red circle on the left"); a *partial* caption names a subset ("a red
shape", "a big triangle", "a blue square at the top"); the *vaguest* names none ("a shape"). Every caption
follows one grammar, ``a [size] [colour] (shape | "shape") [position phrase]``, so :func:`parse_prompt` reads
back exactly the attributes a caption names.

A *two-shape* scene (:class:`ScenePair`) holds two small shapes on opposite sides of the canvas (left and
right, or top and bottom), each with its own colour and shape; its caption joins two such phrases with "and",
each naming its object's position ("a red circle on the left and a blue square on the right"), so that a
reward can tell which object a phrase means. :func:`parse_objects` reads back one attribute dict per object.

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


FULL: tuple[str, ...] = ("size", "colour", "shape", "position")
"""The attributes a full caption names, in caption order."""


class PromptGrammarError(ValueError):
    """A prompt that the scene grammar cannot read."""


@dataclass(frozen=True)
class Scene:
    """One shape: its colour, shape, size and position words."""

    colour: str
    shape: str
    size: str
    position: str

    @property
    def objects(self) -> tuple[Scene, ...]:
        """The shapes of the scene: this one."""
        return (self,)

    def caption(self, named: tuple[str, ...] = FULL) -> str:
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


PAIR_LAYOUTS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))
"""The two positions of a two-shape scene: opposite sides of the canvas."""
PAIR_SIZE = "small"
"""The size of both shapes of a two-shape scene: two small shapes on opposite sides never touch (their centres
are 14 pixels apart, each at most 5 + 2 pixels of jitter from its own half's centre line)."""


def is_pair_layout(positions: list[str | None]) -> bool:
    """Whether ``positions`` are the two sides of one of :data:`PAIR_LAYOUTS` (in either order)."""
    return len(positions) == 2 and any(set(positions) == set(layout) for layout in PAIR_LAYOUTS)


@dataclass(frozen=True)
class ScenePair:
    """Two small shapes on opposite sides of the canvas, ``first`` and ``second`` in caption order."""

    first: Scene
    second: Scene

    def __post_init__(self) -> None:
        on_opposite_sides = is_pair_layout([self.first.position, self.second.position])
        if not on_opposite_sides or not self.first.size == self.second.size == PAIR_SIZE:
            raise ValueError(
                "A two-shape scene holds two small shapes on opposite sides (left and right, or top and bottom), "
                f"got {self.first} and {self.second}."
            )

    @property
    def objects(self) -> tuple[Scene, ...]:
        """The two shapes, in caption order."""
        return (self.first, self.second)

    def caption(self, named: tuple[str, ...] = FULL) -> str:
        """Both shapes' captions (naming the attributes in ``named``) joined by "and"; each names its position
        whatever ``named`` says, so that the phrase says which shape it means."""
        named = (*named, "position")
        return " and ".join(shape.caption(named) for shape in self.objects)


BACKGROUNDS: tuple[str, ...] = ("horizon", "stripes", "tiles")
"""The structured backgrounds of ``tiny:scenes``: a horizon (sky above, ground below), vertical stripes, tiles."""
SKY, GROUND = (0.6, 0.68, 0.78), (0.4, 0.32, 0.26)
"""A horizon's two bands (saturation under 0.2, below every shape colour's 0.65 to 0.8)."""
STRIPE_TONES = TILE_TONES = ((0.2, 0.2, 0.22), (0.42, 0.42, 0.4))
"""The two alternating tones of stripes and of tiles (greys, apart from every shape colour)."""
STRIPE_WIDTH, TILE_SIZE = 4, 8
"""A stripe's width and a tile's side, in pixels (one and two latent cells of the 8×8 latent grid)."""
HORIZON_ROWS = (12, 21)
"""The rows (first, last + 1) where a horizon's ground may begin."""


@dataclass(frozen=True)
class StructuredScene:
    """A scene (one or two shapes) painted over a structured background: ``background`` names its kind
    (:data:`BACKGROUNDS`) and ``offset`` places it (the first ground row of a horizon; the phase, in pixels, of
    stripes and tiles). Captions are the scene's own: the background is not named."""

    scene: Scene | ScenePair
    background: str
    offset: int

    @property
    def objects(self) -> tuple[Scene, ...]:
        """The shapes of the scene."""
        return self.scene.objects

    def caption(self, named: tuple[str, ...] = FULL) -> str:
        """The caption of the shapes (:meth:`Scene.caption`)."""
        return self.scene.caption(named)


def random_background(rng: random.Random) -> tuple[str, int]:
    """A background kind, uniform over :data:`BACKGROUNDS`, and its offset, uniform over its range."""
    kind = rng.choice(BACKGROUNDS)
    offset = rng.randrange(*HORIZON_ROWS) if kind == "horizon" else rng.randrange(2 * STRIPE_WIDTH)
    return kind, offset


def render_background(background: str, offset: int) -> torch.Tensor:
    """The background ``(3, 32, 32)``: ``horizon``: :data:`SKY` on rows ``< offset``, :data:`GROUND` below;
    ``stripes``: tone ``⌊(col + offset) / 4⌋ mod 2`` of :data:`STRIPE_TONES`; ``tiles``: tone
    ``(⌊(row + offset) / 8⌋ + ⌊(col + offset) / 8⌋) mod 2`` of :data:`TILE_TONES`."""
    index = torch.arange(IMAGE_SIZE)
    rows, cols = torch.meshgrid(index, index, indexing="ij")
    if background == "horizon":
        which, tones = (rows >= offset).long(), (SKY, GROUND)
    elif background == "stripes":
        which, tones = ((cols + offset) // STRIPE_WIDTH) % 2, STRIPE_TONES
    elif background == "tiles":
        which, tones = ((rows + offset) // TILE_SIZE + (cols + offset) // TILE_SIZE) % 2, TILE_TONES
    else:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}.")
    return torch.tensor(tones, dtype=torch.float32).T[:, which]


def all_scenes() -> list[Scene]:
    """Every combination of the attribute values (4 × 3 × 2 × 4 = 96 scenes)."""
    return [
        Scene(colour, shape, size, position)
        for colour in ATTRIBUTES["colour"]
        for shape in ATTRIBUTES["shape"]
        for size in ATTRIBUTES["size"]
        for position in ATTRIBUTES["position"]
    ]


def all_pairs() -> list[ScenePair]:
    """Every two-shape scene (2 layouts × 2 orders × (4 colours × 3 shapes)² = 576)."""
    shapes = [(colour, shape) for colour in ATTRIBUTES["colour"] for shape in ATTRIBUTES["shape"]]
    return [
        ScenePair(Scene(*a, PAIR_SIZE, first), Scene(*b, PAIR_SIZE, second))
        for layout in PAIR_LAYOUTS
        for first, second in (layout, layout[::-1])
        for a in shapes
        for b in shapes
    ]


def random_scene(
    rng: random.Random, two_shape_fraction: float = 0.0, backgrounds: bool = False
) -> Scene | ScenePair | StructuredScene:
    """A scene with each attribute drawn uniformly; with probability ``two_shape_fraction`` a two-shape scene
    (layout, order, and each shape's colour and shape drawn uniformly). At 0 no extra number is drawn, so the
    one-shape scenes of a seed are what they always were. With ``backgrounds``, the scene is then painted over
    a :func:`random_background` (drawn after the shapes)."""
    if backgrounds:
        return StructuredScene(random_scene(rng, two_shape_fraction), *random_background(rng))
    if two_shape_fraction > 0 and rng.random() < two_shape_fraction:
        first, second = rng.choice(PAIR_LAYOUTS)
        if rng.random() < 0.5:
            first, second = second, first
        return ScenePair(*(_random_small_shape(rng, position) for position in (first, second)))
    return Scene(*(rng.choice(values) for values in ATTRIBUTES.values()))


def _random_small_shape(rng: random.Random, position: str) -> Scene:
    return Scene(rng.choice(ATTRIBUTES["colour"]), rng.choice(ATTRIBUTES["shape"]), PAIR_SIZE, position)


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


def render_scene(
    scene: Scene | ScenePair | StructuredScene, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``scene`` as a float image ``(3, 32, 32)`` in [0, 1].

    Each shape's centre is its nominal position plus a jitter uniform in ``[−2, 2]`` pixels per axis, drawn
    from ``generator`` (no jitter without one); the shapes are painted in turn, ``x ← x + (colour − x)·mask``,
    over the plain :data:`BACKGROUND` (or a :class:`StructuredScene`'s :func:`render_background`).
    """
    if isinstance(scene, StructuredScene):
        image = render_background(scene.background, scene.offset)
    else:
        image = torch.tensor(BACKGROUND).view(3, 1, 1).expand(3, IMAGE_SIZE, IMAGE_SIZE)
    for shape in scene.objects:
        image = image + (torch.tensor(COLOURS[shape.colour]).view(3, 1, 1) - image) * _placed_mask(
            shape, generator
        )
    return image


def _placed_mask(scene: Scene, generator: torch.Generator | None) -> torch.Tensor:
    """The soft mask ``(32, 32)`` of one shape at its (jittered) position."""
    row, col = POSITIONS[scene.position]
    if generator is not None:
        row, col = (c + (torch.rand((), generator=generator).item() * 2 - 1) * JITTER for c in (row, col))
    grid = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    rows, cols = torch.meshgrid(grid - row, grid - col, indexing="ij")
    return _shape_mask(scene.shape, rows, cols, SIZES[scene.size])


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


def random_caption(scene: Scene | ScenePair, rng: random.Random, detail: str = "mixed") -> str:
    """A caption of ``scene``: ``"full"`` names every attribute, ``"partial"`` a subset from
    :data:`PARTIAL_SUBSETS`, ``"none"`` none ("a shape"); ``"mixed"`` picks full, partial or none with
    probabilities 0.5, 0.4, 0.1. (A two-shape caption names the positions in any case.)"""
    if detail == "mixed":
        detail = rng.choices(("full", "partial", "none"), weights=(0.5, 0.4, 0.1))[0]
    if detail == "full":
        return scene.caption()
    if detail == "partial":
        return scene.caption(rng.choice(PARTIAL_SUBSETS))
    if detail == "none":
        return scene.caption(())
    raise ValueError(f"detail must be 'full', 'partial', 'none' or 'mixed', got {detail!r}.")


def shapes_dataset(
    num_scenes: int = 1024, seed: int = 0, detail: str = "mixed", two_shape_fraction: float = 0.0
) -> Dataset:
    """A ``datasets.Dataset`` of rendered scenes: columns ``image`` (PIL), ``prompt`` (a caption at the given
    ``detail``, see :func:`random_caption`), ``num_shapes`` (1 or 2), one column per attribute of the first
    shape (``colour``, ``shape``, ``size``, ``position``) and the same for the second (``colour_2``, …; None in
    a one-shape scene). A fraction ``two_shape_fraction`` of the scenes, on average, holds two shapes. The same
    ``seed`` gives the same rows."""
    from ..images import to_pil  # diffusers, imported only when images are made

    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    second = [f"{name}_2" for name in ATTRIBUTES]
    rows: dict[str, list] = {
        "image": [],
        "prompt": [],
        "num_shapes": [],
        **{n: [] for n in (*ATTRIBUTES, *second)},
    }
    for _ in range(num_scenes):
        scene = random_scene(rng, two_shape_fraction)
        rows["image"].append(to_pil(render_scene(scene, generator)))
        rows["prompt"].append(random_caption(scene, rng, detail))
        rows["num_shapes"].append(len(scene.objects))
        shapes = [asdict(shape) for shape in scene.objects] + [dict.fromkeys(ATTRIBUTES)]
        for names, values in zip((tuple(ATTRIBUTES), second), shapes):
            for name, value in zip(names, values.values()):
                rows[name].append(value)
    return Dataset.from_dict(rows)


def render_batch(
    num_scenes: int,
    generator: torch.Generator,
    rng: random.Random,
    two_shape_fraction: float = 0.0,
    backgrounds: bool = False,
) -> tuple[torch.Tensor, list[Scene | ScenePair | StructuredScene]]:
    """``num_scenes`` random scenes (a fraction ``two_shape_fraction`` of two-shape ones, on average; over
    structured backgrounds with ``backgrounds``) as a tensor ``(N, 3, 32, 32)`` and their records (the training
    scripts' fast path: no PIL round trip)."""
    scenes = [random_scene(rng, two_shape_fraction, backgrounds) for _ in range(num_scenes)]
    return torch.stack([render_scene(s, generator) for s in scenes]), scenes


GRAMMAR = (
    "a [small|big] [red|green|blue|yellow] (circle|square|triangle|shape) "
    "[on the left|on the right|at the top|at the bottom]"
)
"""The grammar of a one-shape caption, as error messages show it."""


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a caption names, e.g. ``"a red circle at the top"`` → ``{"colour": "red", "shape":
    "circle", "position": "top"}``; ``"a shape"`` → ``{}``.

    Raises:
        PromptGrammarError: ``prompt`` does not follow ``a [size] [colour] (shape | "shape") [position]``, or
            describes two shapes (read those with :func:`parse_objects`).
    """
    if " and " in prompt.lower():
        raise PromptGrammarError(
            f"The prompt {prompt!r} describes two shapes: read it with parse_objects. tiny:shapes draws one shape "
            "per image; two-shape captions are for tiny:shapes-pairs (prompt set builtin:shapes-pairs)."
        )
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
            f"{GRAMMAR!r}, or two such phrases joined by 'and', each naming its position. Use the prompt "
            "sets builtin:shapes, builtin:shapes-ambiguous or builtin:shapes-pairs."
        )
    return named


def parse_objects(prompt: str) -> list[dict[str, str]]:
    """The attributes a caption names, one dict per shape: ``"a red circle"`` → ``[{"colour": "red", "shape":
    "circle"}]``; ``"a red circle on the left and a square on the right"`` → ``[{"colour": "red", "shape":
    "circle", "position": "left"}, {"shape": "square", "position": "right"}]``.

    Raises:
        PromptGrammarError: a phrase outside the grammar of :func:`parse_prompt`, more than two phrases, or two
            phrases that do not name opposite positions (left and right, or top and bottom).
    """
    phrases = prompt.lower().strip().rstrip(".").split(" and ")
    objects = [parse_prompt(phrase.strip()) for phrase in phrases]
    if len(objects) == 1:
        return objects
    if not is_pair_layout([shape.get("position") for shape in objects]):
        raise PromptGrammarError(
            f"Cannot read the prompt {prompt!r} as a scene: a two-shape caption joins two phrases with 'and', "
            "each naming its position, on opposite sides ('… on the left and … on the right', or '… at the top "
            "and … at the bottom'), e.g. 'a red circle on the left and a blue square on the right'."
        )
    return objects


def full_prompts() -> list[str]:
    """The full caption of every scene (96 prompts): the ``builtin:shapes`` prompt set."""
    return [scene.caption() for scene in all_scenes()]


def pair_prompts() -> list[str]:
    """The full caption of every two-shape scene (576 prompts): the ``builtin:shapes-pairs`` prompt set."""
    return [pair.caption() for pair in all_pairs()]


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
PAIR_VOCABULARY: tuple[str, ...] = (*VOCABULARY, "and")
"""The two-shape captions' words: :data:`VOCABULARY` and "and" (appended, so that ``tiny:shapes``' one-shape
tokenizers, built over :data:`VOCABULARY`, stay what its denoiser was trained on)."""
