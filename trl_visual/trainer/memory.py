"""Memory options for large models (12B–14B denoisers beside a 4.7B T5): where the frozen modules live, a cache
of prompt embeddings, decoding in batches, and the check that decoding fits in this machine's memory. (The early
checks of the optional 8-bit and quantisation libraries are :mod:`~trl_visual.trainer.optional_packages`'.)

Sampling in chunks (``generation_batch_size``) lives in :mod:`trl_visual.trainer.rollout`, the EMA of the
trained weights in :mod:`trl_visual.trainer.ema`. ``docs/distributed.md`` ("Memory") says what each option
saves.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..models import DiffusionAdapter, PromptEmbeds


def place_frozen_modules(
    adapter: DiffusionAdapter,
    device: torch.device,
    dtype: torch.dtype | None = None,
    offload_text_encoders: bool = False,
) -> None:
    """Move every frozen module (text encoders, VAE, …) to ``device``, cast to ``dtype`` when given; with
    ``offload_text_encoders`` the text encoders go to the CPU instead. A quantised module keeps its dtype
    (its weights are packed integers, which ``.to(dtype)`` refuses)."""
    text_encoders = set(map(id, adapter.text_encoders.values()))
    for module in adapter.frozen_modules:
        target = torch.device("cpu") if offload_text_encoders and id(module) in text_encoders else device
        # No `dtype=None` keyword: diffusers' `ModelMixin.to` warns about float32 modules whenever one is passed
        cast = {} if dtype is None or _is_quantized(module) else {"dtype": dtype}
        module.to(target, **cast)


def _is_quantized(module: torch.nn.Module) -> bool:
    """Whether diffusers or transformers loaded ``module`` with a ``quantization_config``."""
    return bool(getattr(module, "is_quantized", False) or getattr(module, "hf_quantizer", None))


@contextlib.contextmanager
def text_encoders_on(adapter: DiffusionAdapter, device: torch.device) -> Iterator[None]:
    """Within, the text encoders are on ``device`` (for the pipeline's own ``__call__``, which encodes where the
    denoiser runs); those that were elsewhere (offloaded to the CPU) go back afterwards."""
    moved = {name: module for name, module in adapter.text_encoders.items() if _device_of(module) != device}
    homes = {name: _device_of(module) for name, module in moved.items()}
    for module in moved.values():
        module.to(device)
    try:
        yield
    finally:
        for name, module in moved.items():
            module.to(homes[name])


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class PromptEmbedsCache:
    """The embeddings of the most recently used prompts, held in CPU memory; beyond ``max_size`` prompts the
    least recently used is dropped.

    Each prompt is encoded alone (a batch of one), so that its embedding never depends on which prompts
    shared its batch: a resumed run, whose cache starts empty, gets the embeddings the uninterrupted run had.
    """

    def __init__(self, max_size: int):
        if max_size < 1:
            raise ValueError(
                f"A prompt-embedding cache must hold at least one prompt; got max_size={max_size}."
            )
        self.max_size = max_size
        self._entries: OrderedDict[str, PromptEmbeds] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._entries

    def embeds(self, prompts: list[str], encode: Callable[[list[str]], PromptEmbeds]) -> PromptEmbeds:
        """The embeddings of ``prompts``, one row each in order, on the CPU; ``encode`` (a list of prompts →
        their embeddings) is called once for each prompt that is not cached."""
        rows = [self._entry(prompt, encode) for prompt in prompts]
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    def _entry(self, prompt: str, encode: Callable[[list[str]], PromptEmbeds]) -> PromptEmbeds:
        if prompt in self._entries:
            self._entries.move_to_end(prompt)
            return self._entries[prompt]
        entry = {key: value.to("cpu") for key, value in encode([prompt]).items()}
        self._entries[prompt] = entry
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)
        return entry


def decode_in_batches(
    adapter: DiffusionAdapter, latents: torch.Tensor, batch_size: int | None
) -> torch.Tensor:
    """:meth:`DiffusionAdapter.decode` on at most ``batch_size`` latents at a time (all at once when ``None``),
    the pixels concatenated: the decoder's activations are one batch's."""
    if batch_size is None or batch_size >= len(latents):
        return adapter.decode(latents)
    return torch.cat([adapter.decode(part) for part in latents.split(batch_size)])


def machine_memory_bytes() -> int:
    """The memory the samples are decoded in: the first GPU's total, or the machine's physical RAM."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def decode_memory_bytes(pipeline: Any, samples: int, height: int, width: int, num_frames: int = 1) -> int:
    """A lower bound on the memory decoding ``samples`` images (or videos) of ``height × width`` (× frames) takes:
    the VAE decoder's last block works at full resolution with ``c = block_out_channels[0]`` channels, its input
    and output both held, plus the RGB result, in float32:
    ``bytes ≥ samples · frames · H · W · (3 + 2c) · 4``."""
    channels = getattr(
        getattr(getattr(pipeline, "vae", None), "config", None), "block_out_channels", None
    ) or [0]
    return samples * num_frames * height * width * (3 + 2 * int(channels[0])) * 4


def check_decode_memory(pipeline: Any, args: Any, height: int, width: int, num_frames: int = 1) -> None:
    """Refuse a sample size whose decoding alone cannot fit in this machine's memory (``height = width = 16384``
    would otherwise fail in the allocator after the whole rollout), with the number and the fix. VAE tiling
    bounds decoding memory, so it is not estimated then."""
    if args.vae_tiling:
        return
    chunk = 1 if args.vae_slicing else args.vae_decode_batch_size or args.generation_batch_size
    chunk = chunk or args.per_device_train_batch_size
    needed, available = (
        decode_memory_bytes(pipeline, chunk, height, width, num_frames),
        machine_memory_bytes(),
    )
    if needed > available:
        gib = 2**30
        raise ValueError(
            f"Decoding {chunk} sample(s) of {height}×{width}{f'×{num_frames} frames' if num_frames > 1 else ''} "
            f"needs at least {needed / gib:,.1f} GiB, more than this machine's {available / gib:,.1f} GiB. Lower "
            "`height`/`width`, or decode fewer at once (`vae_decode_batch_size: 1`, `vae_slicing`, `vae_tiling`)."
        )
