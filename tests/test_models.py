"""FLUX, Wan text-to-video and Wan image-to-video adapters, end to end on the tiny offline pipelines.

For each family: the adapter's own sampling reproduces the diffusers pipeline, a saved pipeline reloads
identically, the on-policy ratio is exactly one, GRPO raises a reward and the saved LoRA reloads into a fresh
pipeline with identical outputs, and BPGO/ViPO run a step. Image-to-video also checks its image column.
"""

from __future__ import annotations

import os

import helpers
import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import WanPipeline
from helpers import CHECKPOINTING, PROMPTS, TARGETS, RecordingTrainer, logged
from peft import LoraConfig
from PIL import Image

from trl_visual import DiffusionGRPOTrainer
from trl_visual.models import FluxAdapter, WanAdapter, WanImageToVideoAdapter, get_adapter
from trl_visual.testing import (
    load_tiny_pipeline,
    tiny_wan_i2v_two_experts_pipeline,
    tiny_wan_two_experts_pipeline,
)

MODELS = ["flux", "wan", "wan-i2v"]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (128, 128, 128)]
#: FLUX.1-dev's distilled guidance; Wan trains without CFG here (on-policy tests also run it with CFG)
GUIDANCE = {"flux": 3.5, "wan": 1.0, "wan-i2v": 1.0}


def images(size: int = 40) -> list[Image.Image]:
    """Conditioning images of another size than the videos (the adapter resizes them)."""
    rng = np.random.RandomState(0)
    noise = [(rng.rand(size, size, 3) * 60).astype(np.uint8) for _ in COLOURS]
    return [
        Image.fromarray(np.clip(np.array(c, np.uint8) + n, 0, 255).astype(np.uint8))
        for c, n in zip(COLOURS, noise)
    ]


def dataset(model: str, **extra) -> Dataset:
    data = {"prompt": PROMPTS, **extra}
    if model == "wan-i2v" and "image" not in extra:
        data["image"] = images()
    return Dataset.from_dict(data)


def family_run(model: str, **overrides) -> dict:
    """The shared tiny run's settings for ``tiny:<model>``: 5 frames for video, the family's own guidance."""
    return {"num_frames": 5, "guidance_scale": GUIDANCE[model], **overrides}


def make_config(tmp_path, model, config_class=None, **overrides):
    return helpers.make_config(tmp_path, config_class, **family_run(model, **overrides))


def make_trainer(
    tmp_path, model, reward="red_channel", trainer_class=DiffusionGRPOTrainer, data=None, **overrides
):
    """:func:`make_config`'s run on ``tiny:<model>`` over :func:`dataset` (or ``data``)."""
    extra = {"backbone": overrides.pop("backbone")} if "backbone" in overrides else {}
    return helpers.make_trainer(
        tmp_path,
        reward,
        data if data is not None else dataset(model),
        f"tiny:{model}",
        trainer_class=trainer_class,
        trainer_kwargs=extra,
        **family_run(model, **overrides),
    )


def generate(pipeline, model: str, seed: int = 3) -> torch.Tensor:
    """The pipeline's own sampling (``__call__``), deterministic, as a float tensor."""
    kwargs = dict(
        height=32,
        width=32,
        num_inference_steps=4,
        output_type="pt",
        generator=torch.Generator().manual_seed(seed),
    )
    if model == "flux":
        return pipeline("a red car", guidance_scale=3.5, max_sequence_length=16, **kwargs).images
    # WanImageToVideoPipeline.encode_prompt needs ftfy; the embeddings are the same as WanPipeline's
    prompt_embeds = WanPipeline._get_t5_prompt_embeds(pipeline, ["a red car"], max_sequence_length=16)
    kwargs.update(prompt_embeds=prompt_embeds, num_frames=5, guidance_scale=1.0)
    if model == "wan-i2v":
        kwargs["image"] = images()[0]
    return pipeline(**kwargs).frames


