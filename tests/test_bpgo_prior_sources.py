"""BPGO's other priors (issue 24 §3): the first-frame prior of image-to-video and a prior from a separate model."""

from __future__ import annotations

import json
import weakref

import helpers
import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from trl_visual.checkpointing import METHOD_STATE_NAME
from trl_visual.state_files import load_state_file
from trl_visual.testing import tiny_sd3_pipeline, tiny_wan_i2v_pipeline
from trl_visual.trainer.bpgo_config import BPGOConfig
from trl_visual.trainer.bpgo_estimation import PriorEstimator
from trl_visual.trainer.bpgo_priors import PRIOR_CACHE_NAME, FirstFramePriors, image_key
from trl_visual.trainer.bpgo_trainer import BPGOTrainer

#: solid colours: red_channel of a still video of one is r − (g + b) / 2, whatever the resizing
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "grey": (128, 128, 128)}


def solid(colour: str, size: int = 40) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), COLOURS[colour], dtype=np.uint8))


def red_channel_of(colour: str) -> float:
    r, g, b = (c / 255 for c in COLOURS[colour])
    return r - (g + b) / 2


def video_trainer(tmp_path, dataset, model="tiny:wan-i2v", **overrides):
    """BPGO on a tiny image-to-video Wan (5 frames, 32×32), LoRA, red_channel."""
    torch.manual_seed(0)
    settings = {"num_frames": 5, "learning_rate": 3e-2, **overrides}
    return helpers.make_trainer(
        tmp_path, "red_channel", dataset, model, trainer_class=BPGOTrainer, **settings
    )


# -- the first-frame prior ---------------------------------------------------------------------------------------
def test_first_frame_priors_are_the_reward_of_each_conditioning_image(tmp_path, monkeypatch):
    """The prior of a row is red_channel of its image as a still video, worked by hand for solid colours; two rows
    with one prompt and two images get two priors; the values are cached, checkpointed and read back."""
    data = Dataset.from_dict(
        {
            "prompt": ["a cat", "a cat", "a dog", "a tree"],
            "image": [solid("red"), solid("green"), solid("grey"), solid("red")],
        }
    )
    settings = dict(
        max_steps=1,
        prior_source="first_frame",
        save_strategy="steps",
        save_steps=1,
        per_device_train_batch_size=16,
    )
    trainer = video_trainer(tmp_path, data, **settings)
    trainer.train()
    values = trainer.prior_store.values
    expected = {
        image_key(p, solid(c)): red_channel_of(c)
        for p, c in [("a cat", "red"), ("a cat", "green"), ("a dog", "grey"), ("a tree", "red")]
    }
    assert set(values) == set(expected)
    for key, value in expected.items():
        assert values[key] == pytest.approx(value, abs=1e-5)
    # the batch (all four rows, one group each) was compared with those priors
    assert helpers.logged(trainer, "bpgo/prior_mean")[0] == pytest.approx(
        sum(expected.values()) / 4, abs=1e-5
    )
    with open(tmp_path / "out" / PRIOR_CACHE_NAME) as f:
        cache = json.load(f)
    assert cache["priors"] == values and cache["fingerprint"]["prior"] == "first_frame"
    assert (
        load_state_file(tmp_path / "out" / "checkpoint-1" / METHOD_STATE_NAME)["estimated_priors"] == values
    )

    def no_scoring(*args, **kwargs):
        raise AssertionError("the first-frame priors were computed again")

    monkeypatch.setattr(PriorEstimator, "first_frame_rewards", no_scoring)
    restarted = video_trainer(tmp_path, data, **settings)  # a restart in the same output_dir reads the cache
    restarted.train()
    assert restarted.prior_store.values == values


def test_first_frame_priors_feed_the_consistency_factor_with_zero_variance(tmp_path):
    """One deterministic evaluation per row: v_i = 0, so z_i = (R̄_i − m_i) / (s_i / √G)."""
    data = Dataset.from_dict({"prompt": ["a cat", "a dog"], "image": [solid("red"), solid("grey")]})
    trainer = video_trainer(
        tmp_path,
        data,
        max_steps=1,
        prior_source="first_frame",
        ras_mode="uncertainty",
        ras_consistency=True,
    )
    trainer.train()
    store = trainer.prior_store
    assert isinstance(store, FirstFramePriors)
    assert store.variances(["a cat"], [{}], torch.zeros(1)).tolist() == [0.0]
    assert torch.isfinite(torch.tensor(helpers.logged(trainer, "bpgo/ras_weight_mean"))).all()


def test_first_frame_prior_needs_an_image_to_video_pipeline(tmp_path):
    trainer = helpers.make_trainer(tmp_path, trainer_class=BPGOTrainer, prior_source="first_frame")
    with pytest.raises(
        ValueError, match="StableDiffusion3Pipeline takes no conditioning image.*image-to-video"
    ):
        trainer.train()
    assert trainer.state.global_step == 0


def unloadable(tmp_path, dataset, **overrides):
    """BPGO on a model that cannot be loaded: the error must come before any loading."""
    return BPGOTrainer(
        model="no-such-user/no-such-model",
        reward_funcs="red_channel",
        args=helpers.make_config(tmp_path, BPGOConfig, **overrides),
        train_dataset=dataset,
    )


