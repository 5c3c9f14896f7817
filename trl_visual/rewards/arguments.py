"""Arguments in a reward spec: ``vlm_judge(model_name_or_path=org/model, batch_size=8)``.

A registered reward class is instantiated with no arguments when it is named alone (``pickscore``). Written as
a call, its arguments come with it, so a YAML config or a command line can configure a learned or remote
reward exactly as Python does::

    --reward_funcs "vlm_judge(model_name_or_path=HuggingFaceTB/SmolVLM-256M-Instruct, batch_size=8)"

    reward_funcs:
      - vlm_judge(model_name_or_path=Qwen/Qwen2.5-VL-3B-Instruct, dtype=bfloat16)
      - openai_judge(base_url=http://localhost:8000/v1, model=Qwen/Qwen2.5-VL-7B-Instruct)

Each value is read as YAML (``8`` is an int, ``true`` a bool, ``[a, b]`` a list, ``null`` None, anything else a
string); quote a value holding a comma, brackets or braces: ``templates='Does it show {prompt}?'``. Secrets
never go in a spec: remote rewards read their key from an environment variable they are told the name of.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

_CALL = re.compile(r"^\s*([^\s()]+)\s*\((.*)\)\s*$", re.DOTALL)
_OPENING = {"(": ")", "[": "]", "{": "}"}


def split_reward_call(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name(key=value, …)"`` → ``("name", {key: value, …})``; a spec without parentheses → ``(spec, {})``.

    Raises:
        ValueError: an argument that is not ``key=value``, a key given twice, or unbalanced brackets or quotes.
    """
    match = _CALL.match(spec)
    if match is None:
        if "(" in spec or ")" in spec:
            raise ValueError(
                f"Reward spec {spec!r}: unbalanced parentheses. Write name(key=value, ...), e.g. "
                "vlm_judge(model_name_or_path=org/model, batch_size=8)."
            )
        return spec, {}
    name, body = match.group(1), match.group(2)
    kwargs: dict[str, Any] = {}
    for part in _top_level_parts(body, spec):
        key, equals, value = part.partition("=")
        key = key.strip()
        if not equals or not key.isidentifier():
            raise ValueError(
                f"Reward spec {spec!r}: {part.strip()!r} is not key=value. Write name(key=value, ...), quoting "
                "values with commas or braces: templates='Does it show {prompt}?'."
            )
        if key in kwargs:
            raise ValueError(f"Reward spec {spec!r}: {key!r} is given twice.")
        kwargs[key] = _yaml_value(value.strip(), spec)
    return name, kwargs


def _top_level_parts(body: str, spec: str) -> list[str]:
    """``body`` split at the commas outside quotes and brackets (empty parts dropped). As in YAML, a quote opens a
    quoted value only where a value starts (after ``=``, ``[``, ``{``, ``,`` or ``:``), so an apostrophe inside a
    plain value (``system_prompt=You're a judge``) is a character; ``\\"`` inside double quotes and ``''``
    inside single quotes are escaped quotes."""
    parts, current, stack, quote = [], [], [], ""
    value_starts = True  # where a quoted value may open
    index = 0
    while index < len(body):
        char = body[index]
        if quote:
            if quote == '"' and char == "\\" and index + 1 < len(body):
                current.append(char + body[index + 1])
                index += 2
                continue
            if char == quote and quote == "'" and body[index + 1 : index + 2] == "'":
                current.append("''")
                index += 2
                continue
            quote = "" if char == quote else quote
        elif char in "'\"" and value_starts:
            quote = char
        elif char in _OPENING:
            stack.append(_OPENING[char])
        elif char in ")]}":
            if not stack or stack.pop() != char:
                raise ValueError(f"Reward spec {spec!r}: unbalanced {char!r}; quote values with brackets.")
        elif char == "," and not stack:
            parts.append("".join(current))
            current, value_starts, index = [], True, index + 1
            continue
        if not char.isspace():
            value_starts = char in "=[{,:" and not quote
        current.append(char)
        index += 1
    if quote or stack:
        raise ValueError(f"Reward spec {spec!r}: an unclosed quote or bracket in its arguments.")
    parts.append("".join(current))
    return [part for part in parts if part.strip()]


def _yaml_value(text: str, spec: str) -> Any:
    """One argument's value, read as YAML."""
    import yaml

    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError as error:
        reason = str(error).splitlines()[0]
        raise ValueError(
            f"Reward spec {spec!r}: cannot read the value {text!r} ({reason}); quote it."
        ) from None


def accepted_arguments(cls: type) -> list[str] | None:
    """The keyword arguments ``cls(...)`` takes: those of its ``__init__``, and, where that passes ``**kwargs`` on
    (``**server``), those of its bases' in turn; ``None`` when the chain ends in a catch-all."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names += [
            p.name
            for p in parameters
            if p.name != "self"
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in names
        ]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names
    return None


def instantiate_reward(cls: type, kwargs: dict[str, Any], spec: str) -> Callable[..., Any]:
    """``cls(**kwargs)``, with an argument the class does not take named in a one-line error listing those it
    does, before anything is loaded."""
    accepted = accepted_arguments(cls)
    unknown = [key for key in kwargs if accepted is not None and key not in accepted]
    if unknown:
        raise ValueError(
            f"Reward spec {spec!r}: {cls.__name__} takes no argument {', '.join(map(repr, unknown))}; it takes "
            f"{', '.join(accepted or []) or 'no arguments'}."
        )
    return cls(**kwargs)


def format_reward_call(name: str, kwargs: dict[str, Any]) -> str:
    """The spec string of ``name`` called with ``kwargs``, each value written as JSON (which is YAML), so that
    :func:`split_reward_call` reads back exactly ``kwargs``: how a YAML mapping entry
    ``{vlm_judge: {batch_size: 8}}`` becomes ``"vlm_judge(batch_size=8)"``."""
    arguments = ", ".join(f"{key}={_flow_yaml(value)}" for key, value in kwargs.items())
    return f"{name}({arguments})"


def _flow_yaml(value: Any) -> str:
    """``value`` as YAML in flow style that :func:`_yaml_value` reads back as ``value``: strings double-quoted (as
    JSON writes them), floats as YAML writes them (``1.0e-07``, ``.inf``: JSON's ``1e-07`` and ``Infinity`` read
    back as strings), lists and mappings element by element."""
    import json

    import yaml

    if isinstance(value, float):
        return yaml.safe_dump(value).splitlines()[0]
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_flow_yaml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_flow_yaml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


def reward_entry_spec(entry: Any) -> Any:
    """A YAML ``reward_funcs`` entry as a spec string: a one-key mapping ``{name: {key: value, ...}}`` becomes
    ``"name(key=value, ...)"``; anything else is returned as it is.

    Raises:
        ValueError: a mapping with several keys, or whose value is not a mapping of arguments.
    """
    if not isinstance(entry, dict):
        return entry
    if len(entry) != 1:
        raise ValueError(
            f"A reward entry {entry!r} has {len(entry)} keys; write one reward per entry: "
            "{vlm_judge: {model_name_or_path: org/model}}."
        )
    ((name, kwargs),) = entry.items()
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
        raise ValueError(
            f"The reward entry {entry!r}: the arguments of {name!r} must be a mapping, e.g. "
            f"{{{name}: {{batch_size: 8}}}}."
        )
    return format_reward_call(str(name), kwargs)