# -- adapters follow their pipelines ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, adapter_class",
    [("flux", FluxAdapter), ("wan", WanAdapter), ("wan-i2v", WanImageToVideoAdapter)],
)
def test_adapter_sampling_reproduces_the_pipeline(model, adapter_class):
    """Euler sampling through the adapter (its noise, schedule, velocity with guidance or CFG, conditioning
    and decoding) gives the pipeline's own output from the same generator."""
    pipeline = load_tiny_pipeline(f"tiny:{model}")
    adapter = get_adapter(pipeline)
    assert type(adapter) is adapter_class
    shape = adapter.latent_shape(32, 32, 5)
    guidance = 3.5 if model == "flux" else 5.0
    embeds = adapter.encode_prompts(["a red car"], 16)
    if model == "wan-i2v":
        embeds.update(adapter.encode_conditioning([{"image": images()[0]}]))
    negative = None if model == "flux" else adapter.encode_prompts([""], 16)
    ours = euler_sample(adapter, embeds, 4, shape, negative, guidance)
    if model == "flux":
        reference = pipeline(
            "a red car", height=32, width=32, num_inference_steps=4, guidance_scale=guidance,
            max_sequence_length=16, output_type="pt", generator=torch.Generator().manual_seed(3),
        ).images  # fmt: skip
    else:
        kwargs = dict(
            prompt_embeds=WanPipeline._get_t5_prompt_embeds(pipeline, ["a red car"], max_sequence_length=16),
            negative_prompt_embeds=WanPipeline._get_t5_prompt_embeds(pipeline, [""], max_sequence_length=16),
            height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=guidance,
            output_type="pt", generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
        if model == "wan-i2v":
            kwargs["image"] = images()[0]
        reference = pipeline(**kwargs).frames
    assert ours.shape == reference.shape == ((1, 3, 32, 32) if model == "flux" else (1, 5, 3, 32, 32))
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=0)


def euler_sample(
    adapter, embeds, num_steps: int, shape, negative=None, guidance: float = 1.0
) -> torch.Tensor:
    """Deterministic Euler sampling through the adapter from seed 3 (the pipelines' own sampler), decoded."""
    sigmas = adapter.sigmas(num_steps, shape)
    latents = adapter.prepare_noise(1, shape, torch.Generator().manual_seed(3))
    with torch.no_grad():
        for i in range(num_steps):
            velocity = adapter.velocity(
                adapter.denoiser, latents, sigmas[i].expand(1), embeds, negative, guidance
            )
            latents = latents + (sigmas[i + 1] - sigmas[i]) * velocity
    return adapter.decode(latents)


def test_two_expert_wan_routes_like_the_pipeline():
    """Wan2.2 A14B: the adapter's sampling (``transformer`` while σ ≥ boundary_ratio, ``transformer_2`` below)
    gives the pipeline's own output, and differs from sampling with the first expert alone."""
    pipeline = tiny_wan_two_experts_pipeline()
    adapter = get_adapter(pipeline)
    shape = adapter.latent_shape(32, 32, 5)
    sigmas = adapter.sigmas(8, shape)
    # σ = 1, 0.947, 0.883, 0.801, …: the first three steps are the high-noise expert's
    assert adapter.trains_at(sigmas[:-1]).tolist() == [True] * 3 + [False] * 5
    embeds = adapter.encode_prompts(["a red car"], 16)

    reference = pipeline(
        prompt_embeds=embeds["prompt_embeds"], height=32, width=32, num_frames=5, num_inference_steps=8,
        guidance_scale=1.0, output_type="pt", generator=torch.Generator().manual_seed(3),
    ).frames  # fmt: skip
    ours = euler_sample(adapter, embeds, 8, shape)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=0)
    one_expert = euler_sample(get_adapter(load_tiny_pipeline("tiny:wan")), embeds, 8, shape)
    assert (ours - one_expert).abs().max() > 1e-3


