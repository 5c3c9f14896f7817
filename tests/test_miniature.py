"""The miniature world: scenes, prompt sets, the shipped classifier and reward, ``tiny:shapes``, the backbone."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from trl_visual import DiffusionGRPOConfig
from trl_visual.data import load_prompts
from trl_visual.miniature.classifier import load_classifier, shapes_backbone
from trl_visual.miniature.evaluate import classifier_accuracy, prompt_following, sample
from trl_visual.miniature.reward import ShapesAdherence, ShapesJudge, colour_deviation, shapes_purity
from trl_visual.miniature.scenes import (
    ATTRIBUTES,
    PromptGrammarError,
    Scene,
    parse_prompt,
    random_caption,
    render_scene,
    shapes_dataset,
)
from trl_visual.rewards import resolve_reward
from trl_visual.testing import load_tiny_pipeline


@pytest.fixture(scope="module")
def reward() -> ShapesAdherence:
    return ShapesAdherence()


def test_scenes_are_deterministic_and_captions_name_their_attributes():
    first, second = shapes_dataset(16, seed=3), shapes_dataset(16, seed=3)
    assert first["prompt"] == second["prompt"]
    assert [list(im.getdata()) for im in first["image"]] == [list(im.getdata()) for im in second["image"]]
    assert shapes_dataset(16, seed=4)["prompt"] != first["prompt"]
    for row in first:
        for name, value in parse_prompt(row["prompt"]).items():
            assert row[name] == value, (row["prompt"], name)
    rng = random.Random(0)
    scene = Scene("blue", "triangle", "big", "bottom")
    assert parse_prompt(random_caption(scene, rng, "full")) == {
        "colour": "blue",
        "shape": "triangle",
        "size": "big",
        "position": "bottom",
    }
    assert parse_prompt(random_caption(scene, rng, "none")) == {}


def test_rendering_puts_the_shape_where_the_caption_says():
    left = render_scene(Scene("red", "square", "big", "left"))
    right = render_scene(Scene("red", "square", "big", "right"))
    redness = lambda image, cols: (image[0] - image[1])[:, cols].mean()  # noqa: E731
    assert redness(left, slice(0, 16)) > 0.3 > redness(left, slice(16, 32))
    assert redness(right, slice(16, 32)) > 0.3 > redness(right, slice(0, 16))


def test_prompt_sets_load_through_the_cli_loader():
    full = load_prompts("builtin:shapes")["prompt"]
    ambiguous = load_prompts("builtin:shapes-ambiguous")["prompt"]
    assert len(full) == 96 and len(set(full)) == 96
    assert all(len(parse_prompt(p)) == 4 for p in full)
    assert all(len(parse_prompt(p)) < 4 for p in ambiguous) and "a shape" in ambiguous


def test_a_prompt_outside_the_grammar_is_refused_with_the_fix(reward):
    with pytest.raises(PromptGrammarError, match="builtin:shapes"):
        parse_prompt("a cat on a sofa")
    with pytest.raises(PromptGrammarError):
        reward(["a red circle", "a purple circle"], torch.zeros(2, 3, 32, 32))


def test_shipped_classifier_is_accurate_on_fresh_scenes():
    accuracy = classifier_accuracy(load_classifier(), num_scenes=256, seed=777)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_adherence_scores_a_matching_scene_above_mismatching_ones(reward):
    scene = Scene("green", "circle", "small", "top")
    image = render_scene(scene, torch.Generator().manual_seed(0))[None].expand(4, -1, -1, -1)
    prompts = [
        scene.caption(),
        "a red circle at the top",
        "a small green square",
        "a green shape on the left",
    ]
    scores = reward(prompts, image)
    assert scores[0] > 0.8
    assert max(scores[1:]) < 0.2, scores
    assert reward(["a shape"], image[:1]) == [1.0]
    assert resolve_reward("shapes_adherence").__class__ is ShapesAdherence


def test_tiny_shapes_loads_offline_and_follows_its_prompts(reward):
    pipeline = load_tiny_pipeline("tiny:shapes")
    pipeline.set_progress_bar_config(disable=True)
    prompts = [
        Scene(c, s, "big", p).caption()
        for c in ATTRIBUTES["colour"]
        for s in ("circle", "square")
        for p in ("left", "right", "top")
    ]
    images = sample(pipeline, prompts, guidance_scale=4.0, num_inference_steps=10)
    assert images.shape == (len(prompts), 3, 32, 32)
    following = prompt_following(reward, prompts, images)
    # chance: colour 1/4, shape 1/3, position 1/4
    assert following["colour"] >= 0.75 and following["position"] >= 0.6 and following["shape"] >= 0.5, (
        following
    )


def test_shapes_features_backbone_gives_a_grid_that_sees_the_object():
    backbone = shapes_backbone()
    image = render_scene(Scene("yellow", "square", "big", "left"))[None]
    features = backbone(image)
    assert features.shape == (1, 8, 8, 64)
    background = features[0, 1:7, 6]  # right half: empty
    object_patch = features[0, 4, 2]  # centre of the square (row 16, column 9 → patch 4, 2)
    spread = (background - background.mean(0)).norm(dim=-1).max()
    assert (object_patch - background.mean(0)).norm() > 5 * spread


def test_shapes_judge_scores_full_captions_exactly_and_completes_partial_ones_by_a_reproducible_guess(reward):
    """r = ∏_{named} p(v_a) · ∏_{open} p(g_a): a full caption gives exactly shapes_adherence; a partial caption is
    scored as the caption completed by the judge's guess, which keeps the named values, is the same for the same
    pixels and judge seed, and varies with the pixels (so over many samples every open value gets guessed)."""
    scenes = [Scene("green", "circle", "small", "top"), Scene("red", "triangle", "big", "left")]
    generator = torch.Generator().manual_seed(0)
    images = torch.stack([render_scene(scene, generator) for scene in scenes])
    judge = resolve_reward("shapes_judge")
    assert isinstance(judge, ShapesJudge)
    full = [scene.caption() for scene in scenes]
    assert judge(full, images) == reward(full, images)

    [completion] = judge.completion("a red shape at the top", images[1])
    assert completion["colour"] == "red" and completion["position"] == "top"
    assert [completion] == ShapesJudge(seed=0).completion("a red shape at the top", images[1])
    completed_caption = Scene(**completion).caption()
    assert judge(["a red shape at the top"], images[1:]) == pytest.approx(
        reward([completed_caption], images[1:])
    )

    noisy = images[1] + 0.02 * torch.randn((64, *images.shape[1:]), generator=generator)
    guesses = [judge.completion("a shape", image)[0] for image in noisy]
    assert guesses == [ShapesJudge(seed=0).completion("a shape", image)[0] for image in noisy]
    assert {guess["colour"] for guess in guesses} == set(ATTRIBUTES["colour"])
    assert [ShapesJudge(seed=1).completion("a shape", image)[0] for image in noisy] != guesses
    scores = judge(
        ["a red shape"] * 64, noisy
    )  # the shape is red: a low score means a wrong guess, not a bad image
    assert min(scores) < 0.2 < 0.8 < max(scores)


def test_shapes_purity_is_one_minus_the_mean_colour_distance_in_the_shapes_core():
    """A 4×4 red square on the grey background: its core is the inner 2×2 (the rim is dropped). One core pixel
    orange, (0.9, 0.55, 0.15): the core's mean colour is (0.9, 0.25, 0.15), the distances 0.3 (orange) and 0.1
    (three red), so r = 1 − 0.6 / 4 = 0.85. A wrong colour on the rim does not count; no shape scores 0; the image's
    border is never core."""
    background, red = torch.tensor([0.12, 0.12, 0.12]), torch.tensor([0.9, 0.15, 0.15])
    pure = background.view(3, 1, 1).repeat(1, 8, 8)
    pure[:, 2:6, 2:6] = red.view(3, 1)[:, :, None]
    blemished, rim = pure.clone(), pure.clone()
    blemished[:, 3, 3] = torch.tensor([0.9, 0.55, 0.15])
    rim[:, 2, 2] = torch.tensor([0.2, 0.3, 0.95])
    images = torch.stack([pure, blemished, rim, background.view(3, 1, 1).repeat(1, 8, 8)])
    scores = resolve_reward("shapes_purity")(["a shape"] * 4, images)
    assert scores == pytest.approx([1.0, 0.85, 1.0, 0.0], abs=1e-6)
    deviation, core, inside = colour_deviation(images)
    assert core[1].sum() == 4 and inside[1].sum() == 16 and not inside[3].any()
    assert deviation[1, 3, 3] == pytest.approx(0.3, abs=1e-6) and deviation[1, 4, 4] == pytest.approx(
        0.1, abs=1e-6
    )


def test_rendered_scenes_are_pure_and_vipo_maps_put_their_mass_on_the_shape():
    """On rendered scenes ``shapes_purity`` is about 1, and the ViPO map of the ``tiny:shapes-features`` backbone
    puts more of its mass on the shape than a uniform map would (its area share)."""
    from trl_visual.core.vipo import perceptual_map

    scenes = [
        Scene(colour, shape, size, position)
        for colour, shape, size, position in zip(
            ("red", "green", "blue", "yellow") * 2,
            ("circle", "square", "triangle", "square") * 2,
            ("big", "small") * 4,
            ("left", "right", "top", "bottom", "right", "left", "bottom", "top"),
        )
    ]
    images = torch.stack([render_scene(scene) for scene in scenes])
    assert min(shapes_purity([""] * len(images), images)) > 0.99
    maps, fallback = perceptual_map(shapes_backbone()(images), 8)
    assert not fallback.any()
    grid = torch.nn.functional.interpolate(maps[:, None], size=(32, 32), mode="bilinear")[:, 0]
    _, _, inside = colour_deviation(images)
    share = (grid * inside).sum(dim=(1, 2)) / grid.sum(dim=(1, 2))
    uniform = inside.float().mean(dim=(1, 2))
    assert (share > 1.5 * uniform).all(), (share, uniform)


def test_sd3_adapter_feeds_tiny_shapes_the_t5_length_it_was_trained_on():
    from trl_visual.models import get_adapter

    adapter = get_adapter(load_tiny_pipeline("tiny:shapes"))
    embeds = adapter.encode_prompts(["a red circle"], max_sequence_length=256)  # the trainer's default
    assert embeds["prompt_embeds"].shape[1] == 12 + 8  # CLIP tokens + T5 tokens, not 12 + 256
    tiny_sd3 = get_adapter(load_tiny_pipeline("tiny:sd3"))
    assert tiny_sd3.encode_prompts(["a red car"], max_sequence_length=16)["prompt_embeds"].shape[1] == 77 + 16


def test_vipo_trainer_builds_the_shapes_features_backbone_by_name_from_python():
    """``ViPOConfig(backbone="tiny:shapes-features")`` resolves in the trainer itself, as on the command line, to
    the classifier's pretrained feature grid (not a Hub lookup of the name); an unknown tiny name lists the
    known ones."""
    from trl_visual.backbones import BackboneError
    from trl_visual.trainer.vipo_config import ViPOConfig
    from trl_visual.trainer.vipo_trainer import ViPOTrainer

    args = ViPOConfig(output_dir="/tmp/unused", report_to="none", backbone="tiny:shapes-features")
    backbone = ViPOTrainer._build_backbone(None, args)
    images = torch.rand(2, 3, 32, 32)
    expected = shapes_backbone()(images)
    assert backbone(images).shape == (2, 8, 8, 64)
    assert torch.allclose(backbone(images), expected)
    args.backbone = "tiny:no-such-backbone"
    with pytest.raises(BackboneError, match="tiny:shapes-features"):
        ViPOTrainer._build_backbone(None, args)


def test_cli_trains_tiny_shapes_with_its_own_defaults_which_config_and_flags_override(tmp_path):
    """``--model_name_or_path tiny:shapes`` brings the recipe that learns on it (GRPO_DEFAULTS); a flag or a YAML
    value still wins, and other models keep the config's own defaults."""
    from trl_visual.cli import parse_args
    from trl_visual.miniature import GRPO_DEFAULTS

    _, script, config, model = parse_args(["grpo", "--model_name_or_path", "tiny:shapes"])
    assert script.dataset_name == "builtin:shapes" and script.reward_funcs == ["shapes_adherence"]
    assert config.learning_rate == GRPO_DEFAULTS["learning_rate"] != DiffusionGRPOConfig.learning_rate
    assert (config.num_inference_steps, config.scale_rewards) == (4, "batch")
    assert script.dataset_test_split == "test"  # evaluated before and after training (the CLI prints both)
    assert config.eval_on_start and config.eval_strategy == "steps"
    _, _, config, _ = parse_args(["grpo", "--model_name_or_path=tiny:shapes", "--learning_rate", "1e-3"])
    assert config.learning_rate == 1e-3
    recipe = tmp_path / "run.yaml"
    recipe.write_text("model_name_or_path: tiny:shapes\nnum_inference_steps: 6\n")
    _, _, config, _ = parse_args(["grpo", "--config", str(recipe)])
    assert (config.num_inference_steps, config.learning_rate) == (6, GRPO_DEFAULTS["learning_rate"])
    _, _, config, _ = parse_args(
        ["grpo", "--model_name_or_path", "tiny:sd3", "--reward_funcs", "red_channel"]
    )
    assert config.learning_rate == DiffusionGRPOConfig.learning_rate


