"""Learned reward models on tiny random-weight checkpoints saved to a temp folder.

Every reward is loaded through the same path a user takes with a Hub id (``from_pretrained`` on a folder,
``hf_hub_download``'s local-file branch), and checked against the formula it claims, computed by hand.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from trl_visual.rewards.clip_rewards import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    AestheticMLP,
    AestheticReward,
    CLIPScoreReward,
    ImageTransform,
    PickScoreReward,
)
from trl_visual.rewards.hps import HPSv2Reward, clip_model_from_open_clip, open_clip_to_transformers
from trl_visual.rewards.registry import REWARD_REGISTRY
from trl_visual.rewards.video import CLIPVideoScoreReward, FrameAveraged

IMAGE_SIZE, PATCH = 32, 8
PROMPTS = ["a cat", "a red dog", "a cat", "blue sky at dusk", "abcd"]

# transformers' PIL-based CLIP processor: `CLIPImageProcessorPil` since 5.x's torchvision default, plain
# `CLIPImageProcessor` before it (5.3)
CLIPImageProcessorPil = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)


# ---------------------------------------------------------------------------------------------------------------
# Tiny checkpoints
# ---------------------------------------------------------------------------------------------------------------


def make_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over letters, a few merges, and the two special tokens last (highest ids)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {ch: i for i, ch in enumerate(letters)}
    vocab.update({f"{ch}</w>": len(letters) + i for i, ch in enumerate(letters)})
    merges = [("c", "a"), ("ca", "t</w>"), ("r", "e"), ("re", "d</w>"), ("d", "o")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_clip_config(tokenizer: CLIPTokenizer, text_width: int = 32) -> CLIPConfig:
    """A two-layer CLIP whose end-of-text token is the tokenizer's (so pooling matches open_clip's argmax)."""
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": text_width,
        "intermediate_size": 4 * text_width,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
        "hidden_act": "gelu",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "hidden_act": "gelu",
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny CLIP checkpoint folder laid out like a Hub repo: model, tokenizer, preprocessor_config.json."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    CLIPModel(tiny_clip_config(tokenizer)).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def clip_model(clip_dir: str) -> CLIPModel:
    """The tiny CLIP, loaded independently of the rewards, for computing expected values by hand."""
    return CLIPModel.from_pretrained(clip_dir).eval()


@pytest.fixture(scope="module")
def clipscore(clip_dir: str) -> CLIPScoreReward:
    return CLIPScoreReward(clip_dir, batch_size=2)


def images(n: int, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def by_hand_pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalization with the processor's mean/std (the images are already at the model's size)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def by_hand_cosine(
    model: CLIPModel, tokenizer: CLIPTokenizer, prompts: list[str], x: torch.Tensor
) -> torch.Tensor:
    """cos = <u, v> / (|u| |v|) with u, v from get_image_features / get_text_features."""
    with torch.no_grad():
        u = model.get_image_features(pixel_values=by_hand_pixels(x)).pooler_output
        tokens = tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        v = model.get_text_features(**tokens).pooler_output
    return (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------------


def test_transform_reads_processor_and_matches_it(clip_dir: str) -> None:
    transform = ImageTransform.from_pretrained(clip_dir)
    assert transform.resize_mode == "shortest_edge" and transform.size == IMAGE_SIZE
    assert transform.crop_size == (IMAGE_SIZE, IMAGE_SIZE) and transform.interpolation == "bicubic"
    x = images(2, 48, 40)
    ours = transform(x)
    assert ours.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    # The PIL processor on the uint8 version of the same images: equal up to resampling and 8-bit rounding.
    uint8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    reference = CLIPImageProcessorPil.from_pretrained(clip_dir)(list(uint8), return_tensors="pt")[
        "pixel_values"
    ]
    assert (ours - reference).abs().mean() < 0.015


def test_transform_longest_edge_pad() -> None:
    transform = ImageTransform(resize_mode="longest_edge_pad", size=16, crop_size=None, mean=None, std=None)
    out = transform(torch.ones(1, 3, 8, 16))
    assert out.shape == (1, 3, 16, 16)
    assert (
        torch.all(out[..., 4:12, :] == 1)
        and torch.all(out[..., :4, :] == 0)
        and torch.all(out[..., 12:, :] == 0)
    )


# ---------------------------------------------------------------------------------------------------------------
# CLIPScore and PickScore
# ---------------------------------------------------------------------------------------------------------------


def test_clipscore_is_the_cosine(clipscore: CLIPScoreReward, clip_model: CLIPModel, clip_dir: str) -> None:
    x = images(len(PROMPTS))
    scores = clipscore(PROMPTS, x)
    assert (
        isinstance(scores, list) and len(scores) == len(PROMPTS) and all(isinstance(s, float) for s in scores)
    )
    expected = by_hand_cosine(clip_model, CLIPTokenizer.from_pretrained(clip_dir), PROMPTS, x)
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-5, rtol=1e-5)


def test_clipscore_batching_invariance(clipscore: CLIPScoreReward, clip_dir: str) -> None:
    x = images(len(PROMPTS), 40, 48)
    together = CLIPScoreReward(clip_dir, batch_size=64)(PROMPTS, x)
    in_pieces = clipscore(PROMPTS, x)  # batch_size=2 < 5 images
    one_by_one = [clipscore([p], x[i : i + 1])[0] for i, p in enumerate(PROMPTS)]
    torch.testing.assert_close(torch.tensor(in_pieces), torch.tensor(together), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(one_by_one), torch.tensor(together), atol=1e-5, rtol=0)


def test_clipscore_scale_and_bfloat16(clip_dir: str, clipscore: CLIPScoreReward) -> None:
    x = images(3)
    reference = torch.tensor(clipscore(PROMPTS[:3], x))
    scaled = CLIPScoreReward(clip_dir, scale=100.0)(PROMPTS[:3], x)
    torch.testing.assert_close(torch.tensor(scaled), 100 * reference, atol=1e-3, rtol=1e-5)
    low = CLIPScoreReward(clip_dir, dtype="bfloat16")
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(
        torch.tensor(low(PROMPTS[:3], x.to(torch.bfloat16))), reference, atol=0.05, rtol=0
    )


def test_pickscore_is_logit_scale_times_cosine(
    clip_dir: str, clipscore: CLIPScoreReward, clip_model: CLIPModel
) -> None:
    reward = PickScoreReward(clip_dir, processor_name_or_path=clip_dir, batch_size=3)
    x = images(len(PROMPTS), seed=5)
    expected = clip_model.logit_scale.exp().item() * torch.tensor(clipscore(PROMPTS, x))
    torch.testing.assert_close(torch.tensor(reward(PROMPTS, x)), expected, atol=1e-4, rtol=1e-5)
    one_by_one = [reward([p], x[i : i + 1])[0] for i, p in enumerate(PROMPTS)]
    torch.testing.assert_close(torch.tensor(one_by_one), expected, atol=1e-4, rtol=1e-5)
    low = PickScoreReward(clip_dir, processor_name_or_path=clip_dir, dtype=torch.bfloat16)
    torch.testing.assert_close(
        torch.tensor(low(PROMPTS, x)), expected, atol=0.05 * expected.abs().max().item(), rtol=0
    )


def test_rewards_are_frozen_modules(clipscore: CLIPScoreReward) -> None:
    assert isinstance(clipscore, torch.nn.Module) and clipscore.name == "clipscore"
    assert not any(p.requires_grad for p in clipscore.parameters())
    clipscore.train()
    assert not clipscore.training and not clipscore.model.training
    assert clipscore.to("cpu") is clipscore and clipscore.device.type == "cpu"


def test_clear_errors(clipscore: CLIPScoreReward) -> None:
    with pytest.raises(ValueError, match="FrameAveraged"):
        clipscore(["a"], videos=torch.rand(1, 2, 3, 32, 32))
    with pytest.raises(ValueError, match="one prompt per image"):
        clipscore(["a", "b"], images(3))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        clipscore(["a"], torch.rand(1, 32, 32, 3))


# ---------------------------------------------------------------------------------------------------------------
# Aesthetic
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    """A folder holding ``aesthetic-model.pth`` with the LAION layout (layers 0, 2, 4, 6, 7) at small widths."""
    folder = tmp_path_factory.mktemp("aesthetic-head")
    torch.manual_seed(3)
    state_dict = AestheticMLP((16, 24, 12, 8, 4, 1)).state_dict()
    assert sorted(k.split(".")[1] for k in state_dict if k.endswith("weight")) == ["0", "2", "4", "6", "7"]
    torch.save(state_dict, folder / "aesthetic-model.pth")
    return str(folder), state_dict


def test_aesthetic_is_head_of_normalized_embedding(
    clip_dir: str, clip_model: CLIPModel, aesthetic_head: tuple[str, dict[str, torch.Tensor]]
) -> None:
    folder, state_dict = aesthetic_head
    reward = AestheticReward(clip_dir, head_name_or_path=folder, batch_size=2)
    x = images(5, seed=7)
    scores = reward(PROMPTS, x)
    assert len(scores) == 5 and reward.name == "aesthetic"
    with torch.no_grad():
        u = clip_model.get_image_features(pixel_values=by_hand_pixels(x)).pooler_output
        h = u / u.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            h = h @ state_dict[f"layers.{i}.weight"].T + state_dict[f"layers.{i}.bias"]
    torch.testing.assert_close(torch.tensor(scores), h.squeeze(-1), atol=1e-5, rtol=1e-5)
    one_by_one = [reward([p], x[i : i + 1])[0] for i, p in enumerate(PROMPTS)]
    torch.testing.assert_close(torch.tensor(one_by_one), torch.tensor(scores), atol=1e-5, rtol=0)
    low = AestheticReward(clip_dir, head_name_or_path=folder, dtype="bf16")
    torch.testing.assert_close(torch.tensor(low(PROMPTS, x)), torch.tensor(scores), atol=0.05, rtol=0.05)


def test_aesthetic_head_from_a_safetensors_file(
    clip_dir: str, aesthetic_head: tuple[str, dict[str, torch.Tensor]], tmp_path
) -> None:
    folder, state_dict = aesthetic_head
    save_file(state_dict, tmp_path / "head.safetensors")
    x = images(2)
    from_file = AestheticReward(clip_dir, head_name_or_path=str(tmp_path / "head.safetensors"))(
        PROMPTS[:2], x
    )
    from_folder = AestheticReward(clip_dir, head_name_or_path=folder)(PROMPTS[:2], x)
    assert from_file == pytest.approx(from_folder, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# HPSv2: open_clip state dict -> transformers CLIPModel
# ---------------------------------------------------------------------------------------------------------------

TEXT_WIDTH, VISION_WIDTH, EMBED, HEADS, LAYERS, CONTEXT = 24, 32, 16, 4, 2, 16


def open_clip_state_dict(vocab_size: int, seed: int = 11) -> dict[str, torch.Tensor]:
    """An open_clip ViT CLIP state dict with open_clip's key names and shapes, random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def blocks(prefix: str, width: int) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(LAYERS):
            p = f"{prefix}transformer.resblocks.{i}."
            out |= {
                p + "ln_1.weight": 1 + r(width),
                p + "ln_1.bias": r(width),
                p + "attn.in_proj_weight": r(3 * width, width),
                p + "attn.in_proj_bias": r(3 * width),
                p + "attn.out_proj.weight": r(width, width),
                p + "attn.out_proj.bias": r(width),
                p + "ln_2.weight": 1 + r(width),
                p + "ln_2.bias": r(width),
                p + "mlp.c_fc.weight": r(4 * width, width),
                p + "mlp.c_fc.bias": r(4 * width),
                p + "mlp.c_proj.weight": r(width, 4 * width),
                p + "mlp.c_proj.bias": r(width),
            }
        return out

    grid = IMAGE_SIZE // PATCH
    state = {
        "positional_embedding": r(CONTEXT, TEXT_WIDTH),
        "text_projection": r(TEXT_WIDTH, EMBED),
        "logit_scale": torch.tensor(math.log(100.0)),
        "token_embedding.weight": r(vocab_size, TEXT_WIDTH),
        "ln_final.weight": 1 + r(TEXT_WIDTH),
        "ln_final.bias": r(TEXT_WIDTH),
        "attn_mask": torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1),
        "visual.class_embedding": r(VISION_WIDTH),
        "visual.positional_embedding": r(grid * grid + 1, VISION_WIDTH),
        "visual.proj": r(VISION_WIDTH, EMBED),
        "visual.conv1.weight": r(VISION_WIDTH, 3, PATCH, PATCH),
        "visual.ln_pre.weight": 1 + r(VISION_WIDTH),
        "visual.ln_pre.bias": r(VISION_WIDTH),
        "visual.ln_post.weight": 1 + r(VISION_WIDTH),
        "visual.ln_post.bias": r(VISION_WIDTH),
    }
    return state | blocks("", TEXT_WIDTH) | blocks("visual.", VISION_WIDTH)