def test_first_frame_prior_needs_a_finite_dataset(tmp_path):
    streaming = Dataset.from_dict({"prompt": ["a cat"], "image": [solid("red")]}).to_iterable_dataset()
    with pytest.raises(ValueError, match="prior_source='first_frame'.*map-style Dataset"):
        unloadable(tmp_path, streaming, prior_source="first_frame")


# -- a prior from a separate model -------------------------------------------------------------------------------
def test_a_separate_prior_model_gives_that_models_base_priors(tmp_path):
    """Training tiny:sd3 (seed 0) with the priors of a saved SFT-like model (seed 1): the priors are exactly what
    that model's own base-model estimate gives from the same seeds, and not the trained model's."""
    sft = tmp_path / "sft"
    tiny_sd3_pipeline(seed=1).save_pretrained(sft)
    data = Dataset.from_dict({"prompt": helpers.PROMPTS})
    with_prior_model = helpers.make_trainer(
        tmp_path / "a",
        dataset=data,
        trainer_class=BPGOTrainer,
        prior_source="base_model",
        prior_model_name_or_path=str(sft),
    )
    from_sft = helpers.make_trainer(tmp_path / "b", dataset=data, model=str(sft), trainer_class=BPGOTrainer)
    own = helpers.make_trainer(tmp_path / "c", dataset=data, trainer_class=BPGOTrainer)
    priors = with_prior_model.estimate_priors(data, num_rollouts=2)["prior"]
    assert priors == pytest.approx(from_sft.estimate_priors(data, num_rollouts=2)["prior"], abs=1e-6)
    assert max(abs(a - b) for a, b in zip(priors, own.estimate_priors(data, num_rollouts=2)["prior"])) > 1e-3


def test_the_prior_model_is_freed_when_its_sampling_ends(tmp_path, monkeypatch):
    """Leaving ``prior_sampler()`` frees the prior model's pipeline at once (and the accelerator's cache), even
    while the caller still holds the sampling function, so it never sits beside the policy in training."""
    trainer = helpers.make_trainer(
        tmp_path, trainer_class=BPGOTrainer, prior_source="base_model", prior_model_name_or_path="tiny:sd3"
    )
    loaded = []
    load = PriorEstimator._load_prior_model
    monkeypatch.setattr(
        PriorEstimator, "_load_prior_model", lambda self: loaded.append(load(self)) or loaded[-1]
    )
    with trainer.prior_estimator.prior_sampler() as sample:
        prior_denoiser = weakref.ref(loaded.pop().denoiser)
        assert prior_denoiser() is not None
    assert callable(sample) and prior_denoiser() is None


def test_a_prior_model_is_estimated_once_cached_under_its_name(tmp_path, monkeypatch):
    """On image-to-video (the rows' images condition the prior model's rollouts too): estimated when training
    starts, cached with the prior model in the fingerprint; a restart reads the cache, and a run without the
    prior model in the same output_dir estimates again."""
    data = Dataset.from_dict({"prompt": ["a cat", "a dog"], "image": [solid("red"), solid("grey")]})

    def run(**prior_model):
        """One step of tiny:wan-i2v (seed 1) with base-model priors, in the same output_dir each time."""
        trainer = video_trainer(
            tmp_path,
            data,
            model=tiny_wan_i2v_pipeline(seed=1),
            max_steps=1,
            prior_source="base_model",
            prior_num_rollouts=2,
            **prior_model,
        )
        trainer.train()
        return trainer

    first = run(prior_model_name_or_path="tiny:wan-i2v")
    with open(tmp_path / "out" / PRIOR_CACHE_NAME) as f:
        cache = json.load(f)
    assert cache["fingerprint"]["prior_model"][0] == "tiny:wan-i2v"
    assert cache["priors"] == first.prior_store.values and set(cache["priors"]) == {"a cat", "a dog"}

    asked = []
    original = PriorEstimator.prompt_means

    def counting(self, *args, **kwargs):
        asked.append(self.args.prior_model_name_or_path)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PriorEstimator, "prompt_means", counting)
    again = run(prior_model_name_or_path="tiny:wan-i2v")
    assert asked == [] and again.prior_store.values == first.prior_store.values
    own = run()
    assert asked == [None] and own.prior_store.values != first.prior_store.values


def test_prior_model_is_refused_without_the_base_model_source(tmp_path):
    with pytest.raises(
        ValueError, match="`prior_model_name_or_path`.*prior_source='ema'.*set `prior_source='base_model'`"
    ):
        helpers.make_config(tmp_path, BPGOConfig, prior_model_name_or_path="tiny:sd3")
    with pytest.raises(ValueError, match="`prior_model_name_or_path` is empty"):
        helpers.make_config(tmp_path, BPGOConfig, prior_source="base_model", prior_model_name_or_path=" ")


def test_a_missing_prior_model_is_named_before_the_pipeline_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception, match="`prior_model_name_or_path` 'no-such-user/no-such-sft'.*local path"):
        unloadable(
            tmp_path,
            Dataset.from_dict({"prompt": ["a cat"]}),
            prior_source="base_model",
            prior_model_name_or_path="no-such-user/no-such-sft",
        )
