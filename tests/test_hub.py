"""LoRA files that reload at their trained strength, model cards the Hub accepts, and a push whose uploaded
folder reproduces the card's pictures."""

import ast
import json
import os
import re
import shutil
import sys
from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset, load_from_disk
from diffusers.pipelines.wan import pipeline_wan_i2v
from diffusers.utils import is_ftfy_available
from helpers import PROMPTS, TARGETS, hub_connect_error, make_config, patch_hub_api
from huggingface_hub import ModelCard, ModelCardData, RepoUrl
from huggingface_hub.utils import validate_repo_id
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from test_models import images as model_images
from test_models import make_trainer as make_model_trainer

from trl_visual import DiffusionGRPOTrainer
from trl_visual.hub import CardSample, build_model_card, dataset_repo_id, hub_base_model
from trl_visual.lora_io import load_lora_checkpoint, save_lora
from trl_visual.models import wan
from trl_visual.testing import load_tiny_pipeline
from trl_visual.trainer.logging_utils import captioned_grid

LORA_SETTINGS = {
    "plain": dict(r=4, lora_alpha=32),
    "dora-patterns": dict(
        r=4, lora_alpha=32, use_dora=True, rank_pattern={"to_q": 2}, alpha_pattern={"to_k": 7}
    ),
}


