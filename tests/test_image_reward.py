"""ImageReward on transformers' BLIP: a tiny random checkpoint in the official key layout, saved to a temp file and
loaded by the real loading code, must score exactly as a hand-written forward (plain torch ops) of ImageReward's
network on the same weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig

from trl_visual.rewards import REWARD_REGISTRY, ImageRewardReward
from trl_visual.rewards.clip_rewards import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from trl_visual.rewards.image_reward import (
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    imagereward_configs,
    imagereward_to_transformers,
)

VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "red",
    "blue",
    "cat",
    "dog",
    "car",
    "tree",
    "on",
    "the",
]
VISION = dict(width=16, layers=2, heads=2, mlp=32, image=16, patch=8)
TEXT = dict(width=12, layers=2, heads=3, mlp=24, positions=40)
HEAD = (12, 10, 8, 6, 4, 1)
VISION_EPS, TEXT_EPS = 1e-6, 1e-12


def tiny_configs():
    vision = BlipVisionConfig(
        hidden_size=VISION["width"],
        intermediate_size=VISION["mlp"],
        num_hidden_layers=VISION["layers"],
        num_attention_heads=VISION["heads"],
        image_size=VISION["image"],
        patch_size=VISION["patch"],
        hidden_act="gelu",
        layer_norm_eps=VISION_EPS,
    )
    text = BlipTextConfig(
        vocab_size=len(VOCAB) + 2,  # BLIP's [DEC] and [ENC]
        hidden_size=TEXT["width"],
        encoder_hidden_size=VISION["width"],
        intermediate_size=TEXT["mlp"],
        num_hidden_layers=TEXT["layers"],
        num_attention_heads=TEXT["heads"],
        max_position_embeddings=TEXT["positions"],
        layer_norm_eps=TEXT_EPS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_decoder=True,
    )
    return vision, text


def official_state_dict(seed=0):
    """Random weights named as the official ``ImageReward.pt`` names them (BLIP's ViT and med.py BERT, the
    ``mlp`` head), with the unused contrastive projections and the ``position_ids`` buffer it also holds."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return 0.3 * torch.randn(*shape, generator=g)

    def norm(width):
        return {"weight": 1 + 0.1 * torch.randn(width, generator=g), "bias": rand(width)}

    def linear(fan_in, fan_out):
        return {"weight": rand(fan_out, fan_in), "bias": rand(fan_out)}

    entries: dict[str, dict[str, torch.Tensor]] = {}
    v, t = VISION["width"], TEXT["width"]
    patches = (VISION["image"] // VISION["patch"]) ** 2
    sd = {
        "blip.visual_encoder.cls_token": rand(1, 1, v),
        "blip.visual_encoder.pos_embed": rand(1, patches + 1, v),
        "blip.visual_encoder.patch_embed.proj.weight": rand(v, 3, VISION["patch"], VISION["patch"]),
        "blip.visual_encoder.patch_embed.proj.bias": rand(v),
        "blip.text_encoder.embeddings.word_embeddings.weight": rand(len(VOCAB) + 2, t),
        "blip.text_encoder.embeddings.position_embeddings.weight": rand(TEXT["positions"], t),
        "blip.text_encoder.embeddings.position_ids": torch.arange(TEXT["positions"])[None],
    }
    entries["blip.visual_encoder.norm"] = norm(v)
    entries["blip.text_encoder.embeddings.LayerNorm"] = norm(t)
    for i in range(VISION["layers"]):
        block = f"blip.visual_encoder.blocks.{i}."
        entries[block + "norm1"], entries[block + "norm2"] = norm(v), norm(v)
        entries[block + "attn.qkv"], entries[block + "attn.proj"] = linear(v, 3 * v), linear(v, v)
        entries[block + "mlp.fc1"], entries[block + "mlp.fc2"] = (
            linear(v, VISION["mlp"]),
            linear(VISION["mlp"], v),
        )
    for i in range(TEXT["layers"]):
        layer = f"blip.text_encoder.encoder.layer.{i}."
        for attention, source in (("attention", t), ("crossattention", v)):
            entries[f"{layer}{attention}.self.query"] = linear(t, t)
            entries[f"{layer}{attention}.self.key"] = linear(source, t)
            entries[f"{layer}{attention}.self.value"] = linear(source, t)
            entries[f"{layer}{attention}.output.dense"] = linear(t, t)
            entries[f"{layer}{attention}.output.LayerNorm"] = norm(t)
        entries[layer + "intermediate.dense"] = linear(t, TEXT["mlp"])
        entries[layer + "output.dense"] = linear(TEXT["mlp"], t)
        entries[layer + "output.LayerNorm"] = norm(t)
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(HEAD, HEAD[1:])):
        entries[f"mlp.layers.{index}"] = linear(fan_in, fan_out)
    entries["blip.vision_proj"], entries["blip.text_proj"] = linear(v, 8), linear(t, 8)
    for prefix, tensors in entries.items():
        sd.update({f"{prefix}.{kind}": value for kind, value in tensors.items()})
    return sd


