"""Prompt sets: load the prompts a run trains on, through ``datasets``.

:func:`load_prompts` takes

* a Hub data set id (``"user/prompts"``, with an optional config name and split);
* a local folder that ``datasets.load_dataset`` understands (parquet, json, csv, … files inside);
* a single file: ``.txt`` (one prompt per line, blank lines skipped; the column is called ``prompt``),
  ``.json`` / ``.jsonl``, ``.csv`` / ``.tsv``, or ``.parquet``;
* a built-in prompt list, ``"builtin:<name>"``: see :data:`BUILTIN_PROMPT_SETS`.

Whatever the source, the result is a ``datasets.Dataset`` whose prompt column is checked before any model
is loaded: a missing column is an error that names the columns that do exist and the flag that fixes it.

Example::

    from trl_visual.data import load_prompts

    prompts = load_prompts("builtin:drawbench-mini")     # 48 prompts, "prompt" and "category" columns
    prompts = load_prompts("prompts.txt")                # one prompt per line
    prompts = load_prompts("data.csv", prompt_column="caption")
"""

from __future__ import annotations

import os

from datasets import Dataset, DatasetDict, load_dataset

BUILTIN_PREFIX = "builtin:"

# Our own small prompt list in the spirit of DrawBench's categories: each category probes one thing a
# text-to-image model often gets wrong. Short enough for a quick start, varied enough to see a reward move.
_DRAWBENCH_MINI: dict[str, list[str]] = {
    "colors": [
        "a blue banana on a white plate",
        "a red bicycle leaning against a yellow wall",
        "a green cat sitting on a purple sofa",
        "an orange umbrella in a grey rainy street",
        "a black swan swimming next to a white swan",
        "a pink elephant standing in a field of sunflowers",
    ],
    "counting": [
        "three apples on a wooden table",
        "two dogs playing with one ball",
        "five birds sitting on a power line",
        "four candles on a birthday cake",
        "one teacup and two saucers",
        "six colored pencils in a row",
    ],
    "spatial": [
        "a cat sitting on top of a stack of books",
        "a red cube to the left of a blue sphere",
        "a lamp standing behind a green armchair",
        "a small boat under a stone bridge",
        "a dog lying beneath a kitchen table",
        "a clock hanging above a fireplace",
    ],
    "text": [
        'a shop sign that says "OPEN"',
        'a coffee mug with the word "Monday" printed on it',
        'a street sign reading "Main St"',
        'a birthday card with the text "Happy 30th"',
        'a neon sign that says "night owl"',
        'a book cover titled "The Quiet Sea"',
    ],
    "rare_words": [
        "an axolotl resting at the bottom of an aquarium",
        "a pangolin walking through tall grass",
        "an astrolabe on an old wooden desk",
        "a samovar on a table with glasses of tea",
        "a narwhal breaking through arctic ice",
        "a theremin on a stage under a spotlight",
    ],
    "composition": [
        "an astronaut riding a horse on the moon",
        "a teapot shaped like a pumpkin",
        "a giraffe wearing a knitted scarf",
        "a lighthouse made of glass at sunset",
        "a robot watering plants in a greenhouse",
        "a piano floating in the clouds",
    ],
    "styles": [
        "a watercolor painting of a fox in the snow",
        "a pixel-art castle on a hill",
        "an oil painting of a harbour at dawn",
        "a pencil sketch of an old man reading",
        "a low-poly 3D render of a mountain lake",
        "a ukiyo-e print of a wave and a small fishing boat",
    ],
    "long_descriptions": [
        "a cozy reading nook with a window seat, a knitted blanket, a stack of books and a cup of tea "
        "steaming in the afternoon light",
        "a busy night market with paper lanterns, food stalls, people walking and a light rain on the street",
        "a mountain village at dawn, mist in the valley, wooden houses with red roofs and a river below",
        "a scientist's desk covered with notebooks, a microscope, coloured vials and a sleeping cat",
        "a sailing ship in a storm with large waves, lightning in the sky and a lighthouse on the horizon",
        "a garden in spring with tulips, a stone path, a wooden bench and a small fountain",
    ],
}


def _drawbench_mini() -> Dataset:
    prompts = [p for ps in _DRAWBENCH_MINI.values() for p in ps]
    categories = [c for c, ps in _DRAWBENCH_MINI.items() for _ in ps]
    return Dataset.from_dict({"prompt": prompts, "category": categories})


