"""Early checks of the optional packages a config asks for (bitsandbytes' 8-bit optimizers, diffusers'
quantisation backends), run when the config is built, before any model is downloaded or loaded.
"""

from __future__ import annotations

import importlib.util
from typing import Any

#: ``TrainingArguments.optim`` values that need the ``bitsandbytes`` package (transformers 5.23.0's list)
BITSANDBYTES_OPTIMIZERS = (
    "adamw_bnb_8bit",
    "adamw_8bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "ademamix",
    "ademamix_8bit",
    "paged_ademamix_32bit",
    "paged_ademamix_8bit",
    "lion_32bit",
    "lion_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
    "rmsprop_bnb",
    "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit",
)
#: the package each of diffusers' ``PipelineQuantizationConfig`` backends needs
QUANTIZATION_PACKAGES = {
    "bitsandbytes_4bit": "bitsandbytes",
    "bitsandbytes_8bit": "bitsandbytes",
    "torchao": "torchao",
    "quanto": "optimum.quanto",
    "gguf": "gguf",
}


def missing_package(module_name: str) -> bool:
    """Whether ``module_name`` (``"optimum.quanto"`` for a sub-package) cannot be imported here."""
    try:
        return importlib.util.find_spec(module_name) is None
    except ModuleNotFoundError:  # the parent package is missing
        return True


def check_optimizer_package(optim: Any) -> None:
    """Refuse a bitsandbytes optimizer (``optim="adamw_bnb_8bit"``) when bitsandbytes is not installed, before
    any model is loaded (``Trainer`` would only say so when it builds the optimizer)."""
    name = getattr(optim, "value", optim)
    if name in BITSANDBYTES_OPTIMIZERS and missing_package("bitsandbytes"):
        raise ImportError(
            f"`optim={name!r}` needs the bitsandbytes package, which is not installed: `pip install bitsandbytes` "
            "(8-bit AdamW keeps AdamW's two moments in 8 bits, 2 bytes a trainable parameter instead of 8), or "
            "use `optim='adamw_torch'`."
        )


def quantization_backend(quantization_config: Any) -> str | None:
    """The backend name of a ``quantization_config`` (diffusers' ``PipelineQuantizationConfig`` or its dict
    form ``{"quant_backend": …, "quant_kwargs": …, "components_to_quantize": …}``), or ``None`` without one."""
    if quantization_config is None:
        return None
    if isinstance(quantization_config, dict):
        return quantization_config.get("quant_backend")
    return getattr(quantization_config, "quant_backend", None)


def check_quantization_package(model_init_kwargs: dict[str, Any] | None) -> None:
    """Refuse a ``quantization_config`` whose backend's package is missing, before anything is downloaded."""
    backend = quantization_backend((model_init_kwargs or {}).get("quantization_config"))
    package = QUANTIZATION_PACKAGES.get(backend or "")
    if package is not None and missing_package(package):
        raise ImportError(
            f"`model_init_kwargs.quantization_config` uses the {backend!r} backend, which needs the "
            f"{package.split('.')[0]} package: `pip install {package.replace('.', '-')}`, or drop "
            "`quantization_config` to load the base model unquantised."
        )
