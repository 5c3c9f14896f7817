"""Prompt sets: load the prompts a run trains on, through ``datasets``.

:func:`load_prompts` takes

* a Hub data set id (``"user/prompts"``, with an optional config name and split);
* a local folder that ``datasets.load_dataset`` understands (parquet, json, csv, … files inside);
* a single file: ``.txt`` (one prompt per line, blank lines skipped; the column is called ``prompt``),
  ``.json`` / ``.jsonl``, ``.csv`` / ``.tsv``, or ``.parquet``;
* a built-in prompt list, ``"builtin:<name>"``: see :data:`BUILTIN_PROMPT_SETS`.

Whatever the source, the result is a ``datasets.Dataset`` whose prompts are checked before any model is
loaded. A problem is a :class:`PromptSetError` (a ``ValueError``) that names the file, the line or row, and
the fix: a missing prompt column, a prompt that is not a non-empty string (``null``, a number, ``""``), an
empty file, a file that is not UTF-8, a broken JSON line. A local path that does not exist is a
``FileNotFoundError`` (not a failed Hub lookup).

Example::

    from trl_visual.data import load_prompts

    prompts = load_prompts("builtin:drawbench-mini")     # 48 prompts, "prompt" and "category" columns
    prompts = load_prompts("prompts.txt")                # one prompt per line
    prompts = load_prompts("data.csv", prompt_column="caption")
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import unicodedata
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError

from .miniature import scenes
from .preflight import check_hub_id, missing_prompt_file_message

BUILTIN_PREFIX = "builtin:"


class PromptSetError(ValueError):
    """A prompt set that cannot be trained on as it is; the message names the file (line or row) and the fix."""


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


def _shapes(detail: str) -> Dataset:
    """The shapes world's prompts (:mod:`trl_visual.miniature.scenes`)."""
    prompts = {"full": scenes.full_prompts, "partial": scenes.ambiguous_prompts, "pairs": scenes.pair_prompts}
    return Dataset.from_dict({"prompt": prompts[detail]()})


SHAPES_EVAL_SAMPLES_PER_PROMPT = 4
"""Rows per prompt in ``builtin:shapes``' ``test`` split: evaluation draws one sample per row."""


