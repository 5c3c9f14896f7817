"""``tiny:shapes``: a pretrained miniature Stable Diffusion 3 that draws the scenes of
:mod:`trl_visual.miniature.scenes` from their captions.

It is the real diffusers ``StableDiffusion3Pipeline`` at small size, so every SD3 code path (the
:class:`~trl_visual.models.sd3.SD3Adapter`, ``save_lora_weights`` / ``load_lora_weights``) runs on it unchanged:

* ``vae``: an ``AutoencoderKL`` with three levels (16, 32, 32 channels): 32×32 images ↔ 8×8×4 latents, trained
  on the scenes; its ``shift_factor`` and ``scaling_factor`` are the latents' measured mean and 1/std;
* ``transformer``: an ``SD3Transformer2DModel`` of 4 joint blocks (4 heads × 32, patch 2, 16 image tokens),
  trained by flow matching on the scenes' captions with 10 % empty prompts (so classifier-free guidance works);
* ``text_encoder`` / ``text_encoder_2`` (CLIP with projection) and ``text_encoder_3`` (T5): tiny and *frozen
  at a random initialisation* (seeds 101, 102, 103 under transformers 5.x). The denoiser learns to read their
  embeddings; the text towers themselves were never trained. Their weights ship beside the others, because
  another transformers release may initialise the same seeds differently (5.3 does), and the denoiser only
  understands these exact towers. Their tokenizers are built in memory over the caption vocabulary, one token
  per word;
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler(shift=1.0)`` (no resolution shift at 8×8 latents).

The T5 tokenizer's ``model_max_length`` is 8, the longest caption: the denoiser was trained on 12 CLIP + 8 T5
text tokens, and the :class:`~trl_visual.models.sd3.SD3Adapter` never pads T5 past its tokenizer's
``model_max_length``. Calling the pipeline directly, pass ``max_sequence_length=8`` (its default, 256, feeds
the denoiser 248 padding tokens it never saw).

Every weight ships as package data (``trl_visual/miniature/weights/*.safetensors``): the VAE, the transformer
and the three frozen text towers (one file, ``text_encoders*.safetensors``, keys prefixed by the component's
name). ``python -m trl_visual.miniature.train --part text-encoders`` writes the towers from their seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .scenes import PAIR_VOCABULARY, VOCABULARY

WEIGHTS_DIR = Path(__file__).parent / "weights"
VAE_FILE = "vae.safetensors"
TRANSFORMER_FILE = "transformer.safetensors"
T5_MAX_LENGTH = 8
CLIP_MAX_LENGTH = 12
CLIP_HIDDEN = 32
T5_HIDDEN = 64
TEXT_ENCODER_SEEDS = (101, 102, 103)
"""Seeds of the two CLIP towers and the T5 tower: the random initialisation they were frozen at (their weights
ship as package data; the seeds only write those files, with ``--part text-encoders``)."""
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")
"""The pipeline components stored in a text-encoders file, each under its own key prefix."""


@dataclass(frozen=True)
class ShapesModel:
    """What tells the miniature models apart: the scenes they were trained on, their text length, their files."""

    name: str
    vocabulary: tuple[str, ...]
    clip_max_length: int
    """CLIP tokens: the longest caption's words, and the begin and end tokens."""
    t5_max_length: int
    """T5 tokens: the longest caption's words and the end token."""
    vae_file: str
    transformer_file: str
    two_shape_fraction: float
    """The share of two-shape scenes in the training pool."""
    backgrounds: bool = False
    """Whether its scenes are painted over structured backgrounds (horizons, stripes, tiles)."""
    classifier_file: str = "classifier.safetensors"
    """The scene classifier that judges its samples (``shapes_adherence``)."""
    text_encoders_file: str = "text_encoders.safetensors"
    """Its three frozen text towers (their shapes follow the vocabulary and the CLIP length)."""


ONE_SHAPE = ShapesModel(
    "tiny:shapes",
    VOCABULARY,
    CLIP_MAX_LENGTH,
    T5_MAX_LENGTH,
    VAE_FILE,
    TRANSFORMER_FILE,
    two_shape_fraction=0.0,
)
"""``tiny:shapes``: one shape per scene (captions of up to 8 words)."""
TWO_SHAPES = ShapesModel(
    "tiny:shapes-pairs",
    PAIR_VOCABULARY,
    clip_max_length=17,
    t5_max_length=16,
    vae_file="vae_pairs.safetensors",
    transformer_file="transformer_pairs.safetensors",
    two_shape_fraction=0.5,
    text_encoders_file="text_encoders_pairs.safetensors",
)
"""``tiny:shapes-pairs``: one or two shapes per scene, half and half (captions of up to 15 words)."""
SCENES = ShapesModel(
    "tiny:scenes",
    VOCABULARY,
    CLIP_MAX_LENGTH,
    T5_MAX_LENGTH,
    vae_file="vae_scenes.safetensors",
    transformer_file="transformer_scenes.safetensors",
    two_shape_fraction=0.0,
    backgrounds=True,
    classifier_file="classifier_scenes.safetensors",
)
"""``tiny:scenes``: one shape per scene over a structured background (a horizon, stripes or tiles) that the
captions do not name; the one-shape captions and text towers of ``tiny:shapes``."""
SHAPES_MODELS: dict[str, ShapesModel] = {model.name: model for model in (ONE_SHAPE, TWO_SHAPES, SCENES)}
"""The miniature models by name."""


