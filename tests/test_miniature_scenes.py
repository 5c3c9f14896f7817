"""The structured miniature world: scenes over horizons, stripes and tiles, the structure measure (edge-map
correlation), the object-region oracle map, ``tiny:scenes`` and its backbone."""

import random

import pytest
import torch

from trl_visual.miniature.scenes import (
    BACKGROUND,
    GROUND,
    SKY,
    STRIPE_TONES,
    TILE_TONES,
    Scene,
    StructuredScene,
    random_scene,
    render_background,
    render_batch,
    render_scene,
)
from trl_visual.miniature.structure import edge_correlation, edge_map, object_region, pearson


def test_backgrounds_are_drawn_as_specified():
    horizon = render_background("horizon", 14)
    assert torch.equal(horizon[:, 13, 0], torch.tensor(SKY)) and torch.equal(
        horizon[:, 14, 31], torch.tensor(GROUND)
    )
    stripes = render_background(
        "stripes", 2
    )  # column c has tone ⌊(c + 2) / 4⌋ mod 2: columns 0, 1 → 0; 2..5 → 1
    assert torch.equal(stripes[:, 5, 1], torch.tensor(STRIPE_TONES[0]))
    assert torch.equal(stripes[:, 5, 2], torch.tensor(STRIPE_TONES[1])) and torch.equal(
        stripes[:, 9, 5], stripes[:, 0, 2]
    )
    tiles = render_background("tiles", 0)  # 8-pixel checkerboard
    assert torch.equal(tiles[:, 0, 0], torch.tensor(TILE_TONES[0])) and torch.equal(
        tiles[:, 0, 8], torch.tensor(TILE_TONES[1])
    )
    assert torch.equal(tiles[:, 8, 8], torch.tensor(TILE_TONES[0]))
    with pytest.raises(ValueError, match="background must be one of"):
        render_background("clouds", 0)


def test_structured_scene_paints_the_shape_over_its_background():
    shape = Scene("red", "square", "big", "left")
    scene = StructuredScene(shape, "horizon", 16)
    image = render_scene(scene)
    assert torch.allclose(image[:, 16, 9], torch.tensor((0.9, 0.15, 0.15)))  # the square's centre
    assert torch.equal(image[:, 2, 28], torch.tensor(SKY)) and torch.equal(
        image[:, 30, 28], torch.tensor(GROUND)
    )
    assert scene.caption() == shape.caption() == "a big red square on the left"  # the background is not named


def test_one_shape_scenes_of_tiny_shapes_are_unchanged():
    """Without backgrounds a seed draws the same scenes and pixels as before: the plain background, and the
    random numbers drawn in the same order (the structured scene draws its background after the shape)."""
    images, scenes = render_batch(8, torch.Generator().manual_seed(3), random.Random(3))
    assert all(isinstance(s, Scene) for s in scenes)
    assert torch.equal(images[:, :, 0, 0], torch.tensor(BACKGROUND).expand(8, 3))
    structured = [random_scene(random.Random(3), backgrounds=True) for _ in range(1)][0]
    assert structured.scene == random_scene(random.Random(3))


def test_edge_map_of_a_step_by_hand():
    """A vertical step from 0 to 1 between columns 1 and 2 of a one-channel image: the Sobel x-response is
    1 + 2 + 1 = 4 on the two columns beside the step, 0 elsewhere (the y-response is 0)."""
    image = torch.zeros(1, 1, 4, 4)
    image[..., 2:] = 1
    edges = edge_map(image)[0]
    assert edges[:, 1:3].eq(4).all() and edges[:, 0].eq(0).all() and edges[:, 3].eq(0).all()
    rgb = image.expand(1, 3, 4, 4)  # three equal channels: sqrt(3 · 4²)
    torch.testing.assert_close(edge_map(rgb)[0, 0, 1], torch.tensor(4 * 3**0.5))


def test_edge_correlation_keeps_tints_and_loses_moved_structure():
    image = render_scene(StructuredScene(Scene("blue", "circle", "big", "right"), "tiles", 0))[None]
    assert edge_correlation(image, image).item() == pytest.approx(1.0)
    tinted = 0.5 * image + torch.tensor([0.4, 0.0, 0.0]).view(1, 3, 1, 1)  # redder, lower contrast
    assert edge_correlation(tinted, image).item() == pytest.approx(1.0, abs=1e-6)
    flat = torch.full_like(image, 0.3)  # no structure left
    assert edge_correlation(flat, image).item() == 0.0
    moved = render_scene(StructuredScene(Scene("blue", "circle", "big", "right"), "tiles", 4))[None]
    assert edge_correlation(moved, image).item() < 0.5