def test_wan22_image_to_video_reproduces_the_pipeline():
    """Wan2.2 A14B image-to-video: no CLIP image states (the transformer has no ``image_dim``), the image only
    through the first-frame condition, two experts; the adapter's sampling gives the pipeline's output."""
    pipeline = tiny_wan_i2v_two_experts_pipeline()
    adapter = get_adapter(pipeline)
    shape = adapter.latent_shape(32, 32, 5)
    embeds = adapter.encode_prompts(["a red car"], 16)
    embeds.update(adapter.encode_conditioning([{"image": images()[0]}]))
    assert "image_embeds" not in embeds
    assert adapter.trains_at(adapter.sigmas(8, shape)[:-1]).sum() == 2  # σ = 1, 0.947 ≥ 0.9
    reference = pipeline(
        image=images()[0], prompt_embeds=embeds["prompt_embeds"], height=32, width=32, num_frames=5,
        num_inference_steps=8, guidance_scale=1.0, output_type="pt", generator=torch.Generator().manual_seed(3),
    ).frames  # fmt: skip
    torch.testing.assert_close(euler_sample(adapter, embeds, 8, shape), reference, atol=2e-5, rtol=0)


class TrainedStepsTrainer(DiffusionGRPOTrainer):
    """Records the σ of every transition that reaches the policy loss."""

    trained_sigmas: list[float] = []

    def _make_rollouts(self, inputs):
        rollouts = super()._make_rollouts(inputs)
        self.trained_sigmas = self.trained_sigmas + rollouts.sigmas[rollouts.train_steps].flatten().tolist()
        return rollouts


@pytest.mark.parametrize(
    "model, pipeline, boundary, per_sample",
    # high-noise steps: σ = 1, 0.947, 0.883 ≥ 0.875 (text-to-video), σ = 1, 0.947 ≥ 0.9 (image-to-video);
    # round(0.6 × 3) = 2 and round(0.6 × 2) = 1 of them are trained per sample
    [
        ("wan", tiny_wan_two_experts_pipeline, 0.875, 2),
        ("wan-i2v", tiny_wan_i2v_two_experts_pipeline, 0.9, 1),
    ],
)
def test_two_expert_wan_trains_only_where_the_trained_expert_predicts(
    tmp_path, model, pipeline, boundary, per_sample
):
    """Every step stochastic, DanceGRPO's random selection: only σ ≥ boundary_ratio transitions are trained
    (the frozen expert's would cost a backward pass and train nothing), and the LoRA learns."""
    args = make_config(
        tmp_path, model, num_inference_steps=8, timestep_fraction=0.6, timestep_selection="random", max_steps=2,
        learning_rate=1e-2,
    )  # fmt: skip
    trainer = TrainedStepsTrainer(
        model=pipeline(),
        reward_funcs="red_channel",
        args=args,
        train_dataset=dataset(model),
        peft_config=LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS),
    )
    trainer.train()
    assert len(trainer.trained_sigmas) == 2 * 8 * per_sample  # 2 steps × 8 samples
    assert min(trainer.trained_sigmas) >= boundary
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_two_expert_wan_refuses_a_window_of_frozen_steps(tmp_path):
    args = make_config(tmp_path, "wan", num_inference_steps=8, sde_window_size=2, sde_window_range=[2, 5])
    with pytest.raises(ValueError) as error:
        DiffusionGRPOTrainer(
            model=tiny_wan_two_experts_pipeline(),
            reward_funcs="red_channel",
            args=args,
            train_dataset=dataset("wan"),
        )
    message = str(error.value)
    assert "predicts only at sampling steps [0, 1, 2]" in message
    assert "The stochastic steps [3, 4] (sde_window_size=2, sde_window_range=[2, 5])" in message
    assert "Set `sde_window_range` to [0, 3]" in message