# -- ImageReward's forward, by hand --------------------------------------------------------------------------------


def _linear(sd, x, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _layer_norm(sd, x, name, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _attention(q, k, v, heads, additive_mask=None):
    """Multi-head scaled dot-product attention of (B, L, D) tensors."""
    batch, length, width = q.shape
    split = [x.reshape(batch, x.shape[1], heads, width // heads).transpose(1, 2) for x in (q, k, v)]
    scores = split[0] @ split[1].transpose(-1, -2) / math.sqrt(width // heads)
    if additive_mask is not None:
        scores = scores + additive_mask
    out = torch.softmax(scores, dim=-1) @ split[2]
    return out.transpose(1, 2).reshape(batch, length, width)


def reference_vit(sd, pixels):
    """BLIP's ViT: patches + [CLS] + positions, pre-norm blocks, final norm; every token is returned."""
    p = "blip.visual_encoder."
    patch = VISION["patch"]
    patches = pixels.unfold(2, patch, patch).unfold(3, patch, patch)  # B, 3, h, w, patch, patch
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(pixels.shape[0], -1, 3 * patch * patch)
    kernel = sd[p + "patch_embed.proj.weight"].reshape(VISION["width"], -1)
    x = patches @ kernel.T + sd[p + "patch_embed.proj.bias"]
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[p + "pos_embed"]
    for i in range(VISION["layers"]):
        block = f"{p}blocks.{i}."
        h = _layer_norm(sd, x, block + "norm1", VISION_EPS)
        q, k, v = _linear(sd, h, block + "attn.qkv").chunk(3, dim=-1)
        x = x + _linear(sd, _attention(q, k, v, VISION["heads"]), block + "attn.proj")
        h = _layer_norm(sd, x, block + "norm2", VISION_EPS)
        x = x + _linear(sd, _gelu(_linear(sd, h, block + "mlp.fc1")), block + "mlp.fc2")
    return _layer_norm(sd, x, p + "norm", VISION_EPS)


def reference_text_cls(sd, input_ids, attention_mask, image_tokens):
    """BLIP's med.py BERT in multimodal mode: post-norm layers, bidirectional self-attention over the prompt
    (padding masked with −10000), cross-attention to every image token; the [CLS] state."""
    p = "blip.text_encoder."
    x = sd[p + "embeddings.word_embeddings.weight"][input_ids]
    x = x + sd[p + "embeddings.position_embeddings.weight"][: input_ids.shape[1]]
    x = _layer_norm(sd, x, p + "embeddings.LayerNorm", TEXT_EPS)
    padding = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    for i in range(TEXT["layers"]):
        layer = f"{p}encoder.layer.{i}."
        for attention, source, mask in (("attention", x, padding), ("crossattention", image_tokens, None)):
            q = _linear(sd, x, f"{layer}{attention}.self.query")
            k, v = (_linear(sd, source, f"{layer}{attention}.self.{name}") for name in ("key", "value"))
            out = _linear(sd, _attention(q, k, v, TEXT["heads"], mask), f"{layer}{attention}.output.dense")
            x = _layer_norm(sd, out + x, f"{layer}{attention}.output.LayerNorm", TEXT_EPS)
        hidden = _gelu(_linear(sd, x, layer + "intermediate.dense"))
        x = _layer_norm(
            sd, _linear(sd, hidden, layer + "output.dense") + x, layer + "output.LayerNorm", TEXT_EPS
        )
    return x[:, 0]


def reference_score(sd, tokenizer, prompts, images):
    """ImageReward's score(): tokens (35, padded), normalized pixels, ViT, BERT [CLS], linear MLP, standardized."""
    mean, std = (
        torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1),
        torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1),
    )
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    image_tokens = reference_vit(sd, (images - mean) / std)
    features = reference_text_cls(sd, tokens["input_ids"], tokens["attention_mask"], image_tokens)
    for index in (0, 2, 4, 6, 7):
        features = _linear(sd, features, f"mlp.layers.{index}")
    return ((features.squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).tolist()


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The official layout on disk: ``ImageReward.pt`` in a folder, and a BERT tokenizer folder."""
    root = tmp_path_factory.mktemp("imagereward")
    torch.save(official_state_dict(), root / "ImageReward.pt")
    tokenizer_dir = root / "tokenizer"
    BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB)}).save_pretrained(tokenizer_dir)
    return root, tokenizer_dir


def load(files, **kwargs):
    root, tokenizer_dir = files
    vision, text = tiny_configs()
    return ImageRewardReward(
        str(root), tokenizer_name_or_path=str(tokenizer_dir), vision_config=vision, text_config=text, **kwargs
    )


PROMPTS = ["a red cat", "a blue car on the tree", "a dog", "the red red car"]


def images(seed=1, size=VISION["image"]):
    return torch.rand(len(PROMPTS), 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- tests ---------------------------------------------------------------------------------------------------------


def test_port_scores_as_the_hand_written_forward(files):
    reward = load(files)
    pictures = images()
    expected = reference_score(official_state_dict(), reward.tokenizer, PROMPTS, pictures)
    assert reward(PROMPTS, pictures) == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 4) for s in expected)) == len(PROMPTS)  # the check is not vacuous


def test_tokens_are_blips(files):
    """BERT's ids with [CLS]/[SEP], padded to ImageReward's 35, and BLIP's two added tokens after the vocabulary."""
    tokenizer = load(files).tokenizer
    ids = tokenizer(["a red cat"], padding="max_length", truncation=True, max_length=35)["input_ids"][0]
    assert ids[:5] == [VOCAB.index(w) for w in ("[CLS]", "a", "red", "cat", "[SEP]")]
    assert len(ids) == 35 and set(ids[5:]) == {0}
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(VOCAB), len(VOCAB) + 1]


def test_larger_images_are_resized_and_cropped_as_imagereward_does(files):
    """A 32×48 image is scored after shortest-side resize to 16 and center crop: the same as the reference on
    the image the transform makes (the transform is the shared, tested CLIP one)."""
    reward = load(files)
    big = torch.rand(len(PROMPTS), 3, 32, 48, generator=torch.Generator().manual_seed(2))
    prepared = F.interpolate(big, size=(16, 24), mode="bicubic", antialias=True, align_corners=False).clamp(
        0, 1
    )
    expected = reference_score(official_state_dict(), reward.tokenizer, PROMPTS, prepared[..., 4:20])
    assert reward(PROMPTS, big) == pytest.approx(expected, abs=1e-5)


def test_batching_and_dtype_do_not_change_scores(files):
    pictures = images()
    full = load(files)(PROMPTS, pictures)
    assert load(files, batch_size=1)(PROMPTS, pictures) == pytest.approx(full, abs=1e-6)
    assert load(files, dtype="bfloat16")(PROMPTS, pictures) == pytest.approx(full, abs=0.15)


def test_mapping_drops_only_the_unused_tensors():
    parts = imagereward_to_transformers(official_state_dict())
    assert "embeddings.class_embedding" in parts["vision"]
    assert "encoder.layer.1.crossattention.self.key.weight" in parts["text"]
    assert sorted(parts["head"]) == sorted(
        f"layers.{i}.{k}" for i in (0, 2, 4, 6, 7) for k in ("weight", "bias")
    )
    total = sum(len(p) for p in parts.values())
    assert total == len(official_state_dict()) - 5  # vision_proj, text_proj (weight, bias each), position_ids


def test_unknown_and_missing_keys_are_errors(files, tmp_path):
    with pytest.raises(ValueError, match="no counterpart.*blip.itm_head.weight"):
        imagereward_to_transformers({**official_state_dict(), "blip.itm_head.weight": torch.zeros(2, 12)})
    broken = official_state_dict()
    del broken["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"]
    torch.save(broken, tmp_path / "ImageReward.pt")
    vision, text = tiny_configs()
    with pytest.raises(ValueError, match="(?s)does not fit the BLIP configs.*crossattention.self.key.weight"):
        ImageRewardReward(
            str(tmp_path), tokenizer_name_or_path=str(files[1]), vision_config=vision, text_config=text
        )


def test_videos_are_refused_with_the_fix(files):
    with pytest.raises(ValueError, match="FrameAveraged"):
        load(files)(PROMPTS, videos=torch.rand(len(PROMPTS), 2, 3, 16, 16))


def test_registered_lazily_with_the_official_architecture():
    assert "imagereward" in REWARD_REGISTRY
    assert REWARD_REGISTRY["imagereward"] is ImageRewardReward
    vision, text = imagereward_configs()
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size) == (
        1024,
        24,
        16,
        224,
    )
    assert (text.hidden_size, text.encoder_hidden_size, text.vocab_size, text.num_hidden_layers) == (
        768,
        1024,
        30524,
        12,
    )
