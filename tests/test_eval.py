"""Evaluation: `eval_reward_funcs` (scored by evaluate() only, never trained on) and the evaluation sample grid."""

import os
import re
from pathlib import Path

import helpers
import pytest
import torch
from datasets import Dataset
from helpers import PROMPTS, logged, make_config
from peft import LoraConfig
from PIL import Image

from trl_visual import BPGOTrainer, DiffusionGRPOTrainer
from trl_visual.cli import build_trainer, parse_args
from trl_visual.trainer.logging_utils import MIN_CELL_WIDTH

EVAL_PROMPTS = ["a blue house", "a green field", "a yellow sun"]


def brightness(prompts, images, **kwargs):
    """An evaluation-only reward: mean pixel value (reachable as `path/to/this_file.py:brightness`)."""
    return images.mean(dim=(1, 2, 3)).tolist()


class CountingReward:
    """Mean pixel value, recording the prompts of every call."""

    __name__ = "counting"

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, prompts, images, **kwargs):
        self.calls.append(list(prompts))
        return images.mean(dim=(1, 2, 3)).tolist()


def make_trainer(
    tmp_path,
    trainer_class=DiffusionGRPOTrainer,
    eval_reward_funcs=None,
    config_eval_rewards=None,
    **overrides,
):
    """The tiny SD3 with evaluation batches of 2 over the three evaluation prompts; ``eval_reward_funcs`` go
    to the trainer, ``config_eval_rewards`` to the config."""
    return helpers.make_trainer(
        tmp_path,
        trainer_class=trainer_class,
        eval_dataset=Dataset.from_dict({"prompt": EVAL_PROMPTS}),
        peft=LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]),
        trainer_kwargs={"eval_reward_funcs": eval_reward_funcs},
        per_device_eval_batch_size=2,
        eval_reward_funcs=config_eval_rewards,
        **overrides,
    )


# -- eval_reward_funcs ---------------------------------------------------------------------------------------------


def test_eval_rewards_are_scored_in_evaluation_only(tmp_path):
    """Training never calls an eval reward (nor logs it); evaluate() scores every evaluation prompt with it,
    reports its mean as `eval_rewards/<name>/mean`, and leaves it out of `eval_reward`."""
    counting = CountingReward()
    trainer = make_trainer(tmp_path, eval_reward_funcs=[counting], eval_strategy="steps", eval_steps=2)
    trainer.train()
    assert all(not any(k.startswith("rewards/counting") for k in e) for e in trainer.state.log_history)
    assert [p for call in counting.calls for p in call] == EVAL_PROMPTS  # the one evaluation, at step 2
    evaluated = logged(trainer, "eval_rewards/counting/mean")
    assert len(evaluated) == 1 and 0.0 < evaluated[0] < 1.0

    counting.calls.clear()
    metrics = trainer.evaluate()
    assert [p for call in counting.calls for p in call] == EVAL_PROMPTS
    assert set(metrics) == {"eval_reward", "eval_rewards/red_channel/mean", "eval_rewards/counting/mean"}
    assert metrics["eval_reward"] == pytest.approx(metrics["eval_rewards/red_channel/mean"])
    assert metrics["eval_rewards/counting/mean"] != pytest.approx(metrics["eval_rewards/red_channel/mean"])
    # after evaluate(), training scores only the training reward again
    assert trainer.reward_names == ["red_channel"] and len(trainer.reward_funcs) == 1


def test_evaluation_is_handed_its_rewards_and_never_swaps_the_trainers(tmp_path):
    """The evaluation runner takes the rewards as an argument: while an eval reward runs, the trainer's reward list
    is still the training one."""
    seen = []
    trainer = make_trainer(tmp_path)

    def watching(prompts, images, **kwargs):
        seen.append(list(trainer.reward_names))
        return [0.0] * len(prompts)

    trainer.eval_reward_funcs, trainer.eval_reward_names = [watching], ["watching"]
    metrics = trainer.evaluate()
    assert seen and all(names == ["red_channel"] for names in seen)
    assert metrics["eval_rewards/watching/mean"] == 0.0


def prompt_length(prompts, images, **kwargs):
    """Characters of the prompt; None (not scored) for the blue house."""
    return [None if "blue" in p else float(len(p)) for p in prompts]