def test_flux_packing_and_position_grid():
    adapter = get_adapter(load_tiny_pipeline("tiny:flux"))
    assert adapter.latent_shape(32, 48) == (4 * 6, 16)  # 8×12 latent → 4×6 tokens of 2×2×4 values
    latents = torch.randn(2, 4, 8, 12)
    packed = adapter.pack(latents)
    torch.testing.assert_close(adapter.unpack(packed), latents)
    grid = adapter.to_position_grid(packed)
    assert grid.shape == (2, 16, 4, 6)
    torch.testing.assert_close(grid[:, 0::4, 1, 2], latents[:, :, 2, 4])  # token values: (channel, 2, 2)
    with pytest.raises(ValueError, match="multiples of 8 for FLUX"):
        adapter.latent_shape(36, 32)


def test_flux_guidance_goes_to_the_embedding_not_to_cfg(tmp_path):
    """FLUX.1-dev's guidance_scale is the distilled embedding: one forward per step, no unconditional pass,
    and the value changes the velocity."""
    trainer = make_trainer(tmp_path, "flux", guidance_scale=3.5)
    calls = []
    trainer.model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["guidance"].tolist()), with_kwargs=True
    )
    trainer.sample(["a cat"] * 4, torch.zeros(4, dtype=torch.long), seed=0)
    assert calls == [[3.5] * 4] * 4
    adapter, embeds = trainer.adapter, trainer.adapter.encode_prompts(["a cat"], 16)
    latents, sigma = torch.randn(1, *trainer.latent_shape), torch.tensor([0.7])
    with torch.no_grad():
        low = adapter.velocity(trainer.model, latents, sigma, embeds, None, 1.0)
        high = adapter.velocity(trainer.model, latents, sigma, embeds, None, 3.5)
    assert (low - high).abs().max() > 1e-6


def test_wan_sizes_are_checked_with_a_fix():
    adapter = get_adapter(load_tiny_pipeline("tiny:wan"))
    assert adapter.latent_shape(32, 48, 9) == (4, 3, 4, 6)
    with pytest.raises(ValueError, match=r"num_frames − 1 to be a multiple of 4; got 8\. Use 5 or 9"):
        adapter.latent_shape(32, 32, 8)
    with pytest.raises(ValueError, match="multiples of 16×16"):
        adapter.latent_shape(40, 32, 5)


@pytest.mark.parametrize("model", MODELS)
def test_save_and_reload_gives_identical_outputs(tmp_path, model):
    pipeline = load_tiny_pipeline(f"tiny:{model}")
    pipeline.save_pretrained(tmp_path / "pipe")
    reloaded = type(pipeline).from_pretrained(tmp_path / "pipe")
    # equal up to float32 rounding: CPU matmuls may sum in another order for differently aligned weights
    torch.testing.assert_close(generate(reloaded, model), generate(pipeline, model), atol=1e-5, rtol=0)


# -- the training loop on each family ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, guidance_scale", [("flux", 3.5), ("wan", 1.0), ("wan", 4.5), ("wan-i2v", 4.5)]
)
def test_on_policy_ratio_is_one(tmp_path, model, guidance_scale):
    """Learning rate 0: recomputed log-probs equal the stored ones and nothing is clipped (Wan with and without
    CFG in training; FLUX with its guidance embedding; image-to-video with CFG over its conditioning)."""
    trainer = make_trainer(
        tmp_path, model, trainer_class=RecordingTrainer, learning_rate=0.0, guidance_scale=guidance_scale
    )
    trainer.train()
    assert logged(trainer, "clip_ratio") == [0.0, 0.0]
    assert trainer.log_probs_match(), (trainer.max_log_prob_gap, trainer.max_log_prob)