def test_bpgo_and_vipo_on_tiny_shapes_get_the_recipe_their_own_folder_and_the_worlds_backbone(tmp_path):
    """`trl-visual vipo --model_name_or_path tiny:shapes` must not reach for a DINOv2 on the Hub: its defaults name
    the miniature world's own backbone; BPGO and ViPO write to their own folders, with GRPO's recipe."""
    from trl_visual.cli import parse_args
    from trl_visual.miniature import GRPO_DEFAULTS

    folders = {}
    for command in ("grpo", "bpgo", "vipo"):
        _, script, config, _ = parse_args([command, "--model_name_or_path", "tiny:shapes"])
        assert (
            config.learning_rate == GRPO_DEFAULTS["learning_rate"] and script.dataset_name == "builtin:shapes"
        )
        folders[command] = config.output_dir
    assert folders == {"grpo": "tiny-shapes-grpo", "bpgo": "tiny-shapes-bpgo", "vipo": "tiny-shapes-vipo"}
    assert config.backbone == "tiny:shapes-features"
    _, _, config, _ = parse_args(["vipo", "--model_name_or_path", "tiny:shapes", "--backbone", "tiny:dinov2"])
    assert config.backbone == "tiny:dinov2"


@pytest.mark.parametrize("model", ["tiny:shapes", "tiny:shapes-pairs"])
@pytest.mark.parametrize("command", ["grpo", "bpgo", "vipo"])
def test_from_recipe_gives_python_the_config_the_command_trains_with(model, command):
    """``<Config>.from_recipe(model)`` equals, field for field, the config ``trl-visual <command>
    --model_name_or_path <model>`` parses (its own defaults, no YAML, no flags); keyword arguments override it."""
    import dataclasses

    from trl_visual.cli import parse_args

    _, _, parsed, _ = parse_args([command, "--model_name_or_path", model])
    config_class = type(parsed)
    built = config_class.from_recipe(model)
    differing = [
        f.name for f in dataclasses.fields(config_class) if getattr(built, f.name) != getattr(parsed, f.name)
    ]
    assert differing == []
    assert config_class.from_recipe(model, max_steps=3, output_dir="elsewhere").max_steps == 3


