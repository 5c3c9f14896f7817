"""Issue 29 §1: checkpoints and caches are a trust boundary. Nothing a resume reads runs code (a planted pickle
payload in any file is refused, naming the file, and never executes), the package has no ``weights_only=False``,
and no file a run writes (or pushes) holds the Hub token."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from helpers import patch_hub_api
from huggingface_hub.hf_api import RepoUrl
from test_bpgo_trainer import make_trainer as make_bpgo

from trl_visual.checkpointing import (
    EMA_STATE_NAME,
    LEGACY_STATE_NAMES,
    METHOD_STATE_NAME,
    CheckpointError,
    check_torch_archive,
)
from trl_visual.state_files import load_state_file, save_state_file
from trl_visual.trainer.bpgo_priors import PRIOR_CACHE_NAME
from trl_visual.trainer.diffusion_grpo_config import DiffusionGRPOConfig

PACKAGE = Path(__file__).resolve().parents[1] / "trl_visual"
#: a BPGO run with every state file: estimated priors (method state and the output_dir cache) and an EMA
SETTINGS = dict(
    max_steps=1,
    save_strategy="steps",
    save_steps=1,
    prior_source="base_model",
    prior_num_rollouts=2,
    use_ema=True,
)


class Payload:
    """Unpickled, it runs ``touch <marker>``: what a planted checkpoint would do with ``rm -rf`` instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` with a ``torch.save`` pickle whose loading would create ``marker``."""
    path.unlink(missing_ok=True)
    torch.save({"state": Payload(marker)}, path)


def test_the_package_never_unpickles_with_weights_only_false():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}"
        for path in PACKAGE.rglob("*.py")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"weights_only\s*=\s*False", line)
    ]
    assert offenders == []


def test_the_payload_is_real(tmp_path):
    """Loaded the old way (``weights_only=False``), the planted file does run its command."""
    marker = tmp_path / "ran"
    plant(tmp_path / "payload.pt", marker)
    torch.load(tmp_path / "payload.pt", weights_only=False)
    assert marker.exists()


def test_state_files_round_trip_tensors_and_json_values(tmp_path):
    state = {
        "step": 3,
        "decay": 0.5,
        "nan": float("nan"),
        "name": "x",
        "flag": True,
        "none": None,
        "params": [torch.arange(6.0).reshape(2, 3), {"rng": torch.tensor([1, 2], dtype=torch.uint8)}],
    }
    save_state_file(state, str(tmp_path / "s.safetensors"))
    loaded = load_state_file(str(tmp_path / "s.safetensors"))
    assert {k: v for k, v in loaded.items() if k not in ("nan", "params")} == {
        k: v for k, v in state.items() if k not in ("nan", "params")
    }
    assert loaded["nan"] != loaded["nan"]
    assert torch.equal(loaded["params"][0], state["params"][0])
    assert torch.equal(loaded["params"][1]["rng"], state["params"][1]["rng"])
    with pytest.raises(TypeError, match=r"State state\['bad'\] is a Payload: .*tensors, numbers"):
        save_state_file({"bad": Payload(tmp_path / "x")}, str(tmp_path / "t.safetensors"))


@pytest.fixture(scope="module")
def bpgo_run(tmp_path_factory):
    """A finished 1-step BPGO run (estimated priors, EMA) with its checkpoint-1."""
    root = tmp_path_factory.mktemp("bpgo")
    make_bpgo(root, **SETTINGS).train()
    checkpoint = root / "out" / "checkpoint-1"
    assert {METHOD_STATE_NAME, EMA_STATE_NAME, "optimizer.pt", "rng_state.pth"} <= set(os.listdir(checkpoint))
    return root


@pytest.mark.parametrize(
    "name",
    [
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "scaler.pt",
        "trainer_state.json",
        "pytorch_lora_weights.safetensors",
        METHOD_STATE_NAME,
        EMA_STATE_NAME,
        *LEGACY_STATE_NAMES,
    ],
)
def test_a_planted_payload_in_any_checkpoint_file_is_refused_by_name(tmp_path, bpgo_run, name):
    shutil.copytree(bpgo_run / "out", tmp_path / "out")
    checkpoint = tmp_path / "out" / "checkpoint-1"
    marker = tmp_path / "payload-ran"
    plant(checkpoint / name, marker)
    trainer = make_bpgo(tmp_path, **{**SETTINGS, "max_steps": 2, "resume_weights_only": True})
    with pytest.raises(CheckpointError) as error:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert str(checkpoint / name) in str(error.value)
    assert not marker.exists()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth"])
def test_the_integrity_check_names_the_function_a_payload_calls(tmp_path, bpgo_run, name):
    """Trainer's own files pass the weights-only check (NumPy's RNG state included); a payload does not."""
    path = tmp_path / name
    shutil.copy(bpgo_run / "out" / "checkpoint-1" / name, path)
    assert check_torch_archive(str(path)) is None
    plant(path, tmp_path / "ran")
    reason = check_torch_archive(str(path))
    assert "calls posix.system" in reason and "weights_only=True refuses" in reason
    assert not (tmp_path / "ran").exists()


def test_a_planted_prior_cache_is_estimated_again_without_running_it(tmp_path, bpgo_run, caplog):
    (tmp_path / "out").mkdir()
    marker = tmp_path / "payload-ran"
    plant(tmp_path / "out" / PRIOR_CACHE_NAME, marker)
    trainer = make_bpgo(tmp_path, **SETTINGS)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert not marker.exists()
    assert str(tmp_path / "out" / PRIOR_CACHE_NAME) in caplog.text and "unreadable" in caplog.text
    assert (
        trainer.method_state()["estimated_priors"]
        == load_state_file(str(bpgo_run / "out" / "checkpoint-1" / METHOD_STATE_NAME))["estimated_priors"]
    )


# -- the Hub token ------------------------------------------------------------------------------------------------
TOKEN = "hf_FAKEtokenTHATmustNEVERbeWRITTEN0123456789"


def test_the_config_pickles_without_its_token_and_copies_keep_it(tmp_path):
    args = DiffusionGRPOConfig(
        output_dir=str(tmp_path), hub_token=TOKEN, model_init_kwargs={"token": TOKEN, "revision": "main"}
    )
    torch.save(args, tmp_path / "args.bin")
    assert TOKEN.encode() not in (tmp_path / "args.bin").read_bytes()
    loaded = torch.load(tmp_path / "args.bin", weights_only=False)  # the test's own file
    assert loaded.hub_token == "<HUB_TOKEN>" and loaded.model_init_kwargs == {
        "token": "<TOKEN>",
        "revision": "main",
    }
    assert loaded.num_generations == args.num_generations
    for copied in (copy.copy(args), copy.deepcopy(args)):
        assert copied.hub_token == TOKEN and copied.model_init_kwargs["token"] == TOKEN
    assert args.hub_token == TOKEN
    assert DiffusionGRPOConfig(output_dir=str(tmp_path)).__getstate__()["hub_token"] is None


def test_no_written_or_pushed_file_holds_the_hub_token(tmp_path, monkeypatch):
    """A real run with ``hub_token`` set, a checkpoint every step pushed to a (local) Hub, then ``save_model`` and
    ``push_to_hub``: no byte sequence of the token in any file under ``output_dir`` or in what was uploaded."""
    hub = tmp_path / "hub"

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=(), **kwargs):
        shutil.copytree(folder_path, hub, ignore=shutil.ignore_patterns(*ignore_patterns), dirs_exist_ok=True)
        done = Future()
        done.set_result(None)
        return done

    patch_hub_api(monkeypatch, "create_repo", create_repo)
    patch_hub_api(monkeypatch, "upload_folder", upload_folder)
    from helpers import make_trainer

    trainer = make_trainer(
        tmp_path,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        push_to_hub=True,
        hub_model_id="me/tiny",
        hub_token=TOKEN,
    )
    trainer.train()
    trainer.save_model()
    trainer.push_to_hub()
    written = [path for path in (tmp_path / "out").rglob("*") if path.is_file()]
    pushed = [path for path in hub.rglob("*") if path.is_file()]
    names = {path.name for path in written}
    assert {"training_args.bin", "pytorch_lora_weights.safetensors", "optimizer.pt"} <= names
    assert any(path.name == "training_args.bin" for path in pushed)
    assert (
        sum(
            path.parent.name.startswith("checkpoint-") for path in written if path.name == "training_args.bin"
        )
        == 2
    )
    holding = [str(path) for path in written + pushed if TOKEN.encode() in path.read_bytes()]
    assert holding == []
    assert trainer.args.hub_token == TOKEN  # the run itself still has it


def test_the_prior_cache_fingerprint_holds_no_token(tmp_path):
    """``bpgo_priors.json`` (written to ``output_dir``) records ``model_init_kwargs``: a token there is redacted."""
    trainer = make_bpgo(tmp_path, prior_source="base_model")
    trainer.args.model_init_kwargs = {"token": TOKEN, "revision": "main"}
    fingerprint = json.dumps(trainer.prior_estimator.fingerprint())
    assert TOKEN not in fingerprint and '"revision": "main"' in fingerprint