# Per model: (steps, learning rate, margin between the means of the last and first quarter of the run).
# Measured with these settings (num_generations 8, batch 32, 4 inference steps, LoRA r 8, red_channel, the test's
# seeding), seeds 0, 1, 2:
# - FLUX: at learning rate 0 it moves by 0.0001; at 3e-2 it gains 0.024 and 0.013 in 20 steps (seeds 0, 1).
# - Wan text-to-video, 40 steps at 2e-2: gains 0.035, 0.036, 0.029; at learning rate 0: 0.0011, −0.0001, 0.0011.
# - Wan image-to-video, same: gains 0.022, 0.014, 0.030; at learning rate 0: 0.0010, −0.0005, 0.0011.
# Each margin is at least 4× the noise and at most a third of the smallest gain.
TRAINING = {"flux": (20, 3e-2, 0.004), "wan": (40, 2e-2, 0.005), "wan-i2v": (40, 2e-2, 0.005)}


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_grpo_raises_the_reward_and_the_lora_reloads(tmp_path, model):
    """A short LoRA GRPO run on red_channel raises the reward; the saved LoRA, loaded with
    ``load_lora_weights`` into a fresh pipeline, reproduces the trained pipeline (margins: see TRAINING)."""
    steps, learning_rate, margin = TRAINING[model]
    trainer = make_trainer(
        tmp_path,
        model,
        num_generations=8,
        per_device_train_batch_size=32,
        learning_rate=learning_rate,
        max_steps=steps,
        seed=0,
    )
    trainer.train()
    rewards = logged(trainer, "reward")
    window = steps // 4
    assert len(rewards) == steps
    gain = sum(rewards[-window:]) / window - sum(rewards[:window]) / window

    trainer.save_model(str(tmp_path / "final"))
    assert os.path.exists(tmp_path / "final" / "pytorch_lora_weights.safetensors")
    fresh = load_tiny_pipeline(f"tiny:{model}")
    untrained = generate(fresh, model)
    fresh.load_lora_weights(str(tmp_path / "final"))
    trained = generate(trainer.pipeline, model)
    assert (trained - untrained).abs().max() > 1e-4  # training changed the model
    torch.testing.assert_close(generate(fresh, model), trained, atol=1e-6, rtol=0)
    assert gain > margin, f"reward gain {gain:.5f} is not above {margin}"


@pytest.mark.parametrize("model", MODELS)
def test_gradient_checkpointing_trains(tmp_path, model):
    trainer = make_trainer(tmp_path, model, **CHECKPOINTING, learning_rate=3e-2, max_steps=1)
    assert trainer.model.is_gradient_checkpointing
    trainer.train()
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_vae_tiling_and_slicing_reach_the_decoder(tmp_path):
    """``vae_tiling``/``vae_slicing`` switch on the pipeline VAE's own memory options, and training decodes
    through them (tiles made smaller than the tiny videos so the tiled path really runs)."""
    trainer = make_trainer(tmp_path, "wan", vae_tiling=True, vae_slicing=True, max_steps=1)
    vae = trainer.pipeline.vae
    assert vae.use_tiling and vae.use_slicing
    vae.enable_tiling(16, 16, 8, 8)
    tiled_calls = []
    tiled_decode = vae.tiled_decode

    def counting_tiled_decode(latents, *args, **kwargs):
        tiled_calls.append(latents.shape[0])
        return tiled_decode(latents, *args, **kwargs)

    vae.tiled_decode = counting_tiled_decode
    trainer.train()
    # slicing hands the tiled decoder one video at a time: 8 videos in the step's batch
    assert tiled_calls == [1] * 8
    assert np.isfinite(logged(trainer, "reward")).all()

    untouched = make_trainer(tmp_path, "wan")
    assert not untouched.pipeline.vae.use_tiling and not untouched.pipeline.vae.use_slicing


def test_vae_slicing_without_support_is_reported(tmp_path, monkeypatch, caplog):
    from diffusers.models.autoencoders.vae import AutoencoderMixin

    monkeypatch.delattr(AutoencoderMixin, "enable_slicing")
    with caplog.at_level("WARNING", logger="trl_visual.trainer.diffusion_grpo_trainer"):
        trainer = make_trainer(tmp_path, "wan", vae_slicing=True)
    assert (
        "vae_slicing=True has no effect: the pipeline's VAE (AutoencoderKLWan) has no enable_slicing()"
        in caplog.text
    )
    assert not trainer.pipeline.vae.use_slicing


