"""Exact resume from every checkpoint position when rollouts are reused over several micro-steps
(``num_iterations > 1``, with gradient accumulation), and the rollouts file a checkpoint inside an iteration keeps."""

import json
import os

import pytest
import torch
from helpers import logged, lora_weights, make_trainer
from safetensors.torch import save_file

from trl_visual.checkpointing import CheckpointError
from trl_visual.trainer.hooks import Advantages, AuxiliaryObjective
from trl_visual.trainer.iteration_state import (
    STRUCTURE_KEY,
    is_mid_iteration,
    load_rollouts,
    save_rollouts,
)
from trl_visual.trainer.rollout import Rollouts

ROLLOUTS = "rollouts.safetensors"


def settings(num_iterations, accumulation, steps):
    return dict(
        num_iterations=num_iterations,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        save_strategy="steps",
        save_steps=1,
        learning_rate=3e-2,
        seed=3,
        per_device_train_batch_size=4,
        num_generations=2,
    )


@pytest.mark.parametrize(
    "num_iterations, accumulation, steps",
    [(2, 1, 4), (3, 1, 4), (3, 2, 3)],
    ids=["mu2", "mu3", "mu3-accum2"],
)
def test_resume_from_every_checkpoint_is_bitwise_exact(tmp_path, num_iterations, accumulation, steps):
    """A run of ``steps`` steps with a checkpoint after each, and the same run resumed from each of them, end with
    bitwise equal LoRA weights and log the same rewards. Checkpoints inside an iteration (the next micro-step
    reuses rollouts) hold the rollouts; those at a boundary do not. Before the rollouts were saved, resuming
    checkpoint-1 of a ``num_iterations=2`` run resampled them with the updated weights (max |Δw| 0.07)."""
    config = settings(num_iterations, accumulation, steps)
    straight = make_trainer(tmp_path / "straight", **config)
    straight.train()
    expected, rewards = lora_weights(straight), logged(straight, "reward")
    out = tmp_path / "straight" / "out"
    middles = [n for n in range(1, steps) if is_mid_iteration(n, accumulation, num_iterations)]
    assert middles
    for step in range(1, steps):
        checkpoint = out / f"checkpoint-{step}"
        assert (checkpoint / ROLLOUTS).is_file() == (step in middles), step
        resumed = make_trainer(tmp_path / f"resumed-{step}", **config)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        got = lora_weights(resumed)
        assert all(torch.equal(got[k], expected[k]) for k in expected), f"resumed from step {step}"
        assert logged(resumed, "reward") == rewards, f"resumed from step {step}"
    first = lora_weights(make_trainer(tmp_path / "untrained", **config))
    assert any(not torch.equal(first[k], expected[k]) for k in expected)  # the run did train


def test_a_checkpoint_inside_an_iteration_without_its_rollouts_is_refused(tmp_path, caplog):
    config = settings(2, 1, 2)
    make_trainer(tmp_path / "a", **config).train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-1"
    os.remove(checkpoint / ROLLOUTS)
    with pytest.raises(
        CheckpointError, match=r"middle of an iteration \(num_iterations=2.*rollouts.safetensors"
    ):
        make_trainer(tmp_path / "b", **config).train(resume_from_checkpoint=str(checkpoint))
    trainer = make_trainer(tmp_path / "c", resume_weights_only=True, **config)
    trainer.train(resume_from_checkpoint=str(checkpoint))  # on purpose: the next step samples afresh
    assert trainer.state.global_step == 2 and "samples afresh" in caplog.text
    # resumed with another num_iterations, step 1 is at a boundary: nothing to reuse, nothing refused
    make_trainer(tmp_path / "d", **{**config, "num_iterations": 1}).train(
        resume_from_checkpoint=str(checkpoint)
    )


