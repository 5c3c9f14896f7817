"""State files that nothing can run code from: tensors in safetensors, everything else as JSON in its header.

A checkpoint is a trust boundary: it may come from the Hub or another person's disk, and resuming it must not
run code. A ``torch.save`` pickle can name any function to call when loaded; safetensors holds only tensors and
a string-to-string header. So every state this package writes into a checkpoint (the method's state, the EMA of
the weights) is one ``.safetensors`` file:

* each tensor of the state (at any depth) is a tensor of the file, named ``t0``, ``t1``, …;
* the rest (numbers, strings, booleans, ``None``, lists and dicts with string keys) is JSON under the header's
  ``trl_visual_state`` key, where each tensor stands as ``{"__tensor__": "t<i>"}``.

Reading one is ``json.loads`` and ``safe_open``: neither calls anything named in the file. A value of another
type (a NumPy array, an object) is refused when saving, naming where it sits in the state.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

#: the header key of the JSON part
STATE_KEY = "trl_visual_state"
#: how a tensor is referred to from the JSON part
TENSOR_REF = "__tensor__"


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` and replaced by references."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu").contiguous()
        return {TENSOR_REF: name}
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value) or TENSOR_REF in value:
            raise TypeError(
                f"State {where}: dict keys must be strings other than {TENSOR_REF!r}; got {list(value)[:5]}."
            )
        return {key: _encode(item, tensors, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"State {where} is a {type(value).__name__}: a checkpoint's state files hold tensors, numbers, strings, "
        "booleans, None, lists and dicts with string keys only (so that loading one runs no code). Convert it "
        "(a NumPy array with torch.from_numpy, an object to a dict of its fields)."
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_encode` (tuples come back as lists)."""
    if isinstance(value, dict):
        if set(value) == {TENSOR_REF}:
            return tensors[value[TENSOR_REF]]
        return {key: _decode(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    return value


def save_state_file(state: dict[str, Any], path: str) -> None:
    """Write ``state`` (nested dicts and lists of tensors and JSON values) to the safetensors file ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, "state")
    save_file(tensors, path, metadata={STATE_KEY: json.dumps(encoded)})


def check_state_file(path: str) -> str | None:
    """Why the state file at ``path`` cannot be read, or ``None``: its safetensors header must parse and cover
    the file, and hold the JSON part. Tensor bytes are not read."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as error:
        return (
            f"it is not a readable safetensors file ({error}); the file is truncated or corrupt, or is not a "
            "trl_visual state file"
        )
    if STATE_KEY not in metadata:
        return f"its safetensors header has no {STATE_KEY!r} entry: it is not a trl_visual state file"
    try:
        json.loads(metadata[STATE_KEY])
    except json.JSONDecodeError as error:
        return f"the JSON in its header is unreadable ({error})"
    return None


def load_state_file(path: str, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The state :func:`save_state_file` wrote to ``path``; a ``ValueError`` naming the file when it is not one."""
    reason = check_state_file(path)
    if reason:
        raise ValueError(f"Cannot read the state file {path}: {reason}.")
    with safe_open(path, framework="pt", device=str(device)) as f:
        encoded = json.loads(f.metadata()[STATE_KEY])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return _decode(encoded, tensors)
