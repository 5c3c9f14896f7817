"""End-to-end tests of DiffusionGRPOTrainer on the tiny offline SD3 pipeline."""

import asyncio
import os

import pytest
import torch
from datasets import Dataset
from helpers import (
    CHECKPOINTING,
    PROMPTS,
    RecordingTrainer,
    logged,
    make_config,
    make_trainer,
    pipeline_images,
)

from trl_visual import DiffusionGRPOTrainer
from trl_visual.models import get_adapter, load_pipeline
from trl_visual.testing import tiny_sd3_pipeline
from trl_visual.trainer.hooks import Advantages, AuxiliaryObjective
from trl_visual.trainer.rollout import BatchPlacement, initial_noise


def test_grpo_policy_loss_is_one_clipped_objective_with_no_extra_terms(tiny_trainer):
    """GRPO's policy_loss is L(A); a weight and auxiliary objectives, when given, make it w·L(A) + Σ c·L(A_j)."""
    trainer = tiny_trainer()
    log_prob, old, advantages = 1e-3 * torch.randn(4, 3), torch.zeros(4, 3), torch.randn(4)
    main, clipped = trainer.clipped_objective(log_prob, old, advantages)
    plain = trainer.policy_loss(log_prob, old, Advantages(reward=torch.zeros(4), advantages=advantages))
    assert torch.equal(plain.loss, main) and torch.equal(plain.clipped, clipped) and plain.metrics == {}
    extra = torch.randn(4)
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5])
    combined = trainer.policy_loss(
        log_prob,
        old,
        Advantages(
            torch.zeros(4), advantages, weight, [AuxiliaryObjective(0.5, extra), AuxiliaryObjective(2, extra)]
        ),
    )
    extra_loss, _ = trainer.clipped_objective(log_prob, old, extra)
    torch.testing.assert_close(combined.loss, weight * main + 2.5 * extra_loss)
    assert combined.metrics == {}  # unnamed terms are not logged


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_on_policy_ratio_is_one(tmp_path, guidance_scale):
    """Learning rate 0: the log-probs recomputed in training equal the stored ones, so nothing is clipped,
    with classifier-free guidance in training off (1.0) and on (4.5)."""
    trainer = make_trainer(
        tmp_path,
        trainer_class=RecordingTrainer,
        learning_rate=0.0,
        guidance_scale=guidance_scale,
        max_steps=2,
    )
    trainer.train()
    assert logged(trainer, "clip_ratio") == [0.0, 0.0]
    assert trainer.log_probs_match(), (trainer.max_log_prob_gap, trainer.max_log_prob)


@pytest.mark.slow
def test_grpo_raises_the_red_channel_reward(tmp_path):
    """40 steps of LoRA GRPO on red_channel. Measured on this configuration: with learning_rate=0 the first-5
    and last-5 step means differ by at most 0.0003 over seeds 1–3 (the run-to-run noise; per-sample reward std
    0.003 over 160 samples per window); with learning_rate=3e-2 the gain is about 0.012 (seeds 0 and 2). A margin
    of 0.004 is over 10× the noise and a third of the effect."""
    trainer = make_trainer(
        tmp_path, num_generations=8, per_device_train_batch_size=32, learning_rate=3e-2, max_steps=40, seed=0
    )
    trainer.train()
    rewards = logged(trainer, "reward")
    assert len(rewards) == 40
    assert sum(rewards[-5:]) / 5 - sum(rewards[:5]) / 5 > 0.004


def test_saved_lora_reloads_into_a_fresh_pipeline(tmp_path):
    trainer = make_trainer(tmp_path, learning_rate=3e-2, max_steps=3)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert os.path.exists(tmp_path / "final" / "pytorch_lora_weights.safetensors")

    def generate(pipeline):
        return pipeline_images(pipeline, "a red car", seed=3)

    fresh = tiny_sd3_pipeline()
    untrained = generate(fresh)
    fresh.load_lora_weights(str(tmp_path / "final"))
    trained = generate(trainer.pipeline)
    assert (trained - untrained).abs().max() > 1e-4  # training changed the model
    torch.testing.assert_close(generate(fresh), trained, atol=1e-6, rtol=0)


def test_kl_starts_at_zero_and_grows(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.1, learning_rate=3e-2, max_steps=4)
    trainer.train()
    kl = logged(trainer, "kl")
    assert len(kl) == 4
    assert abs(kl[0]) < 1e-10  # LoRA's B starts at zero: the policy is the reference
    assert kl[-1] > 1e-8


