"""Two CPU processes over gloo: groups split across ranks keep whole-group statistics."""

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from trl_visual.testing import tiny_sd3_pipeline

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "two_process_grpo.py")


def free_port() -> int:
    """A TCP port free right now: pytest-xdist may run a module-scoped fixture in both workers at once, and two
    launches on one fixed port crash each other's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_processes(script, out, port=None):
    """``torchrun --nproc_per_node 2 script out``: two CPU ranks over gloo, one thread each, on a free port."""
    port = port or free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
    ]
    result = subprocess.run(
        [*command, script, str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    # the crashed rank's error lines first: its traceback is far from the end of stderr
    errors = [line for line in result.stderr.splitlines() if "Error" in line][:20]
    assert result.returncode == 0, "\n".join(errors) + "\n...\n" + result.stderr[-2000:]


def test_a_group_split_across_two_processes_is_scored_as_one(tmp_path):
    run_two_processes(SCRIPT, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # both ranks see the same 8 gathered rewards, in rank order, and the same prompt for the whole group
    assert ranks[0]["global_rewards"] == ranks[1]["global_rewards"]
    assert ranks[0]["global_rewards"][:4] == ranks[0]["local_rewards"]
    assert ranks[0]["global_rewards"][4:] == ranks[1]["local_rewards"]
    assert len(set(ranks[0]["prompts"])) == 1
    # advantages are those of the whole group of 8 (computed by hand here), split 4 + 4
    rewards = torch.tensor(ranks[0]["global_rewards"])
    expected = ((rewards - rewards.mean()) / (rewards.std() + 1e-4)).clamp(-5, 5)
    torch.testing.assert_close(
        torch.tensor(ranks[0]["local_advantages"] + ranks[1]["local_advantages"]), expected
    )
    # the logged reward is the global mean, and DDP keeps the LoRA weights identical on both ranks
    assert ranks[0]["logged_reward"] == pytest.approx(rewards.mean().item(), rel=1e-5)
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]


# ----------------------------------------------------------------------------------------------------------------
# Engines: DDP against one process, resuming under DDP, the LoRA gathered from FSDP2 shards
# ----------------------------------------------------------------------------------------------------------------
SCRIPTS = os.path.dirname(SCRIPT)
TOLERANCE = 1e-6
"""1 and 2 processes sum the same per-sample gradients in another order: the LoRAs agree to float32 rounding
(7e-9 measured), far below the ~5e-4 that one optimizer step moves them."""


def lora_file(folder):
    return load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))


def loaded_lora(folder):
    """The LoRA that ``load_lora_weights(folder)`` puts into a fresh tiny SD3 pipeline, under the file's keys."""
    pipeline = tiny_sd3_pipeline()
    pipeline.load_lora_weights(str(folder))
    return {
        "transformer." + re.sub(r"\.default(_\d+)?\.", ".", name): parameter.detach().cpu()
        for name, parameter in pipeline.transformer.named_parameters()
        if "lora_" in name
    }


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    """ddp_accumulation.py on 2 processes (DDP over gloo, then the FSDP2 gathering), and in this process on 1,
    with the same global batch and the same samples."""
    two = tmp_path_factory.mktemp("two_processes")
    run_two_processes(os.path.join(SCRIPTS, "ddp_accumulation.py"), two)
    one = tmp_path_factory.mktemp("one_process")
    sys.path.insert(0, SCRIPTS)
    try:
        spec = importlib.util.spec_from_file_location(
            "ddp_accumulation", os.path.join(SCRIPTS, "ddp_accumulation.py")
        )
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        script.main(str(one), resume=False)
    finally:
        sys.path.remove(SCRIPTS)
    return one, two


def test_ddp_reduces_gradients_once_per_optimizer_step(engine_runs):
    """2 optimizer steps × 2 micro-steps × 2 trained timesteps = 8 backwards per rank, but DDP all-reduces the
    gradients (one bucket) only at the last backward of each step: 2 times, not 4 (per micro-step) or 8."""
    _, two = engine_runs
    for rank in (0, 1):
        counts = json.loads((two / f"rank{rank}.json").read_text())
        assert counts["world"] == 2 and counts["optimizer_steps"] == 2
        assert counts["backwards"] == 8
        assert counts["all_reduces"] == 2