def test_from_recipe_names_the_models_that_have_one():
    with pytest.raises(
        ValueError, match=r"No recipe for 'tiny:sd3': recipes exist for tiny:shapes, tiny:shapes-pairs"
    ):
        DiffusionGRPOConfig.from_recipe("tiny:sd3")


def test_shapes_grpo_recipe_file_states_the_cli_defaults():
    """``examples/configs/shapes_grpo.yaml`` spells out exactly the defaults the CLI applies to tiny:shapes."""
    import yaml

    from trl_visual.miniature import GRPO_DEFAULTS

    path = Path(__file__).resolve().parent.parent / "examples" / "configs" / "shapes_grpo.yaml"
    recipe = yaml.safe_load(path.read_text())
    assert recipe.pop("model_name_or_path") == "tiny:shapes"
    assert recipe == GRPO_DEFAULTS


def test_shapes_test_split_is_a_fixed_balanced_half_of_the_captions_four_rows_each():
    """``builtin:shapes``' ``test`` split, the CLI's evaluation set for tiny:shapes: 48 captions × 4 rows, every
    value of every attribute equally often, the same order every time."""
    from collections import Counter

    from trl_visual.data import PromptSetError

    rows = list(load_prompts("builtin:shapes", split="test")["prompt"])
    prompts = list(dict.fromkeys(rows))
    assert len(prompts) == 48 and all(rows.count(p) == 4 for p in prompts)
    assert set(prompts) <= set(
        load_prompts("builtin:shapes")["prompt"]
    )  # 96 captions in all: noise is held out
    for name, values in ATTRIBUTES.items():
        counts = Counter(parse_prompt(p)[name] for p in prompts)
        assert set(counts) == set(values) and len(set(counts.values())) == 1, (name, counts)
    assert prompts[:4] != sorted(prompts)[:4]  # shuffled: a picture of the first few is not all one colour
    assert list(load_prompts("builtin:shapes", split="test")["prompt"]) == rows
    with pytest.raises(PromptSetError, match="'train' and 'test'; got 'validation'"):
        load_prompts("builtin:shapes", split="validation")
    with pytest.raises(PromptSetError, match="one split, 'train'; got 'test'"):
        load_prompts("builtin:shapes-ambiguous", split="test")


