"""The one check of a setting that takes one of a few named values, shared by the tensor math and the configs."""

from __future__ import annotations

from typing import Any


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a ``ValueError`` naming the setting and its valid values when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
