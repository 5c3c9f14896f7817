"""Tiny random-weight pipelines that build offline in well under a second.

They are what the tests, the docs and the quick start run on. Each is reachable by a ``tiny:`` name
wherever a model id is accepted (``DiffusionGRPOTrainer(model="tiny:sd3")``); a colon cannot appear
in a Hub id, so these names never collide with real models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

TINY_PREFIX = "tiny:"
HIDDEN_SIZE = 32
_WORDS = (
    "a an the of and with on in at red green blue yellow black white cat dog car tree house bird flower "
    "sky sea mountain city street person man woman child horse boat apple banana cake book chair table "
    "painting photo portrait landscape small big old new bright dark sunny night"
).split()


def _tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer built in memory: whole words as tokens, plus single characters."""
    letters = sorted({c for word in _WORDS for c in word})
    pieces = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            merges.append((symbols[0], symbols[1]))
            pieces.append(merged)
            symbols = [merged] + symbols[2:]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=77)


def _tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5 unigram tokenizer built in memory over the same small word list."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in _WORDS]
    pieces += [(c, -5.0) for c in sorted({c for w in _WORDS for c in w})]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _tiny_clip_text_encoder(seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=HIDDEN_SIZE,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A random-weight ``StableDiffusion3Pipeline``: 32×32 images, 8×8×4 latents, two-layer towers.

    Every module is in eval mode (T5's dropout would otherwise make outputs nondeterministic).
    """
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=HIDDEN_SIZE,
        caption_projection_dim=HIDDEN_SIZE,
        pooled_projection_dim=2 * HIDDEN_SIZE,
        pos_embed_max_size=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=1000,
            d_model=HIDDEN_SIZE,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=_tiny_clip_text_encoder(seed + 3),
        tokenizer=_tiny_clip_tokenizer(),
        text_encoder_2=_tiny_clip_text_encoder(seed + 4),
        tokenizer_2=_tiny_clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=_tiny_t5_tokenizer(),
    )
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipeline


TINY_PIPELINES: dict[str, Callable[..., DiffusionPipeline]] = {"sd3": tiny_sd3_pipeline}


def is_tiny_name(name: object) -> bool:
    """Whether ``name`` is a ``tiny:`` model name."""
    return isinstance(name, str) and name.startswith(TINY_PREFIX)


def load_tiny_pipeline(name: str, seed: int = 0) -> DiffusionPipeline:
    """Build the tiny pipeline called ``name`` (``"tiny:sd3"``), or explain which names exist."""
    key = name[len(TINY_PREFIX) :]
    if key not in TINY_PIPELINES:
        known = ", ".join(TINY_PREFIX + k for k in TINY_PIPELINES)
        raise ValueError(f"Unknown tiny model {name!r}. The built-in tiny models are: {known}.")
    return TINY_PIPELINES[key](seed=seed)
