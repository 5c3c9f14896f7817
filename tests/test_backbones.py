"""Tests for trl_visual/backbones.py on tiny random-config models saved to a temp folder."""

import pytest
import torch
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextImageProcessor,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ResNetConfig,
    ResNetModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from trl_visual.backbones import BackboneError, VisionBackbone
from trl_visual.core.vipo import perceptual_map

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
VIT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32)


def _save(tmp_path, name, model, processor):
    path = tmp_path / name
    torch.manual_seed(0)
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _dinov2(tmp_path):
    model = Dinov2Model(Dinov2Config(patch_size=4, **VIT))
    return _save(
        tmp_path, "dinov2", model, BitImageProcessor(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    )


def _dinov2_registers(tmp_path):
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=4, num_register_tokens=4, **VIT))
    return _save(
        tmp_path, "dinov2reg", model, BitImageProcessor(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    )


def _clip_vision(tmp_path):
    return _save(
        tmp_path, "clip", CLIPVisionModel(CLIPVisionConfig(patch_size=8, **VIT)), CLIPImageProcessor()
    )


def _siglip_vision(tmp_path):
    return _save(
        tmp_path, "siglip", SiglipVisionModel(SiglipVisionConfig(patch_size=4, **VIT)), SiglipImageProcessor()
    )


def _resnet(tmp_path):
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    processor = ConvNextImageProcessor(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return _save(tmp_path, "resnet", ResNetModel(config), processor)


# name, builder, patch size (total stride for ResNet), prefix tokens dropped, feature dim
CASES = [
    ("dinov2", _dinov2, 4, 1, 16),
    ("dinov2_registers", _dinov2_registers, 4, 5, 16),
    ("clip_vision", _clip_vision, 8, 1, 16),
    ("siglip_vision", _siglip_vision, 4, 0, 16),
    ("resnet", _resnet, 8, 0, 16),  # stem stride 4, second stage stride 2
]


@pytest.mark.parametrize("name,build,patch,prefix,dim", CASES, ids=[c[0] for c in CASES])
def test_local_path_gives_patch_features(tmp_path, name, build, patch, prefix, dim):
    backbone = VisionBackbone(build(tmp_path))
    assert backbone.patch_size == patch
    assert backbone.num_prefix_tokens == prefix
    assert backbone.feature_dim == dim
    assert backbone.readout == ("feature_map" if name == "resnet" else "tokens")
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.parameters())

    images = torch.rand(2, 3, 6 * patch + 1, 4 * patch - 1, requires_grad=True)  # rounded to 6×4 patches
    features = backbone(images)
    assert features.shape == (2, 6, 4, dim)
    assert features.dtype == torch.float32 and not features.requires_grad
    assert torch.isfinite(features).all()
    maps, fallback = perceptual_map(features, (8, 8))
    assert maps.shape == (2, 8, 8) and not fallback.any()


@pytest.mark.parametrize(
    "build,model_cls",
    [(_dinov2, Dinov2Model), (_dinov2_registers, Dinov2WithRegistersModel), (_clip_vision, CLIPVisionModel)],
    ids=["dinov2", "dinov2_registers", "clip_vision"],
)
def test_prefix_tokens_are_dropped_not_patch_tokens(tmp_path, build, model_cls):
    """The features are exactly the model's last h·w tokens, in row-major order."""
    path = build(tmp_path)
    backbone = VisionBackbone(path)
    reference = model_cls.from_pretrained(path).eval()
    images = torch.rand(1, 3, 24, 16)
    pixel_values = backbone.preprocess(images)
    kwargs = {"interpolate_pos_encoding": True} if model_cls is CLIPVisionModel else {}
    with torch.no_grad():
        tokens = reference(pixel_values=pixel_values, **kwargs).last_hidden_state
    h, w = 24 // backbone.patch_size, 16 // backbone.patch_size
    assert tokens.shape[1] == backbone.num_prefix_tokens + h * w
    torch.testing.assert_close(backbone(images), tokens[:, -h * w :].reshape(1, h, w, -1))


def test_registers_count_comes_from_the_model(tmp_path):
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=4, num_register_tokens=2, **VIT))
    path = _save(tmp_path, "reg2", model, BitImageProcessor(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD))
    assert VisionBackbone(path).num_prefix_tokens == 3


def test_preprocessing_uses_the_processor_settings(tmp_path):
    backbone = VisionBackbone(_dinov2(tmp_path))
    torch.testing.assert_close(backbone.image_mean.flatten(), torch.tensor(IMAGENET_MEAN))
    images = torch.rand(2, 3, 16, 12)  # already a multiple of the patch: no resize
    expected = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(backbone.preprocess(images), expected)
    siglip = VisionBackbone(_siglip_vision(tmp_path))
    torch.testing.assert_close(siglip.preprocess(images), images * 2 - 1)
    clip = VisionBackbone(_clip_vision(tmp_path))
    torch.testing.assert_close(clip.image_std.flatten(), torch.tensor(CLIPImageProcessor().image_std))


