"""Memory options for large models: chunked sampling, text encoders off the accelerator, cached prompt
embeddings, decoding in batches, 8-bit AdamW and a quantised base (plumbing), and the EMA of the weights."""

import math
import os

import pytest
import torch
from datasets import Dataset
from helpers import PROMPTS, TARGETS
from peft import LoraConfig
from safetensors.torch import load_file
from test_trainer import make_config  # the trainer tests' tiny settings
from transformers import TrainerCallback

from trl_visual import DiffusionGRPOTrainer
from trl_visual.checkpointing import CheckpointError
from trl_visual.models import get_adapter, load_pipeline
from trl_visual.trainer.ema import EMA_STATE_NAME, trainable_parameters
from trl_visual.trainer.memory import (
    PromptEmbedsCache,
    decode_in_batches,
    place_frozen_modules,
    text_encoders_on,
)
from trl_visual.trainer.optional_packages import missing_package
from trl_visual.trainer.rollout import PromptEncoder


def make_trainer(tmp_path, eval_dataset=None, callbacks=None, **overrides):
    return DiffusionGRPOTrainer(
        model="tiny:sd3",
        reward_funcs="red_channel",
        args=make_config(tmp_path, **overrides),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=eval_dataset,
        callbacks=callbacks,
        peft_config=LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS),
    )


def forward_batch_sizes(trainer):
    """The batch size of every denoiser forward from now on."""
    sizes = []
    trainer.model.register_forward_hook(
        lambda m, args, kwargs, out: sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    return sizes


def assert_same_rollouts(chunked, whole):
    for name in ("latents", "next_latents", "log_probs", "samples"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-5, atol=1e-5)
    for key in whole.embeds:
        torch.testing.assert_close(chunked.embeds[key], whole.embeds[key])
    assert chunked.prompts == whole.prompts
    assert torch.equal(chunked.sigmas, whole.sigmas)


# -- generation_batch_size ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(guidance_scale=4.5),  # every step stochastic, CFG batched
        dict(num_inference_steps=6, sde_window_size=2, sde_window_range=[3, 4]),  # branched ODE prefix
        dict(init_same_noise=True, sde_type="dance_grpo", noise_level=0.3),
    ],
)
def test_chunked_sampling_gives_the_rollouts_of_one_chunk(tmp_path, settings):
    """Sampling 8 samples in chunks of 2 draws the same noise as sampling them at once: the same latents,
    log-probs, samples and rewards, up to float rounding, from forwards of 2 samples (4 with CFG)."""
    trainer = make_trainer(tmp_path, **settings)
    prompts, groups = ["a cat"] * 4 + ["a dog"] * 4, torch.arange(8) // 4
    whole = trainer.sample(prompts, groups, seed=3)
    trainer.args.generation_batch_size = 2
    sizes = forward_batch_sizes(trainer)
    chunked = trainer.sample(prompts, groups, seed=3)
    assert max(sizes) == (4 if settings.get("guidance_scale", 1) > 1 else 2)
    assert len(sizes) > settings.get("num_inference_steps", 4)  # several chunks, each over all steps
    assert_same_rollouts(chunked, whole)
    rows = [{"prompt": p} for p in prompts]
    torch.testing.assert_close(
        trainer.compute_rewards(prompts, chunked.samples, rows),
        trainer.compute_rewards(prompts, whole.samples, rows),
    )
    other_seed = trainer.sample(prompts, groups, seed=4)
    assert not torch.allclose(other_seed.log_probs, whole.log_probs)  # the comparison can fail


