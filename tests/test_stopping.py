"""Nothing trained is lost when training stops early: any exception after the first update, a reward calling
``sys.exit``, and SIGTERM save a resumable ``output_dir/stopped-at-step-N`` and say where."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import lora_weights, make_trainer
from safetensors.torch import load_file

from trl_visual import DiffusionGRPOTrainer
from trl_visual.testing import tiny_sd3_pipeline

LORA = "pytorch_lora_weights.safetensors"


def red(prompts, images, **kwargs):
    return images[:, 0].mean(dim=(1, 2)).tolist()


def failing_on_call(number, error):
    """``red``, raising ``error`` (an exception, or ``SystemExit``) on its ``number``-th call."""
    calls = []

    def flaky(prompts, images, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise error
        return red(prompts, images)

    return flaky


def test_an_error_after_the_first_update_saves_a_resumable_checkpoint(tmp_path, caplog):
    """A reward raising on its 3rd call (step 3) with ``save_strategy="no"``: the original error propagates, the
    state after step 2 is in ``stopped-at-step-2`` (a LoRA that diffusers loads, and a whole checkpoint), and
    resuming it ends bitwise where a run never interrupted ends."""
    settings = dict(max_steps=4, learning_rate=3e-2, seed=5)
    straight = make_trainer(tmp_path / "straight", reward=red, **settings)
    straight.train()

    trainer = make_trainer(tmp_path, reward=failing_on_call(3, ValueError("scorer down")), **settings)
    with pytest.raises(RuntimeError, match="'flaky' raised ValueError: scorer down") as info:
        trainer.train()
    stopped = tmp_path / "out" / "stopped-at-step-2"
    assert info.value.__notes__[0].startswith(
        f"Training stopped at step 2. The weights trained so far were saved to {stopped}"
    )
    logged_line = "Training stopped at step 2 (RuntimeError: The reward function 'flaky' raised ValueError: scorer down)"
    assert logged_line in caplog.text and f"resume_from_checkpoint={str(stopped)!r}" in caplog.text
    left = [n for n in os.listdir(tmp_path / "out") if n.startswith(("checkpoint", "stopped", "."))]
    assert left == ["stopped-at-step-2"]  # no checkpoint-N, no staging folder left
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"} <= set(os.listdir(stopped))
    pipe = tiny_sd3_pipeline()
    pipe.load_lora_weights(str(stopped))  # the weights load as any saved LoRA
    assert load_file(stopped / LORA).keys()

    resumed = make_trainer(tmp_path, reward=red, **settings)
    resumed.train(resume_from_checkpoint=str(stopped))
    got, expected = lora_weights(resumed), lora_weights(straight)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_an_error_before_the_first_update_saves_nothing(tmp_path):
    trainer = make_trainer(tmp_path, reward=failing_on_call(1, ValueError("bad")))
    with pytest.raises(RuntimeError, match="raised ValueError: bad") as info:
        trainer.train()
    assert not getattr(info.value, "__notes__", None)
    assert not any(name.startswith("stopped") for name in os.listdir(tmp_path / "out"))


def test_sys_exit_in_a_reward_is_an_error_naming_it(tmp_path):
    """``sys.exit(0)`` in a reward used to end the run with status 0 and nothing saved."""
    trainer = make_trainer(tmp_path, reward=failing_on_call(2, SystemExit(0)), max_steps=3)
    with pytest.raises(RuntimeError, match=r"'flaky' called sys.exit\(0\).*not end the process"):
        trainer.train()
    assert (tmp_path / "out" / "stopped-at-step-1" / LORA).is_file()


def test_keyboard_interrupt_after_the_first_update_saves_and_propagates(tmp_path):
    trainer = make_trainer(tmp_path, reward=failing_on_call(2, KeyboardInterrupt()), max_steps=3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (tmp_path / "out" / "stopped-at-step-1" / "optimizer.pt").is_file()


class NaNFromStep2(DiffusionGRPOTrainer):
    def policy_loss(self, log_prob, old_log_prob, advantages):
        result = super().policy_loss(log_prob, old_log_prob, advantages)
        if self.state.global_step >= 1:
            result.loss = result.loss * float("nan")
        return result


def test_a_nan_stop_saves_its_checkpoint_once(tmp_path):
    """The non-finite stop saves before raising; the general stop path then saves nothing more."""
    trainer = make_trainer(
        tmp_path, trainer_class=NaNFromStep2, max_steps=4, max_consecutive_nonfinite_steps=2
    )
    with pytest.raises(FloatingPointError, match="saved to .*stopped-at-step-2") as info:
        trainer.train()
    assert not getattr(info.value, "__notes__", None)
    assert [n for n in os.listdir(tmp_path / "out") if n.startswith("stopped")] == ["stopped-at-step-2"]


SIGTERM_REWARD = """
import os, time
calls = []
def red(prompts, images, **columns):
    calls.append(1)
    if len(calls) == 3:  # step 3: steps 1 and 2 are trained; tell the test, then wait for its SIGTERM
        open(os.path.join(os.path.dirname(__file__), "waiting"), "w").close()
        time.sleep(60)
    return images[:, 0].mean(dim=(1, 2)).tolist()
"""


def test_sigterm_saves_the_run_and_exits_143_with_a_message(tmp_path):
    (tmp_path / "slow_reward.py").write_text(SIGTERM_REWARD)
    out = tmp_path / "out"
    args = [
        "grpo", "--model_name_or_path", "tiny:sd3", "--reward_funcs", f"{tmp_path / 'slow_reward.py'}:red",
        "--max_steps", "5", "--num_generations", "2", "--per_device_train_batch_size", "4",
        "--num_inference_steps", "2", "--guidance_scale", "1", "--max_sequence_length", "8",
        "--height", "32", "--width", "32", "--use_peft", "--lora_r", "4", "--lora_alpha", "4",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "TRL_VISUAL_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "trl_visual.cli", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "waiting").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never reached step 3"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    stopped = out / "stopped-at-step-2"
    assert (
        f"Training stopped at step 2 (SIGTERM received). The weights trained so far were saved to {stopped}"
        in (stderr)
    )
    assert load_file(stopped / LORA).keys() and (stopped / "optimizer.pt").is_file()