def test_eval_reward_mean_leaves_unscored_samples_out(tmp_path):
    """The logged mean is over the evaluation samples the reward scored (None left out), across batches."""
    metrics = make_trainer(tmp_path, eval_reward_funcs=prompt_length).evaluate()
    assert metrics["eval_rewards/prompt_length/mean"] == pytest.approx(
        (len("a green field") + len("a yellow sun")) / 2
    )


def test_config_names_and_file_specs_resolve(tmp_path):
    """The config takes names and `path/to/file.py:function` specs (YAML and CLI expressible); the trainer's
    argument, callables included, takes precedence over the config."""
    spec = f"{os.path.abspath(__file__)}:brightness"
    assert make_trainer(tmp_path).eval_reward_funcs == []
    trainer = make_trainer(tmp_path, config_eval_rewards=["jpeg_compressibility", spec])
    assert trainer.eval_reward_names == ["jpeg_compressibility", "brightness"]
    metrics = trainer.evaluate()
    assert 0.0 < metrics["eval_rewards/brightness/mean"] < 1.0
    assert metrics["eval_rewards/jpeg_compressibility/mean"] != metrics["eval_rewards/brightness/mean"]
    counting = CountingReward()
    trainer = make_trainer(tmp_path, eval_reward_funcs=counting, config_eval_rewards=["jpeg_compressibility"])
    assert trainer.eval_reward_funcs == [counting]


def test_cli_flag_reaches_the_trainer(tmp_path):
    command, *parsed = parse_args(
        [
            "grpo",
            "--model_name_or_path",
            "tiny:sd3",
            "--reward_funcs",
            "red_channel",
            "--eval_reward_funcs",
            "jpeg_compressibility",
            f"{os.path.abspath(__file__)}:brightness",
            "--output_dir",
            str(tmp_path / "out"),
            "--report_to",
            "none",
        ]
    )
    trainer = build_trainer(command, *parsed)
    assert trainer.eval_reward_names == ["jpeg_compressibility", "brightness"]
    assert trainer.reward_names == ["red_channel"]


@pytest.mark.parametrize(
    "eval_rewards",
    [["red_channel"], ["jpeg_compressibility", "jpeg_compressibility"]],
    ids=["train", "twice"],
)
def test_colliding_eval_reward_names_are_refused(tmp_path, eval_rewards):
    with pytest.raises(ValueError, match="eval_reward_funcs.*collide"):
        make_trainer(tmp_path, eval_reward_funcs=eval_rewards)


def test_training_and_eval_rewards_take_the_same_specs():
    """``reward_funcs=`` in Python takes what ``--reward_funcs`` and ``eval_reward_funcs=`` take: a registered
    name, ``module.path:function``, or a callable; an unknown name is the same error for both."""
    from trl_visual.rewards.builtin import red_channel
    from trl_visual.trainer.reward_calls import resolve_eval_rewards, resolve_rewards

    spec = "trl_visual.rewards.builtin:red_channel"
    assert resolve_rewards(spec) == resolve_eval_rewards([spec], []) == [red_channel]
    assert resolve_rewards(["red_channel", red_channel]) == [red_channel, red_channel]
    for resolve in (resolve_rewards, lambda name: resolve_eval_rewards(name, [])):
        with pytest.raises(ValueError, match="Unknown reward 'nope'.*module.path:function"):
            resolve(["nope"])


def test_unknown_eval_reward_names_the_registered_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown reward 'imagerewrd'.*imagereward"):
        make_trainer(tmp_path, eval_reward_funcs=["imagerewrd"])


def test_bpgo_trainer_takes_eval_rewards(tmp_path):
    counting = CountingReward()
    trainer = make_trainer(tmp_path, trainer_class=BPGOTrainer, eval_reward_funcs=[counting])
    assert "eval_rewards/counting/mean" in trainer.evaluate()


# -- the evaluation sample grid ------------------------------------------------------------------------------------