def _shapes_test() -> Dataset:
    """``builtin:shapes``' evaluation split: half of the 96 full captions, each repeated
    :data:`SHAPES_EVAL_SAMPLES_PER_PROMPT` times, so that ``evaluate()``, which draws one deterministic sample per
    row from fixed noise, scores 4 samples of each.

    The half is balanced: for each colour, shape and size, two of the four positions (left and top, or right and
    bottom, alternating), so every attribute value is evaluated equally often; the 48 captions come in a fixed
    shuffled order (seed 0), so that the first few of them (a picture's columns) are varied."""
    prompts = scenes.full_prompts()
    positions = len(scenes.ATTRIBUTES["position"])
    half = [p for i, p in enumerate(prompts) if (i % positions + i // positions) % 2 == 0]
    half = random.Random(0).sample(half, len(half))
    return Dataset.from_dict({"prompt": [p for p in half for _ in range(SHAPES_EVAL_SAMPLES_PER_PROMPT)]})


def _shapes_pairs_test() -> Dataset:
    """``builtin:shapes-pairs``' evaluation split: 48 of its 576 two-shape captions (drawn with seed 0), each
    repeated :data:`SHAPES_EVAL_SAMPLES_PER_PROMPT` times."""
    prompts = random.Random(0).sample(scenes.pair_prompts(), 48)
    return Dataset.from_dict({"prompt": [p for p in prompts for _ in range(SHAPES_EVAL_SAMPLES_PER_PROMPT)]})


BUILTIN_PROMPT_SETS = {
    "drawbench-mini": _drawbench_mini,
    "objects": _objects,
    "shapes": lambda: _shapes("full"),
    "shapes-ambiguous": lambda: _shapes("partial"),
    "shapes-pairs": lambda: _shapes("pairs"),
}
"""Built-in prompt lists, reachable as ``dataset_name="builtin:<name>"``.

- ``drawbench-mini``: 48 prompts written for this project in eight DrawBench-style categories (colors,
  counting, spatial, text, rare_words, composition, styles, long_descriptions), six each, with columns
  ``prompt`` and ``category``.
- ``objects``: 8 short prompts of common objects ("a cat", "a red car", …), column ``prompt``; the quick
  start's set for the tiny offline models.
- ``shapes``: the 96 full captions of the shapes world ("a small red circle on the left"), for ``tiny:shapes``
  and the ``shapes_adherence`` reward.
- ``shapes-ambiguous``: its 102 partial captions ("a red shape", "a big triangle", …, "a shape"), where the
  reward of a prompt is uncertain: BPGO's setting.
- ``shapes-pairs``: the 576 full captions of its two-shape scenes ("a small red circle on the left and a small
  blue square on the right"), for ``tiny:shapes-pairs``.
"""

BUILTIN_TEST_SPLITS = {"shapes": _shapes_test, "shapes-pairs": _shapes_pairs_test}
"""Built-in lists that also have a ``test`` split (``--dataset_test_split test``); the others have only ``train``.

- ``shapes``: 48 of its 96 captions (each attribute value equally often), four rows each. The world has only 96
  full captions, so these prompts are also trained on; what is held out is the samples: evaluation draws them
  deterministically (ODE) from its own fixed noise, training stochastically (SDE).
- ``shapes-pairs``: 48 of its 576 captions, four rows each (also trained on, as above).
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


_TEXT_EXTENSIONS = {".txt", ".json", ".jsonl", ".csv", ".tsv"}

# How many bad prompts an error lists before it stops looking.
_MAX_REPORTED_ROWS = 3


def is_single_split(dataset_name: str) -> bool:
    """Whether ``dataset_name`` is a single file or a built-in list without a test split
    (:data:`BUILTIN_TEST_SPLITS`): those have one split, ``"train"``."""
    if dataset_name.startswith(BUILTIN_PREFIX):
        return dataset_name[len(BUILTIN_PREFIX) :] not in BUILTIN_TEST_SPLITS
    return os.path.isfile(dataset_name)


def _looks_like_local_file(dataset_name: str) -> bool:
    """A file extension, or a path that starts like one (``./``, ``../``, ``/``, ``~``): never a Hub id."""
    extension = os.path.splitext(dataset_name)[1].lower()
    return extension in _FILE_BUILDERS or dataset_name.startswith(("./", "../", "/", "~"))


def _read_utf8(path: str) -> str:
    """The text of ``path``, or a :class:`PromptSetError` naming the line of the first byte that is not UTF-8."""
    with open(path, "rb") as file:
        data = file.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise PromptSetError(
            f"{path!r} is not UTF-8 text: byte 0x{data[error.start]:02x} on line {line} is not valid UTF-8 "
            "(prompt files are read as UTF-8). Save the file as UTF-8, e.g. from Latin-1: "
            f"`iconv -f latin1 -t utf-8 {path} > utf8_{os.path.basename(path)}`."
        ) from error


def _check_json_lines(path: str, text: str) -> None:
    """Every non-blank line of a JSON-lines file is one JSON object; the first that is not is named."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptSetError(
                f"{path!r}, line {number}: not valid JSON ({error.msg}, column {error.colno}). Each line must be "
                'one JSON object, e.g. {"prompt": "a cat"}.'
            ) from error
        if not isinstance(row, dict):
            raise PromptSetError(
                f"{path!r}, line {number}: a JSON {type(row).__name__}, not an object. Each line must be one "
                'JSON object, e.g. {"prompt": "a cat"}.'
            )


def _check_text_file(path: str, extension: str) -> None:
    """Checks that ``datasets`` reports without naming the file: encoding, emptiness, JSON syntax."""
    text = _read_utf8(path)
    if not text.strip():
        what = "one prompt per line" if extension == ".txt" else "a header row and one row per prompt"
        raise PromptSetError(f"{path!r} is empty (or only blank lines): write {what}.")
    if extension == ".jsonl":
        _check_json_lines(path, text)
    elif extension == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError:
            _check_json_lines(path, text)  # a .json file may also hold JSON lines


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Reading one small local file takes no time worth a progress bar ("Generating train split", "Filter")."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _load_file(path: str, split: str) -> Dataset:
    extension = os.path.splitext(path)[1].lower()
    if extension not in _FILE_BUILDERS:
        known = ", ".join(sorted(_FILE_BUILDERS))
        raise PromptSetError(
            f"Cannot read prompts from {path!r}: unknown file type {extension!r}. Use one of {known}, "
            "a folder, a Hub data set id, or a built-in list ('builtin:drawbench-mini')."
        )
    if split != "train":
        raise PromptSetError(
            f"{path!r} is a single file, with one split, 'train'; got the split {split!r}. Drop "
            "`--dataset_split` / `--dataset_test_split`, or point `--dataset_name` at a folder or Hub data set "
            "that has several splits."
        )
    if extension in _TEXT_EXTENSIONS:
        _check_text_file(path, extension)
    builder = _FILE_BUILDERS[extension]
    kwargs = {"delimiter": "\t"} if extension == ".tsv" else {}
    with _no_progress_bars():
        try:
            dataset = load_dataset(builder, data_files={"train": path}, split="train", **kwargs)
        except Exception as error:  # pyarrow's errors on a corrupt file do not name it
            if not isinstance(error, DatasetGenerationError) and not _is_arrow_error(error):
                raise
            cause = error.__cause__ or error
            raise PromptSetError(
                f"Cannot read prompts from {path!r}: {type(cause).__name__}: {cause}. Is it a valid "
                f"{extension} file? Re-export it, or give the prompts as a .txt (one per line) or .jsonl file."
            ) from error
        if builder == "text":
            dataset = dataset.filter(lambda row: bool(row["text"].strip())).rename_column("text", "prompt")
    return dataset


def _is_arrow_error(error: BaseException) -> bool:
    """Whether ``error`` comes from pyarrow (a corrupt Parquet/Arrow file: ``ArrowInvalid``, ``ArrowIOError``…)."""
    return type(error).__module__.startswith("pyarrow")


def _describe(value: object) -> str:
    if isinstance(value, str):
        return "an empty string" if not value.strip() else f"only invisible characters {value!r}"
    return f"{value!r} ({type(value).__name__})"


def check_prompts(dataset: Dataset, prompt_column: str, source: str) -> None:
    """Raise a :class:`PromptSetError` unless ``dataset`` has rows and every ``prompt_column`` value is a
    non-empty string; the error names up to three bad rows (counted from 0, a header not included)."""
    columns = list(dataset.column_names or [])
    if prompt_column not in columns:
        raise PromptSetError(
            f"The prompt set {source!r} has no {prompt_column!r} column (its columns: {columns}). "
            "Name the column that holds the prompts with `--prompt_column <name>` (or `prompt_column:` in "
            "the YAML config)."
        )
    if len(dataset) == 0:
        raise PromptSetError(f"The prompt set {source!r} has no rows: add prompts to it.")
    check_prompt_values(dataset[prompt_column], f"the prompt set {source!r}, column {prompt_column!r}")


def is_visible_text(text: str) -> bool:
    """Whether ``text`` has a character that is neither whitespace nor invisible formatting (zero-width spaces and
    joiners, the byte-order mark, direction marks: Unicode categories Cf, Cc, Z*)."""
    return any(not (c.isspace() or unicodedata.category(c) in ("Cf", "Cc", "Zs", "Zl", "Zp")) for c in text)


def check_prompt_values(prompts: Sequence[Any], where: str) -> None:
    """Raise a :class:`PromptSetError` unless every prompt is a non-empty string with a visible character (not only
    whitespace or zero-width characters): an empty prompt would silently train the unconditional prompt. The error names up to three bad rows
    (counted from 0) and ``where`` they come from."""
    bad_rows = []
    for row, value in enumerate(prompts):
        if not isinstance(value, str) or not is_visible_text(value):
            bad_rows.append(f"row {row}: {_describe(value)}")
            if len(bad_rows) == _MAX_REPORTED_ROWS:
                break
    if bad_rows:
        raise PromptSetError(
            f"Prompts that are not text in {where} ({'; '.join(bad_rows)}; rows counted from 0). Every prompt "
            "must be a non-empty string: fix or remove those rows (e.g. `dataset.filter(lambda row: "
            "isinstance(row['prompt'], str) and row['prompt'].strip())`)."
        )


def _load_folder(folder: str, config: str | None, split: str) -> Dataset:
    """A local folder that ``datasets.load_dataset`` reads (parquet, json, csv, … files, split by file name)."""
    try:
        loaded = load_dataset(folder, config, split=split)
    except (DatasetGenerationError, ValueError) as error:
        raise PromptSetError(
            f"Cannot read prompts from the folder {folder!r}: {error.__cause__ or error}"
        ) from error
    return loaded


def _builtin_split(key: str, split: str) -> Dataset:
    """The ``split`` of the built-in list ``key``: ``train``, or ``test`` where :data:`BUILTIN_TEST_SPLITS` has one."""
    if split == "train":
        return BUILTIN_PROMPT_SETS[key]()
    if split == "test" and key in BUILTIN_TEST_SPLITS:
        return BUILTIN_TEST_SPLITS[key]()
    splits = "'train' and 'test'" if key in BUILTIN_TEST_SPLITS else "one split, 'train'"
    raise PromptSetError(f"The built-in prompt set {BUILTIN_PREFIX + key!r} has {splits}; got {split!r}.")


def load_prompts(
    dataset_name: str,
    dataset_config: str | None = None,
    split: str = "train",
    prompt_column: str = "prompt",
) -> Dataset:
    """Load a prompt set and check its prompts (see :func:`check_prompts`).

    Args:
        dataset_name: a Hub data set id, a local folder, a ``.txt`` / ``.json`` / ``.jsonl`` / ``.csv`` /
            ``.tsv`` / ``.parquet`` file, or ``"builtin:<name>"`` (see :data:`BUILTIN_PROMPT_SETS`).
            A ``.txt`` file holds one prompt per line and gives a ``prompt`` column.
        dataset_config: the data set's configuration name (Hub data sets with several), if any.
        split: which split to load (``"train"``). Files have only ``"train"``; built-in lists also ``"test"``
            where :data:`BUILTIN_TEST_SPLITS` has one.
        prompt_column: the column holding the prompts; every other column is passed to the rewards.

    Returns:
        The prompts as a ``datasets.Dataset``.

    Raises:
        PromptSetError: (a ``ValueError``) unknown built-in name or file type, a split a file does not have,
            a file that is empty, not UTF-8 or not valid JSON (the line is named), no ``prompt_column`` (the
            message lists the columns found and names ``--prompt_column``), or prompts that are not
            non-empty strings (the rows are named).
        FileNotFoundError: ``dataset_name`` is a local file path that does not exist.
    """
    if dataset_name.startswith("~"):
        dataset_name = os.path.expanduser(dataset_name)
    if dataset_name.startswith(BUILTIN_PREFIX):
        key = dataset_name[len(BUILTIN_PREFIX) :]
        if key not in BUILTIN_PROMPT_SETS:
            known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_PROMPT_SETS)
            raise PromptSetError(f"Unknown built-in prompt set {dataset_name!r}. Built-in sets: {known}.")
        dataset = _builtin_split(key, split)
    elif os.path.isfile(dataset_name):
        dataset = _load_file(dataset_name, split)
    elif os.path.isdir(dataset_name):  # a folder of data files, by any path (absolute ones look like files)
        with _no_progress_bars():
            dataset = _load_folder(dataset_name, dataset_config, split)
    elif _looks_like_local_file(dataset_name):
        raise FileNotFoundError(missing_prompt_file_message(dataset_name))
    else:
        check_hub_id(dataset_name, "dataset", "`dataset_name`")  # cached or reachable, else one line now
        loaded = load_dataset(dataset_name, dataset_config, split=split)
        if isinstance(loaded, DatasetDict):  # pragma: no cover - split is always given
            loaded = loaded[split]
        dataset = loaded
    check_prompts(dataset, prompt_column, dataset_name)
    return dataset


__all__ = [
    "BUILTIN_PREFIX",
    "BUILTIN_PROMPT_SETS",
    "BUILTIN_TEST_SPLITS",
    "PromptSetError",
    "check_prompt_values",
    "check_prompts",
    "is_single_split",
    "load_prompts",
]
