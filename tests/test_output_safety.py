"""Issue 29 §2: one writer per ``output_dir`` (a lock file, stale locks taken over) and durable checkpoints
(every file and folder of a staged checkpoint is fsynced before it is renamed into place)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
from helpers import make_trainer

from trl_visual.trainer import diffusion_grpo_trainer
from trl_visual.trainer.output_lock import LOCK_NAME, OutputDirLock, OutputDirLockedError

#: a live process that holds the lock of the folder given as its argument (written as OutputDirLock writes it,
#: without importing the package, which takes seconds) until its stdin closes
HOLDER = f"""
import json, os, socket, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
path = os.path.join(sys.argv[1], {LOCK_NAME!r})
with open(path, "x") as f:
    json.dump({{"pid": os.getpid(), "host": socket.gethostname(), "started": time.ctime()}}, f)
print("locked", flush=True)
sys.stdin.read()
os.remove(path)
"""


@pytest.fixture
def other_run(tmp_path):
    """Another process holding ``tmp_path/out``'s lock, as a second training run would."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "out")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "locked"
    yield process
    process.stdin.close()
    process.wait(timeout=30)


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_run_on_a_locked_output_dir_is_refused_before_the_model_loads(
    tmp_path, other_run, monkeypatch
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(diffusion_grpo_trainer, "load_pipeline", no_loading)
    with pytest.raises(OutputDirLockedError) as error:
        make_trainer(tmp_path)
    message = str(error.value)
    assert f"process {other_run.pid} on {socket.gethostname()}" in message
    assert str(tmp_path / "out" / LOCK_NAME) in message and "another `output_dir`" in message


def test_a_run_that_finds_the_lock_taken_after_it_was_built_does_not_train(tmp_path):
    trainer = make_trainer(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "out")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirLockedError, match=rf"process {process.pid} on"):
            trainer.train()
        assert trainer.state.global_step == 0
    finally:
        process.stdin.close()
        process.wait(timeout=30)
    trainer.train()  # the other run ended: the folder is free
    assert trainer.state.global_step == 2 and not (tmp_path / "out" / LOCK_NAME).exists()


def test_the_lock_is_held_while_training_and_released_after_an_error(tmp_path):
    seen = []

    def reward(prompts, images, **kwargs):
        seen.append(json.loads((tmp_path / "out" / LOCK_NAME).read_text()))
        if len(seen) == 2:
            raise RuntimeError("reward server down")
        return [0.0] * len(prompts)

    trainer = make_trainer(tmp_path, reward=reward)
    with pytest.raises(RuntimeError, match="reward server down"):
        trainer.train()
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname() and seen[0]["started"]
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    pid = dead_pid()
    (out / LOCK_NAME).write_text(
        json.dumps({"pid": pid, "host": socket.gethostname(), "started": "yesterday"})
    )
    trainer = make_trainer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="trl_visual.trainer.output_lock"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert f"stale lock {out / LOCK_NAME} of process {pid}" in caplog.text
    assert not (out / LOCK_NAME).exists()


def test_a_lock_from_another_host_or_unreadable_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere", "started": "now"}))
    with pytest.raises(OutputDirLockedError, match=r"on elsewhere.*delete the lock file"):
        OutputDirLock(str(out)).acquire()
    (out / LOCK_NAME).write_text("")
    with pytest.raises(OutputDirLockedError, match="an unreadable lock"):
        OutputDirLock(str(out)).acquire()


def test_only_the_main_process_takes_the_lock(tmp_path):
    with OutputDirLock(str(tmp_path), enabled=False):
        assert not (tmp_path / LOCK_NAME).exists()
        with OutputDirLock(str(tmp_path)):  # so the main process is not refused by the others
            assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_taken_over_by_another_run_is_left_alone(tmp_path):
    lock = OutputDirLock(str(tmp_path))
    lock.acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": time.ctime()}))
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()


# -- fsync before the rename --------------------------------------------------------------------------------------
def test_a_checkpoint_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """Every file and folder of the staged checkpoint is fsynced before ``os.replace`` moves it into place, and
    ``output_dir`` (which then holds the new name) after."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(source, target, **kwargs):
        events.append(("replace", os.fspath(source), os.fspath(target)))
        replace(source, target, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    make_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1).train()

    out = str(tmp_path / "out")
    for step in (1, 2):
        staged, final = f"{out}/.staging/checkpoint-{step}", f"{out}/checkpoint-{step}"
        moved = events.index(("replace", staged, final))
        before = {path for kind, path, *_ in events[:moved] if kind == "fsync"}
        files = {
            os.path.join(root.replace(final, staged), n) for root, _, names in os.walk(final) for n in names
        }
        assert {"optimizer.pt", "pytorch_lora_weights.safetensors", "trainer_state.json"} <= {
            os.path.basename(f) for f in files
        }
        assert files <= before, files - before
        assert staged in before
        assert ("fsync", out) in events[moved + 1 :]
