"""Tiny random-weight pipelines that build offline in well under a second.

They are what the tests, the docs and the quick start run on. Each is reachable by a ``tiny:`` name
wherever a model id is accepted (``DiffusionGRPOTrainer(model="tiny:sd3")``); a colon cannot appear
in a Hub id, so these names never collide with real models.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusion3Pipeline,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from .backbones import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .miniature import MINIATURE_MODELS
from .miniature.pipeline import (
    small_clip_text_config,
    small_image_vae,
    small_sd3_transformer,
    small_t5_config,
    word_t5_tokenizer,
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
    """A T5 unigram tokenizer built in memory over the same small word list (no length limit of its own)."""
    return word_t5_tokenizer(tuple(_WORDS), model_max_length=int(1e30))


def _tiny_clip_text_config(**extra: Any) -> CLIPTextConfig:
    """The two-layer CLIP text tower of every tiny pipeline (``extra``: a ``projection_dim``, say)."""
    return small_clip_text_config(
        1000, HIDDEN_SIZE, intermediate_size=37, max_position_embeddings=77, **extra
    )


def _tiny_clip_text_encoder(seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_tiny_clip_text_config(projection_dim=HIDDEN_SIZE)).eval()


def _tiny_image_vae(shift_factor: float, scaling_factor: float, **extra: Any) -> AutoencoderKL:
    """The image VAE of the tiny SD3 and FLUX pipelines: three blocks of 8 channels, 4 latent channels (a 32×32
    image gives an 8×8 latent), with the family's own latent shift and scale."""
    return small_image_vae(
        (8, 8, 8), norm_num_groups=4, shift_factor=shift_factor, scaling_factor=scaling_factor, **extra
    )


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A random-weight ``StableDiffusion3Pipeline``: 32×32 images, 8×8×4 latents, two-layer towers.

    Every module is in eval mode (T5's dropout would otherwise make outputs nondeterministic).
    """
    torch.manual_seed(seed)
    transformer = small_sd3_transformer(
        num_layers=2,
        attention_head_dim=8,
        joint_attention_dim=HIDDEN_SIZE,
        caption_projection_dim=HIDDEN_SIZE,
        pooled_projection_dim=2 * HIDDEN_SIZE,
        pos_embed_max_size=32,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_image_vae(shift_factor=0.0609, scaling_factor=1.5035)
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(_tiny_t5_config())
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
    _eval_all(pipeline)
    return pipeline


def _eval_all(pipeline: DiffusionPipeline) -> None:
    """Put every module of ``pipeline`` in eval mode (dropout would make outputs nondeterministic)."""
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()


def _tiny_t5_config(config_class: type = T5Config) -> T5Config:
    return small_t5_config(1000, HIDDEN_SIZE, d_kv=8, d_ff=37, config_class=config_class)


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A random-weight ``FluxPipeline`` with the guidance embedding of FLUX.1-dev: 32×32 images by default,
    8×8×4 latents packed into 16 tokens of 16 values, one double and one single transformer block."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=HIDDEN_SIZE,
        pooled_projection_dim=HIDDEN_SIZE,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_image_vae(
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_clip_text_config())
    torch.manual_seed(seed + 3)
    t5 = T5EncoderModel(_tiny_t5_config())
    pipeline = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tiny_clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=_tiny_t5_tokenizer(),
    )
    pipeline.default_sample_size = 8  # 8 latent pixels × VAE factor 4 = 32×32 images by default
    _eval_all(pipeline)
    return pipeline


def _tiny_wan_vae(seed: int) -> AutoencoderKLWan:
    """A random Wan VAE with 16 channels and one residual block per level. With 4 channels (the first version)
    its RMS-normed decoder hardly followed the latent: 40 GRPO steps on red_channel moved the reward by less
    than the run-to-run noise. With 16 channels the same runs gain 0.014–0.036 (noise ≤ 0.001)."""
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=16,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=0,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    )


def _tiny_wan_transformer(seed: int, in_channels: int, image_dim: int | None = None) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=4,
        text_dim=HIDDEN_SIZE,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=image_dim,
        added_kv_proj_dim=24 if image_dim is not None else None,
        rope_max_seq_len=32,
    )


def _tiny_wan_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Wan's checkpoints ship UniPC with flow sigmas; the trainer only reads the sigmas, which a flow-match
    Euler scheduler with the same shift gives too (and the pipeline's own sampling stays first order)."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _small_video_defaults(pipeline: DiffusionPipeline) -> None:
    """Default size the Wan adapters read (``default_height``/``default_width``/``default_num_frames``)."""
    pipeline.default_height, pipeline.default_width, pipeline.default_num_frames = 32, 32, 5


def _tiny_wan(pipeline_class: type, seed: int, build_parts: Callable[[], dict]) -> DiffusionPipeline:
    """A tiny Wan ``pipeline_class``: the parts every tiny Wan shares (UMT5 text encoder and tokenizer, VAE,
    scheduler), plus ``build_parts()`` (the transformer(s) and any image encoder), built last."""
    torch.manual_seed(seed + 2)
    text_encoder = UMT5EncoderModel(_tiny_t5_config(UMT5Config))
    vae = _tiny_wan_vae(seed + 1)
    pipeline = pipeline_class(
        tokenizer=_tiny_t5_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        scheduler=_tiny_wan_scheduler(),
        **build_parts(),
    )
    _small_video_defaults(pipeline)
    _eval_all(pipeline)
    return pipeline


def tiny_wan_pipeline(seed: int = 0) -> WanPipeline:
    """A random-weight Wan text-to-video ``WanPipeline``: 5 frames of 32×32 by default, ``(4, 2, 4, 4)``
    latents (VAE factors 4 in time and 8 in space), a UMT5 text encoder and a two-block transformer."""
    return _tiny_wan(WanPipeline, seed, lambda: {"transformer": _tiny_wan_transformer(seed, in_channels=4)})


def tiny_wan_two_experts_pipeline(seed: int = 0, boundary_ratio: float = 0.875) -> WanPipeline:
    """:func:`tiny_wan_pipeline` with a second, low-noise expert, like Wan2.2 A14B: ``transformer`` predicts
    while ``σ ≥ boundary_ratio`` and ``transformer_2`` below."""
    return _tiny_wan(
        WanPipeline,
        seed,
        lambda: {
            "transformer": _tiny_wan_transformer(seed, in_channels=4),
            "transformer_2": _tiny_wan_transformer(seed + 5, in_channels=4),
            "boundary_ratio": boundary_ratio,
        },
    )


def _tiny_clip_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": 32},
        resample=3,
        do_center_crop=True,
        crop_size={"height": 32, "width": 32},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


def _tiny_clip_vision_model(seed: int) -> CLIPVisionModel:
    torch.manual_seed(seed)
    return CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=HIDDEN_SIZE,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=HIDDEN_SIZE,
        )
    )


def tiny_wan_i2v_pipeline(seed: int = 0) -> WanImageToVideoPipeline:
    """A random-weight Wan2.1-style ``WanImageToVideoPipeline``: the transformer takes the noisy latents, the
    first-frame mask and the VAE-encoded conditioning video on its channels (4 + 4 + 4), and CLIP image
    embeddings (penultimate layer of a tiny ``CLIPVisionModel``) through its added key/value projections."""
    return _tiny_wan(
        WanImageToVideoPipeline,
        seed,
        lambda: {
            "image_processor": _tiny_clip_image_processor(),
            "image_encoder": _tiny_clip_vision_model(seed + 3),
            "transformer": _tiny_wan_transformer(seed, in_channels=12, image_dim=HIDDEN_SIZE),
        },
    )


def tiny_wan_i2v_two_experts_pipeline(seed: int = 0, boundary_ratio: float = 0.9) -> WanImageToVideoPipeline:
    """A random-weight Wan2.2 A14B-style ``WanImageToVideoPipeline``: no CLIP image encoder (the image enters only
    through the VAE-encoded first frame), and two experts split at ``boundary_ratio``."""
    return _tiny_wan(
        WanImageToVideoPipeline,
        seed,
        lambda: {
            "transformer": _tiny_wan_transformer(seed, in_channels=12),
            "transformer_2": _tiny_wan_transformer(seed + 5, in_channels=12),
            "boundary_ratio": boundary_ratio,
        },
    )


def tiny_dinov2(seed: int = 0) -> Dinov2Model:
    """A random-weight DINOv2 small enough for the CPU (patch 4: an 8×8 patch grid on 32×32 samples, 16
    channels, one layer), so ViPO runs offline. The global RNG is left as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    config = Dinov2Config(
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
    )
    model = Dinov2Model(config).eval()
    torch.random.set_rng_state(state)
    return model


def save_tiny_dinov2(path: str | os.PathLike, seed: int = 0) -> str:
    """:func:`tiny_dinov2` saved with an ImageNet-normalising image processor, laid out like a Hub checkpoint,
    so it loads through exactly the path a user's ``backbone="facebook/dinov2-large"`` takes."""
    tiny_dinov2(seed).save_pretrained(path)
    BitImageProcessor(image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)).save_pretrained(path)
    return str(path)