def test_evaluation_logs_one_captioned_grid_at_the_current_step(tmp_path):
    """With log_images, each evaluation (here at steps 1 and 2) writes one grid of the first num_images_to_log
    evaluation samples, gathered across evaluation batches, and sends it to tensorboard as `eval_samples` at
    the step the evaluation ran, captioned with the evaluation prompts and their training reward."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(
        tmp_path,
        eval_strategy="steps",
        eval_steps=1,
        log_images=True,
        num_images_to_log=3,  # more than one evaluation batch (2)
        report_to="tensorboard",
        logging_steps=1,
    )
    trainer.train()
    folder = tmp_path / "out" / "samples"
    assert sorted(f for f in os.listdir(folder) if f.startswith("eval")) == [
        "eval_step_000001.png",
        "eval_step_000002.png",
    ]
    grid = Image.open(folder / "eval_step_000002.png")
    width, height = (
        grid.size
    )  # three cells in one row, each 32×32 sample enlarged to 128×128 above its caption
    assert width == 3 * MIN_CELL_WIDTH and height > MIN_CELL_WIDTH

    (run_dir,) = (tmp_path / "out" / "runs").iterdir()
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Images("eval_samples")] == [1, 2]
    captions = [
        e.tensor_proto.string_val[0].decode() for e in events.Tensors("eval_samples/captions/text_summary")
    ]
    rewards = logged(trainer, "eval_reward")
    for caption, reward in zip(captions, rewards):
        lines = caption.split("\n\n")
        assert [line.split(" | ")[0] for line in lines] == EVAL_PROMPTS
        per_sample = [float(line.split(" | ")[1]) for line in lines]
        assert sum(per_sample) / 3 == pytest.approx(reward, abs=1e-3)  # the captions show the training reward


def test_evaluation_logs_no_images_without_log_images(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.evaluate()
    assert not (tmp_path / "out" / "samples").exists()


# -- the external video scorer example of docs/rewards.md ----------------------------------------------------------


def docs_video_reward_class():
    """The `ExternalVideoReward` class exactly as docs/rewards.md shows it (its first code block after the
    "External video scorers" heading), executed."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "rewards.md").read_text()
    section = page[page.index("### External video scorers") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/rewards.md", "exec"), namespace)
    return namespace["ExternalVideoReward"]


class FakeVideoScorer:
    """Stands for VideoCLIP-XL / VideoAlign: records what it is given and scores the mean frame brightness."""

    def __init__(self):
        self.seen: list[tuple[str, tuple, object]] = []

    def __call__(self, prompt, frames):
        self.seen.append((prompt, frames.shape, frames.dtype))
        return frames.mean(axis=(1, 2, 3)).tolist()[-1] / 255 + len(prompt)


def test_docs_external_video_reward_feeds_the_scorer_uint8_frames():
    """Frame t of video b has brightness (t + b) / 20: the scorer gets 4 evenly spaced frames (0, 4, 7, 11 of
    12) per video, as uint8 (T, H, W, 3), with the video's prompt; its numbers come back one per video."""
    reward_class = docs_video_reward_class()
    scorer = FakeVideoScorer()
    reward = reward_class(scorer, num_frames=4, name="fake_video")
    brightness = (torch.arange(12)[None, :] + torch.arange(2)[:, None]) / 20
    videos = brightness[:, :, None, None, None].expand(2, 12, 3, 8, 6).contiguous()
    scores = reward(["a cat", "a big dog"], videos=videos)
    assert [(p, shape, str(dtype)) for p, shape, dtype in scorer.seen] == [
        ("a cat", (4, 8, 6, 3), "uint8"),
        ("a big dog", (4, 8, 6, 3), "uint8"),
    ]
    # the last frame picked is frame 11: brightness (11 + b) / 20, quantized to uint8
    expected = [round((11 + b) / 20 * 255) / 255 + len(p) for b, p in enumerate(["a cat", "a big dog"])]
    assert scores == pytest.approx(expected)
    assert reward.__name__ == "fake_video"


def test_docs_external_video_reward_as_an_eval_reward_of_a_video_model(tmp_path):
    """The wrapped scorer runs in evaluate() of the tiny Wan (video) model and lands in eval_rewards/<name>."""
    scorer = FakeVideoScorer()
    reward = docs_video_reward_class()(scorer, num_frames=2, name="fake_video")
    trainer = DiffusionGRPOTrainer(
        model="tiny:wan",
        reward_funcs="red_channel",
        args=make_config(tmp_path, per_device_eval_batch_size=3, num_inference_steps=2),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": EVAL_PROMPTS}),
        eval_reward_funcs=reward,
    )
    metrics = trainer.evaluate()
    assert [p for p, _, _ in scorer.seen] == EVAL_PROMPTS
    assert all(shape[0] == 2 and shape[-1] == 3 for _, shape, _ in scorer.seen)
    mean_length = sum(len(p) for p in EVAL_PROMPTS) / 3
    assert mean_length < metrics["eval_rewards/fake_video/mean"] < mean_length + 1
