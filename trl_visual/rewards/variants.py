"""Prompt variants: a text-matching reward scores each sample against several paraphrases of its prompt.

A data set may carry, per row, a list of paraphrases of the prompt in the column ``prompt_variants``
(:data:`PROMPT_VARIANTS_COLUMN`). A text-matching reward (CLIPScore, PickScore, HPSv2, ImageReward,
``shapes_adherence``) given that column scores every sample against each of its ``M`` variants and returns the
``M`` scores as the sample's *interpretations* (:mod:`trl_visual.core.interpretations`): the trainer trains on
their mean and reads their spread as the reward's uncertainty on that prompt (BPGO's ``ras_mode="uncertainty"``).
Include the prompt itself among the variants if it should count. Example::

    Dataset.from_dict({
        "prompt": ["a red shape", "a big red circle at the top"],
        "prompt_variants": [["a red circle", "a red square", "a small red shape"],
                            ["a big red circle at the top"] * 3],
    })

Every row needs the same number ``M`` of variants; a row without any (``None`` or ``[]``) is scored ``M`` times
against its own prompt (no disagreement).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

PROMPT_VARIANTS_COLUMN = "prompt_variants"
"""The dataset column of paraphrases that text-matching rewards read."""


def prompt_variants(
    prompts: list[str], columns: dict[str, Any], column: str = PROMPT_VARIANTS_COLUMN
) -> list[list[str]] | None:
    """Each sample's variants from ``columns[column]``, or ``None`` when the column is absent or empty in every row.

    Raises:
        ValueError: a row whose variants are not a list of strings, or rows with different numbers of them.
    """
    rows = columns.get(column)
    if rows is None or not any(rows):
        return None
    if len(rows) != len(prompts):
        raise ValueError(f"The {column!r} column has {len(rows)} rows for {len(prompts)} prompts.")
    for i, row in enumerate(rows):
        if row and (isinstance(row, str) or not all(isinstance(v, str) for v in row)):
            raise ValueError(
                f"Row {i} of the {column!r} column is {row!r}: it must be a list of paraphrases of the prompt "
                "(strings), or None / [] for none."
            )
    counts = sorted({len(row) for row in rows if row})
    if len(counts) > 1:
        raise ValueError(
            f"The {column!r} column has {counts[0]} paraphrases in some rows and {counts[-1]} in others: every row "
            "needs the same number (repeat a paraphrase, or include the prompt itself, to even them out)."
        )
    return [list(row) if row else [prompt] * counts[0] for prompt, row in zip(prompts, rows)]


def score_variants(
    score: Callable[[list[str], torch.Tensor], list[float] | torch.Tensor],
    variants: list[list[str]],
    samples: torch.Tensor,
) -> list[list[float]]:
    """``score(prompts, samples)`` of every sample against each of its variants, in one batch of ``B · M`` pairs;
    returns ``B`` lists of ``M`` scores (the sample's interpretations)."""
    count = len(variants[0])
    flat = [variant for row in variants for variant in row]
    scores = torch.as_tensor(score(flat, samples.repeat_interleave(count, dim=0)), dtype=torch.float32)
    return scores.reshape(len(variants), count).tolist()