def perturb_lora(denoiser, seed=0, scale=0.05):
    """Random LoRA weights (B starts at zero, so an untrained adapter does nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in denoiser.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def generate(pipeline, model="tiny:sd3", prompt="a red car"):
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, output_type="pt", max_sequence_length=16)
    kwargs.update(dict(height=16, width=16, num_frames=5) if "wan" in model else dict(height=32, width=32))
    output = pipeline(prompt, generator=torch.Generator().manual_seed(3), **kwargs)
    return output.frames if "wan" in model else output.images


@pytest.mark.parametrize("settings", LORA_SETTINGS.values(), ids=LORA_SETTINGS.keys())
def test_saved_lora_reloads_at_the_trained_strength(tmp_path, settings):
    """r=4, alpha=32 (scale 8), also with DoRA and rank/alpha patterns: the trainer's saved file, loaded with
    ``load_lora_weights`` into a fresh pipeline, reproduces the trained pipeline to 1e-5; the same tensors saved
    without the adapter metadata (diffusers then assumes alpha = r) do not."""
    trainer = DiffusionGRPOTrainer(
        model="tiny:sd3",
        reward_funcs="red_channel",
        args=make_config(tmp_path),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(target_modules=TARGETS, **settings),
    )
    perturb_lora(trainer.model)
    trainer.save_model(str(tmp_path / "final"))
    trained = generate(trainer.pipeline)

    fresh = load_tiny_pipeline("tiny:sd3")
    untrained = generate(fresh)
    fresh.load_lora_weights(str(tmp_path / "final"))
    config = next(iter(fresh.transformer.peft_config.values()))
    assert (config.r, config.lora_alpha, config.use_dora) == (4, 32, settings.get("use_dora", False))
    assert (trained - untrained).abs().max() > 1e-2  # the adapter changes the pictures
    torch.testing.assert_close(generate(fresh), trained, atol=1e-5, rtol=0)

    bare = load_tiny_pipeline("tiny:sd3")
    type(bare).save_lora_weights(
        str(tmp_path / "bare"), transformer_lora_layers=get_peft_model_state_dict(trainer.model)
    )
    bare.load_lora_weights(str(tmp_path / "bare"))
    assert (generate(bare) - trained).abs().max() > 1e-3  # what every saved LoRA did before


@pytest.mark.parametrize("model", ["tiny:flux", "tiny:wan"])
def test_other_families_reload_at_the_trained_strength(tmp_path, model):
    """FLUX's and Wan's own ``save_lora_weights`` take the metadata too: r=4, alpha=32 reloads exactly."""
    pipeline = load_tiny_pipeline(model)
    pipeline.transformer.add_adapter(LoraConfig(r=4, lora_alpha=32, target_modules=["to_q", "to_k", "to_v"]))
    perturb_lora(pipeline.transformer)
    save_lora(type(pipeline), str(tmp_path), pipeline.transformer, "transformer")
    fresh = load_tiny_pipeline(model)
    fresh.load_lora_weights(str(tmp_path))
    assert next(iter(fresh.transformer.peft_config.values())).lora_alpha == 32
    torch.testing.assert_close(generate(fresh, model), generate(pipeline, model), atol=1e-5, rtol=0)


def test_resuming_into_a_differently_configured_adapter_is_an_error(tmp_path):
    saved = load_tiny_pipeline("tiny:sd3")
    saved.transformer.add_adapter(LoraConfig(r=4, lora_alpha=32, target_modules=TARGETS))
    save_lora(type(saved), str(tmp_path), saved.transformer, "transformer")
    other = load_tiny_pipeline("tiny:sd3")
    other.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"lora_alpha=32.*lora_alpha=4.*checkpoint's LoraConfig"):
        load_lora_checkpoint(type(other), str(tmp_path), other.transformer, "transformer")


# ------------------------------------------------------------------------------------------------------------
# Model cards
# ------------------------------------------------------------------------------------------------------------
def local_folder(tmp_path, name, recorded=None):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    index = {"_class_name": "StableDiffusion3Pipeline", **({"_name_or_path": recorded} if recorded else {})}
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


def card_for(model_name, **overrides):
    samples = [
        CardSample(p, 42 + i, f"images/before_{i}.png", f"images/after_{i}.png")
        for i, p in enumerate(PROMPTS)
    ]
    settings = dict(
        model_name=model_name,
        repo_id="user/tiny-grpo",
        method="GRPO",
        pipeline_tag="text-to-image",
        reward_names=["red_channel"],
        rewards=[0.1, 0.2],
        settings={"learning_rate": 0.03, "height": 32, "num_frames": None},
        citations=["Flow-GRPO"],
        samples=samples,
        call_kwargs={"height": 32, "width": 32, "num_inference_steps": 4, "negative_prompt": None},
    )
    settings.update(overrides)
    return build_model_card(**settings)


def check_valid(card):
    """What the Hub checks, offline: the YAML parses, round-trips through ``ModelCardData``, has a license, and a
    ``base_model`` only when it is a valid repo id; the snippet is valid Python."""
    text = str(card)
    metadata = yaml.safe_load(text.split("---")[1])
    reparsed = ModelCard(text).data
    assert ModelCardData(**metadata).to_dict() == reparsed.to_dict()
    assert metadata["license"]
    if "base_model" in metadata:
        validate_repo_id(metadata["base_model"])
    assert [entry["text"] for entry in metadata["widget"]] == PROMPTS
    assert "None" not in text
    snippet = re.search(r"```python\n(.*?)```", text, re.S)[1]
    ast.parse(snippet)
    return metadata, snippet


@pytest.mark.parametrize(
    "where, expected_base, loads",
    [
        ("tiny:sd3", None, 'load_pipeline("tiny:sd3")'),
        (
            "hub",
            "stabilityai/stable-diffusion-3.5-medium",
            'from_pretrained("stabilityai/stable-diffusion-3.5-medium"',
        ),
        (
            "folder naming its hub id",
            "stabilityai/stable-diffusion-3.5-medium",
            'from_pretrained("stabilityai/',
        ),
        ("hub cache snapshot", "org/model", 'from_pretrained("org/model"'),
        ("plain folder", None, 'from_pretrained("path/to/the/base/model"'),
    ],
)
def test_model_cards_are_valid_for_every_kind_of_base_model(tmp_path, where, expected_base, loads):
    model_name = {
        "tiny:sd3": "tiny:sd3",
        "hub": "stabilityai/stable-diffusion-3.5-medium",
        "folder naming its hub id": local_folder(tmp_path, "sd35", "stabilityai/stable-diffusion-3.5-medium"),
        "hub cache snapshot": local_folder(tmp_path, "hub/models--org--model/snapshots/0123abc"),
        "plain folder": local_folder(tmp_path, "mine", str(tmp_path / "elsewhere")),
    }[where]
    metadata, snippet = check_valid(card_for(model_name))
    assert metadata.get("base_model") == expected_base
    assert loads in snippet and 'pipe.load_lora_weights("user/tiny-grpo")' in snippet
    assert "generator=torch.Generator().manual_seed(42)" in snippet
    assert metadata["license"] == "other"


def test_card_links_the_active_wandb_run(monkeypatch):
    assert "Training run" not in str(card_for("tiny:sd3"))
    run = SimpleNamespace(url="https://wandb.ai/user/project/runs/abc123")
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(run=run))
    assert "Training run: [Weights & Biases](https://wandb.ai/user/project/runs/abc123)" in str(
        card_for("tiny:sd3")
    )


def test_card_license_datasets_and_settings(tmp_path):
    folder = local_folder(tmp_path, "base")
    (tmp_path / "base" / "README.md").write_text("---\nlicense: openrail++\n---\n# base\n")
    metadata, _ = check_valid(card_for(folder))
    assert metadata["license"] == "openrail++"  # the base model's own card
    metadata, _ = check_valid(card_for("tiny:sd3", license="apache-2.0", datasets=["user/prompts"]))
    assert metadata["license"] == "apache-2.0" and metadata["datasets"] == ["user/prompts"]
    text = str(card_for("tiny:sd3"))
    assert "| `height` | `32` |" in text and "num_frames" not in text


def test_dataset_repo_id_from_the_datasets_cache_folder(tmp_path):
    """``load_dataset("user/prompts")`` caches under ``user___prompts``; in-memory and local data have no id."""
    Dataset.from_dict({"prompt": PROMPTS}).save_to_disk(str(tmp_path / "user___prompts" / "default"))
    assert dataset_repo_id(load_from_disk(str(tmp_path / "user___prompts" / "default"))) == "user/prompts"
    Dataset.from_dict({"prompt": PROMPTS}).save_to_disk(str(tmp_path / "local"))
    assert dataset_repo_id(load_from_disk(str(tmp_path / "local"))) is None
    assert dataset_repo_id(Dataset.from_dict({"prompt": PROMPTS})) is None


def test_hub_base_model_rejects_what_is_not_a_repo_id(tmp_path):
    assert hub_base_model("tiny:flux") is None
    assert hub_base_model(str(tmp_path)) is None
    assert hub_base_model("black-forest-labs/FLUX.1-dev") == "black-forest-labs/FLUX.1-dev"


# ------------------------------------------------------------------------------------------------------------
# Pushing
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """``HfApi.create_repo``/``upload_folder`` intercepted: an upload is copied (its ignore patterns applied) to
    ``tmp_path/hub/<repo id>``; returns the list of uploaded repo ids."""
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=(), **kwargs):
        target = tmp_path / "hub" / repo_id
        shutil.copytree(
            folder_path, target, ignore=shutil.ignore_patterns(*ignore_patterns), dirs_exist_ok=True
        )
        uploads.append(repo_id)
        done = Future()
        done.set_result(None)
        return done

    patch_hub_api(monkeypatch, "create_repo", create_repo)
    patch_hub_api(monkeypatch, "upload_folder", upload_folder)
    return uploads


def test_checkpoint_pushes_carry_the_lora_and_save_model_pushes_once(tmp_path, fake_hub):
    """``push_to_hub=True`` with a checkpoint every step: each checkpoint push uploads the LoRA file (with its
    adapter metadata); ``save_model()`` at the end (what the CLI calls) pushes once, with the card."""
    trainer = DiffusionGRPOTrainer(
        model="tiny:sd3",
        reward_funcs="red_channel",
        args=make_config(
            tmp_path,
            max_steps=2,
            push_to_hub=True,
            hub_model_id="user/tiny-grpo",
            save_strategy="steps",
            save_steps=1,
        ),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=4, lora_alpha=32, target_modules=TARGETS),
    )
    trainer.train()
    pushed = tmp_path / "hub" / "user" / "tiny-grpo"
    assert fake_hub == ["user/tiny-grpo"] * 2 and not (pushed / "README.md").exists()
    with safe_open(str(pushed / "pytorch_lora_weights.safetensors"), "pt") as file:
        metadata = json.loads(file.metadata()["lora_adapter_metadata"])
    assert (metadata["transformer.r"], metadata["transformer.lora_alpha"]) == (4, 32)
    trainer.save_model()
    assert fake_hub == ["user/tiny-grpo"] * 3 and (pushed / "README.md").exists()


def test_pushed_folder_reproduces_the_cards_pictures(tmp_path, monkeypatch, fake_hub):
    """Train r=4/alpha=32 for 3 steps, push with the Hub calls intercepted (the upload is copied to a folder),
    then run the card's own snippet against that copy for each prompt and seed of the card: each picture
    matches its ``images/after_i.png`` and the grid matches ``samples_after.png`` within 1/255 (8-bit PNGs);
    before and after differ by more than that. The card's samples are rendered once per push."""
    trainer = DiffusionGRPOTrainer(
        model="tiny:sd3",
        reward_funcs="red_channel",
        args=make_config(tmp_path, learning_rate=3e-2, max_steps=3, hub_model_id="user/tiny-grpo"),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=4, lora_alpha=32, target_modules=TARGETS),
    )
    trainer.train()
    renders = []
    original = trainer.model_card.pictures_for
    monkeypatch.setattr(
        trainer.model_card, "pictures_for", lambda *args: renders.append(1) or original(*args)
    )
    trainer.push_to_hub()
    assert fake_hub == ["user/tiny-grpo"] and len(renders) == 1

    pushed = tmp_path / "hub" / "user" / "tiny-grpo"
    text = (pushed / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S)[1].replace(
        '"user/tiny-grpo"', json.dumps(str(pushed))
    )
    rows = re.findall(r"^\| (.+?) \| (\d+) \| !\[before\]\((\S+)\) \| !\[after\]\((\S+)\) \|$", text, re.M)
    assert [row[0] for row in rows] == PROMPTS
    first_prompt, first_seed = rows[0][0], rows[0][1]
    images = []
    for prompt, seed, before_file, after_file in rows:
        namespace = {}
        code = snippet.replace(json.dumps(first_prompt), json.dumps(prompt), 1)
        exec(code.replace(f"manual_seed({first_seed})", f"manual_seed({seed})"), namespace)
        image = np.asarray(namespace["image"], dtype=np.int16)
        after = np.asarray(Image.open(pushed / after_file), dtype=np.int16)
        before = np.asarray(Image.open(pushed / before_file), dtype=np.int16)
        assert np.abs(image - after).max() <= 1
        assert np.abs(before - after).max() > 1
        images.append(namespace["image"])
    grid = np.asarray(captioned_grid(images, PROMPTS), dtype=np.int16)
    assert np.abs(grid - np.asarray(Image.open(pushed / "samples_after.png"), dtype=np.int16)).max() <= 1
    assert os.path.exists(pushed / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("model", ["flux", "wan", "wan-i2v"])
def test_cards_of_the_other_families(tmp_path, monkeypatch, model):
    """FLUX (guidance-distilled: the snippet passes ``guidance_scale``; its picture is reproduced from the saved
    LoRA), Wan text-to-video and image-to-video (one animated GIF per prompt with every frame, ``num_frames`` and,
    for image-to-video, a ``load_image`` in the snippet): each card validates.

    ``WanImageToVideoPipeline.__call__`` needs ``ftfy``, which is not installed here: the test stands in
    ``fix_text`` as the identity (what ftfy does to these ASCII prompts)."""
    if model == "wan-i2v" and not is_ftfy_available():
        monkeypatch.setattr(
            pipeline_wan_i2v, "ftfy", SimpleNamespace(fix_text=lambda text: text), raising=False
        )
        monkeypatch.setattr(wan, "is_ftfy_available", lambda: True)
    prompts = PROMPTS[:2]
    data = {"prompt": prompts, **({"image": model_images()[:2]} if model == "wan-i2v" else {})}
    trainer = make_model_trainer(
        tmp_path, model, data=Dataset.from_dict(data), height=16, width=16, num_inference_steps=2
    )
    perturb_lora(trainer.model, scale=0.2)
    trainer.save_model()
    trainer.create_model_card()
    out = tmp_path / "out"
    text = (out / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert ModelCard(text).data.to_dict() == metadata and "base_model" not in metadata and "None" not in text
    snippet = re.search(r"```python\n(.*?)```", text, re.S)[1]
    ast.parse(snippet)
    if model == "flux":
        assert "guidance_scale=3.5" in snippet and "true_cfg_scale" not in snippet
        namespace = {}
        exec(snippet.replace('"out"', json.dumps(str(out))), namespace)
        first = np.asarray(namespace["image"], dtype=np.int16)
        assert np.abs(first - np.asarray(Image.open(out / "images/after_0.png"), dtype=np.int16)).max() <= 1
        return
    assert metadata["pipeline_tag"] == ("image-to-video" if model == "wan-i2v" else "text-to-video")
    assert "num_frames=5" in snippet and ".frames[0]" in snippet
    assert ("load_image(" in snippet) == (model == "wan-i2v")
    for kind in ("before", "after"):
        with Image.open(out / f"images/{kind}_0.gif") as gif:
            assert gif.n_frames == 5
    assert [entry["output"]["url"] for entry in metadata["widget"]] == [
        "images/after_0.gif",
        "images/after_1.gif",
    ]


def test_image_to_video_card_without_ftfy_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(wan, "is_ftfy_available", lambda: False)
    data = Dataset.from_dict({"prompt": PROMPTS[:2], "image": model_images()[:2]})
    trainer = make_model_trainer(tmp_path, "wan-i2v", data=data, height=16, width=16, num_inference_steps=2)
    with pytest.raises(ImportError, match=r"needs `ftfy`: `pip install ftfy`"):
        trainer.create_model_card()


def test_an_unreachable_hub_is_one_clear_error_before_training(monkeypatch, tmp_path, capsys):
    """push_to_hub creates the repository when the trainer is built: without network (or token) that is one
    message naming the repository and the way out, before anything is trained; the CLI prints it as one line."""
    from trl_visual.cli import main
    from trl_visual.trainer.model_card import HubRepositoryError

    def unreachable(self, repo_id, **kwargs):
        raise hub_connect_error()

    patch_hub_api(monkeypatch, "create_repo", unreachable)
    with pytest.raises(
        HubRepositoryError, match=r"'me/shapes-lora' \(ConnectError: \[Errno -2\].*hf auth login"
    ):
        DiffusionGRPOTrainer(
            model="tiny:sd3",
            reward_funcs="red_channel",
            args=make_config(tmp_path, push_to_hub=True, hub_model_id="me/shapes-lora"),
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
        )
    argv = ["grpo", "--model_name_or_path", "tiny:sd3", "--reward_funcs", "red_channel", "--max_steps", "1"]
    out = tmp_path / "cli"
    assert main([*argv, "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "me/shapes-lora"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trl-visual: error: push_to_hub: could not create") and err.count("\n") == 1
    assert not (out / "checkpoint-1").exists()


def test_a_push_that_fails_after_training_keeps_the_weights_and_is_one_line(monkeypatch, tmp_path, capsys):
    """The CLI trains, saves, then the upload fails: the summary still says where the weights are, the error is one
    line naming the saved folder, and the exit status is 1 (not the 2 of bad input)."""
    from trl_visual.cli import main

    def upload_folder(self, *, run_as_future=False, **kwargs):  # checkpoint pushes run in the background
        error = hub_connect_error()
        if not run_as_future:
            raise error
        failed = Future()
        failed.set_exception(error)
        return failed

    patch_hub_api(
        monkeypatch, "create_repo", lambda self, repo_id, **kwargs: RepoUrl(f"https://hf.co/{repo_id}")
    )
    patch_hub_api(monkeypatch, "upload_folder", upload_folder)
    out = tmp_path / "run"
    argv = ["grpo", "--model_name_or_path", "tiny:sd3", "--reward_funcs", "red_channel", "--max_steps", "1"]
    argv += ["--output_dir", str(out), "--push_to_hub", "--hub_model_id", "me/tiny", "--disable_tqdm", "true"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert (
        captured.err.startswith("trl-visual: error: Could not push to the Hub")
        and captured.err.count("\n") == 1
    )
    assert str(out) in captured.err and f"saved to {out}" in captured.out
    assert (
        out / "transformer" / "config.json"
    ).is_file()  # the fully trained denoiser, saved before the push


# ------------------------------------------------------------------------------------------------------------
# Full fine-tuning (no LoRA): the tiny:shapes recipe's default
# ------------------------------------------------------------------------------------------------------------
SHAPES_PROMPTS = ["a small red circle on the left", "a big blue square at the top"]


def test_full_fine_tuning_pushes_a_pipeline_that_its_card_loads(tmp_path, fake_hub):
    """Train the whole denoiser of tiny:shapes (no peft_config) with a checkpoint, push with the Hub calls
    intercepted, then take the user's path: the card says what was trained (no LoRA, no `lora` tag), its own
    snippet run against the pushed folder draws the card's "after" picture, the "before" picture is the base
    model's (a fresh tiny:shapes from the same seed), and ``DiffusionPipeline.from_pretrained`` on the output folder
    loads the trained weights. The checkpoint keeps only the denoiser."""
    from diffusers import DiffusionPipeline

    trainer = DiffusionGRPOTrainer(
        model="tiny:shapes",
        reward_funcs="shapes_adherence",
        args=make_config(
            tmp_path,
            learning_rate=1e-3,
            max_sequence_length=8,
            hub_model_id="user/shapes-full",
            save_strategy="steps",
            save_steps=2,
        ),
        train_dataset=Dataset.from_dict({"prompt": SHAPES_PROMPTS * 2}),
    )
    trainer.train()
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "transformer").is_dir() and not (
        out / "checkpoint-2" / "model_index.json"
    ).exists()
    trainer.push_to_hub()
    pushed = tmp_path / "hub" / "user" / "shapes-full"
    text = (pushed / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert "lora" not in metadata["tags"] and "LoRA" not in text and "load_lora_weights" not in text
    assert "# shapes-full: GRPO fine-tune of tiny:shapes" in text and "whole `transformer` fine-tuned" in text

    snippet = re.search(r"```python\n(.*?)```", text, re.S)[1]
    assert 'DiffusionPipeline.from_pretrained("user/shapes-full"' in snippet
    namespace = {}
    exec(snippet.replace('"user/shapes-full"', json.dumps(str(pushed))), namespace)
    drawn = np.asarray(namespace["image"], dtype=np.int16)
    after = np.asarray(Image.open(pushed / "images/after_0.png"), dtype=np.int16)
    before = np.asarray(Image.open(pushed / "images/before_0.png"), dtype=np.int16)
    assert np.abs(drawn - after).max() <= 1 and np.abs(before - after).max() > 1

    base = load_tiny_pipeline("tiny:shapes")  # the base model draws the card's "before" picture
    base.set_progress_bar_config(disable=True)
    call = dict(height=32, width=32, num_inference_steps=4, guidance_scale=1.0, max_sequence_length=8)
    base_image = base(
        SHAPES_PROMPTS[0], generator=torch.Generator().manual_seed(trainer.args.seed), **call
    ).images[0]
    assert np.abs(np.asarray(base_image, dtype=np.int16) - before).max() <= 1

    loaded = DiffusionPipeline.from_pretrained(str(out))
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(t, trained[name]) for name, t in loaded.transformer.state_dict().items())
    assert type(loaded).__name__ == "StableDiffusion3Pipeline"


def test_a_card_without_the_base_samples_says_so():
    """A whole denoiser trained where the base model's samples were not kept: no broken "before" links."""
    samples = [CardSample("a cat", 0, None, "images/after_0.png")]
    card = build_model_card(
        model_name="tiny:sd3",
        repo_id="me/full",
        method="GRPO",
        pipeline_tag="text-to-image",
        reward_names=["red_channel"],
        rewards=[0.1, 0.2],
        settings={},
        citations=[],
        samples=samples,
        call_kwargs={"num_inference_steps": 2},
        trained_module="transformer",
    )
    text = str(card)
    assert "| a cat | 0 | (not kept) | ![after](images/after_0.png) |" in text
    assert "samples_before.png" not in text and "samples_after.png" in text


def test_base_samples_that_cannot_be_drawn_never_stop_training(tmp_path, monkeypatch, caplog):
    """Full fine-tuning samples the card's "before" pictures when train() starts; if the pipeline cannot draw them,
    training runs anyway, a warning says why, and the card marks them "(not kept)" instead of showing the trained
    model as the base."""
    trainer = DiffusionGRPOTrainer(
        model="tiny:sd3",
        reward_funcs="red_channel",
        args=make_config(tmp_path, max_steps=1),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )
    original = trainer.model_card.samples

    def fails_once(rows, reference):
        monkeypatch.setattr(trainer.model_card, "samples", original)
        raise ImportError("this pipeline needs `ftfy`")

    monkeypatch.setattr(trainer.model_card, "samples", fails_once)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert trainer.state.global_step == 1 and "needs `ftfy`" in caplog.text
    trainer.create_model_card()
    text = (tmp_path / "out" / "README.md").read_text()
    assert "(not kept)" in text and not (tmp_path / "out" / "images" / "before_0.png").exists()