def _bpe_merges_for(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE merges under which each of ``words`` becomes one token.

    Each word is run through BPE with the merges found so far (the lowest-ranked adjacent pair merges first);
    where no known merge applies, the first pair is merged and that merge appended. An appended merge ranks
    below every earlier one, so it never fires inside a word that was already one token without it.
    """
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = list(zip(symbols, symbols[1:]))
            known = [pair for pair in pairs if pair in ranks]
            pair = min(known, key=ranks.__getitem__) if known else pairs[0]
            ranks.setdefault(pair, len(ranks))
            i = pairs.index(pair)
            symbols[i : i + 2] = [pair[0] + pair[1]]
    return list(ranks)


def word_clip_tokenizer(
    words: tuple[str, ...] = VOCABULARY, model_max_length: int = CLIP_MAX_LENGTH
) -> CLIPTokenizer:
    """A CLIP BPE tokenizer built in memory that turns each of ``words`` into one token."""
    letters = sorted({c for w in words for c in w})
    merges = _bpe_merges_for(words)
    pieces = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    pieces += [a + b for a, b in merges]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def word_t5_tokenizer(words: tuple[str, ...] = VOCABULARY, **kwargs: Any) -> T5Tokenizer:
    """A T5 unigram tokenizer over ``words``: one piece per word (and letters as a fallback). ``kwargs`` go to
    ``T5Tokenizer`` (``model_max_length`` defaults to the shapes world's ``T5_MAX_LENGTH``)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words]
    pieces += [(c, -5.0) for c in sorted({c for w in words for c in w})]
    return T5Tokenizer(vocab=pieces, extra_ids=0, **{"model_max_length": T5_MAX_LENGTH, **kwargs})


def small_clip_text_config(
    vocab_size: int, hidden_size: int, intermediate_size: int, max_position_embeddings: int, **extra: Any
) -> CLIPTextConfig:
    """A two-layer, four-head CLIP text tower: token 0 begins a prompt, token 1 ends and pads it (``extra``: a
    ``projection_dim``, say). The text towers of the miniature world and of the tiny test pipelines."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        num_hidden_layers=2,
        num_attention_heads=4,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def small_t5_config(
    vocab_size: int, d_model: int, d_kv: int, d_ff: int, config_class: type = T5Config, **extra: Any
) -> T5Config:
    """A two-layer, four-head T5 encoder (``config_class``: ``T5Config`` or ``UMT5Config``) with 8
    relative-position buckets: token 0 pads, token 1 ends a prompt."""
    return config_class(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **extra,
    )


def small_image_vae(block_out_channels: tuple[int, ...], norm_num_groups: int, **extra: Any) -> AutoencoderKL:
    """A three-level ``AutoencoderKL`` with 4 latent channels: 32×32×3 images ↔ 8×8×4 latents (``extra``:
    the latent shift and scale, say)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=block_out_channels,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=32,
        **extra,
    )


def _clip_text_encoder(seed: int, vocab_size: int, max_length: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = small_clip_text_config(vocab_size, CLIP_HIDDEN, 64, max_length, projection_dim=CLIP_HIDDEN)
    return CLIPTextModelWithProjection(config)


def _t5_encoder(seed: int, vocab_size: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    return T5EncoderModel(small_t5_config(vocab_size, T5_HIDDEN, d_kv=16, d_ff=128, dropout_rate=0.0))


def build_vae() -> AutoencoderKL:
    """The miniature VAE architecture (random weights): 32×32×3 ↔ 8×8×4."""
    return small_image_vae((16, 32, 32), norm_num_groups=8, layers_per_block=1)


def small_sd3_transformer(
    num_layers: int,
    attention_head_dim: int,
    joint_attention_dim: int,
    caption_projection_dim: int,
    pooled_projection_dim: int,
    pos_embed_max_size: int,
) -> SD3Transformer2DModel:
    """An ``SD3Transformer2DModel`` with four heads for 8×8×4 latents (patch 2: 16 image tokens). The denoiser
    of the miniature world and of the tiny test pipeline."""
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=4,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=caption_projection_dim,
        pooled_projection_dim=pooled_projection_dim,
        pos_embed_max_size=pos_embed_max_size,
    )


def build_transformer() -> SD3Transformer2DModel:
    """The miniature denoiser architecture (random weights): 8×8×4 latents, 4 joint blocks of width 128."""
    return small_sd3_transformer(
        num_layers=4,
        attention_head_dim=32,
        joint_attention_dim=T5_HIDDEN,
        caption_projection_dim=128,
        pooled_projection_dim=2 * CLIP_HIDDEN,
        pos_embed_max_size=8,
    )


def seeded_text_encoders(model: ShapesModel = ONE_SHAPE) -> dict[str, torch.nn.Module]:
    """``model``'s three text towers initialised from :data:`TEXT_ENCODER_SEEDS` by the installed transformers
    (what ``--part text-encoders`` saves; the pipelines load the saved file instead)."""
    vocab_size = len(word_clip_tokenizer(model.vocabulary, model.clip_max_length))
    t5_vocab_size = len(word_t5_tokenizer(model.vocabulary, model_max_length=model.t5_max_length))
    clip_seed, clip_seed_2, t5_seed = TEXT_ENCODER_SEEDS
    return {
        "text_encoder": _clip_text_encoder(clip_seed, vocab_size, model.clip_max_length),
        "text_encoder_2": _clip_text_encoder(clip_seed_2, vocab_size, model.clip_max_length),
        "text_encoder_3": _t5_encoder(t5_seed, t5_vocab_size),
    }


def text_encoders_state(encoders: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """One state dict for the three towers, each key prefixed by its component name (``text_encoder_2.…``);
    tied tables are stored once per key (safetensors refuses shared memory)."""
    return {
        f"{name}.{key}": value.detach().clone().contiguous()  # a copy: T5 ties its two embedding tables
        for name in TEXT_ENCODER_NAMES
        for key, value in encoders[name].state_dict().items()
    }


def load_text_encoders(
    weights_dir: str | Path | None = None, model: ShapesModel = ONE_SHAPE
) -> dict[str, torch.nn.Module]:
    """``model``'s frozen text towers with their shipped weights (``weights_dir / model.text_encoders_file``)."""
    path = (Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR) / model.text_encoders_file
    encoders = seeded_text_encoders(model)
    _require_file(path)
    state = load_file(str(path))
    for name, encoder in encoders.items():
        prefix = f"{name}."
        encoder.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return encoders


def build_shapes_pipeline(
    transformer: SD3Transformer2DModel | None = None,
    vae: AutoencoderKL | None = None,
    model: ShapesModel = ONE_SHAPE,
    weights_dir: str | Path | None = None,
):
    """A ``StableDiffusion3Pipeline`` of the miniature architecture around ``transformer`` and ``vae`` (random
    ones when not given), with ``model``'s frozen text towers (from ``weights_dir``, the shipped weights by
    default) and word tokenizers. Every module is in eval mode."""
    clip_tokenizers = [word_clip_tokenizer(model.vocabulary, model.clip_max_length) for _ in range(2)]
    t5_tokenizer = word_t5_tokenizer(model.vocabulary, model_max_length=model.t5_max_length)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer if transformer is not None else build_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae if vae is not None else build_vae(),
        tokenizer=clip_tokenizers[0],
        tokenizer_2=clip_tokenizers[1],
        tokenizer_3=t5_tokenizer,
        **load_text_encoders(weights_dir, model),
    )
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipeline


def _require_file(path: Path) -> None:
    """Raise a clear error when a weight file is missing."""
    if not path.is_file():
        raise FileNotFoundError(
            f"No miniature weights at {path}. Reinstall trl_visual (the weights ship as package data), or "
            "train them with `python -m trl_visual.miniature.train`."
        )


def _load_weights(module: torch.nn.Module, path: Path) -> dict[str, str]:
    """Load ``path`` into ``module``; return the file's metadata."""
    _require_file(path)
    module.load_state_dict(load_file(str(path)))
    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


def load_vae(weights_dir: str | Path | None = None, model: ShapesModel = ONE_SHAPE) -> AutoencoderKL:
    """``model``'s pretrained VAE, with the latent shift and scale stored in its file's metadata."""
    weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    vae = build_vae()
    scaling = _load_weights(vae, weights_dir / model.vae_file)
    vae.register_to_config(
        shift_factor=float(scaling["shift_factor"]), scaling_factor=float(scaling["scaling_factor"])
    )
    return vae.eval().requires_grad_(False)


def load_shapes_pipeline(
    weights_dir: str | Path | None = None, seed: int = 0, model: ShapesModel = ONE_SHAPE
) -> StableDiffusion3Pipeline:
    """``tiny:shapes`` (or another :class:`ShapesModel`): the pretrained miniature SD3, loaded offline from the
    weights shipped with the package (or from ``weights_dir``). ``seed`` is accepted for the ``tiny:`` loader
    interface; the weights are fixed."""
    del seed
    weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    transformer = build_transformer()
    _load_weights(transformer, weights_dir / model.transformer_file)
    return build_shapes_pipeline(transformer, load_vae(weights_dir, model), model, weights_dir)


def load_shapes_pairs_pipeline(
    weights_dir: str | Path | None = None, seed: int = 0
) -> StableDiffusion3Pipeline:
    """``tiny:shapes-pairs``: the pretrained miniature SD3 of one- and two-shape scenes (:data:`TWO_SHAPES`)."""
    return load_shapes_pipeline(weights_dir, seed, TWO_SHAPES)


def load_scenes_pipeline(weights_dir: str | Path | None = None, seed: int = 0) -> StableDiffusion3Pipeline:
    """``tiny:scenes``: the pretrained miniature SD3 of one-shape scenes over structured backgrounds
    (:data:`SCENES`)."""
    return load_shapes_pipeline(weights_dir, seed, SCENES)