def test_chunked_evaluation_samples_what_one_chunk_does(tmp_path):
    """Deterministic evaluation sampling (each sample its own initial noise) is chunk-invariant too."""
    trainer = make_trainer(tmp_path)
    prompts = PROMPTS[:3]
    whole = trainer.sample(prompts, torch.arange(3), seed=5, stochastic=False, training=False)
    trainer.args.generation_batch_size = 2  # chunks of 2 and 1
    chunked = trainer.sample(prompts, torch.arange(3), seed=5, stochastic=False, training=False)
    torch.testing.assert_close(chunked.samples, whole.samples, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(whole.samples[0], whole.samples[1])


def test_chunked_training_runs_and_learns_the_same_first_step(tmp_path):
    """A training step with `generation_batch_size` gives the loss of the unchunked step."""
    logs = {}
    for chunk in (None, 4):
        trainer = make_trainer(tmp_path / str(chunk), generation_batch_size=chunk, max_steps=1)
        trainer.train()
        logs[chunk] = trainer.state.log_history[0]
    for key in ("reward", "reward_std", "loss"):
        assert math.isclose(logs[None][key], logs[4][key], rel_tol=1e-4, abs_tol=1e-7), key


@pytest.mark.parametrize("chunk", [3, 0])
def test_generation_batch_size_must_divide_the_batch(tmp_path, chunk):
    expected = r"must divide `per_device_train_batch_size` \(8\).*\[1, 2, 4, 8\]" if chunk else "at least 1"
    with pytest.raises(ValueError, match=expected):
        make_config(tmp_path, generation_batch_size=chunk)


# -- text encoders and prompt embeddings --------------------------------------------------------------


def test_prompt_embeds_cache_encodes_each_prompt_once_and_gives_the_same_embeddings():
    adapter = get_adapter(load_pipeline("tiny:sd3"))
    encoded = []
    adapter.pipeline.text_encoder_3.register_forward_hook(lambda m, args, out: encoded.append(len(args[0])))
    plain = PromptEncoder(adapter, 16, "")
    cached = PromptEncoder(adapter, 16, "", cache_size=2)
    batch = ["a cat", "a dog", "a cat", "a dog"]
    expected = plain(batch)
    encoded.clear()
    first = cached(batch)
    assert encoded == [1, 1]  # each distinct prompt alone
    for key in expected:
        torch.testing.assert_close(first[key], expected[key], rtol=1e-5, atol=1e-6)
        assert first[key].device == adapter.device
    encoded.clear()
    again = cached(batch)
    assert encoded == []  # from the cache
    assert all(torch.equal(again[key], first[key]) for key in first)
    assert all(v.device.type == "cpu" for entry in cached.cache._entries.values() for v in entry.values())
    cached(["a tree"])  # a third prompt: the least recently used ("a cat") is dropped
    assert "a cat" not in cached.cache and "a dog" in cached.cache and len(cached.cache) == 2


def test_cached_prompt_embeds_give_the_same_samples(tmp_path):
    prompts, groups = ["a cat"] * 4 + ["a dog"] * 4, torch.arange(8) // 4
    plain = make_trainer(tmp_path / "plain", guidance_scale=4.5).sample(prompts, groups, seed=1)
    cached_trainer = make_trainer(tmp_path / "cached", guidance_scale=4.5, cache_prompt_embeds=True)
    assert cached_trainer._prompt_encoder.cache.max_size == 1024
    cached = cached_trainer.sample(prompts, groups, seed=1)
    assert_same_rollouts(cached, plain)


def test_cache_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="prompt_embeds_cache_size"):
        make_config(tmp_path, cache_prompt_embeds=True, prompt_embeds_cache_size=0)
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptEmbedsCache(0)


def test_offloaded_text_encoders_stay_on_the_cpu_and_the_rest_moves():
    """The placement logic, with PyTorch's `meta` device standing in for the accelerator (this machine has
    none): the VAE and every other frozen module go there, the text encoders stay on the CPU."""
    adapter = get_adapter(load_pipeline("tiny:sd3"))
    accelerator = torch.device("meta")
    place_frozen_modules(adapter, accelerator, offload_text_encoders=True)
    encoders = adapter.text_encoders
    assert sorted(encoders) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert all(p.device.type == "cpu" for m in encoders.values() for p in m.parameters())
    assert all(p.device.type == "meta" for p in adapter.pipeline.vae.parameters())
    assert adapter.text_encoder_device.type == "cpu"

    moves = []  # a meta tensor cannot come back to the CPU: record the moves instead of making them
    for name, module in encoders.items():
        module.to = lambda device, _name=name: moves.append((_name, torch.device(device).type))
    with text_encoders_on(adapter, accelerator):  # the model card's pipeline call
        assert sorted(moves) == [(name, "meta") for name in sorted(encoders)]
    assert sorted(moves[3:]) == [(name, "cpu") for name in sorted(encoders)]

    without = get_adapter(load_pipeline("tiny:sd3"))
    place_frozen_modules(without, accelerator, dtype=torch.bfloat16)
    assert all(
        p.device.type == "meta" and p.dtype == torch.bfloat16
        for p in without.pipeline.text_encoder_3.parameters()
    )