def test_before_after_picture_shows_base_above_and_trained_below_from_the_same_noise(reward, tmp_path):
    """The picture script's core: one column per prompt (the first of the evaluation set), the base model's sample
    above and the trained model's below, both from the same initial noise."""
    import copy

    from trl_visual.miniature.before_after import (
        GAP,
        TILE,
        before_after,
        eval_prompts,
        grid_size,
        header_height,
        tile_box,
        trained_pipeline,
    )

    base = load_tiny_pipeline("tiny:shapes")
    prompts = eval_prompts(2)
    assert prompts == list(dict.fromkeys(load_prompts("builtin:shapes", split="test")["prompt"]))[:2]

    def tiles(picture, row):
        header = header_height(prompts)
        return [picture.crop(tile_box(row, column, header)).tobytes() for column in range(len(prompts))]

    same = before_after(base, base, prompts, reward)
    assert same.size == grid_size(prompts) and grid_size(prompts)[0] - grid_size(prompts[:1])[0] == TILE + GAP
    assert tiles(same, 0) == tiles(same, 1)  # same model, same noise: the same images
    assert tiles(same, 0)[0] != tiles(same, 0)[1]

    changed = copy.deepcopy(base.transformer)
    with torch.no_grad():
        changed.proj_out.weight.mul_(1.5)
    changed.save_pretrained(tmp_path / "transformer")  # what a full fine-tuning run writes to its output_dir
    trained = trained_pipeline(tmp_path, base)
    picture = before_after(base, trained, prompts, reward)
    assert tiles(picture, 0) == tiles(same, 0)  # the base row does not depend on the trained model
    assert all(a != b for a, b in zip(tiles(picture, 0), tiles(picture, 1)))
    with pytest.raises(FileNotFoundError, match="output_dir of a `trl-visual grpo"):
        trained_pipeline(tmp_path / "missing", base)


