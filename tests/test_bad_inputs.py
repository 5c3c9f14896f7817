"""Bad input and faults: every refusal names the culprit and the fix, comes before sampling where it can, and
no run ends silently wrong, hung, or with a non-finite or lost file (issue 12).

Table-driven: each case is one row; the API and the command line are both exercised."""

import asyncio
import errno
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from helpers import PROMPTS, TARGETS, logged, make_config, make_trainer
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback

from trl_visual import DiffusionGRPOTrainer
from trl_visual.cli import main
from trl_visual.core.advantages import combine_rewards, group_advantages
from trl_visual.state_files import save_state_file
from trl_visual.testing import tiny_sd3_pipeline
from trl_visual.trainer.finite_updates import NonFiniteTrainingError
from trl_visual.trainer.reward_calls import RewardTimeoutError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "examples", "configs", "tiny_quickstart.yaml")
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture
def sampling_calls(monkeypatch):
    """Counts calls of the trainer's sampler: a check that passes "before sampling" leaves it at 0."""
    calls = {"n": 0}
    original = DiffusionGRPOTrainer.sample

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionGRPOTrainer, "sample", counting)
    return calls


def checkpoint_tensors(directory):
    """Every tensor a checkpoint (or a final save) holds: the LoRA and AdamW's state."""
    tensors = dict(load_file(os.path.join(directory, LORA)))
    optimizer = os.path.join(directory, "optimizer.pt")
    if os.path.exists(optimizer):
        for index, state in torch.load(optimizer, weights_only=True)["state"].items():
            tensors.update({f"optimizer.{index}.{key}": value for key, value in state.items()})
    return tensors


def assert_saved_files_are_finite(output_dir):
    """Every LoRA file under ``output_dir`` (checkpoints and final save) and its optimizer state is finite."""
    found = 0
    for root, _, files in os.walk(output_dir):
        if LORA in files:
            found += 1
            for key, value in checkpoint_tensors(root).items():
                assert torch.isfinite(value.float()).all(), f"{root}: {key} is not finite"
    return found


# ------------------------------------------------------------------------------------------------------------
# Hyper-parameters out of range: refused by the config, naming the field and its range
# ------------------------------------------------------------------------------------------------------------
CONFIG_CASES = [
    ({"epsilon": -0.1}, r"`epsilon` must be ≥ 0"),
    ({"epsilon": float("nan")}, r"`epsilon` must be ≥ 0.*nan"),
    ({"beta": -0.01}, r"`beta` must be ≥ 0"),
    ({"adv_clip_max": 0.0}, r"`adv_clip_max` must be > 0"),
    ({"noise_level": 0.0}, r"`noise_level` must be > 0.*log-probability is NaN"),
    ({"noise_level": -0.7}, r"`noise_level` must be > 0"),
    ({"num_inference_steps": 0}, r"`num_inference_steps` must be at least 1; got 0"),
    ({"guidance_scale": -1.0}, r"`guidance_scale` must be in \[0, 100\]"),
    ({"max_steps": 0}, r"`max_steps` must be positive \(or -1"),
    ({"learning_rate": float("nan")}, r"`learning_rate` must be a finite number"),
    ({"per_device_train_batch_size": 0}, r"`per_device_train_batch_size` must be at least 1"),
    ({"reward_weights": [0.0, 0.0]}, r"`reward_weights` are all zero"),
    ({"reward_weights": [1.0, float("inf")]}, r"`reward_weights` must all be finite"),
    ({"reward_timeout": 0}, r"`reward_timeout` must be > 0 seconds, or None"),
    ({"max_consecutive_nonfinite_steps": 0}, r"`max_consecutive_nonfinite_steps` must be at least 1"),
    (
        {"sde_window_size": 2, "sde_window_range": [8, 10]},
        r"`sde_window_range` \[8, 10\] does not fit 4 sampling steps.*Use e.g. \[0, 3\]",
    ),
    ({"sde_window_size": 2, "sde_window_range": [2, 1]}, r"`sde_window_range` \[2, 1\] does not fit"),
    # issue 29 §3: silent or unclear before
    ({"height": 0}, r"`height` must be a positive number of pixels.*got 0"),
    ({"width": -32}, r"`width` must be a positive number of pixels.*got -32"),
    ({"num_frames": 0}, r"`num_frames` must be a positive number"),
    ({"sde_window_size": -2}, r"`sde_window_size` must be ≥ 0.*got -2"),
    ({"num_images_to_log": -3}, r"`num_images_to_log` must be ≥ 0; got -3"),
    (
        {"save_strategy": "steps", "save_steps": 0},
        r"`save_steps` must be > 0.*Or set `save_strategy` to 'no'",
    ),
    ({"max_steps": -1, "num_train_epochs": 0}, r"`num_train_epochs` must be > 0 when `max_steps` is unset"),
    ({"max_sequence_length": 0}, r"`max_sequence_length` must be at least 1 token"),
    ({"time_shift": float("inf")}, r"`time_shift` must be in \(0, 1000\].*got inf"),
    ({"time_shift": 1e9}, r"`time_shift` must be in \(0, 1000\]"),
    ({"noise_level": 1e6}, r"`noise_level` must be ≤ 5 for sde_type 'flow_grpo'; got 1000000.0"),
    ({"noise_level": 1.5, "sde_type": "cps"}, r"`noise_level` must be ≤ 1 for sde_type 'cps'"),
    ({"guidance_scale": 1e30}, r"`guidance_scale` must be in \[0, 100\].*got 1e\+30"),
    ({"guidance_scale": float("nan")}, r"`guidance_scale` must be in \[0, 100\].*got nan"),
    ({"epsilon": 0.2, "epsilon_high": 0.1}, r"`epsilon_high` must be ≥ `epsilon` \(0.2\)"),
]