def test_pearson_by_hand():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert pearson(a, torch.tensor([[2.0, 4.0, 6.0]])).item() == pytest.approx(1.0)
    assert pearson(a, torch.tensor([[3.0, 2.0, 1.0]])).item() == pytest.approx(-1.0)
    assert pearson(a, torch.tensor([[1.0, 0.0, 1.0]])).item() == pytest.approx(0.0)


def test_object_region_is_the_disc_of_the_named_position():
    images = torch.zeros(3, 3, 32, 32)
    regions = object_region(
        images, ["a small red circle on the left", "a big square at the top", "a red shape"]
    )
    assert regions[0, 16, 9] == 1 and regions[0, 16, 23] == 0  # centre (16, 9), radius 5 + 2 + 1 = 8
    assert regions[0, 16, 1] == 1 and regions[0, 16, 0] == 0  # pixel centre 0.5 is 8.5 away, 1.5 is 7.5
    assert regions[1, 9, 16] == 1 and regions[1, 9 + 12, 16] == 0  # radius 9 + 2 + 1 = 12: (21.5 − 9) > 12
    assert regions[2].eq(1).all()  # no position named: anywhere


# ------------------------------------------------------------------------------------------------------
# tiny:scenes, its classifier and its backbone (the shipped weights)
# ------------------------------------------------------------------------------------------------------
def test_scenes_classifier_reads_shapes_over_every_background():
    from trl_visual.miniature.evaluate import classifier_accuracy
    from trl_visual.miniature.reward import ScenesAdherence

    accuracy = classifier_accuracy(ScenesAdherence().classifier, num_scenes=192, seed=779, backgrounds=True)
    assert min(accuracy.values()) >= 0.9, accuracy


def test_tiny_scenes_draws_the_shape_over_a_structured_background():
    """Samples of ``tiny:scenes`` follow their prompts (``scenes_adherence``) and carry background structure: their
    edges outside the shape's disc are several times those of ``tiny:shapes``' plain backgrounds."""
    from trl_visual.miniature.evaluate import sample
    from trl_visual.miniature.reward import ScenesAdherence
    from trl_visual.miniature.scenes import full_prompts
    from trl_visual.testing import load_tiny_pipeline

    prompts = full_prompts()[::4]
    edges = {}
    for name in ("tiny:scenes", "tiny:shapes"):
        pipeline = load_tiny_pipeline(name)
        pipeline.set_progress_bar_config(disable=True)
        images = sample(pipeline, prompts, guidance_scale=1.0, num_inference_steps=4)
        outside = 1 - object_region(images, prompts)
        edges[name] = float((edge_map(images) * outside).sum() / outside.sum())
        if name == "tiny:scenes":
            adherence = sum(ScenesAdherence()(prompts, images)) / len(prompts)
    assert adherence >= 0.45, adherence  # 0.53 measured (shape is the hard attribute at CFG 1)
    assert edges["tiny:scenes"] > 3 * edges["tiny:shapes"], edges


def test_scenes_backbone_sees_the_background_the_classifier_ignores():
    """Two scenes that differ only in their background (a horizon at row 12 or 20): the ``tiny:scenes-features``
    grid changes far more, relative to its size, than the classifier features of ``tiny:shapes-features``."""
    from trl_visual.named_backbones import named_backbone

    shape = Scene("green", "circle", "big", "left")
    images = torch.stack([render_scene(StructuredScene(shape, "horizon", row)) for row in (12, 20)])
    change = {}
    for name in ("tiny:scenes-features", "tiny:shapes-features"):
        features = named_backbone(name)(images)
        change[name] = float((features[0] - features[1]).norm() / features[0].norm())
    assert named_backbone("tiny:scenes-features")(images).shape == (2, 8, 8, 32)
    assert change["tiny:scenes-features"] > 1.5 * change["tiny:shapes-features"], change


def test_cli_gives_tiny_scenes_its_reward_and_backbone():
    from trl_visual.cli import parse_args

    _, script, config, _ = parse_args(["vipo", "--model_name_or_path", "tiny:scenes"])
    assert script.reward_funcs == ["scenes_adherence"] and script.dataset_name == "builtin:shapes"
    assert (config.backbone, config.output_dir) == ("tiny:scenes-features", "tiny-scenes-vipo")