def test_shapes_judge_draws_are_interpretations_and_the_first_is_the_single_guess(reward):
    """num_draws = M: M successive guesses per sample (the first the one M = 1 makes), each scored as its completed
    caption; a full caption's M scores are all shapes_adherence (no disagreement)."""
    generator = torch.Generator().manual_seed(1)
    scene = Scene("red", "triangle", "big", "left")
    images = render_scene(scene, generator)[None] + 0.02 * torch.randn((6, 3, 32, 32), generator=generator)
    judge = ShapesJudge(num_draws=4)
    drawn = judge(["a red shape"] * 6, images)
    assert len(drawn) == 6 and all(len(scores) == 4 for scores in drawn)
    assert [scores[0] for scores in drawn] == ShapesJudge()(["a red shape"] * 6, images)
    for image, scores in zip(images, drawn):
        captions = [Scene(**c[0]).caption() for c in judge.completions("a red shape", image, 4)]
        assert scores == pytest.approx(reward(captions, image[None].expand(4, -1, -1, -1)))
    assert len({round(score, 6) for scores in drawn for score in scores}) > 1  # the guesses disagree
    full = judge([scene.caption()] * 2, images[:2])
    assert all(
        scores == [reward([scene.caption()], image[None])[0]] * 4 for scores, image in zip(full, images)
    )
    with pytest.raises(ValueError, match="num_draws must be at least 1"):
        ShapesJudge(num_draws=0)