def test_video_samples_are_logged_as_a_gif(tmp_path):
    trainer = make_trainer(tmp_path, "wan", log_images=True, num_images_to_log=4, max_steps=1)
    trainer.train()
    assert os.listdir(tmp_path / "out" / "samples") == ["step_000001.gif"]
    with Image.open(tmp_path / "out" / "samples" / "step_000001.gif") as gif:
        assert gif.n_frames == 5


# -- image-to-video: the image column ------------------------------------------------------------------------


def test_i2v_missing_image_column_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"needs the column\(s\) \['image'\].*its columns: \['prompt'\]"):
        make_trainer(tmp_path, "wan-i2v", data=Dataset.from_dict({"prompt": PROMPTS}))
    with pytest.raises(ValueError, match=r"needs the column\(s\) \['frame0'\].*\['prompt', 'image'\]"):
        make_trainer(tmp_path, "wan-i2v", image_column="frame0")


def test_i2v_conditioning_image_reaches_the_reward_and_the_video(tmp_path):
    """Rewards get ``images_in`` (the images the model was conditioned on, resized to the video size) and the
    dataset column by name; the image reaches the model (another image, another video); paths work."""
    column = "frame0"
    seen = {}

    def reward(prompts, videos, images_in, **columns):
        seen.update(prompts=list(prompts), images_in=images_in, column=list(columns[column]))
        return videos[:, :, 0].mean(dim=(1, 2, 3)).tolist()

    paths = []
    for i, image in enumerate(images()):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    data = Dataset.from_dict({"prompt": PROMPTS, column: paths})
    trainer = make_trainer(tmp_path, "wan-i2v", reward=reward, data=data, max_steps=1, image_column=column)
    trainer.train()
    assert seen["images_in"].shape == (8, 3, 32, 32)
    mean_colour = {
        PROMPTS[i]: np.asarray(image).reshape(-1, 3).mean(0) / 255 for i, image in enumerate(images())
    }
    for prompt, image_in, path in zip(seen["prompts"], seen["images_in"], seen["column"]):
        assert path == paths[PROMPTS.index(prompt)]
        assert (
            np.abs(image_in.mean(dim=(1, 2)).numpy() - mean_colour[prompt]).max() < 0.02
        )  # resized, same image

    rows = [{"prompt": "a cat", column: paths[0]}, {"prompt": "a cat", column: paths[2]}]
    rollouts = trainer.sample(
        ["a cat"] * 2, torch.zeros(2, dtype=torch.long), seed=0, stochastic=False, rows=rows
    )
    assert (rollouts.samples[0] - rollouts.samples[1]).abs().max() > 1e-3


# -- BPGO and ViPO on each family -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_bpgo_runs_a_step(tmp_path, model):
    bpgo = pytest.importorskip("trl_visual.trainer.bpgo_trainer")
    from trl_visual.trainer.bpgo_config import BPGOConfig

    trainer = make_trainer(
        tmp_path,
        model,
        trainer_class=bpgo.BPGOTrainer,
        config_class=BPGOConfig,
        data=dataset(model, prior=[-0.01, -0.02, 0.0, -0.01]),
        prior_source="column",
        learning_rate=3e-2,
        max_steps=1,
    )
    trainer.train()
    assert len(logged(trainer, "reward")) == 1 and logged(trainer, "bpgo/ras_weight_mean")


@pytest.mark.parametrize("model", MODELS)
def test_vipo_runs_a_step(tmp_path, model, dinov2_path):
    vipo = pytest.importorskip("trl_visual.trainer.vipo_trainer")
    from trl_visual.trainer.vipo_config import ViPOConfig

    trainer = make_trainer(
        tmp_path,
        model,
        trainer_class=vipo.ViPOTrainer,
        config_class=ViPOConfig,
        backbone=dinov2_path,
        learning_rate=3e-2,
        max_steps=1,
    )
    expected_grid = {"flux": (4, 4), "wan": (2, 4, 4), "wan-i2v": (2, 4, 4)}[model]
    assert tuple(trainer.position_grid) == expected_grid
    trainer.train()
    assert len(logged(trainer, "reward")) == 1