def test_prompts_are_encoded_once_per_distinct_prompt(tmp_path):
    trainer = make_trainer(tmp_path, guidance_scale=4.5)
    rows_encoded = []
    trainer.pipeline.text_encoder_3.register_forward_hook(
        lambda m, args, out: rows_encoded.append(len(args[0]))
    )
    calls = []
    trainer.model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    prompts = ["a cat"] * 4 + ["a dog"] * 4
    trainer.sample(prompts, torch.arange(8) // 4, seed=0)
    assert rows_encoded == [2, 1]  # the 2 distinct prompts, then the negative prompt once
    assert calls == [16] * 4  # CFG: conditional and unconditional passes batched in one forward per step
    rows_encoded.clear()
    trainer.sample(prompts, torch.arange(8) // 4, seed=1)
    assert rows_encoded == [2]  # the negative prompt's embedding is kept


def test_sde_window_branches_the_ode_prefix_once_per_group(tmp_path):
    trainer = make_trainer(tmp_path, num_inference_steps=6, sde_window_size=2, sde_window_range=[3, 4])
    calls = []
    trainer.model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    rollouts = trainer.sample(["a cat"] * 4 + ["a dog"] * 4, torch.arange(8) // 4, seed=0)
    assert calls == [2, 2, 2, 8, 8, 8]  # steps 0-2: one trajectory per group; then 8 branches
    assert rollouts.log_probs.shape[:2] == (8, 2)  # only the window's two steps are stochastic
    assert torch.equal(rollouts.latents[0, 0], rollouts.latents[3, 0])  # same prefix within a group
    assert not torch.equal(rollouts.next_latents[0, 0], rollouts.next_latents[3, 0])  # then they branch


def test_init_same_noise_shares_the_initial_latent_within_a_group():
    adapter = get_adapter(load_pipeline("tiny:sd3"))
    placement = BatchPlacement(process_index=0, num_processes=1, per_device_batch_size=8)
    kwargs = dict(placement=placement, num_generations=4, device=torch.device("cpu"))
    shared = initial_noise(
        adapter, adapter.latent_shape(32, 32), torch.arange(8) // 4, 5, shared=True, **kwargs
    )
    assert torch.equal(shared[0], shared[3]) and not torch.equal(shared[0], shared[4])
    independent = initial_noise(
        adapter, adapter.latent_shape(32, 32), torch.arange(8) // 4, 5, shared=False, **kwargs
    )
    assert not torch.equal(independent[0], independent[1])


def test_a_process_draws_its_own_rows_of_the_global_noise():
    adapter = get_adapter(load_pipeline("tiny:sd3"))
    shape, device, groups = adapter.latent_shape(32, 32), torch.device("cpu"), torch.arange(4) // 2

    def noise(process_index: int, num_processes: int, ids: torch.Tensor, shared: bool) -> torch.Tensor:
        placement = BatchPlacement(process_index, num_processes, per_device_batch_size=len(ids))
        return initial_noise(
            adapter, shape, ids, 9, placement=placement, num_generations=2, shared=shared, device=device
        )

    whole = noise(0, 1, torch.arange(8) // 2, shared=False)
    assert torch.equal(noise(1, 2, groups + 2, shared=False), whole[4:])
    whole_shared = noise(0, 1, torch.arange(8) // 2, shared=True)
    assert torch.equal(noise(1, 2, groups + 2, shared=True), whole_shared[4:])


def test_evaluation_is_deterministic_and_prefixed(tmp_path):
    trainer = DiffusionGRPOTrainer(
        model="tiny:sd3",
        reward_funcs="red_channel",
        args=make_config(tmp_path, per_device_eval_batch_size=2),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:3]}),
    )
    first, second = trainer.evaluate(), trainer.evaluate()
    assert set(first) == {"eval_reward", "eval_rewards/red_channel/mean"}
    assert first == second


def test_log_images_writes_a_grid(tmp_path):
    trainer = make_trainer(tmp_path, log_images=True, num_images_to_log=4, max_steps=1)
    trainer.train()
    files = os.listdir(tmp_path / "out" / "samples")
    assert files == ["step_000001.png"]  # filed under the step whose metrics it shows


def test_metrics_use_trl_names(tmp_path):
    trainer = make_trainer(tmp_path, reward=["red_channel", "jpeg_compressibility"], max_steps=1)
    trainer.train()
    entry = trainer.state.log_history[0]
    for key in (
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "clip_ratio",
        "policy_loss",
        "loss",
        "rewards/red_channel/mean",
        "rewards/jpeg_compressibility/std",
    ):
        assert key in entry, key
    assert entry["reward"] == pytest.approx(
        entry["rewards/red_channel/mean"] + entry["rewards/jpeg_compressibility/mean"], rel=1e-5
    )


def test_full_fine_tuning_saves_the_denoiser(tmp_path):
    trainer = make_trainer(tmp_path, peft=False, learning_rate=1e-3, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "full"))
    assert os.path.exists(tmp_path / "full" / "transformer" / "config.json")


def test_checkpoint_and_resume(tmp_path):
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=2, max_steps=2, learning_rate=3e-2)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "pytorch_lora_weights.safetensors").exists()
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora" in k}
    resumed = make_trainer(tmp_path, save_strategy="steps", save_steps=2, max_steps=3, learning_rate=3e-2)
    resumed._load_from_checkpoint(str(checkpoint))
    for key, value in resumed.model.state_dict().items():
        if "lora" in key:
            torch.testing.assert_close(value, saved[key])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3