def test_shapes_adherence_scores_each_prompt_variant(reward):
    """A prompt_variants column: each image scored against each paraphrase, M interpretations per sample."""
    scene = Scene("green", "circle", "small", "top")
    image = render_scene(scene, torch.Generator().manual_seed(0))[None]
    variants = [[scene.caption(), "a green shape", "a red circle"]]
    scores = reward(["a green circle"], image, prompt_variants=variants)
    assert scores == [pytest.approx([reward([v], image)[0] for v in variants[0]])]
    assert scores[0][2] < 0.2 < 0.8 < scores[0][1]  # the wrong paraphrase disagrees
    assert reward(["a green circle"], image, prompt_variants=[None]) == reward(["a green circle"], image)


@pytest.mark.parametrize("name", ["tiny:shapes", "tiny:shapes-pairs", "tiny:scenes"])
def test_text_towers_are_the_shipped_weights_whatever_the_installed_initialisation(name, monkeypatch):
    """The denoiser only understands the exact towers it was trained on: another transformers release that
    initialises the seeds differently (5.3 does) must not change them. Fresh towers initialised from other seeds
    stand in for such a release; the pipeline's prompt embeddings must not move."""
    from trl_visual.miniature import pipeline as miniature_pipeline

    def embeddings() -> dict[str, torch.Tensor]:
        from trl_visual.models import get_adapter

        return get_adapter(load_tiny_pipeline(name)).encode_prompts(["a big red circle on the left"], 8)

    before = embeddings()
    monkeypatch.setattr(miniature_pipeline, "TEXT_ENCODER_SEEDS", (7, 8, 9))
    other_init = miniature_pipeline.seeded_text_encoders(miniature_pipeline.SHAPES_MODELS[name])
    shipped = miniature_pipeline.load_text_encoders(model=miniature_pipeline.SHAPES_MODELS[name])
    assert not torch.equal(
        other_init["text_encoder_3"].shared.weight, shipped["text_encoder_3"].shared.weight
    )  # the stand-in really initialises differently
    after = embeddings()
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        assert torch.equal(before[key], after[key]), key


def test_writing_the_text_towers_round_trips_through_the_loader(tmp_path):
    from safetensors.torch import save_file

    from trl_visual.miniature.pipeline import (
        TWO_SHAPES,
        load_text_encoders,
        seeded_text_encoders,
        text_encoders_state,
    )

    written = seeded_text_encoders(TWO_SHAPES)
    save_file(text_encoders_state(written), str(tmp_path / TWO_SHAPES.text_encoders_file))
    loaded = load_text_encoders(tmp_path, TWO_SHAPES)
    for name, encoder in written.items():
        for (key, value), other in zip(encoder.state_dict().items(), loaded[name].state_dict().values()):
            assert torch.equal(value, other), f"{name}.{key}"
    with pytest.raises(FileNotFoundError, match="Reinstall trl_visual"):
        load_text_encoders(tmp_path / "missing", TWO_SHAPES)
