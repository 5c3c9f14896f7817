"""ViPO's map hook and controls: ``map_fn`` (a user's map instead of the PCA map), ``aggregation="shuffled"`` (each
map moved to another sample) and ``aggregation="oracle"`` (the reward's own region), on images and video."""

import helpers
import pytest
import torch
from helpers import logged

from trl_visual.core.vipo import function_map, function_video_map, shuffle_maps
from trl_visual.trainer.map_functions import named_map_fn, register_map_fn
from trl_visual.trainer.vipo_config import ViPOConfig
from trl_visual.trainer.vipo_trainer import ViPOTrainer


def left_half(count: int, size: int = 8) -> torch.Tensor:
    """``(count, size, size)`` maps: 1 on the left half, 0 on the right."""
    maps = torch.zeros(count, size, size)
    maps[..., : size // 2] = 1
    return maps


def left_map_fn(images, prompts):
    """A map function giving every image the left-half map on the 8×8 latent grid of the tiny SD3."""
    return left_half(len(images))


def make_trainer(tmp_path, reward="red_channel", map_fn=None, **overrides):
    kwargs = {"map_fn": map_fn} if map_fn is not None else {}
    return helpers.make_trainer(
        tmp_path, reward, trainer_class=ViPOTrainer, trainer_kwargs=kwargs, **overrides
    )


# ------------------------------------------------------------------------------------------------------
# The functions
# ------------------------------------------------------------------------------------------------------
def test_shuffle_swaps_two_maps_and_deranges_larger_batches():
    maps = torch.stack([torch.full((2, 2), float(i)) for i in range(5)])  # map i is all i
    two = shuffle_maps(maps[:2], torch.Generator().manual_seed(0))
    assert two[:, 0, 0].tolist() == [1.0, 0.0]
    for seed in range(10):
        moved = shuffle_maps(maps, torch.Generator().manual_seed(seed))[:, 0, 0]
        assert sorted(moved.tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0]  # every map used once: the same masses
        assert (moved != torch.arange(5.0)).all()  # and none left in place
    assert torch.equal(shuffle_maps(maps[:1]), maps[:1])


def test_function_map_normalizes_a_mask_on_the_latent_grid():
    raw = left_half(2)
    maps, fallback = function_map(raw, 8)
    assert torch.equal(maps, raw) and not fallback.any()
    mean_one, _ = function_map(raw, 8, "mean_one")  # mean 1/2 → values 2 and 0
    assert mean_one[:, :, :4].eq(2).all() and mean_one[:, :, 4:].eq(0).all()
    constant, _ = function_map(torch.full((1, 4, 4), 0.3), 8)
    assert constant.eq(1).all()  # no place is preferred: all ones, GRPO's map
    nan = raw.clone()
    nan[1, 0, 0] = float("nan")
    maps, fallback = function_map(nan, 8)
    assert fallback.tolist() == [False, True] and maps[1].eq(1).all() and torch.equal(maps[0], raw[0])


def test_function_map_is_resized_bilinearly_from_the_image_size():
    """A 32×32 left-half mask onto 8×8 (antialiased bilinear, scale 4): latent column 3 (centre at pixel 13.5)
    averages pixels 10..17 with triangle weights 1 − |x − 13.5| / 4, of which 16 and 17 (weights 0.375, 0.125)
    are outside the mask: 3.5 / 4 = 0.875; column 4 mirrors it, 0.125."""
    maps, _ = function_map(left_half(1, 32), 8)
    torch.testing.assert_close(maps[0, 0, 2:6], torch.tensor([1.0, 0.875, 0.125, 0.0]))


def test_function_map_refuses_negative_values_and_wrong_shapes():
    with pytest.raises(ValueError, match="negative"):
        function_map(-left_half(1), 8)
    with pytest.raises(ValueError, match="one map per image"):
        function_map(torch.ones(2, 1, 8, 8), 8)


def test_function_video_map_follows_the_frames():
    """Two frames, the left half then all ones; two latent frames and no temporal blur keep them apart; the
    min-max over the volume leaves both as they are."""
    raw = torch.stack([left_half(1)[0], torch.ones(8, 8)])[None]  # (1, F=2, 8, 8)
    maps, fallback = function_video_map(raw, (2, 8, 8), temporal_sigma=0.0)
    assert torch.equal(maps, raw) and not fallback.any()
    mean_one, _ = function_video_map(raw, (2, 8, 8), temporal_sigma=0.0, normalization="mean_one")
    torch.testing.assert_close(mean_one, raw / 0.75)  # the volume's mean is (0.5 + 1) / 2


def test_named_map_functions():
    register_map_fn("test:left")(left_map_fn)
    assert named_map_fn("test:left") is left_map_fn
    with pytest.raises(ValueError, match="Unknown map_fn 'nope'.*test:left"):
        named_map_fn("nope")


# ------------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------------
def test_map_fn_replaces_the_backbone_on_images_and_video(tmp_path, monkeypatch):
    seen = []

    def recording(images, prompts):
        seen.append((tuple(images.shape), list(prompts)))
        return left_half(len(images))

    trainer = make_trainer(tmp_path, map_fn=recording, backbone="/nonexistent/backbone")
    assert trainer.backbone is None  # a map_fn needs no backbone: the bad path is never read
    maps, fallback = trainer.compute_maps(torch.rand(2, 3, 32, 32), ["a cat", "a dog"])
    assert torch.equal(maps, left_half(2)) and not fallback.any()
    assert seen[-1] == ((2, 3, 32, 32), ["a cat", "a dog"])
    monkeypatch.setattr(trainer, "position_grid", (2, 8, 8))
    maps, _ = trainer.compute_maps(torch.rand(2, 3, 3, 32, 32), ["a cat", "a dog"])
    assert seen[-1] == ((6, 3, 32, 32), ["a cat"] * 3 + ["a dog"] * 3)  # the frames, each with its prompt
    assert maps.shape == (2, 2, 8, 8) and torch.equal(maps[:, 0], left_half(2))


def test_map_fn_by_name_from_the_config(tmp_path):
    register_map_fn("test:left")(left_map_fn)
    trainer = helpers.make_trainer(tmp_path, trainer_class=ViPOTrainer, map_fn="test:left")
    assert trainer.map_fn is left_map_fn
    with pytest.raises(ValueError, match="Unknown map_fn"):
        helpers.make_trainer(tmp_path, trainer_class=ViPOTrainer, map_fn="nope")


def test_shuffled_maps_go_to_other_samples(tmp_path):
    def one_hot(images, prompts):  # sample i marks position (0, i)
        maps = torch.zeros(len(images), 8, 8)
        maps[torch.arange(len(images)), 0, torch.arange(len(images))] = 1
        return maps

    trainer = make_trainer(tmp_path, map_fn=one_hot, aggregation="shuffled")
    maps, _ = trainer.compute_maps(torch.rand(2, 3, 32, 32), ["a", "b"])
    assert maps[0, 0, 1] == 1 and maps[1, 0, 0] == 1 and maps.sum() == 2  # swapped


class LeftRedness:
    """The red-channel reward of the left half, which knows its region (the oracle hook)."""

    __name__ = "left_redness"

    def __call__(self, prompts, images, **kwargs):
        left = images[..., : images.shape[-1] // 2].float().mean(dim=(2, 3))
        return (left[:, 0] - 0.5 * (left[:, 1] + left[:, 2])).tolist()

    def region(self, images, prompts):
        return left_half(len(images), images.shape[-1])


def test_oracle_takes_the_rewards_region_and_trains(tmp_path):
    """Two steps with the oracle map: it is the left half (mean map 0.5 on the 8×8 grid, up to the resize's one
    blended column pair: 28/64 ones + 4 columns at 0.875/0.125 → exactly 0.5)."""
    trainer = make_trainer(tmp_path, reward=LeftRedness(), aggregation="oracle", backbone="/nonexistent")
    assert trainer.backbone is None
    trainer.train()
    assert logged(trainer, "vipo/map_mean") == pytest.approx([0.5, 0.5])
    assert logged(trainer, "vipo/map_fallbacks") == [0.0, 0.0]


def test_oracle_without_a_region_fails_before_sampling(tmp_path):
    with pytest.raises(ValueError, match="region"):
        make_trainer(tmp_path, aggregation="oracle")


def test_map_fn_refuses_a_pca_aggregation(tmp_path):
    register_map_fn("test:left")(left_map_fn)
    with pytest.raises(ValueError, match="map_fn.*aggregation='average'"):
        helpers.make_trainer(tmp_path, trainer_class=ViPOTrainer, aggregation="average", map_fn="test:left")


def test_shuffled_needs_two_samples_per_process(tmp_path, monkeypatch):
    """One sample per process (two processes make the group of two) leaves nothing to shuffle with."""
    monkeypatch.setattr(ViPOConfig, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="per_device_train_batch_size >= 2"):
        ViPOConfig(
            output_dir=str(tmp_path), aggregation="shuffled", per_device_train_batch_size=1, num_generations=2
        )


def test_config_names_the_controls(tmp_path):
    assert ViPOConfig(output_dir=str(tmp_path), aggregation="shuffled").aggregation == "shuffled"
    assert ViPOConfig(output_dir=str(tmp_path), map_fn="tiny:scenes-objects").map_fn == "tiny:scenes-objects"