def test_training_with_offloaded_text_encoders_and_cache(tmp_path, monkeypatch):
    """The option set trains; then the trainer's own placement, with `meta` standing in for the accelerator,
    leaves the text encoders on the CPU and moves the VAE."""
    trainer = make_trainer(
        tmp_path, offload_text_encoders=True, cache_prompt_embeds=True, generation_batch_size=4, max_steps=1
    )
    trainer.train()
    assert len(trainer._prompt_encoder.cache) == 2  # the two prompts of the step's batch
    assert math.isfinite(trainer.state.log_history[0]["reward"])
    monkeypatch.setattr(type(trainer.accelerator), "device", property(lambda self: torch.device("meta")))
    trainer._place_frozen_modules()
    assert trainer.adapter.text_encoder_device.type == "cpu"
    assert all(p.device.type == "cpu" for m in trainer.adapter.text_encoders.values() for p in m.parameters())
    assert all(p.device.type == "meta" for p in trainer.pipeline.vae.parameters())


# -- decoding -----------------------------------------------------------------------------------------


def test_decoding_in_batches_equals_one_batch():
    adapter = get_adapter(load_pipeline("tiny:sd3"))
    latents = torch.randn(5, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    whole = adapter.decode(latents)
    calls = []
    adapter.pipeline.vae.decoder.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    torch.testing.assert_close(decode_in_batches(adapter, latents, 2), whole, rtol=1e-5, atol=1e-5)
    assert calls == [2, 2, 1]
    adapter.pipeline.vae.enable_slicing()  # the library's one-at-a-time decoding
    torch.testing.assert_close(adapter.decode(latents), whole, rtol=1e-5, atol=1e-5)


def test_vae_decode_batch_size_reaches_sampling(tmp_path):
    trainer = make_trainer(tmp_path, vae_decode_batch_size=3)
    calls = []
    trainer.pipeline.vae.decoder.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    trainer.sample(PROMPTS * 2, torch.arange(8) // 4, seed=0)
    assert calls == [3, 3, 2]


# -- 8-bit AdamW and a quantised base -----------------------------------------------------------------


def test_8bit_adamw_is_accepted_or_refused_naming_the_package(tmp_path):
    if missing_package("bitsandbytes"):
        with pytest.raises(ImportError, match=r"adamw_bnb_8bit.*pip install bitsandbytes.*adamw_torch"):
            make_config(tmp_path, optim="adamw_bnb_8bit")
    else:
        assert make_config(tmp_path, optim="adamw_bnb_8bit").optim == "adamw_bnb_8bit"
    assert make_config(tmp_path, optim="adamw_torch").optim == "adamw_torch"


@pytest.mark.skipif(missing_package("bitsandbytes"), reason="bitsandbytes is not installed here")
def test_8bit_adamw_trains_with_8bit_moments(tmp_path):
    """`optim="adamw_bnb_8bit"` reaches Trainer's optimizer: bitsandbytes' AdamW with 8-bit moments (uint8) for
    every LoRA matrix of at least 4,096 elements (r = 128 here; smaller ones bitsandbytes keeps in float32)."""
    trainer = DiffusionGRPOTrainer(
        model="tiny:sd3",
        reward_funcs="red_channel",
        args=make_config(tmp_path, optim="adamw_bnb_8bit", max_steps=1, learning_rate=1e-2),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=128, lora_alpha=128, target_modules=["to_q", "to_k", "to_v"]),
    )
    before = [p.detach().clone() for p in trainable_parameters(trainer.model)]
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert type(optimizer).__module__.startswith("bitsandbytes")
    moments = [state["state1"] for state in optimizer.state.values()]
    assert moments and all(m.dtype == torch.uint8 for m in moments)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable_parameters(trainer.model)))


QUANTIZATION = {
    "quant_backend": "bitsandbytes_4bit",
    "quant_kwargs": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": "bfloat16",
    },
    "components_to_quantize": ["transformer"],
}


def test_quantization_config_reaches_from_pretrained_as_diffusers_config(monkeypatch):
    """The YAML (dict) form of `quantization_config` becomes diffusers' `PipelineQuantizationConfig` on its
    way to `from_pretrained` (captured here: no quantisation library is needed for the plumbing)."""
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    received = {}
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda name, **kwargs: received.update(kwargs))
    monkeypatch.setattr("trl_visual.models.loading.check_hub_id", lambda *args: None)  # no Hub here
    load_pipeline("user/model", {"quantization_config": QUANTIZATION, "torch_dtype": "bfloat16"})
    config = received["quantization_config"]
    assert isinstance(config, PipelineQuantizationConfig)
    assert config.quant_backend == "bitsandbytes_4bit" and config.components_to_quantize == ["transformer"]
    assert received["torch_dtype"] is torch.bfloat16