@pytest.mark.parametrize(("overrides", "message"), CONFIG_CASES, ids=lambda v: str(v)[:40])
def test_out_of_range_settings_are_refused_by_the_config(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU that computes in bfloat16")
def test_bf16_on_a_cpu_only_machine_names_the_fix(tmp_path):
    """A real model's config (``bf16: true``) on a CPU: our message and the fix, not transformers' "Your setup
    doesn't support bf16/gpu"."""
    with pytest.raises(
        ValueError, match=r"`bf16` is set, but this machine has no GPU.*`--bf16 false`.*tiny:sd3"
    ):
        make_config(tmp_path, bf16=True)


def test_the_sde_window_range_limit_is_inclusive(tmp_path):
    """The last start that still fits a window of 2 in 4 flow_grpo steps is 2: [2, 3) is accepted and samples."""
    config = make_config(tmp_path, sde_window_size=2, sde_window_range=[2, 3])
    assert config.sde_window_range == [2, 3]


def test_a_non_positive_learning_rate_is_only_a_warning(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        make_config(tmp_path, learning_rate=0.0)
    assert "`learning_rate` is 0.0" in caplog.text


# ------------------------------------------------------------------------------------------------------------
# Refused when the trainer is built: before any sampling
# ------------------------------------------------------------------------------------------------------------
def pipeline_with(scheduler):
    pipeline = tiny_sd3_pipeline()
    pipeline.scheduler = scheduler
    return pipeline


TRAINER_CASES = [
    (
        "no reward",
        dict(reward=[]),
        ValueError,
        r"`reward_funcs` is empty: give at least one reward function",
    ),
    (
        "Euler scheduler (not flow matching)",
        dict(model=lambda: pipeline_with(EulerDiscreteScheduler())),
        ValueError,
        r"scheduler is EulerDiscreteScheduler.*flow-matching.*FlowMatchEulerDiscreteScheduler",
    ),
    (
        "DDIM scheduler",
        dict(model=lambda: pipeline_with(DDIMScheduler())),
        ValueError,
        r"scheduler is DDIMScheduler.*FlowMatchEulerDiscreteScheduler.*no flow-matching sigmas",
    ),
    (
        "weights that do not match the rewards",
        dict(reward=["red_channel"], reward_weights=[1.0, 2.0]),
        ValueError,
        r"`reward_weights` has 2 values but there are 1 reward functions \(red_channel\)",
    ),
    (
        "lora_alpha 0 (trains nothing)",
        dict(peft=LoraConfig(r=8, lora_alpha=0, target_modules=TARGETS)),
        ValueError,
        r"`lora_alpha` is 0: the LoRA update is scaled by lora_alpha / r, so nothing would train",
    ),
    (
        "lora_dropout 1.5",
        dict(peft=LoraConfig(r=8, lora_alpha=8, lora_dropout=1.5, target_modules=TARGETS)),
        ValueError,
        r"`lora_dropout` must be in \[0, 1\).*got 1.5",
    ),
    (
        "prompts of zero-width characters only",
        dict(dataset=Dataset.from_dict({"prompt": ["a cat", "\u200b\u200d", "\ufeff ", "a tree"]})),
        ValueError,
        r"row 1: only invisible characters.*row 2: only invisible characters",
    ),
    (
        "a prompt outside the shapes grammar",
        dict(reward="shapes_adherence", dataset=Dataset.from_dict({"prompt": ["a red circle", "a cat"] * 2})),
        ValueError,
        r"reward 'ShapesAdherence' cannot score the train_dataset's prompts: .*'a cat'",
    ),
    (
        "an image size whose decoding cannot fit in memory",
        dict(height=16384, width=16384),
        ValueError,
        r"Decoding 8 sample\(s\) of 16384×16384 needs at least [\d,.]+ GiB, more than this machine's.*"
        r"vae_decode_batch_size",
    ),
]


@pytest.mark.parametrize(
    ("case", "settings", "error", "message"), TRAINER_CASES, ids=[c[0] for c in TRAINER_CASES]
)
def test_bad_trainer_inputs_are_refused_before_sampling(
    tmp_path, sampling_calls, case, settings, error, message
):
    settings = dict(settings)
    if callable(settings.get("model")):
        settings["model"] = settings["model"]()
    with pytest.raises(error, match=message):
        make_trainer(tmp_path, **settings).train()
    assert sampling_calls["n"] == 0


@pytest.mark.parametrize(
    "case",
    [
        "lora_alpha 0 (trains nothing)",
        "prompts of zero-width characters only",
        "a prompt outside the shapes grammar",
    ],
)
def test_checks_on_rewards_data_and_lora_come_before_loading_the_model(tmp_path, monkeypatch, case):
    loads = []
    monkeypatch.setattr("trl_visual.trainer.diffusion_grpo_trainer.load_pipeline", lambda *a: loads.append(a))
    _, settings, error, message = next(c for c in TRAINER_CASES if c[0] == case)
    with pytest.raises(error, match=message):
        make_trainer(tmp_path, **settings)
    assert loads == []


@pytest.fixture
def immutable_dir(tmp_path):
    """A folder nobody may write into, root included (``chattr +i``; root ignores ``chmod``)."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available")
    folder = tmp_path / "locked"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("this file system does not support chattr +i")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("inside", [False, True], ids=["output_dir itself", "a folder to create inside it"])
def test_an_unwritable_output_dir_is_refused_at_construction(tmp_path, immutable_dir, sampling_calls, inside):
    """With ``save_strategy: "no"`` (the quick start's) it used to be found only at the final save, losing the run."""
    output_dir = immutable_dir / "run" if inside else immutable_dir
    config = make_config(tmp_path, save_strategy="no")
    config.output_dir = str(output_dir)
    with pytest.raises(
        PermissionError, match=rf"`output_dir` '{output_dir}' is not writable.*Choose another"
    ):
        DiffusionGRPOTrainer("tiny:sd3", "red_channel", args=config, train_dataset=_prompts())
    assert sampling_calls["n"] == 0


def _prompts():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS})


# ------------------------------------------------------------------------------------------------------------
# Reward outputs: the error names the reward; ±inf is an invalid sample, not a value
# ------------------------------------------------------------------------------------------------------------
def reward_returning(value):
    def bad_reward(prompts, images, **kwargs):
        return value(len(prompts)) if callable(value) else value

    return bad_reward


REWARD_CASES = [
    (
        "strings",
        lambda n: ["good"] * n,
        TypeError,
        r"'bad_reward' returned str 'good' for sample 0.*one float",
    ),
    (
        "dicts",
        lambda n: [{"score": 1.0}] * n,
        TypeError,
        r"'bad_reward' returned dict \{'score': 1.0\} for sample 0",
    ),
    ("a dict", {"score": [1.0] * 8}, TypeError, r"'bad_reward' must return a list of floats.*got dict"),
    ("a string", "0.5", TypeError, r"'bad_reward' must return a list of floats.*got str '0.5'"),
    ("a float", 0.5, TypeError, r"'bad_reward' must return a list of floats.*got float"),
    ("only inf", lambda n: [math.inf] * n, ValueError, r"'bad_reward' returned only None/NaN/inf"),
    (
        "the wrong length",
        lambda n: [0.0] * (n - 1),
        ValueError,
        r"'bad_reward' returned 7 values for 8 samples",
    ),
    (
        "a complex tensor",
        lambda n: torch.ones(n, dtype=torch.complex64) * (1 + 2j),
        TypeError,
        r"'bad_reward' returned a complex tensor.*would drop the imaginary part",
    ),
    (
        "complex scalar tensors",
        lambda n: [torch.tensor(1 + 2j)] * n,
        TypeError,
        r"'bad_reward' returned a complex tensor for sample 0",
    ),
    (
        "a meta tensor",
        lambda n: torch.empty(n, device="meta"),
        ValueError,
        r"'bad_reward' returned a tensor on the 'meta' device, which holds no values",
    ),
]


@pytest.mark.parametrize(
    ("case", "output", "error", "message"), REWARD_CASES, ids=[c[0] for c in REWARD_CASES]
)
def test_bad_reward_outputs_name_the_reward(tmp_path, case, output, error, message):
    trainer = make_trainer(tmp_path, reward=reward_returning(output), max_steps=1)
    with pytest.raises(error, match=message):
        trainer.train()


def test_a_reward_calling_sys_exit_is_an_error_naming_it(tmp_path):
    """``sys.exit(0)`` in a reward used to end the run with status 0 and nothing saved."""

    def exits(prompts, images, **kwargs):
        sys.exit(0)

    trainer = make_trainer(tmp_path, reward=exits, max_steps=1)
    with pytest.raises(RuntimeError, match=r"'exits' called sys.exit\(0\); a reward must return its scores"):
        trainer.train()


@pytest.mark.parametrize("is_async", [False, True], ids=["plain", "async"])
def test_a_reward_that_edits_images_in_place_changes_nothing_for_the_next(tmp_path, is_async):
    """Each reward gets its own copy of the samples: blacking them out in the first leaves the second's (and the
    logged samples) as sampled."""
    seen = []

    def vandal(prompts, images, **kwargs):
        images.mul_(0)
        prompts.clear()
        return [0.0] * len(images)

    async def async_vandal(prompts, images, **kwargs):
        return vandal(prompts, images)

    def witness(prompts, images, **kwargs):
        seen.append((len(prompts), float(images.abs().sum())))
        return [float(x) for x in images.mean(dim=(1, 2, 3))]

    make_trainer(tmp_path, reward=[async_vandal if is_async else vandal, witness], max_steps=1).train()
    ((count, total),) = seen
    assert count == 8 and total > 0


def test_an_async_reward_that_blocks_its_event_loop_still_times_out(tmp_path):
    """``time.sleep`` inside ``async def`` keeps ``asyncio.wait_for`` from firing; the loop's thread is given up on
    instead, and the error says what blocked."""

    async def sleepy(prompts, images, **kwargs):
        time.sleep(5)  # blocks the event loop
        return [0.0] * len(prompts)

    trainer = make_trainer(tmp_path, reward=sleepy, reward_timeout=0.3, max_steps=1)
    with pytest.raises(
        RewardTimeoutError, match=r"'sleepy' did not return.*blocked its event loop.*asyncio.sleep"
    ):
        trainer.train()


def test_tensors_and_scalar_tensors_are_valid_reward_outputs(tmp_path):
    rewards = [
        reward_returning(lambda n: torch.rand(n)),
        reward_returning(lambda n: [torch.tensor(0.5)] * n),
    ]
    trainer = make_trainer(tmp_path, reward=rewards, max_steps=1)
    trainer.train()
    assert math.isfinite(logged(trainer, "reward")[0])


def test_an_infinite_reward_does_not_corrupt_its_group():
    """One +inf in a group used to make the group mean inf and give the finite group-mates −adv_clip_max; now it
    is left out like NaN: the others get exactly the advantages of the group without it."""
    rewards = torch.tensor([math.inf, 1.0, 2.0, 3.0, 0.5, -math.inf, 1.5, 2.5])
    advantages = group_advantages(rewards, num_generations=4)
    without = group_advantages(torch.tensor([math.nan, 1.0, 2.0, 3.0, 0.5, math.nan, 1.5, 2.5]), 4)
    assert torch.isfinite(advantages).all()
    assert advantages[0] == 0 and advantages[5] == 0
    torch.testing.assert_close(advantages, without)
    assert advantages[3] > 0 > advantages[1]  # the finite samples keep their order, not −5 for all
    reward, combined = combine_rewards(rewards[:, None], torch.ones(1), 4)
    assert math.isnan(reward[0]) and math.isnan(reward[5])
    torch.testing.assert_close(combined, without)


def test_an_infinite_reward_is_counted_and_left_out_in_training(tmp_path):
    def sometimes_inf(prompts, images, **kwargs):
        return [math.inf if i == 0 else float(images[i].mean()) for i in range(len(prompts))]

    trainer = make_trainer(tmp_path, reward=sometimes_inf, max_steps=2)
    trainer.train()
    assert logged(trainer, "rewards/sometimes_inf/num_inf") == [1.0, 1.0]
    assert all(math.isfinite(r) for r in logged(trainer, "reward"))
    assert logged(trainer, "nonfinite_steps") == [0.0, 0.0]


# ------------------------------------------------------------------------------------------------------------
# Reward timeouts: a reward that never returns stops the run with an error naming it, and keeps checkpoints
# ------------------------------------------------------------------------------------------------------------
def hanging_after(calls_before_hang, is_async):
    calls = {"n": 0}
    never = threading.Event()

    def check():
        calls["n"] += 1
        return calls["n"] > calls_before_hang

    if is_async:

        async def hung_reward(prompts, images, **kwargs):
            if check():
                await asyncio.Event().wait()
            return [float(x) for x in images.mean(dim=(1, 2, 3))]

    else:

        def hung_reward(prompts, images, **kwargs):
            if check():
                never.wait(60)  # far longer than the timeout; a daemon thread, so it never holds pytest up
            return [float(x) for x in images.mean(dim=(1, 2, 3))]

    return hung_reward


@pytest.mark.parametrize("is_async", [False, True], ids=["thread", "async"])
def test_a_hung_reward_times_out_naming_it_and_keeps_the_checkpoint(tmp_path, is_async):
    trainer = make_trainer(
        tmp_path,
        reward=hanging_after(1, is_async),
        reward_timeout=0.5,
        max_steps=3,
        save_strategy="steps",
        save_steps=1,
    )
    start = time.perf_counter()
    with pytest.raises(
        RewardTimeoutError, match=r"'hung_reward' did not return within reward_timeout=0.5 s"
    ) as info:
        trainer.train()
    assert time.perf_counter() - start < 30
    assert ("cannot stop a running thread" in str(info.value)) != is_async
    assert "raise `reward_timeout` (None waits forever)" in str(info.value)
    out = tmp_path / "out"
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-1"]
    assert f"saved to {out / 'stopped-at-step-1'}" in str(info.value)  # what step 1 trained is not lost
    assert load_file(out / "stopped-at-step-1" / LORA).keys() == load_file(out / "checkpoint-1" / LORA).keys()
    assert assert_saved_files_are_finite(out) == 2


def test_no_timeout_waits_in_the_calling_thread(tmp_path):
    threads = []

    def where(prompts, images, **kwargs):
        threads.append(threading.current_thread())
        return [0.0] * len(prompts)

    make_trainer(tmp_path, reward=where, reward_timeout=None, max_steps=1).train()
    assert threads == [threading.main_thread()]


# ------------------------------------------------------------------------------------------------------------
# Finite updates: a NaN/inf step never reaches the weights, AdamW's state or a saved file
# ------------------------------------------------------------------------------------------------------------
class NaNLossTrainer(DiffusionGRPOTrainer):
    """Makes the policy loss NaN on the optimizer steps listed in ``nan_steps`` (0-based)."""

    nan_steps: tuple[int, ...] = ()

    def policy_loss(self, log_prob, old_log_prob, advantages):
        result = super().policy_loss(log_prob, old_log_prob, advantages)
        if self.state.global_step in self.nan_steps:
            result.loss = result.loss * float("nan")
        return result


def test_a_nan_step_is_skipped_without_touching_weights_or_optimizer_state(tmp_path):
    NaNLossTrainer.nan_steps = (1,)
    trainer = make_trainer(
        tmp_path,
        trainer_class=NaNLossTrainer,
        max_steps=3,
        learning_rate=3e-2,
        save_strategy="steps",
        save_steps=1,
    )
    trainer.train()
    assert logged(trainer, "nonfinite_steps") == [0.0, 1.0, 0.0]
    out = tmp_path / "out"
    first, second, third = (checkpoint_tensors(out / f"checkpoint-{n}") for n in (1, 2, 3))
    assert first.keys() == second.keys()
    for key in first:  # the NaN step changed neither the LoRA nor AdamW's moments and step counts
        assert torch.equal(first[key], second[key]), key
    assert any(not torch.equal(second[k], third[k]) for k in second)  # the next step trained
    assert assert_saved_files_are_finite(out) == 3


def test_consecutive_nan_steps_stop_with_the_likely_cause(tmp_path):
    NaNLossTrainer.nan_steps = (1, 2, 3)
    trainer = make_trainer(
        tmp_path,
        trainer_class=NaNLossTrainer,
        max_steps=6,
        max_consecutive_nonfinite_steps=3,
        save_strategy="steps",
        save_steps=1,
    )
    with pytest.raises(
        NonFiniteTrainingError, match=r"3 optimizer steps in a row.*Likely cause: the policy loss"
    ):
        trainer.train()
    assert trainer.state.global_step == 3
    out = tmp_path / "out"
    assert assert_saved_files_are_finite(out) == 4  # checkpoint-1 to -3, and the weights saved when stopping
    stopped, first = load_file(out / "stopped-at-step-3" / LORA), load_file(out / "checkpoint-1" / LORA)
    assert all(torch.equal(stopped[k], first[k]) for k in first)  # the three NaN steps changed nothing


def test_nonfinite_samples_are_never_scored_and_blame_the_model(tmp_path):
    """NaN samples used to reach the reward, which was then blamed for returning NaN."""
    scored = []

    def counted(prompts, images, **kwargs):
        scored.append(len(prompts))
        return [0.0] * len(prompts)

    trainer = make_trainer(tmp_path, reward=counted, max_steps=5)
    trainer.adapter.decode = lambda latents: torch.full((len(latents), 3, 32, 32), float("nan"))
    with pytest.raises(
        NonFiniteTrainingError, match=r"model's own predictions are non-finite before any update"
    ):
        trainer.train()
    assert scored == []


def test_nan_log_probs_blame_the_noise_level(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=5)
    trainer.args.noise_level = 0.0  # what the config now refuses, forced past it
    with pytest.raises(
        NonFiniteTrainingError, match=r"log-probabilities are non-finite.*`noise_level` \(0.0\) must be > 0"
    ):
        trainer.train()


@pytest.mark.parametrize(
    ("field", "value"), [("guidance_scale", 1e30), ("noise_level", 1e6), ("time_shift", 1e30)]
)
def test_a_nan_stop_names_the_sampling_setting_that_overflowed(tmp_path, field, value):
    """Values the config now refuses, forced past it: the stop names the field rather than "the pipeline's dtype
    or scheduler"."""
    trainer = make_trainer(tmp_path, max_steps=5, max_consecutive_nonfinite_steps=1)
    setattr(trainer.args, field, value)
    with pytest.raises(
        NonFiniteTrainingError, match=re.escape(f"`{field}` ({value:g}) is far above the usual")
    ):
        trainer.train()


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "good"))
    parameter = next(p for n, p in trainer.model.named_parameters() if "lora" in n)
    with torch.no_grad():
        parameter[0, 0] = float("inf")
    with pytest.raises(
        NonFiniteTrainingError, match=r"Refusing to save.*are NaN/inf.*resume_from_checkpoint"
    ):
        trainer.save_model(str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------------------
# Resuming with other settings, or from an edited checkpoint; a full disk
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory):
    """A one-step GRPO run (seed 5, G 4) with checkpoint-1; each test copies it."""
    root = tmp_path_factory.mktemp("resume")
    make_trainer(root, max_steps=1, save_strategy="steps", save_steps=1, seed=5).train()
    return root / "out"