def test_two_processes_train_the_lora_of_one(engine_runs):
    one, two = engine_runs
    assert json.loads((one / "rank0.json").read_text())["world"] == 1
    single, double = lora_file(one / "a"), lora_file(two / "a")
    assert max_difference(single, double) < TOLERANCE
    # the comparison means something: the second step moved the LoRA far beyond the tolerance
    assert max_difference(double, lora_file(two / "run" / "checkpoint-1")) > 100 * TOLERANCE


def test_ddp_save_then_resume_gives_the_uninterrupted_lora(engine_runs):
    """Also inside an iteration: checkpoint-1 holds each rank's rollouts, which step 2 reuses."""
    _, two = engine_runs
    assert max_difference(lora_file(two / "a"), lora_file(two / "b")) == 0
    for rank in (0, 1):
        assert (two / "run" / "checkpoint-1" / f"rollouts_{rank}.safetensors").is_file()


def test_ddp_model_card_is_written_by_rank_zero_without_hanging_the_others(engine_runs):
    _, two = engine_runs
    assert "samples_after.png" in (two / "run" / "README.md").read_text()


def test_lora_gathered_from_fsdp2_shards_is_the_whole_one(engine_runs):
    """Read from the sharded model itself, every LoRA tensor is a shard; gathered as ``Trainer.save_model`` does
    under FSDP2 and written by ``save_lora``, it is the unsharded LoRA, and loads into a fresh pipeline."""
    _, two = engine_runs
    fsdp = two / "fsdp"
    shards = json.loads((fsdp / "shards.json").read_text())
    assert len(shards["sharded_keys"]) == shards["num_keys"] == 10
    reference, gathered = lora_file(fsdp / "reference"), lora_file(fsdp / "gathered")
    assert max_difference(reference, gathered) == 0
    loaded = loaded_lora(fsdp / "gathered")
    assert len(loaded) == 10
    assert max_difference(loaded, reference) == 0


def test_ddp_lora_loads_into_a_fresh_pipeline(engine_runs):
    _, two = engine_runs
    saved = lora_file(two / "a")
    assert max_difference(loaded_lora(two / "a"), saved) == 0


def _engine_skip_reason(engine):
    if torch.cuda.device_count() < 2:
        return (
            "needs 2 CUDA devices: accelerate 1.15 makes DistributedType.FSDP/DEEPSPEED only on top of a multi-device "
            "type (MULTI_GPU, ...); on CPUs it stays MULTI_CPU and wraps the model in DDP, and `accelerate launch "
            "--use_fsdp` refuses without an accelerator. On CPU, the LoRA gathered from real FSDP2 shards is tested "
            "above, and the DeepSpeed config in test_engines.py."
        )
    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        return "needs deepspeed (pip install deepspeed)"
    return None