TINY_PIPELINES: dict[str, Callable[..., DiffusionPipeline]] = {
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
    "wan": tiny_wan_pipeline,
    "wan-i2v": tiny_wan_i2v_pipeline,
    # pretrained: the miniature world's models (trl_visual.miniature.MINIATURE_MODELS)
    **{name.removeprefix(TINY_PREFIX): model.load for name, model in MINIATURE_MODELS.items()},
}


def load_tiny_pipeline(name: str, seed: int = 0) -> DiffusionPipeline:
    """Build the tiny pipeline called ``name`` (``"tiny:sd3"``), or explain which names exist."""
    key = name[len(TINY_PREFIX) :]
    if key not in TINY_PIPELINES:
        known = ", ".join(TINY_PREFIX + k for k in TINY_PIPELINES)
        raise ValueError(f"Unknown tiny model {name!r}. The built-in tiny models are: {known}.")
    return TINY_PIPELINES[key](seed=seed)


TINY_VLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""SmolVLM's chat format, shortened: ``<|im_start|>User:<image>question<end_of_utterance>\\nAssistant:``."""


def tiny_byte_tokenizer(words: list[str], special_tokens: list[str]) -> Any:
    """A byte-level BPE tokenizer built in memory: every byte is a token, and each of ``words`` (a leading
    ``Ġ`` marks a leading space, as byte-level BPE writes it) is merged into one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []

    def merge(left: str, right: str) -> str:
        if left + right not in vocab:
            merges.append((left, right))
            vocab[left + right] = len(vocab)
        return left + right

    for word in words:
        body = word.removeprefix("Ġ")
        token = body[0]
        for char in body[1:]:
            token = merge(token, char)
        if word.startswith("Ġ"):
            merge("Ġ", token)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})
    tokenizer.pad_token = special_tokens[0]
    return tokenizer


def save_tiny_vlm_judge(path: str | os.PathLike, seed: int = 0, chat_template: bool = True) -> str:
    """A random-weight SmolVLM (``Idefics3ForConditionalGeneration``: a 1-layer SigLIP-style vision tower, pixel
    shuffle, a 2-layer Llama; 69 k parameters) with its processor (56-pixel images, 4 image tokens each, no
    tiling) and a byte-level tokenizer in which ``yes``/``no`` (any case, with or without a leading space) are
    single tokens, saved to ``path`` so that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load it as
    they load a Hub checkpoint. ``chat_template=False`` saves it without a chat template."""
    import transformers
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    # the PIL-based processor: `Idefics3ImageProcessorPil` where torchvision became the default (5.x), the plain
    # class before (5.3)
    pil_processor = getattr(transformers, "Idefics3ImageProcessorPil", transformers.Idefics3ImageProcessor)

    words = ["yes", "no", "Yes", "No", "Ġyes", "Ġno", "ĠYes", "ĠNo", "User", "Assistant"]
    tokenizer = tiny_byte_tokenizer(words, ["<|endoftext|>"])
    image_processor = pil_processor(
        size={"longest_edge": 56}, max_image_size={"longest_edge": 56}, do_image_splitting=False
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=4,
        chat_template=TINY_VLM_CHAT_TEMPLATE if chat_template else None,
    )
    config = Idefics3Config(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "pad_token_id": tokenizer.pad_token_id,
            "initializer_range": 0.5,  # logits far enough apart that scores differ visibly between inputs
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
        },
        scale_factor=2,
        image_token_id=processor.image_token_id,
    )
    torch.manual_seed(seed)
    Idefics3ForConditionalGeneration(config).eval().save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)