def resumed_copy(tmp_path, one_checkpoint):
    shutil.copytree(one_checkpoint, tmp_path / "out")
    return tmp_path / "out" / "checkpoint-1"


def edit_trainer_state(checkpoint, edit):
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


RESUME_WARNINGS = [
    (
        "another num_generations",
        dict(num_generations=2),
        r"num_generations=2, but it was trained with num_generations=4",
    ),
    ("another seed", dict(seed=6), r"seed=6, but it was trained with seed=5: the rollouts after the resume"),
]


@pytest.mark.parametrize(
    ("case", "settings", "message"), RESUME_WARNINGS, ids=[c[0] for c in RESUME_WARNINGS]
)
def test_resuming_with_other_settings_warns(tmp_path, one_checkpoint, caplog, case, settings, message):
    """A legitimate change, as another batch size is for transformers: said, not refused."""
    checkpoint = resumed_copy(tmp_path, one_checkpoint)
    trainer = make_trainer(tmp_path, **{"max_steps": 2, "seed": 5, **settings})
    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert re.search(message, caplog.text)
    assert trainer.state.global_step == 2


def test_resuming_with_the_same_settings_says_nothing(tmp_path, one_checkpoint, caplog):
    checkpoint = resumed_copy(tmp_path, one_checkpoint)
    with caplog.at_level("WARNING"):
        make_trainer(tmp_path, max_steps=2, seed=5).train(resume_from_checkpoint=str(checkpoint))
    assert "it was trained with" not in caplog.text