@pytest.mark.parametrize("engine", ["fsdp", "zero2", "zero3"])
def test_cli_trains_saves_and_resumes_under_a_sharding_engine(tmp_path, engine):
    """On 2 GPUs, `trl-visual grpo --accelerate_config <engine>`: the saved LoRA is whole (loads into a fresh
    pipeline, every tensor at its full shape), and resuming the step-1 checkpoint ends where the straight run
    ends."""
    reason = _engine_skip_reason(engine)
    if reason:
        pytest.skip(reason)
    flags = [
        "--accelerate_config", engine, "--num_processes", "2", "--mixed_precision", "no",
        "--model_name_or_path", "tiny:sd3", "--reward_funcs", "red_channel", "--use_peft",
        "--lora_r", "4", "--lora_alpha", "8", "--num_generations", "4", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--num_inference_steps", "4", "--timestep_fraction", "0.5",
        "--height", "32", "--width", "32", "--max_sequence_length", "16", "--guidance_scale", "1.0",
        "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--report_to", "none",
        "--optim", "sgd", "--learning_rate", "50", "--lr_scheduler_type", "constant",
    ]  # fmt: skip
    cli = [sys.executable, "-m", "trl_visual.cli", "grpo", *flags]
    straight = subprocess.run([*cli, "--output_dir", str(tmp_path / "a")], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]
    shutil.copytree(tmp_path / "a" / "checkpoint-1", tmp_path / "b" / "checkpoint-1")
    resumed = subprocess.run(
        [*cli, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "true"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    saved = lora_file(tmp_path / "a")
    assert max_difference(loaded_lora(tmp_path / "a"), saved) == 0
    assert max_difference(saved, lora_file(tmp_path / "b")) < TOLERANCE


# ----------------------------------------------------------------------------------------------------------------
# BPGO's uncertainty RAS: weights renormalized over the gathered batch
# ----------------------------------------------------------------------------------------------------------------
def test_uncertainty_weights_are_renormalized_over_the_batch_of_both_processes(tmp_path):
    """Four groups, two per rank, three with ρ = 0 and one with ρ = 1: u = 1 ± α = 1.5 and 0.5, mean 1.25 over
    the gathered batch, so w = 1.2 (reliable) and 0.4 (ambiguous) on both ranks. Renormalized per process, a rank
    would hold weights of mean 1 (1 and 1, or 1.5 and 0.5) instead."""
    run_two_processes(os.path.join(SCRIPTS, "two_process_uncertainty.py"), tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["global_weights"] == ranks[1]["global_weights"]
    assert sorted(ranks[0]["global_prompts"]) == ["a cat", "a dog", "a red car", "a tree"]
    expected = {p: 0.4 if p == "a dog" else 1.2 for p in ranks[0]["global_prompts"]}
    for prompt, weight in zip(ranks[0]["global_prompts"], ranks[0]["global_weights"]):
        assert weight == pytest.approx(expected[prompt], abs=1e-6)
    local_means = []
    for rank in ranks:  # each rank's loss weights are its slice of the batch's, one per sample
        assert len(rank["local_weights"]) == 8
        for prompt, weight in zip(rank["local_prompts"], rank["local_weights"]):
            assert weight == pytest.approx(expected[prompt], abs=1e-6)
        local_means.append(sum(rank["local_weights"]) / 8)
    assert sorted(local_means) == pytest.approx([0.8, 1.2])  # not 1 on each rank


# ----------------------------------------------------------------------------------------------------------------
# Evaluation over two processes: the same figures as on one
# ----------------------------------------------------------------------------------------------------------------
def test_an_evaluation_set_that_does_not_split_evenly_gives_the_one_process_figures(tmp_path):
    """5 prompts in batches of 2 over 2 processes (3 batches): each batch is sampled from the seed it gets on one
    process, the processes run as many forward passes (a repeated batch is not counted), and both return exactly
    the metrics of a one-process evaluation. A contiguous shard (3 rows and 2) gathered unequal tensors."""
    from helpers import eval_on_five_prompts

    run_two_processes(os.path.join(SCRIPTS, "two_process_eval.py"), tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r.pop("world") for r in ranks] == [2, 2]
    one = eval_on_five_prompts(tmp_path / "one").evaluate()
    for rank in ranks:
        assert rank["eval_reward"] == pytest.approx(one["eval_reward"], abs=1e-7)
        assert rank["eval_rewards/red_channel/mean"] == pytest.approx(
            one["eval_rewards/red_channel/mean"], abs=1e-7
        )


@pytest.mark.parametrize(
    "num_rows, batch_size, world, expected",
    [
        (5, 2, 2, [[(0, 2, True), (4, 5, True)], [(2, 4, True), (2, 4, False)]]),
        (4, 2, 2, [[(0, 2, True)], [(2, 4, True)]]),
        (1, 2, 2, [[(0, 1, True)], [(0, 1, False)]]),
        (5, 8, 1, [[(0, 5, True)]]),
    ],
)
def test_evaluation_batches_are_one_process_batches_dealt_out(num_rows, batch_size, world, expected):
    from trl_visual.trainer.evaluation import evaluation_batches

    dealt = [
        [(b.start, b.stop, counts) for b, counts in evaluation_batches(num_rows, batch_size, rank, world)]
        for rank in range(world)
    ]
    assert dealt == expected
