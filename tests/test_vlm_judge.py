"""The VLM judge reward on a tiny random-weight SmolVLM (Idefics3) saved to a folder and loaded by path."""

import math

import pytest
import torch
from PIL import Image

from trl_visual.cli import parse_args, run
from trl_visual.core.interpretations import interpretation_mean_var
from trl_visual.rewards import REWARD_REGISTRY, VLMJudgeReward, resolve_reward, split_reward_call
from trl_visual.rewards.judging import DEFAULT_TEMPLATE
from trl_visual.rewards.spec import resolve_reward_spec
from trl_visual.testing import TINY_VLM_CHAT_TEMPLATE, save_tiny_vlm_judge
from trl_visual.trainer.reward_calls import check_reward_interpretations

QUESTION = "Does this {media} show: {prompt}? Answer yes or no."


@pytest.fixture(scope="module")
def judge_path(tmp_path_factory):
    return save_tiny_vlm_judge(tmp_path_factory.mktemp("vlm") / "smolvlm-tiny")


@pytest.fixture(scope="module")
def judge(judge_path):
    return VLMJudgeReward(judge_path, batch_size=3)


def hand_written_score(
    judge, prompt: str, frames: torch.Tensor, question: str = QUESTION, media="image"
) -> float:
    """The judge's formula written out for one sample, without the reward's code: the SmolVLM prompt typed
    by hand, the processor on PIL images, the last position's softmax over the whole vocabulary, and the
    probabilities of the tokens `yes`, `Yes`, ` yes`, ` Yes` against those of `no`, `No`, ` no`, ` No`."""
    tokenizer = judge.processor.tokenizer
    text = (
        "<|im_start|>User:" + "<image>" * len(frames) + question.format(prompt=prompt, media=media)
        + "<end_of_utterance>\nAssistant:"
    )  # fmt: skip
    pictures = [
        Image.fromarray((f.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        for f in frames
    ]
    inputs = judge.processor(text=[text], images=[pictures], return_tensors="pt")
    with torch.no_grad():
        probs = judge.model(**inputs).logits[0, -1].float().softmax(-1)
    yes = probs[tokenizer.convert_tokens_to_ids(["yes", "Yes", "Ġyes", "ĠYes"])].sum()
    no = probs[tokenizer.convert_tokens_to_ids(["no", "No", "Ġno", "ĠNo"])].sum()
    return float(yes / (yes + no))


def test_score_is_p_yes_over_p_yes_plus_p_no_of_a_hand_written_forward(judge):
    torch.manual_seed(1)
    images = torch.rand(4, 3, 32, 40)
    prompts = ["a red cube left of a blue sphere", "a cat", "two dogs on a sofa, one asleep", "x"]
    scores = judge(prompts, images)
    expected = [hand_written_score(judge, p, img[None]) for p, img in zip(prompts, images)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert max(scores) - min(scores) > 0.1  # the random judge does tell these inputs apart
    assert judge.yes_ids != judge.no_ids and len(judge.yes_ids) == 4


def test_batching_and_padding_do_not_change_scores(judge_path, judge):
    torch.manual_seed(2)
    images = torch.rand(5, 3, 32, 32)
    prompts = ["a", "a much longer prompt that pads every other row of the batch", "b c", "d", "e f g h"]
    one_at_a_time = VLMJudgeReward(judge_path, batch_size=1)(prompts, images)
    assert judge(prompts, images) == pytest.approx(one_at_a_time, abs=1e-5)
    assert judge(prompts[::-1], images.flip(0)) == pytest.approx(one_at_a_time[::-1], abs=1e-5)
    bf16 = VLMJudgeReward(judge_path, batch_size=5, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert bf16(prompts, images) == pytest.approx(one_at_a_time, abs=0.05)


def test_special_characters_reach_the_question_verbatim_and_cannot_add_image_slots(judge):
    torch.manual_seed(3)
    images = torch.rand(2, 3, 32, 32)
    prompts = [
        'a {sign} saying "100% {prompt}" — ünïcødé 🐱\nsecond line',
        "a frame with <image> written on it",
    ]
    scores = judge(prompts, images)
    assert scores[0] == pytest.approx(hand_written_score(judge, prompts[0], images[:1]), abs=1e-5)
    protected = "a frame with <\u200bimage> written on it"  # the special token is broken, not read as a slot
    assert judge.protect(prompts[1]) == protected
    assert scores[1] == pytest.approx(hand_written_score(judge, protected, images[1:]), abs=1e-5)


def test_several_templates_return_one_interpretation_each(judge_path, judge):
    torch.manual_seed(4)
    images = torch.rand(3, 3, 32, 32)
    prompts = ["a cat", "a dog", "a bird"]
    other = "Is there {prompt} in this {media}? yes or no"
    both = VLMJudgeReward(judge_path, templates=[QUESTION, other], batch_size=4)(prompts, images)
    alone = [VLMJudgeReward(judge_path, templates=t)(prompts, images) for t in (QUESTION, other)]
    assert [len(row) for row in both] == [2, 2, 2]
    assert [row[0] for row in both] == pytest.approx(alone[0], abs=1e-5)
    assert [row[1] for row in both] == pytest.approx(alone[1], abs=1e-5)
    values = check_reward_interpretations(both, "vlm_judge", 3)  # the trainer's reading: (B, M)
    mean, variance = interpretation_mean_var(values)
    assert mean.tolist() == pytest.approx([(a + b) / 2 for a, b in zip(*alone)], abs=1e-5)
    assert torch.isfinite(variance).all()
    variants = [["a cat", "a kitten"], ["a dog", "a puppy"], ["a bird", "a sparrow"]]  # × 2 templates: M = 4
    paraphrased = VLMJudgeReward(judge_path, templates=[QUESTION, other])(
        prompts, images, prompt_variants=variants
    )
    assert [len(row) for row in paraphrased] == [4, 4, 4]
    assert paraphrased[1][3] == pytest.approx(
        hand_written_score(judge, "a puppy", images[1:2], other), abs=1e-5
    )


def test_video_frames_are_evenly_spaced_images_in_one_turn(judge_path):
    torch.manual_seed(5)
    videos = torch.rand(2, 7, 3, 32, 32)
    judge = VLMJudgeReward(judge_path, num_frames=3)
    scores = judge(["a cat walking", "rain"], videos=videos)
    for score, prompt, video in zip(scores, ["a cat walking", "rain"], videos):
        expected = hand_written_score(judge, prompt, video[[0, 3, 6]], media="video")
        assert score == pytest.approx(expected, abs=1e-5)
    assert judge(["a cat walking", "rain"], videos) == pytest.approx(scores, abs=1e-6)  # 5-D `images` too


def test_registered_and_configured_from_a_spec_string(judge_path):
    assert "vlm_judge" in REWARD_REGISTRY
    spec = f"vlm_judge(model_name_or_path={judge_path}, batch_size=2, templates=['Is it {{prompt}}?', '{QUESTION}'])"
    name, kwargs = split_reward_call(spec)
    assert name == "vlm_judge" and kwargs["batch_size"] == 2 and kwargs["templates"][0] == "Is it {prompt}?"
    for reward in (resolve_reward(spec), resolve_reward_spec(spec)):
        assert isinstance(reward, VLMJudgeReward) and isinstance(reward, torch.nn.Module)
        assert reward.batch_size == 2 and reward.templates == ["Is it {prompt}?", QUESTION]
    with pytest.raises(ValueError, match=r"takes no argument 'batchsize'; it takes model_name_or_path"):
        resolve_reward(f"vlm_judge(model_name_or_path={judge_path}, batchsize=2)")
    with pytest.raises(ValueError, match="is not key=value"):
        resolve_reward("vlm_judge(2)")


def test_spec_arguments_read_back_exactly_what_a_yaml_mapping_gave():
    """A YAML mapping's arguments become a spec string and are read back unchanged: quotes and commas inside
    strings, apostrophes, small floats and infinities (which JSON writes as YAML strings), nested lists and maps."""
    from trl_visual.rewards.arguments import format_reward_call

    kwargs = {
        "system_prompt": "You're a strict judge, aren't you?",
        "templates": ['Is it 5" tall, {prompt}?', "it's {prompt}"],
        "backoff": 1e-07,
        "timeout": float("inf"),
        "answers": ["yes", "no"],
        "name": None,
        "flag": True,
        "batch_size": 8,
        "nested": {"a": 0.5, "b": [1.5e-09, "x, y"]},
        "empty": "",
    }
    assert split_reward_call(format_reward_call("vlm_judge", kwargs)) == ("vlm_judge", kwargs)


def test_a_plain_spec_value_may_hold_an_apostrophe():
    """As in YAML, a quote opens a quoted value only where a value starts; ``''`` and ``\\"`` are escaped quotes."""
    spec = "vlm_judge(system_prompt=You're strict, batch_size=2, templates=[\"it's {prompt}\", 'a ''b'', c'])"
    assert split_reward_call(spec) == (
        "vlm_judge",
        {"system_prompt": "You're strict", "batch_size": 2, "templates": ["it's {prompt}", "a 'b', c"]},
    )
    assert split_reward_call('x(a="say \\"hi\\", ok")') == ("x", {"a": 'say "hi", ok'})
    with pytest.raises(ValueError, match="unclosed quote"):
        split_reward_call("x(a='open, b=2)")


def test_cli_trains_bpgo_on_the_judges_interpretations_from_a_yaml(tmp_path, judge_path):
    """YAML and flags: the judge with two templates (a YAML mapping of its arguments) is the reward of a BPGO step
    whose RAS reads its spread; the same judge as a flag is one spec string."""
    config = tmp_path / "judge.yaml"
    config.write_text(
        "reward_funcs:\n"
        "  - vlm_judge:\n"
        f"      model_name_or_path: {judge_path}\n"
        "      batch_size: 4\n"
        f"      templates: ['{QUESTION}', 'Is there {{prompt}} here? yes or no']\n"
        "ras_mode: uncertainty\nprior_source: base_model\nprior_num_rollouts: 2\n"
    )
    fast = ["--model_name_or_path", "tiny:sd3", "--max_steps", "1", "--num_generations", "2",
            "--per_device_train_batch_size", "4", "--num_inference_steps", "2", "--guidance_scale", "1",
            "--max_sequence_length", "8", "--height", "32", "--width", "32", "--use_peft", "--lora_r", "4",
            "--lora_alpha", "4", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]  # fmt: skip
    trainer = run(["bpgo", "--config", str(config), *fast, "--output_dir", str(tmp_path / "out")])
    assert trainer.reward_names == ["vlm_judge"] and trainer.reward_funcs[0].batch_size == 4
    assert trainer.reward_funcs[0].templates == [QUESTION, "Is there {prompt} here? yes or no"]
    logs = [entry for entry in trainer.state.log_history if "rewards/vlm_judge/mean" in entry]
    assert logs and 0 < logs[0]["rewards/vlm_judge/mean"] < 1
    assert any(entry.get("interpretation_var_mean", 0) > 0 for entry in trainer.state.log_history)
    flag = f"vlm_judge(model_name_or_path={judge_path}, batch_size=2)"
    script_args = parse_args(["grpo", *fast, "--reward_funcs", flag, "--output_dir", str(tmp_path / "o")])[1]
    assert script_args.reward_funcs == [flag] and resolve_reward_spec(flag).batch_size == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"answers": ("yes please", "no")}, r"'yes please' is not a single token .* answers=\('yes', 'no'\)"),
        ({"answers": ("yes", "Yes")}, r"must be two different words"),
        ({"answers": ("maybe", "no")}, r"'maybe' is not a single token"),
        ({"templates": "Is it a cat?"}, r"has no \{prompt\}"),
        ({"templates": "Is {prompt} in {place}?"}, r"cannot be filled .* write a literal brace twice"),
        ({"video_mode": "clip"}, r"video_mode must be one of"),
        ({"batch_size": 0}, r"batch_size must be a positive integer"),
        ({"dtype": "float8"}, r"Unknown reward dtype 'float8'; use one of"),
    ],
)
def test_bad_arguments_are_one_line_errors_that_name_the_fix(judge_path, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        VLMJudgeReward(judge_path, **kwargs)
    assert "\n" not in str(error.value)


def test_a_processor_without_chat_template_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    path = save_tiny_vlm_judge(tmp_path / "no-template", chat_template=False)
    loaded = []
    monkeypatch.setattr(VLMJudgeReward, "_load_model", staticmethod(lambda *a: loaded.append(a)))
    with pytest.raises(ValueError, match=r"has no chat template.*-Instruct.*chat_template=") as error:
        VLMJudgeReward(path)
    assert "\n" not in str(error.value) and not loaded
    monkeypatch.undo()
    given = VLMJudgeReward(path, chat_template=TINY_VLM_CHAT_TEMPLATE)  # the fix the message names
    images = torch.rand(1, 3, 32, 32)
    assert given(["a cat"], images) == pytest.approx([hand_written_score(given, "a cat", images)], abs=1e-5)


def test_video_mode_hands_the_processor_one_video_per_sample(judge_path, monkeypatch):
    """`video_mode="video"` puts one video slot in the turn and gives the processor `videos=` (a list of frames per
    sample); the tiny SmolVLM has no video processor, so the processor is stubbed to see what it is given."""
    judge = VLMJudgeReward(judge_path, num_frames=2, video_mode="video")
    assert judge.conversation("q", 2, "video")[0]["content"] == [
        {"type": "video"},
        {"type": "text", "text": "q"},
    ]
    assert judge.conversation("q", 2, "image")[0]["content"][0] == {"type": "image"}
    seen = {}

    def stub(self, text, **kwargs):
        seen.update(kwargs, text=text)
        raise RuntimeError("stop here")

    monkeypatch.setattr(type(judge.processor), "__call__", stub)
    monkeypatch.setattr(type(judge.processor), "apply_chat_template", lambda self, turns, **kw: str(turns))
    with pytest.raises(ValueError, match="refused the judge's inputs .* try video_mode='frames'"):
        judge(["rain", "snow"], videos=torch.rand(2, 5, 3, 16, 16))
    assert "images" not in seen and [len(frames) for frames in seen["videos"]] == [2, 2]
    assert all(frame.size == (16, 16) for frames in seen["videos"] for frame in frames)
    assert "'type': 'video'" in seen["text"][0] and "Does this video show: rain?" in seen["text"][0]


def test_a_processor_that_refuses_the_image_size_names_image_size(judge_path, monkeypatch):
    """Qwen2-VL's processor refuses images under 28 pixels a side; here the tiny processor is made to, with
    Qwen2-VL's own message, and `image_size=` is the fix."""
    judge = VLMJudgeReward(judge_path)
    processor = judge.processor.image_processor
    original = type(processor).__call__

    def refuse_small(self, images, **kwargs):
        for row in images:
            for image in row if isinstance(row, list) else [row]:
                if min(image.size) < 28:
                    raise ValueError(
                        f"height:{image.size[1]} and width:{image.size[0]} must be larger than factor:28"
                    )
        return original(self, images, **kwargs)

    monkeypatch.setattr(type(processor), "__call__", refuse_small)
    small = torch.rand(2, 3, 16, 16)
    with pytest.raises(
        ValueError,
        match=r"refused the judge's inputs \(1 frame\(s\) of 16x16 pixels\).*factor:28.*image_size=",
    ) as error:
        judge(["a", "b"], small)
    assert "\n" not in str(error.value)
    resized = VLMJudgeReward(judge_path, image_size=32)
    scores = resized(["a", "b"], small)
    assert all(0 < s < 1 for s in scores)


def test_default_question_and_answer_forms():
    assert (
        DEFAULT_TEMPLATE.format(prompt="a cat", media="image")
        == "Does this image show: a cat? Answer yes or no."
    )
    from trl_visual.rewards.judging import answer_forms, yes_probability

    assert answer_forms("yes") == ["yes", "Yes", " yes", " Yes"]
    p = yes_probability(torch.tensor([math.log(0.3)]), torch.tensor([math.log(0.1)]))
    assert p.item() == pytest.approx(0.75)


def test_scores_become_one_float_or_one_list_of_interpretations_per_sample():
    from trl_visual.rewards.judging import as_interpretations

    assert as_interpretations([0.1, 0.2], 2) == [0.1, 0.2]
    # a missing interpretation drops the sample
    assert as_interpretations([0.1, 0.2, 0.3, None], 2) == [[0.1, 0.2], None]
    assert as_interpretations([], 0) == []  # an empty batch, not a division by zero