# -- errors: clear, and raised before any expensive work ------------------------------------------------


def test_missing_prompt_column(tmp_path):
    with pytest.raises(ValueError, match=r"no 'prompt' column \(its columns: \['text'\]\).*rename_column"):
        make_trainer(tmp_path, dataset=Dataset.from_dict({"text": PROMPTS}))


def test_num_generations_must_divide_the_batch(tmp_path):
    with pytest.raises(ValueError, match=r"must be divisible by `num_generations` \(3\)"):
        make_config(tmp_path, num_generations=3, per_device_train_batch_size=8)


def test_reward_of_the_wrong_length(tmp_path):
    def short_reward(prompts, images, **kwargs):
        return [0.0]

    trainer = make_trainer(tmp_path, reward=short_reward)
    with pytest.raises(ValueError, match=r"'short_reward' returned 1 values for 8 samples"):
        trainer.train()


def test_async_rewards_run_concurrently_and_are_timed(tmp_path):
    """Two ``async`` rewards meet inside one step: each waits until the other has started, which only
    happens when they run concurrently (one after the other, the first would give up)."""
    started: set[str] = set()

    async def rendezvous(name: str, prompts: list[str]) -> list[float]:
        started.add(name)
        for _ in range(100):
            if started == {"first", "second"}:
                return [0.0] * len(prompts)
            await asyncio.sleep(0)
        raise AssertionError(f"{name} ran alone")

    async def first(prompts, images, **kwargs):
        return await rendezvous("first", prompts)

    async def second(prompts, images, **kwargs):
        return await rendezvous("second", prompts)

    trainer = make_trainer(tmp_path, reward=[first, second], max_steps=1)
    trainer.train()
    assert started == {"first", "second"}
    assert logged(trainer, "timing/reward/first")[0] > 0
    assert logged(trainer, "timing/reward/second")[0] > 0

    async def broken(prompts, images, **kwargs):
        raise KeyError("score")

    with pytest.raises(RuntimeError, match=r"reward function 'broken' raised KeyError"):
        make_trainer(tmp_path, reward=broken).train()


def test_reward_that_raises_or_returns_only_nan(tmp_path):
    def broken(prompts, images, **kwargs):
        raise KeyError("score")

    with pytest.raises(RuntimeError, match=r"reward function 'broken' raised KeyError"):
        make_trainer(tmp_path, reward=broken).train()

    def empty(prompts, images, **kwargs):
        return [None] * len(prompts)

    with pytest.raises(ValueError, match=r"'empty' returned only None/NaN"):
        make_trainer(tmp_path, reward=empty).train()


def test_unknown_reward_name(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown reward 'red'.*red_channel"):
        make_trainer(tmp_path, reward="red")


def test_unknown_tiny_model(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown tiny model 'tiny:sdxl'.*tiny:sd3"):
        make_trainer(tmp_path, model="tiny:sdxl")


def test_beta_without_lora_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`beta > 0` needs a `peft_config`"):
        make_trainer(tmp_path, peft=False, beta=0.1)


def test_dataset_columns_reach_the_reward(tmp_path):
    seen = {}

    def reward(prompts, images, style, **kwargs):
        seen.update(style=style, prompts=prompts)
        return [1.0 if s == "red" else 0.0 for s in style]

    dataset = Dataset.from_dict({"prompt": PROMPTS, "style": ["red", "blue", "red", "blue"]})
    trainer = make_trainer(tmp_path, reward=reward, dataset=dataset, max_steps=1)
    trainer.train()
    assert [p for p, s in zip(seen["prompts"], seen["style"]) if s == "red"] == [
        p for p in seen["prompts"] if p in ("a cat", "a red car")
    ]
    assert logged(trainer, "frac_reward_zero_std") == [1.0]  # each group has one prompt, so one style


def test_gradient_checkpointing_trains_and_gives_the_same_gradients(tmp_path):
    """transformers 5 calls the flag `activation_checkpointing`; diffusers' own checkpointing must be used and
    must not change the result of a step."""
    plain = make_trainer(tmp_path / "a", learning_rate=3e-2, max_steps=1)
    plain.train()
    checkpointed = make_trainer(tmp_path / "b", learning_rate=3e-2, max_steps=1, **CHECKPOINTING)
    assert checkpointed.model.is_gradient_checkpointing
    checkpointed.train()
    assert logged(checkpointed, "grad_norm") == pytest.approx(logged(plain, "grad_norm"), rel=1e-4)