@pytest.mark.skipif(not missing_package("bitsandbytes"), reason="bitsandbytes is installed here")
def test_quantization_backend_without_its_package_is_refused_before_loading(tmp_path):
    with pytest.raises(ImportError, match=r"bitsandbytes_4bit.*pip install bitsandbytes"):
        make_config(tmp_path, model_init_kwargs={"quantization_config": QUANTIZATION})


@pytest.mark.skipif(
    missing_package("bitsandbytes") or not torch.cuda.is_available(),
    reason="a 4-bit base needs bitsandbytes and a CUDA device (neither is on the CPU test machines)",
)
def test_lora_trains_on_a_4bit_base(tmp_path):
    pipeline = load_pipeline("tiny:sd3")
    pipeline.save_pretrained(tmp_path / "base")
    trainer = DiffusionGRPOTrainer(
        model=str(tmp_path / "base"),
        reward_funcs="red_channel",
        args=make_config(tmp_path, model_init_kwargs={"quantization_config": QUANTIZATION}, max_steps=1),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"]),
    )
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["reward"])


# -- EMA of the trained weights -----------------------------------------------------------------------


class WeightRecorder(TrainerCallback):
    """A callback that copies the trainable weights after every optimizer step."""

    def __init__(self):
        self.trajectory = []
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        self.trajectory.append([p.detach().clone() for p in trainable_parameters(self.trainer.model)])


def closed_form_ema(trajectory, decay):
    """``θ̄_N = Σ_t (1 − d_t) Π_{u > t} d_u θ_t`` with diffusers' schedule ``d_t = min(d, (1 + s)/(10 + s))``,
    ``s = t − 1``, and ``d_1 = 0``."""
    steps = len(trajectory)
    d = [0.0] + [min(decay, (1 + (t - 1)) / (10 + (t - 1))) for t in range(2, steps + 1)]
    weights = [(1 - d[t]) * math.prod(d[t + 1 :]) for t in range(steps)]
    assert math.isclose(sum(weights), 1.0)
    return [sum(w * theta[i] for w, theta in zip(weights, trajectory)) for i in range(len(trajectory[0]))]


def ema_trainer(tmp_path, decay=0.5, **overrides):
    recorder = WeightRecorder()
    settings = dict(use_ema=True, ema_decay=decay, learning_rate=3e-2, max_steps=4)
    trainer = make_trainer(tmp_path, callbacks=[recorder], **{**settings, **overrides})
    recorder.trainer = trainer
    return trainer, recorder


def test_the_average_follows_the_parameters_to_their_device_when_training_starts():
    """DeepSpeed places the model when training starts, after the average was made where the weights were: the
    callback moves the average to the parameters' device then (``meta`` stands in for an accelerator here)."""
    from trl_visual.trainer.ema import EMA

    ema = EMA([torch.nn.Parameter(torch.ones(3))], decay=0.9)
    callback = ema.callback()
    assert ema.shadow_params[0].device.type == "cpu"
    ema.parameters[0] = torch.nn.Parameter(torch.ones(3, device="meta"))  # placed by the engine
    callback.on_train_begin(None, None, None)
    assert ema.shadow_params[0].device.type == "meta"


def test_deepspeed_resume_restores_the_average_and_the_method_state(tmp_path):
    """DeepSpeed's own resume skips ``Trainer._load_from_checkpoint``: :meth:`CheckpointIO.load_beside_deepspeed`
    restores the EMA (and the method's state) from the checkpoint."""
    trainer, _ = ema_trainer(tmp_path, save_strategy="steps", save_steps=4)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-4"
    saved = [tensor.clone() for tensor in trainer.ema.shadow_params]
    fresh, _ = ema_trainer(tmp_path / "fresh")
    assert not torch.equal(fresh.ema.shadow_params[0], saved[0])
    states = []
    fresh.checkpoints.load_beside_deepspeed(str(checkpoint), states.append)
    assert all(torch.equal(a, b) for a, b in zip(fresh.ema.shadow_params, saved))
    assert fresh.ema.optimization_step == 4 and states == []  # GRPO keeps no method state