def test_image_size_options(tmp_path):
    path = _dinov2(tmp_path)
    assert VisionBackbone(path).input_size(33, 50) == (32, 52)  # own size, nearest multiple of 4
    assert VisionBackbone(path, image_size=16).input_size(32, 48) == (16, 24)  # shorter side
    fixed = VisionBackbone(path, image_size=(20, 20))
    assert fixed(torch.rand(1, 3, 40, 64)).shape == (1, 5, 5, 16)


def test_dual_encoder_checkpoint_uses_its_vision_tower(tmp_path):
    config = CLIPConfig(
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        vision_config=dict(patch_size=8, **VIT),
        projection_dim=8,
    )
    path = _save(tmp_path, "clipfull", CLIPModel(config), CLIPImageProcessor())
    backbone = VisionBackbone(path)
    assert backbone.num_prefix_tokens == 1
    assert backbone(torch.rand(1, 3, 32, 16)).shape == (1, 4, 2, 16)


def test_train_keeps_the_backbone_frozen(tmp_path):
    backbone = VisionBackbone(_dinov2(tmp_path))
    parent = torch.nn.ModuleDict({"backbone": backbone}).train()
    assert parent.training and not backbone.model.training


def test_missing_processor_config_warns_and_uses_defaults(tmp_path):
    path = tmp_path / "noproc"
    Dinov2Model(Dinov2Config(patch_size=4, **VIT)).save_pretrained(path)
    with pytest.warns(UserWarning, match="image processor"):
        backbone = VisionBackbone(str(path))
    torch.testing.assert_close(backbone.image_mean.flatten(), torch.tensor(IMAGENET_MEAN))
    explicit = VisionBackbone(str(path), image_mean=[0.5] * 3, image_std=[0.5] * 3)
    torch.testing.assert_close(explicit.image_std.flatten(), torch.full((3,), 0.5))


# -------------------------------------------------------------------------------------- user modules


class _PatchModule(torch.nn.Module):
    """Patchify with a strided conv and return channels-last (B, h, w, D) features."""

    def __init__(self, patch=4, dim=6, channels_last=True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, dim, patch, stride=patch)
        self.channels_last = channels_last

    def forward(self, x):
        y = self.conv(x)
        return y.permute(0, 2, 3, 1) if self.channels_last else y


def test_user_module_returning_patch_features(tmp_path):
    backbone = VisionBackbone(_PatchModule(), patch_size=4)
    assert backbone.readout == "custom" and backbone.feature_dim == 6
    assert backbone.image_mean is None  # no normalization unless asked for
    assert backbone(torch.rand(3, 3, 17, 29)).shape == (3, 4, 7, 6)
    assert not backbone.model.training and not any(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize(
    "module,match",
    [
        (_PatchModule(channels_last=False), "cannot read it as patch features"),  # (B, D, h, w)
        (torch.nn.Sequential(_PatchModule(), torch.nn.Flatten(1)), "cannot read it as patch features"),
        (torch.nn.Linear(3, 3), "failed on a dummy image"),
    ],
    ids=["channels_first", "flat", "raises"],
)
def test_wrong_output_raises_at_construction(module, match):
    with pytest.raises(BackboneError, match=match) as info:
        VisionBackbone(module, patch_size=4)
    assert type(module).__name__ in str(info.value)
    assert "(B, h, w, D)" in str(info.value)


def test_non_vision_checkpoint_is_a_clear_error(tmp_path):
    from transformers import BertConfig, BertModel

    path = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(path)
    with pytest.warns(UserWarning):  # no image processor either
        with pytest.raises(BackboneError, match="bert"):
            VisionBackbone(str(path))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="Could not load the vision backbone"):
        VisionBackbone(str(tmp_path / "does-not-exist"), local_files_only=True)


def test_built_transformers_model_and_dtype(tmp_path):
    backbone = VisionBackbone(Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=4, **VIT)))
    assert backbone.num_prefix_tokens == 5  # CLS + the config's 4 registers
    torch.testing.assert_close(backbone.image_mean.flatten(), torch.tensor(IMAGENET_MEAN))
    half = VisionBackbone(_dinov2(tmp_path), dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    features = half(torch.rand(1, 3, 16, 16))
    assert features.dtype == torch.float32 and features.shape == (1, 4, 4, 16)