def oc_block(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str, causal: bool) -> torch.Tensor:
    """open_clip's residual attention block, written out with the fused in_proj (batch first)."""
    b, n, w = x.shape
    h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
    qkv = h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
    q, k, v = (t.view(b, n, HEADS, w // HEADS).transpose(1, 2) for t in qkv.split(w, dim=-1))
    logits = q @ k.transpose(-1, -2) / math.sqrt(w // HEADS)
    if causal:
        logits = logits + sd["attn_mask"][:n, :n]
    attended = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w)
    x = x + attended @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
    h = F.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def oc_encode_image(sd: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (VISION_WIDTH,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(LAYERS):
        x = oc_block(x, sd, f"visual.transformer.resblocks.{i}.", causal=False)
    pooled = F.layer_norm(x[:, 0], (VISION_WIDTH,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    return pooled @ sd["visual.proj"]


def oc_encode_text(sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    for i in range(LAYERS):
        x = oc_block(x, sd, f"transformer.resblocks.{i}.", causal=True)
    x = F.layer_norm(x, (TEXT_WIDTH,), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]


@pytest.fixture(scope="module")
def hps_files(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, str, dict[str, torch.Tensor], CLIPConfig]:
    """``HPS_v2.1_compressed.pt`` (``{"state_dict": open_clip weights}``) in a folder, and a tokenizer folder."""
    folder = tmp_path_factory.mktemp("hps")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    state_dict = open_clip_state_dict(len(tokenizer))
    torch.save({"state_dict": state_dict}, folder / "HPS_v2.1_compressed.pt")
    config = tiny_clip_config(tokenizer, text_width=TEXT_WIDTH)
    config.save_pretrained(folder / "config")
    return str(folder), str(folder / "tokenizer"), state_dict, config


def test_open_clip_mapping_splits_in_proj_and_transposes(hps_files) -> None:
    _, _, sd, _ = hps_files
    mapped = open_clip_to_transformers(sd)
    fused = sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
    for i, name in enumerate("qkv"):
        split = mapped[f"vision_model.encoder.layers.1.self_attn.{name}_proj.weight"]
        assert torch.equal(split, fused[i * VISION_WIDTH : (i + 1) * VISION_WIDTH])
    assert torch.equal(mapped["text_projection.weight"], sd["text_projection"].T)
    assert torch.equal(mapped["visual_projection.weight"], sd["visual.proj"].T)
    assert "attn_mask" not in mapped and "logit_scale" in mapped
    with pytest.raises(ValueError, match="no CLIPModel counterpart"):
        open_clip_to_transformers(
            sd | {"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(VISION_WIDTH)}
        )


def test_open_clip_mapping_reproduces_open_clip_forward(hps_files) -> None:
    _, tokenizer_dir, sd, config = hps_files
    model = clip_model_from_open_clip(sd, config)
    pixels = by_hand_pixels(images(3, seed=2))
    ids = CLIPTokenizer.from_pretrained(tokenizer_dir)(
        PROMPTS[:3], padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        # One attention block, through transformers' layer vs the fused-in_proj computation.
        x = torch.randn(2, 5, VISION_WIDTH)
        ours = model.vision_model.encoder.layers[0](x, attention_mask=None)
        ours = ours[0] if isinstance(ours, tuple) else ours
        torch.testing.assert_close(ours, oc_block(x, sd, "visual.transformer.resblocks.0.", causal=False))
        # Both towers and the projections.
        image_features = model.get_image_features(pixel_values=pixels).pooler_output
        text_features = model.get_text_features(input_ids=ids).pooler_output
        torch.testing.assert_close(image_features, oc_encode_image(sd, pixels), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(text_features, oc_encode_text(sd, ids), atol=1e-5, rtol=1e-4)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_hpsv2_scores_are_open_clip_cosines(hps_files) -> None:
    folder, tokenizer_dir, sd, config = hps_files
    reward = HPSv2Reward(folder, tokenizer_name_or_path=tokenizer_dir, config=config, batch_size=2)
    x = images(len(PROMPTS), seed=4)
    scores = reward(PROMPTS, x)
    assert reward.name == "hpsv2" and len(scores) == len(PROMPTS)
    ids = CLIPTokenizer.from_pretrained(tokenizer_dir)(
        PROMPTS, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        expected = F.cosine_similarity(
            oc_encode_image(sd, by_hand_pixels(x)), oc_encode_text(sd, ids), dim=-1
        )
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-5, rtol=1e-5)
    one_by_one = [reward([p], x[i : i + 1])[0] for i, p in enumerate(PROMPTS)]
    torch.testing.assert_close(torch.tensor(one_by_one), expected, atol=1e-5, rtol=1e-5)
    # The checkpoint file itself and a saved config folder work as well; bfloat16 stays close.
    low = HPSv2Reward(
        f"{folder}/HPS_v2.1_compressed.pt",
        tokenizer_name_or_path=tokenizer_dir,
        config=f"{folder}/config",
        dtype="bfloat16",
    )
    torch.testing.assert_close(torch.tensor(low(PROMPTS, x)), expected, atol=0.05, rtol=0)
    # Non-square images are resized on the long side and padded, as HPSv2's evaluation transform does.
    assert len(reward(PROMPTS[:2], images(2, 24, 40))) == 2


def test_hpsv2_wrong_config_is_a_clear_error(hps_files) -> None:
    folder, tokenizer_dir, _, _ = hps_files
    with pytest.raises(ValueError, match="does not fit the CLIPConfig"):
        HPSv2Reward(
            folder, tokenizer_name_or_path=tokenizer_dir, config=tiny_clip_config(make_tokenizer(), 32)
        )


# ---------------------------------------------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------------------------------------------


def test_frame_averaged_is_the_mean_of_frame_scores(clipscore: CLIPScoreReward) -> None:
    videos = torch.rand(3, 4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(9))
    prompts = PROMPTS[:3]
    reward = FrameAveraged(clipscore)
    assert reward.name == "clipscore_frames" and reward.image_reward is clipscore
    scores = reward(prompts, videos=videos)
    per_frame = torch.tensor(
        [[clipscore([p], videos[b, t : t + 1])[0] for t in range(4)] for b, p in enumerate(prompts)]
    )
    torch.testing.assert_close(torch.tensor(scores), per_frame.mean(dim=1), atol=1e-5, rtol=0)


def test_frame_averaged_plain_function_gets_columns_per_frame() -> None:
    seen = {}

    def brightness(prompts: list[str], images: torch.Tensor, offset: list[float], **kwargs) -> list[float]:
        seen["prompts"], seen["offset"] = prompts, offset
        return (images.mean(dim=(1, 2, 3)) + torch.tensor(offset)).tolist()

    videos = torch.rand(2, 3, 3, 8, 8)
    scores = FrameAveraged(brightness)(["x", "y"], videos=videos, offset=[1.0, 2.0])
    assert seen["prompts"] == ["x", "x", "x", "y", "y", "y"] and seen["offset"] == [1.0] * 3 + [2.0] * 3
    expected = videos.mean(dim=(2, 3, 4)).mean(dim=1) + torch.tensor([1.0, 2.0])
    assert scores == pytest.approx(expected.tolist(), abs=1e-6)


def test_clip_video_score_pools_frame_embeddings(clip_dir: str, clip_model: CLIPModel) -> None:
    reward = CLIPVideoScoreReward(clip_dir, batch_size=3)
    videos = torch.rand(2, 3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(6))
    prompts = ["a cat", "a red dog"]
    scores = reward(prompts, videos=videos)
    with torch.no_grad():
        frames = clip_model.get_image_features(
            pixel_values=by_hand_pixels(videos.flatten(0, 1))
        ).pooler_output
        video = F.normalize(F.normalize(frames, dim=-1).view(2, 3, -1).mean(1), dim=-1)
        tokens = CLIPTokenizer.from_pretrained(clip_dir)(
            prompts, padding="max_length", max_length=16, return_tensors="pt"
        )
        text = F.normalize(clip_model.get_text_features(**tokens).pooler_output, dim=-1)
    torch.testing.assert_close(torch.tensor(scores), (video * text).sum(-1), atol=1e-5, rtol=0)
    assert reward(prompts[:1], videos=videos[:1]) == pytest.approx(scores[:1], abs=1e-5)
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        reward(prompts, images(2))


# ---------------------------------------------------------------------------------------------------------------
# Registry and docs
# ---------------------------------------------------------------------------------------------------------------


def test_registry_names_resolve() -> None:
    assert REWARD_REGISTRY["clipscore"] is CLIPScoreReward
    assert REWARD_REGISTRY["pickscore"] is PickScoreReward
    assert REWARD_REGISTRY["aesthetic"] is AestheticReward
    assert REWARD_REGISTRY["hpsv2"] is HPSv2Reward
    assert REWARD_REGISTRY["clipscore_video"] is CLIPVideoScoreReward
    for name in ("clipscore", "pickscore", "aesthetic", "hpsv2", "clipscore_video"):
        assert REWARD_REGISTRY[name].name == name


def test_processor_settings_json_roundtrip(clip_dir: str) -> None:
    with open(f"{clip_dir}/preprocessor_config.json") as handle:
        settings = json.load(handle)
    assert ImageTransform.from_processor_dict(settings) == ImageTransform.from_pretrained(clip_dir)


def test_transform_reads_the_older_integer_processor_format() -> None:
    # The layout of openai/clip-vit-large-patch14's preprocessor_config.json (integer size and crop_size).
    settings = {
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "resample": 3,
        "size": 224,
    }
    transform = ImageTransform.from_processor_dict(
        settings | {"image_mean": list(OPENAI_CLIP_MEAN), "image_std": [0.5] * 3}
    )
    assert (transform.resize_mode, transform.size, transform.crop_size) == ("shortest_edge", 224, (224, 224))
    assert transform.std == (0.5, 0.5, 0.5) and transform(images(1, 300, 260)).shape == (1, 3, 224, 224)


def test_every_reward_class_runs_in_a_training_step(tmp_path, clip_dir, aesthetic_head, hps_files) -> None:
    """The four learned rewards, loaded from local folders exactly as from Hub ids, score a real GRPO step."""
    from datasets import Dataset
    from helpers import make_trainer
    from peft import LoraConfig

    hps_folder, hps_tokenizer, _, hps_config = hps_files
    rewards = [
        CLIPScoreReward(clip_dir),
        PickScoreReward(clip_dir, processor_name_or_path=clip_dir),
        AestheticReward(clip_dir, head_name_or_path=aesthetic_head[0]),
        HPSv2Reward(hps_folder, tokenizer_name_or_path=hps_tokenizer, config=hps_config),
    ]
    trainer = make_trainer(
        tmp_path,
        rewards,
        Dataset.from_dict({"prompt": ["a red cat", "a blue dog"]}),
        "tiny:sd3",
        peft=LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]),
        output_dir=str(tmp_path),
        max_steps=1,
        num_inference_steps=3,
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    for name in ("clipscore", "pickscore", "aesthetic", "hpsv2"):
        assert math.isfinite(logs[f"rewards/{name}/mean"]), name
        assert logs[f"rewards/{name}/std"] > 0, name  # the 8 different images get different scores
        assert logs[f"timing/reward/{name}"] > 0, name


def test_video_rewards_run_in_a_training_step_on_tiny_wan(tmp_path, clip_dir) -> None:
    """FrameAveraged(image reward) and the CLIP video score, called with ``videos`` by a real Wan GRPO step."""
    from datasets import Dataset
    from helpers import make_trainer
    from peft import LoraConfig

    trainer = make_trainer(
        tmp_path,
        [FrameAveraged(CLIPScoreReward(clip_dir)), CLIPVideoScoreReward(clip_dir)],
        Dataset.from_dict({"prompt": ["a red cat", "a blue dog"]}),
        "tiny:wan",
        peft=LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]),
        output_dir=str(tmp_path),
        max_steps=1,
        num_inference_steps=3,
        num_frames=5,
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    for name in ("clipscore_frames", "clipscore_video"):
        assert math.isfinite(logs[f"rewards/{name}/mean"]), name
        assert logs[f"rewards/{name}/std"] > 0, name


def test_prompt_variants_give_one_clipscore_per_paraphrase(clipscore: CLIPScoreReward) -> None:
    """With a `prompt_variants` column each image is scored against each of its paraphrases (its interpretations);
    a row without any is scored against its own prompt; the aesthetic reward, which reads no prompt, ignores it."""
    x = images(2)
    variants = [["a cat", "a red dog", "abcd"], None]
    scores = clipscore(["a cat", "blue sky at dusk"], x, prompt_variants=variants)
    expected_first = [clipscore([v], x[:1])[0] for v in variants[0]]
    torch.testing.assert_close(torch.tensor(scores[0]), torch.tensor(expected_first), atol=1e-5, rtol=0)
    own = clipscore(["blue sky at dusk"], x[1:])[0]
    torch.testing.assert_close(torch.tensor(scores[1]), torch.tensor([own] * 3), atol=1e-5, rtol=0)
    assert AestheticReward.reads_prompts is False