RESUME_REFUSALS = [
    (
        "a BPGO checkpoint under GRPO",
        lambda state: state["stateful_callbacks"]["RunSettingsCallback"]["args"].update(method="BPGO"),
        r"checkpoint-1 was written by BPGO, not GRPO: resuming it with GRPO would drop",
    ),
    (
        "an edited global_step",
        lambda state: state.update(global_step=5),
        r"trainer_state.json says global_step 5, but the folder is checkpoint-1: the file was edited",
    ),
]


@pytest.mark.parametrize(("case", "edit", "message"), RESUME_REFUSALS, ids=[c[0] for c in RESUME_REFUSALS])
def test_resuming_what_cannot_continue_is_refused_before_sampling(
    tmp_path, one_checkpoint, sampling_calls, case, edit, message
):
    checkpoint = resumed_copy(tmp_path, one_checkpoint)
    edit_trainer_state(checkpoint, edit)
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, max_steps=2, seed=5).train(resume_from_checkpoint=str(checkpoint))
    assert sampling_calls["n"] == 0


def test_an_older_checkpoint_holding_a_method_state_is_refused_under_grpo(tmp_path, one_checkpoint):
    """A checkpoint without recorded settings (an older one) that holds a method's state: refused as well."""
    checkpoint = resumed_copy(tmp_path, one_checkpoint)
    edit_trainer_state(checkpoint, lambda state: state.pop("stateful_callbacks"))
    save_state_file({"priors": torch.zeros(1)}, str(checkpoint / "trl_visual_state.safetensors"))
    with pytest.raises(
        ValueError, match=r"holds trl_visual_state.safetensors, the state of a method such as BPGO"
    ):
        make_trainer(tmp_path, max_steps=2, seed=5).train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail] unexpected pos 44736 vs 44630"),
    ],
    ids=["ENOSPC", "torch's unexpected pos"],
)
def test_a_full_disk_says_so_and_leaves_no_staging(tmp_path, monkeypatch, failure):
    def disk_full(*args, **kwargs):
        raise failure

    monkeypatch.setattr("trl_visual.trainer.checkpoint_io.save_lora", disk_full)
    monkeypatch.setattr(
        "trl_visual.trainer.output_dir.shutil.disk_usage",
        lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1024),
    )
    trainer = make_trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    with pytest.raises(
        OSError, match=r"The disk holding '.*out/.staging' is full \(0 MiB free\): the checkpoint "
    ):
        trainer.train()
    assert not (tmp_path / "out" / ".staging").exists()


