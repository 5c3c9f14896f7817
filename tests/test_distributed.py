"""Two CPU processes over gloo: groups split across ranks keep whole-group statistics."""

import json
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "two_process_grpo.py")


def test_a_group_split_across_two_processes_is_scored_as_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        SCRIPT,
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
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