# Short prompts of common objects: what the tiny offline models learn fastest on (their tokenizers know
# only a few dozen words, so long prompts are mostly truncated).
_OBJECTS = ["a cat", "a dog", "a red car", "a tree", "a house", "a bird", "a boat", "a flower"]


def _objects() -> Dataset:
    return Dataset.from_dict({"prompt": list(_OBJECTS)})


BUILTIN_PROMPT_SETS = {"drawbench-mini": _drawbench_mini, "objects": _objects}
"""Built-in prompt lists, reachable as ``dataset_name="builtin:<name>"``.

- ``drawbench-mini``: 48 prompts written for this project in eight DrawBench-style categories (colors,
  counting, spatial, text, rare_words, composition, styles, long_descriptions), six each, with columns
  ``prompt`` and ``category``.
- ``objects``: 8 short prompts of common objects ("a cat", "a red car", …), column ``prompt``; the quick
  start's set for the tiny offline models.
"""

# File extensions and the `datasets` builder that reads them.
_FILE_BUILDERS = {
    ".txt": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}


def _load_file(path: str, split: str) -> Dataset:
    extension = os.path.splitext(path)[1].lower()
    if extension not in _FILE_BUILDERS:
        known = ", ".join(sorted(_FILE_BUILDERS))
        raise ValueError(
            f"Cannot read prompts from {path!r}: unknown file type {extension!r}. Use one of {known}, "
            "a folder, a Hub data set id, or a built-in list ('builtin:drawbench-mini')."
        )
    if split != "train":
        raise ValueError(
            f"A single file has one split, 'train'; got dataset_split={split!r}. Drop `--dataset_split` or "
            "point `--dataset_name` at a folder or Hub data set with several splits."
        )
    builder = _FILE_BUILDERS[extension]
    kwargs = {"delimiter": "\t"} if extension == ".tsv" else {}
    dataset = load_dataset(builder, data_files={"train": path}, split="train", **kwargs)
    if builder == "text":
        dataset = dataset.filter(lambda row: bool(row["text"].strip())).rename_column("text", "prompt")
    return dataset


def load_prompts(
    dataset_name: str,
    dataset_config: str | None = None,
    split: str = "train",
    prompt_column: str = "prompt",
) -> Dataset:
    """Load a prompt set and check that it has the prompt column.

    Args:
        dataset_name: a Hub data set id, a local folder, a ``.txt`` / ``.json`` / ``.jsonl`` / ``.csv`` /
            ``.tsv`` / ``.parquet`` file, or ``"builtin:<name>"`` (see :data:`BUILTIN_PROMPT_SETS`).
            A ``.txt`` file holds one prompt per line and gives a ``prompt`` column.
        dataset_config: the data set's configuration name (Hub data sets with several), if any.
        split: which split to load (``"train"``). Files and built-in lists have only ``"train"``.
        prompt_column: the column holding the prompts; every other column is passed to the rewards.

    Returns:
        The prompts as a ``datasets.Dataset``.

    Raises:
        ValueError: unknown built-in name, unknown file type, missing split, or no ``prompt_column``
            (the message lists the columns found and names ``--prompt_column``).
    """
    if dataset_name.startswith(BUILTIN_PREFIX):
        key = dataset_name[len(BUILTIN_PREFIX) :]
        if key not in BUILTIN_PROMPT_SETS:
            known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_PROMPT_SETS)
            raise ValueError(f"Unknown built-in prompt set {dataset_name!r}. Built-in sets: {known}.")
        if split != "train":
            raise ValueError(f"The built-in prompt sets have one split, 'train'; got {split!r}.")
        dataset = BUILTIN_PROMPT_SETS[key]()
    elif os.path.isfile(dataset_name):
        dataset = _load_file(dataset_name, split)
    else:
        loaded = load_dataset(dataset_name, dataset_config, split=split)
        if isinstance(loaded, DatasetDict):  # pragma: no cover - split is always given
            loaded = loaded[split]
        dataset = loaded
    columns = list(dataset.column_names or [])
    if prompt_column not in columns:
        raise ValueError(
            f"The prompt set {dataset_name!r} has no {prompt_column!r} column (its columns: {columns}). "
            "Name the column that holds the prompts with `--prompt_column <name>` (or `prompt_column:` in "
            "the YAML config)."
        )
    return dataset


__all__ = ["BUILTIN_PREFIX", "BUILTIN_PROMPT_SETS", "load_prompts"]