def test_an_interrupted_checkpoint_write_leaves_nothing_in_the_stop_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing checkpoint-1 (a half-written file already there): the staging folder goes,
    so the checkpoint saved before stopping holds only what its own write put there."""
    from trl_visual.trainer import checkpoint_io

    calls = []

    def interrupted_once(pipeline_class, folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 1:
            (Path(folder) / "half-written.tmp").write_bytes(b"half")
            raise KeyboardInterrupt
        return save_lora(pipeline_class, folder, *args, **kwargs)

    save_lora = checkpoint_io.save_lora
    monkeypatch.setattr(checkpoint_io, "save_lora", interrupted_once)
    trainer = make_trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    stopped = tmp_path / "out" / "stopped-at-step-1"
    assert len(calls) == 2 and (stopped / "pytorch_lora_weights.safetensors").is_file()
    assert not (stopped / "half-written.tmp").exists() and not (tmp_path / "out" / ".staging").exists()


def test_a_leftover_staging_folder_is_removed_at_the_next_start(tmp_path, caplog):
    leftover = tmp_path / "out" / ".staging" / "checkpoint-7"
    leftover.mkdir(parents=True)
    (leftover / "optimizer.pt").write_bytes(b"half")
    with caplog.at_level("WARNING"):
        make_trainer(tmp_path, max_steps=1).train()
    assert not (tmp_path / "out" / ".staging").exists()
    assert "left by a checkpoint write that did not finish" in caplog.text


# ------------------------------------------------------------------------------------------------------------
# The command line: the reproductions
# ------------------------------------------------------------------------------------------------------------
def run_cli(argv, capsys):
    """``main(argv)`` in this process: its exit status and the error text, whether the command line reports the
    error itself (a message and a non-zero status) or lets the exception propagate (status 1, as Python's)."""
    try:
        status = main(argv)
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else 1
        text = "" if isinstance(exit.code, int) else str(exit.code)
    except Exception as error:
        status, text = 1, f"{type(error).__name__}: {error}"
    else:
        text = ""
    captured = capsys.readouterr()
    return status, text + captured.err + captured.out


def cli_args(tmp_path, *flags):
    return [
        "grpo",
        "--config",
        QUICKSTART,
        "--output_dir",
        str(tmp_path / "run"),
        "--report_to",
        "none",
        *flags,
    ]


def test_cli_noise_level_zero_exits_nonzero_before_loading_anything(tmp_path):
    """The issue's first command, as a user runs it: a non-zero exit status and a message naming the field,
    before the output folder exists."""
    command = [
        sys.executable,
        "-m",
        "trl_visual.cli",
        *cli_args(tmp_path, "--noise_level", "0", "--max_steps", "3"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode != 0
    assert "`noise_level` must be > 0" in result.stderr
    assert not (tmp_path / "run").exists()


CLI_CASES = [
    (["--num_inference_steps", "0"], r"`num_inference_steps` must be at least 1"),
    (["--epsilon", "-1"], r"`epsilon` must be ≥ 0"),
    (["--noise_level", "-0.5"], r"`noise_level` must be > 0"),
    (["--learning_rate", "nan"], r"`learning_rate` must be a finite number"),
    (["--reward_timeout", "-1"], r"`reward_timeout` must be > 0 seconds, or None"),
    (["--sde_window_size", "2", "--sde_window_range", "5", "9"], r"`sde_window_range` \[5, 9\]"),
    (["--reward_weights", "0"], r"`reward_weights` are all zero"),
    (["--reward_funcs"], r"argument --reward_funcs.*: expected at least one argument"),
    (["--reward_funcs", "no_such_reward"], r"Unknown reward 'no_such_reward'"),
    # issue 29 §3 and issue 26 §3
    (["--height", "-32"], r"`height` must be a positive number of pixels.*got -32"),
    (["--lora_alpha", "0"], r"`lora_alpha` is 0: the LoRA update is scaled by lora_alpha / r"),
    (["--lora_dropout", "1.5"], r"`lora_dropout` must be in \[0, 1\).*got 1.5"),
    (["--max_sequence_length", "0"], r"`max_sequence_length` must be at least 1 token"),
    (
        ["--max_steps", "-1", "--num_train_epochs", "0"],
        r"`num_train_epochs` must be > 0 when `max_steps` is unset",
    ),
    (["--save_strategy", "steps", "--save_steps", "0"], r"`save_steps` must be > 0"),
    (["--time_shift", "inf"], r"`time_shift` must be in \(0, 1000\]"),
    (["--guidance_scale", "1e30"], r"`guidance_scale` must be in \[0, 100\]"),
    (["--noise_level", "1e6"], r"`noise_level` must be ≤ 5"),
    (["--epsilon_high", "1e-5"], r"`epsilon_high` must be ≥ `epsilon`"),
    (["--max_stepz", "3"], r"unknown flag --max_stepz \(did you mean --max_steps\?\)"),
    (["--steps_per_generation", "4"], r"--steps_per_generation is not a setting here: .*`num_iterations`"),
]


@pytest.mark.parametrize(("flags", "message"), CLI_CASES, ids=lambda v: str(v)[:30])
def test_cli_bad_flags_are_refused_before_sampling(tmp_path, capsys, sampling_calls, flags, message):
    status, text = run_cli(cli_args(tmp_path, *flags), capsys)
    assert status != 0
    assert re.search(message, text), text[-2000:]
    assert sampling_calls["n"] == 0
    assert not (tmp_path / "run").exists()  # refused before the trainer was built


def quickstart_with(tmp_path, **changes):
    """The quick start's YAML with ``changes`` (``None`` removes a key), writing to ``tmp_path/run``."""
    with open(QUICKSTART) as handle:
        config = yaml.safe_load(handle)
    config.update(output_dir=str(tmp_path / "run"), **changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
    return str(path)


YAML_CASES = [
    ({"max_steps": 2.7}, r"`max_steps` must be a whole number; got 2.7 in the YAML config"),
    ({"num_generations": 4.0}, r"`num_generations` must be a whole number; got 4.0 .*Write 4"),
    ({"max_stepz": 3}, r"unknown YAML key .*'max_stepz' \(did you mean 'max_steps'\?\)"),
    ({"steps_per_generation": 4}, r"'steps_per_generation' is not a setting here"),
    ({"lora_dropout": 1.5}, r"`lora_dropout` must be in \[0, 1\)"),
]


@pytest.mark.parametrize(("changes", "message"), YAML_CASES, ids=lambda v: str(v)[:30])
def test_cli_bad_yaml_values_are_one_line(tmp_path, capsys, sampling_calls, changes, message):
    status, text = run_cli(["grpo", "--config", quickstart_with(tmp_path, **changes)], capsys)
    assert status == 2
    assert len(text.strip().splitlines()) == 1 and re.search(message, text), text[-2000:]
    assert sampling_calls["n"] == 0 and not (tmp_path / "run").exists()


def test_a_single_reward_name_in_yaml_is_a_one_element_list(tmp_path):
    """``reward_funcs: red_channel`` used to be read letter by letter ("Unknown reward 'r'")."""
    from trl_visual.cli import parse_args

    _, script_args, _, _ = parse_args(
        ["grpo", "--config", quickstart_with(tmp_path, reward_funcs="red_channel")]
    )
    assert script_args.reward_funcs == ["red_channel"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU that computes in bfloat16")
def test_cli_a_real_model_config_on_a_cpu_gets_our_message(tmp_path, capsys):
    """A bf16 YAML for a GPU, with ``--model_name_or_path tiny:sd3`` on a CPU-only machine."""
    config = quickstart_with(tmp_path, bf16=True)
    status, text = run_cli(["grpo", "--config", config, "--model_name_or_path", "tiny:sd3"], capsys)
    assert status == 2
    assert "`bf16` is set, but this machine has no GPU" in text and "--bf16 false" in text
    assert "Your setup doesn't support" not in text


def test_cli_a_missing_tracker_package_is_one_line(tmp_path, capsys, monkeypatch):
    """``--report_to tensorboard`` without tensorboard installed (hidden from the import system here)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        "trl_visual.preflight.module_installed",
        lambda name: name not in ("tensorboard", "tensorboardX") and real(name) is not None,
    )
    status, text = run_cli(cli_args(tmp_path, "--report_to", "tensorboard"), capsys)
    assert status == 2
    assert re.search(r"--report_to tensorboard: the tensorboard package is not installed.*pip install", text)


def test_cli_a_corrupt_parquet_names_the_file(tmp_path, capsys):
    bad = tmp_path / "prompts.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    status, text = run_cli(cli_args(tmp_path, "--dataset_name", str(bad)), capsys)
    assert status == 2
    assert f"Cannot read prompts from '{bad}'" in text and "Is it a valid .parquet file?" in text


def test_a_prompt_folder_given_by_absolute_path_is_read(tmp_path):
    from trl_visual.data import load_prompts

    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"}\n')
    assert load_prompts(str(folder.resolve()))["prompt"] == ["a cat", "a dog"]


def test_cli_a_prompt_outside_the_shapes_grammar_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr("trl_visual.trainer.diffusion_grpo_trainer.load_pipeline", lambda *a: loads.append(a))
    argv = ["grpo", "--model_name_or_path", "tiny:shapes", "--dataset_name", "builtin:objects"]
    argv += [
        "--reward_funcs",
        "shapes_adherence",
        "--output_dir",
        str(tmp_path / "run"),
        "--report_to",
        "none",
    ]
    status, text = run_cli(argv, capsys)
    assert status == 2
    assert "cannot score the train_dataset's prompts: Cannot read the prompt 'a cat' as a scene" in text
    assert loads == []


@pytest.mark.parametrize("name", ["sd35_pickscore_grpo.yaml", "flux_hpsv2_vipo.yaml"])
def test_real_model_configs_use_activation_checkpointing_without_a_warning(name, tmp_path):
    """transformers 5 deprecated `gradient_checkpointing` (a FutureWarning at every run); the shipped configs use
    `activation_checkpointing`, which the trainer turns into the denoiser's own checkpointing."""
    from trl_visual.cli import parse_args

    command = "vipo" if "vipo" in name else "grpo"
    argv = [command, "--config", os.path.join(REPO, "examples", "configs", name), "--bf16", "false"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, config, _ = parse_args([*argv, "--output_dir", str(tmp_path)])
    assert config.activation_checkpointing is True
    assert not [w for w in caught if "gradient_checkpointing" in str(w.message)]


# The user's own path, a new process: one line on stderr, no traceback, exit status 2
def trl_visual_command():
    script = shutil.which("trl-visual")
    return [script] if script else [sys.executable, "-m", "trl_visual.cli"]


def run_trl_visual(args, cwd, **env):
    environment = {**os.environ, **env}
    for name in ("WANDB_API_KEY", "WANDB_MODE", "HF_TOKEN"):
        if name not in env:
            environment.pop(name, None)
    return subprocess.run(
        [*trl_visual_command(), *args], capture_output=True, text=True, cwd=cwd, env=environment, timeout=300
    )


SUBPROCESS_CASES = [
    (
        "a .txt given without its extension",
        lambda tmp: (["--dataset_name", "my_prompts"], {}),
        r"--dataset_name 'my_prompts': no file or folder of that name, but my_prompts.txt exists",
    ),
    (
        "a Hub data set id offline",
        lambda tmp: (["--dataset_name", "someone/uncached-prompts"], {"HF_HUB_OFFLINE": "1"}),
        r"--dataset_name 'someone/uncached-prompts': .*not in the Hugging Face cache, and HF_HUB_OFFLINE is set",
    ),
    (
        "a Hub model id offline",
        lambda tmp: (["--model_name_or_path", "someone/uncached-model"], {"HF_HUB_OFFLINE": "1"}),
        r"--model_name_or_path 'someone/uncached-model': .*not in the Hugging Face cache.*hf download",
    ),
    (
        "wandb without a login",
        lambda tmp: (["--report_to", "wandb"], {"HOME": str(tmp), "NETRC": str(tmp / "none")}),
        r"--report_to wandb: wandb has no login on this machine. Run `wandb login`.*WANDB_MODE=offline",
    ),
    (
        "a flag typo",
        lambda tmp: (["--learning_rat", "1e-4"], {}),
        r"unknown flag --learning_rat \(did you mean --learning_rate\?\)",
    ),
]


@pytest.mark.parametrize(("case", "make", "message"), SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_cli_errors_in_a_new_process_are_one_line(tmp_path, case, make, message):
    (tmp_path / "my_prompts.txt").write_text("a cat\na dog\n")
    flags, env = make(tmp_path)
    result = run_trl_visual(
        ["grpo", "--config", QUICKSTART, "--output_dir", str(tmp_path / "run"), *flags], tmp_path, **env
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("trl-visual: error: ") and re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


def test_cli_unwritable_output_dir_is_one_line_in_a_new_process(immutable_dir):
    result = run_trl_visual(
        ["grpo", "--config", QUICKSTART, "--output_dir", str(immutable_dir / "run")], REPO
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "is not writable" in result.stderr


def test_cli_empty_reward_list_in_yaml_names_reward_funcs(tmp_path, capsys, sampling_calls):
    with open(QUICKSTART) as handle:
        config = yaml.safe_load(handle)
    config.update(reward_funcs=[], output_dir=str(tmp_path / "run"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    status, text = run_cli(["grpo", "--config", str(path)], capsys)
    assert status != 0
    assert "`reward_funcs` is empty" in text
    assert sampling_calls["n"] == 0


def test_cli_unwritable_output_dir_is_refused_before_loading_the_model(immutable_dir, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr("trl_visual.trainer.diffusion_grpo_trainer.load_pipeline", lambda *a: loads.append(a))
    argv = ["grpo", "--config", QUICKSTART, "--output_dir", str(immutable_dir / "run"), "--report_to", "none"]
    status, text = run_cli(argv, capsys)
    assert status != 0
    assert re.search(rf"`output_dir` '{immutable_dir / 'run'}' is not writable", text)
    assert loads == []


def test_cli_huge_learning_rate_never_leaves_a_non_finite_checkpoint(tmp_path, capsys):
    """``--learning_rate 1e6`` with a checkpoint at every step: the overflowing steps are skipped and counted,
    and every checkpoint and the final save hold finite weights and optimizer state."""
    flags = ["--learning_rate", "1e6", "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1"]
    flags += ["--per_device_train_batch_size", "8", "--num_generations", "4"]
    status, text = run_cli(cli_args(tmp_path, *flags), capsys)
    run = tmp_path / "run"
    assert status == 0 or "learning_rate" in text  # finished, or stopped naming the learning rate
    assert assert_saved_files_are_finite(run) >= 1
    assert any(p.startswith("checkpoint") for p in os.listdir(run))


# ------------------------------------------------------------------------------------------------------------
# kill -9 in the middle of a run, then resume: bitwise the same weights as a run never interrupted
# ------------------------------------------------------------------------------------------------------------
class KillAt(TrainerCallback):
    """``kill -9`` this process at the start of optimizer step ``step`` (after the checkpoint before it)."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


KILLED_RUN = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import pathlib
from test_bad_inputs import KillAt, RESUME_SETTINGS
from helpers import make_trainer
trainer = make_trainer(pathlib.Path({tmp!r}), **RESUME_SETTINGS)
trainer.add_callback(KillAt(3))
trainer.train()
"""

RESUME_SETTINGS = dict(save_strategy="steps", save_steps=1, learning_rate=3e-2, max_steps=4, seed=5)


def test_resume_after_kill_9_is_bitwise_identical(tmp_path):
    straight = make_trainer(tmp_path / "straight", **RESUME_SETTINGS)
    straight.train()
    straight.save_model(str(tmp_path / "straight" / "final"))

    killed = tmp_path / "killed"
    script = KILLED_RUN.format(tests=os.path.join(REPO, "tests"), tmp=str(killed))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert sorted(p for p in os.listdir(killed / "out") if p.startswith("checkpoint")) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]
    resumed = make_trainer(killed, **RESUME_SETTINGS)
    resumed.train(resume_from_checkpoint=True)
    resumed.save_model(str(killed / "final"))

    a, b = load_file(tmp_path / "straight" / "final" / LORA), load_file(killed / "final" / LORA)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert logged(resumed, "reward") == logged(straight, "reward")