def tiny_rollouts(device="cpu"):
    g = torch.Generator().manual_seed(0)
    return Rollouts(
        prompts=["a cat", "a dog"],
        embeds={"prompt_embeds": torch.randn(2, 3, 4, generator=g).to(torch.bfloat16)},
        negative_embeds=None,
        latents=torch.randn(2, 2, 4, 8, 8, generator=g),
        next_latents=torch.randn(2, 2, 4, 8, 8, generator=g),
        log_probs=torch.randn(2, 2, 4, 8, 8, generator=g),
        sigmas=torch.tensor([1.0, 0.5]),
        sigmas_next=torch.tensor([0.5, 0.0]),
        sigma_max=float("nan"),
        samples=torch.rand(2, 3, 32, 32, generator=g),
        train_steps=torch.tensor([[0, 1], [1, 0]]),
        rewards=torch.tensor([0.25, -1.0]),
        advantages=Advantages(
            reward=torch.tensor([0.25, -1.0]),
            advantages=torch.tensor([1.0, -1.0]),
            auxiliary=[AuxiliaryObjective(0.5, torch.tensor([0.1, 0.2]), "bpgo/crt_loss")],
            metrics={"bpgo/weight": torch.tensor(0.75)},
        ),
    )


def test_rollouts_round_trip_exactly(tmp_path):
    rollouts, path = tiny_rollouts(), str(tmp_path / ROLLOUTS)
    save_rollouts(rollouts, path, {"global_step": 1})
    loaded, info = load_rollouts(path, torch.device("cpu"))
    assert (
        info == {"global_step": 1} and loaded.prompts == rollouts.prompts and loaded.negative_embeds is None
    )
    assert loaded.embeds["prompt_embeds"].dtype == torch.bfloat16
    assert torch.equal(loaded.embeds["prompt_embeds"], rollouts.embeds["prompt_embeds"])
    for name in ("latents", "next_latents", "log_probs", "sigmas", "samples", "train_steps", "rewards"):
        assert torch.equal(getattr(loaded, name), getattr(rollouts, name)), name
    assert loaded.sigma_max != loaded.sigma_max  # NaN survives JSON
    term = loaded.advantages.auxiliary[0]
    assert isinstance(term, AuxiliaryObjective) and term.coefficient == 0.5 and term.name == "bpgo/crt_loss"
    assert torch.equal(term.advantages, torch.tensor([0.1, 0.2]))
    assert loaded.advantages.weight is None and loaded.advantages.metrics["bpgo/weight"].item() == 0.75


def test_a_rollouts_file_naming_another_type_is_refused_without_running_it(tmp_path):
    """Only the listed dataclasses are rebuilt: a file naming any other callable is refused, naming the file."""
    path = tmp_path / ROLLOUTS
    structure = {"info": {}, "rollouts": {"type": "os.system", "fields": {"command": "touch pwned"}}}
    save_file({"x": torch.zeros(1)}, str(path), metadata={STRUCTURE_KEY: json.dumps(structure)})
    with pytest.raises(CheckpointError, match=f"{path}.*unreadable.*KeyError"):
        load_rollouts(str(path), torch.device("cpu"))
    path.write_bytes(path.read_bytes()[:-3])  # truncated
    with pytest.raises(CheckpointError, match="unreadable"):
        load_rollouts(str(path), torch.device("cpu"))
    assert not (tmp_path / "pwned").exists()


def test_bpgo_vipo_resume_inside_an_iteration_is_bitwise_exact(tmp_path, dinov2_path):
    """BPGO's CRT terms, RAS weights and EMA priors, and ViPO's maps, stored in the rollouts of a checkpoint inside
    an iteration, come back as they were: resuming it ends bitwise where the uninterrupted run ends."""
    from trl_visual.trainer.bpgo_vipo import BPGOViPOTrainer

    config = {**settings(2, 1, 3), "prior_source": "ema", "crt_weight": 0.25}
    kwargs = dict(trainer_class=BPGOViPOTrainer, trainer_kwargs={"backbone": dinov2_path}, **config)
    straight = make_trainer(tmp_path / "straight", **kwargs)
    straight.train()
    checkpoint = tmp_path / "straight" / "out" / "checkpoint-1"
    loaded, _ = load_rollouts(str(checkpoint / ROLLOUTS), torch.device("cpu"))
    assert loaded.advantages.maps is not None and loaded.advantages.auxiliary  # ViPO's maps, BPGO's CRT term
    resumed = make_trainer(tmp_path / "resumed", **kwargs)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got, expected = lora_weights(resumed), lora_weights(straight)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert logged(resumed, "reward") == logged(straight, "reward")
