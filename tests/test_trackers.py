"""Every `report_to` tracker works with a diffusers denoiser, gets the metrics, and gets the sample images under
the step of the metrics they belong to. The trackers write to files under the test's temp folder (wandb
offline, trackio local, MLflow's file store), and the tests read those files back."""

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
from datasets import Dataset
from diffusers.configuration_utils import FrozenDict
from helpers import PROMPTS
from peft import LoraConfig

from trl_visual import DiffusionGRPOTrainer
from trl_visual.trainer.logging_utils import SampleBatch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "train_with_trackers.py"


def make_trainer(tmp_path, trainer_class=DiffusionGRPOTrainer, reward="red_channel", **overrides):
    """The shared tiny run with three evaluation prompts, LoRA on the attention projections only."""
    return helpers.make_trainer(
        tmp_path,
        reward,
        trainer_class=trainer_class,
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:3]}),
        peft=LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
        **overrides,
    )


def tensorboard_events(output_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (output_dir / "runs").iterdir()
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


def tensorboard_text(events, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")}


# -- the denoiser's config, as the trackers read it ----------------------------------------------------------------


def test_denoiser_config_answers_what_the_trackers_ask(tmp_path):
    """tensorboard calls `model.config.to_json_string()`; wandb, trackio, MLflow, Comet, Neptune and SwanLab call
    `.to_dict()`. Both work on the trained denoiser, agree with each other, and diffusers still sees its
    FrozenDict (attribute access, save_pretrained/from_pretrained)."""
    trainer = make_trainer(tmp_path)
    denoiser = trainer.model
    config = denoiser.config
    as_dict = config.to_dict()
    assert isinstance(config, FrozenDict)
    assert as_dict["num_layers"] == config.num_layers == 2
    assert json.loads(config.to_json_string()) == json.loads(json.dumps(as_dict))
    assert set(as_dict) == set(config)
    denoiser.save_pretrained(tmp_path / "denoiser")
    reloaded = type(denoiser).from_pretrained(tmp_path / "denoiser")
    assert reloaded.config.num_layers == 2 and reloaded.config.patch_size == config.patch_size


# -- the sample images, under the step of their metrics ------------------------------------------------------------


class CaptionRecorder(DiffusionGRPOTrainer):
    """Records, per optimizer step being computed, the captions of each micro-batch's rollouts."""

    def _make_rollouts(self, inputs):
        rollouts = super()._make_rollouts(inputs)
        captions = SampleBatch.of(rollouts, self.args.num_images_to_log).captions()
        self.made = getattr(self, "made", {})
        self.made.setdefault(self.state.global_step, []).append("\n\n".join(captions))
        return rollouts


def test_samples_are_logged_once_per_logging_step_under_its_step(tmp_path):
    """Rollouts are sampled before the optimizer step, metrics logged after it. With 2 micro-batches per step
    and a log every 2 steps over 4 steps, the grids land at steps 2 and 4 (files and tensorboard), each showing
    the first micro-batch of that very step, at the step where tensorboard has that step's reward."""
    trainer = make_trainer(
        tmp_path,
        trainer_class=CaptionRecorder,
        report_to="tensorboard",
        max_steps=4,
        gradient_accumulation_steps=2,
        logging_steps=2,
        log_images=True,
        num_images_to_log=4,
    )
    trainer.train()
    assert sorted(os.listdir(tmp_path / "out" / "samples")) == ["step_000002.png", "step_000004.png"]
    events = tensorboard_events(tmp_path / "out")
    assert [e.step for e in events.Images("samples")] == [2, 4]
    assert [e.step for e in events.Scalars("train/reward")] == [2, 4]
    captions = tensorboard_text(events, "samples/captions")
    # global_step is 1 while step 2 is computed: its first micro-batch is what step 2 shows
    assert captions == {2: trainer.made[1][0], 4: trainer.made[3][0]}
    # the denoiser's config, whose to_json_string() call crashed training before step 1
    assert json.loads(tensorboard_text(events, "model_config")[0])["num_layers"] == 2


# -- reward timings of evaluate() ------------------------------------------------------------------------------------


class SlowInEvaluation:
    """A reward that takes 0.2 s when scoring the 3-prompt evaluation batch, and no time in training."""

    __name__ = "slow_eval"

    def __call__(self, prompts, images, **kwargs):
        if len(prompts) == 3:
            time.sleep(0.2)
        return images.mean(dim=(1, 2, 3)).tolist()


def test_evaluation_reward_timings_are_eval_metrics(tmp_path):
    """Time spent by rewards in evaluate() (here after every step) is logged as `eval_timing/...`, not averaged
    into the next training log's `timing/...`."""
    trainer = make_trainer(
        tmp_path,
        reward=SlowInEvaluation(),
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=3,
    )
    trainer.train()
    eval_timings = [
        e["eval_timing/reward/slow_eval"] for e in trainer.state.log_history if "eval_reward" in e
    ]
    train_timings = [e["timing/reward/slow_eval"] for e in trainer.state.log_history if "reward" in e]
    assert len(eval_timings) == len(train_timings) == 2
    assert min(eval_timings) >= 0.2 and max(train_timings) < 0.1
    assert "eval_timing/reward/slow_eval" not in trainer.evaluate()  # evaluate() returns the scores only


# -- every tracker, for real -------------------------------------------------------------------------------------


def run_with_trackers(root: Path, model: str = "sd3") -> dict:
    """Train with ``report_to="all"`` (transformers 4's default) in a fresh process whose HOME, working folder and
    every tracker folder are in ``root``, so nothing is written elsewhere and nothing reaches the network."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "HOME": str(root / "home"),
        "XDG_CACHE_HOME": str(root / "home" / ".cache"),
        "XDG_CONFIG_HOME": str(root / "home" / ".config"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(root),
        "WANDB_CACHE_DIR": str(root / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "WANDB_DATA_DIR": str(root / "wandb-data"),
        "TRACKIO_DIR": str(root / "trackio"),
        "MLFLOW_TRACKING_URI": f"file:{root / 'mlruns'}",
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    (root / "home").mkdir()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(root / "out"), "all", model],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((root / "out" / "result.json").read_text())


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """Two logged steps of tiny:sd3 with sample images, reported to every installed tracker."""
    root = tmp_path_factory.mktemp("trackers")
    return root, run_with_trackers(root)


def wandb_records(root: Path) -> tuple[Path, list[dict]]:
    """The offline run's folder and its records, read back with wandb's own reader (``wandb leet inspect``)."""
    (run_file,) = root.glob("wandb/offline-run-*/run-*.wandb")
    inspected = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(root / "home"), "WANDB_MODE": "offline"},
    )
    return run_file.parent, [
        json.loads(line) for line in inspected.stdout.splitlines() if line.startswith("{")
    ]


def trackio_rows(root: Path) -> list[dict]:
    with sqlite3.connect(
        root / "trackio" / "huggingface.db"
    ) as connection:  # project: TrainingArguments.project
        return [json.loads(metrics) for (metrics,) in connection.execute("SELECT metrics FROM metrics")]


def logged_rewards(result) -> dict[int, float]:
    return {e["step"]: e["reward"] for e in result["log_history"] if "reward" in e}


def test_report_to_all_runs_every_installed_tracker(tracked_run):
    _, result = tracked_run
    for package, callback in [
        ("tensorboard", "TensorBoardCallback"),
        ("wandb", "WandbCallback"),
        ("mlflow", "MLflowCallback"),
        ("trackio", "TrackioCallback"),
    ]:
        pytest.importorskip(package)
        assert callback in result["callbacks"]
    assert sorted(logged_rewards(result)) == [1, 2]


def test_tensorboard_gets_the_metrics_and_images(tracked_run):
    pytest.importorskip("tensorboard")
    root, result = tracked_run
    events = tensorboard_events(root / "out")
    rewards = {e.step: e.value for e in events.Scalars("train/reward")}
    assert rewards == pytest.approx(logged_rewards(result))
    images = events.Images("samples")
    assert [e.step for e in images] == [1, 2] and images[0].width > 0


def test_wandb_offline_run_gets_the_metrics_and_images(tracked_run):
    pytest.importorskip("wandb")
    root, result = tracked_run
    run_dir, records = wandb_records(root)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    rewards = {item["train/global_step"]: item["train/reward"] for item in history if "train/reward" in item}
    assert rewards == pytest.approx(logged_rewards(result))
    samples = {item["train/global_step"]: item for item in history if "samples.filenames" in item}
    assert sorted(samples) == [1, 2]
    for item in samples.values():
        assert item["samples.count"] == 4 and len(item["samples.captions"]) == 4
        for name in item["samples.filenames"]:
            assert (run_dir / "files" / name).stat().st_size > 0
    config = {k: v for r in records if r["type"] == "config" for k, v in r["config"]["update"].items()}
    assert config["num_layers"] == 2  # the denoiser's config, through to_dict()


def test_mlflow_file_store_gets_the_metrics_and_images(tracked_run, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store for reading only
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")

    root, result = tracked_run
    client = MlflowClient(tracking_uri=f"file:{root / 'mlruns'}")
    (run,) = client.search_runs(experiment_ids=["0"])
    history = client.get_metric_history(run.info.run_id, "reward")
    assert {m.step: m.value for m in history} == pytest.approx(logged_rewards(result))
    assert run.data.params["num_layers"] == "2"  # the denoiser's config, through to_dict()
    names = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
    image_steps = sorted(int(m[1]) for n in names if (m := re.search(r"samples\+step\+(\d+)\+.*\.png$", n)))
    assert image_steps == [1, 2], names


def test_trackio_local_database_gets_the_metrics_and_images(tracked_run):
    pytest.importorskip("trackio")
    root, result = tracked_run
    rows = trackio_rows(root)
    rewards = {row["train/global_step"]: row["train/reward"] for row in rows if "train/reward" in row}
    assert rewards == pytest.approx(logged_rewards(result))
    samples = {row["train/global_step"]: row["samples"] for row in rows if "samples" in row}
    assert sorted(samples) == [1, 2]
    for sample in samples.values():
        assert sample["_type"] == "trackio.image" and sample["caption"].count("\n") == 3
        assert (root / "trackio" / "media" / sample["file_path"]).stat().st_size > 0


def test_trackers_write_only_where_they_are_told(tracked_run):
    """The run's working folder holds the folders the trackers were pointed to and nothing else (no default
    ./mlruns, ./mlflow.db or ./wandb beside them)."""
    root, _ = tracked_run
    allowed = {"home", "out", "wandb", "trackio", "mlruns", "wandb-cache", "wandb-config", "wandb-data"}
    assert {p.name for p in root.iterdir()} <= allowed


def test_sample_videos_reach_every_tracker(tmp_path, monkeypatch):
    """One step of tiny:wan: the animated grid GIF reaches wandb and trackio as a video and MLflow as an
    artifact, and its frames reach tensorboard, all under step 1."""
    for package in ("tensorboard", "wandb", "mlflow", "trackio"):
        pytest.importorskip(package)
    from mlflow.tracking import MlflowClient

    run_with_trackers(tmp_path, "wan")
    assert [e.step for e in tensorboard_events(tmp_path / "out").Images("samples/frames")] == [1]
    run_dir, records = wandb_records(tmp_path)
    (video,) = [
        r["history"]["item"]
        for r in records
        if r["type"] == "history" and "samples.path" in r["history"]["item"]
    ]
    assert video["samples._type"] == "video-file" and video["train/global_step"] == 1
    assert (run_dir / "files" / video["samples.path"]).stat().st_size > 0
    (sample,) = [row for row in trackio_rows(tmp_path) if "samples" in row]
    assert sample["samples"]["_type"] == "trackio.video" and sample["train/global_step"] == 1
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    (run,) = client.search_runs(experiment_ids=["0"])
    assert [f.path for f in client.list_artifacts(run.info.run_id, "samples")] == ["samples/step_000001.gif"]


def test_trackio_logs_locally_unless_a_space_is_named(tmp_path):
    """transformers 5.3 defaults `trackio_space_id` to "trackio" (deploy the run to a public Space, which needs a
    Hub login); the configs make local logging the default on every release, and a named Space is kept."""
    from trl_visual import DiffusionGRPOConfig

    assert DiffusionGRPOConfig(output_dir=str(tmp_path)).trackio_space_id is None
    assert (
        DiffusionGRPOConfig(output_dir=str(tmp_path), trackio_space_id="me/runs").trackio_space_id
        == "me/runs"
    )