def test_ema_after_n_steps_is_the_closed_form(tmp_path):
    trainer, recorder = ema_trainer(tmp_path, decay=0.2)  # d_t = 0, 0.18, 0.2, 0.2
    trainer.train()
    assert len(recorder.trajectory) == 4
    assert not torch.equal(recorder.trajectory[0][0], recorder.trajectory[-1][0])  # the weights did move
    for shadow, expected in zip(trainer.ema.shadow_params, closed_form_ema(recorder.trajectory, 0.2)):
        torch.testing.assert_close(shadow, expected, rtol=1e-5, atol=1e-7)
    assert trainer.ema.optimization_step == 4


def test_ema_is_saved_and_resumed(tmp_path):
    """A run resumed from step 2 of 3 ends with the EMA (and weights) of the uninterrupted run."""
    straight, _ = ema_trainer(tmp_path, max_steps=3, save_strategy="steps", save_steps=2)
    straight.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / EMA_STATE_NAME).is_file()
    resumed, _ = ema_trainer(tmp_path / "resumed", max_steps=3)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.ema.optimization_step == straight.ema.optimization_step == 3
    for ours, theirs in zip(resumed.ema.shadow_params, straight.ema.shadow_params):
        torch.testing.assert_close(ours, theirs)
    for ours, theirs in zip(trainable_parameters(resumed.model), trainable_parameters(straight.model)):
        torch.testing.assert_close(ours, theirs)


def test_checkpoint_without_ema_state_is_refused_unless_weights_only(tmp_path):
    plain = make_trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    plain.train()
    checkpoint = str(tmp_path / "out" / "checkpoint-1")
    with pytest.raises(CheckpointError, match=rf"no {EMA_STATE_NAME}.*resume_weights_only=True"):
        ema_trainer(tmp_path, max_steps=2)[0].train(resume_from_checkpoint=checkpoint)
    trainer, _ = ema_trainer(tmp_path, max_steps=2, resume_weights_only=True)
    trainer.train(resume_from_checkpoint=checkpoint)
    assert trainer.ema.optimization_step == 1  # restarted at the resumed weights, then one step


def test_evaluation_card_and_export_use_the_ema_weights(tmp_path):
    seen = []
    trainer, _ = ema_trainer(tmp_path, max_steps=3, eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:2]}))

    def weights_reward(prompts, images, **kwargs):
        seen.append([p.detach().clone() for p in trainable_parameters(trainer.model)])
        return [0.0] * len(prompts)

    trainer.train()
    trained = [p.detach().clone() for p in trainable_parameters(trainer.model)]
    assert not all(torch.equal(a, b) for a, b in zip(trained, trainer.ema.shadow_params))
    trainer.eval_reward_funcs, trainer.eval_reward_names = [weights_reward], ["weights"]
    trainer.evaluate()
    assert seen and all(torch.equal(a, b) for a, b in zip(seen[0], trainer.ema.shadow_params))
    assert all(torch.equal(a, b) for a, b in zip(trainable_parameters(trainer.model), trained))  # restored

    during_card = []
    trainer.model.register_forward_pre_hook(
        lambda m, args: during_card.append(trainable_parameters(m)[0].detach().clone())
    )
    trainer.model_card.samples([{"prompt": "a cat"}], reference=False)  # the model card's "after" pictures
    assert during_card and all(torch.equal(w, trainer.ema.shadow_params[0]) for w in during_card)
    assert torch.equal(trainable_parameters(trainer.model)[0], trained[0])

    trainer.save_model(str(tmp_path / "export"))
    exported = load_file(os.path.join(tmp_path / "export", "pytorch_lora_weights.safetensors"))
    name = next(n for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_A" in n)
    index = [n for n, p in trainer.model.named_parameters() if p.requires_grad].index(name)
    key = next(k for k in exported if k.endswith("." + name.replace(".default", "")))
    torch.testing.assert_close(exported[key].float(), trainer.ema.shadow_params[index], rtol=1e-3, atol=1e-3)
    assert not torch.allclose(exported[key].float(), trained[index], rtol=1e-3, atol=1e-3)


def test_ema_decay_must_be_in_the_unit_interval(tmp_path):
    with pytest.raises(ValueError, match=r"`ema_decay` must be in \(0, 1\)"):
        make_config(tmp_path, use_ema=True, ema_decay=1.0)
