"""Run by tests/test_distributed.py, under `torchrun --nproc_per_node 2` (DDP over gloo) or as one process, with
the same global batch (8 samples: 2 groups of 4) either way.

The trainer draws each process's SDE noise from its own seed, so 1 and 2 processes sample different trajectories
by design. To compare the engines on the same samples, this script draws the SDE noise of the whole global batch
from one seed and gives each process its rows (`global_batch_noise`), as the initial noise already is.

Under 2 processes it ends with fsdp2_lora.py's check of the LoRA gathered from FSDP2 shards (in `fsdp/`).

Run "a" trains 2 optimizer steps of 2 micro-steps, each micro-step taking 2 backwards (one per trained timestep),
checkpointing after step 1; run "b" resumes that checkpoint in a fresh trainer and trains step 2. With
`num_iterations=3` the rollouts of micro-step 0 are reused by micro-steps 1 and 2, so the step-1 checkpoint falls
inside an iteration: each rank keeps its rollouts there (`rollouts_<rank>.safetensors`) for run "b". Both final
LoRAs are saved with `save_model`; run "a" also writes its model card. Each rank writes what it counted: backwards, and DDP's gradient all-reduces
(a communication hook counts them)."""

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator

import torch
from datasets import Dataset
from fsdp2_lora import write_sharded_lora
from peft import LoraConfig
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

import trl_visual.trainer.rollout as rollout
from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer

GLOBAL_BATCH = 8

LEARNING_RATE = 50.0
"""Plain SGD (the same update on 1 and 2 processes to rounding, unlike Adam's sign-like first steps) with a step
large enough to move the tiny LoRA well beyond the tolerance of the comparison."""


@contextlib.contextmanager
def global_batch_noise(rank: int) -> Iterator[None]:
    """Make the rollouts independent of the process layout: one SDE-noise seed for all processes, each drawing
    the noise of the whole global batch and keeping its own rows."""

    class GlobalBatchNoise(rollout.StepNoise):
        """Draws the noise of the whole global batch and keeps this rank's rows of it."""

        def __init__(self, seed: int, device: torch.device, batch_size: int, rows: slice):
            first, stop, _ = rows.indices(batch_size)
            offset = rank * batch_size
            super().__init__(seed, device, GLOBAL_BATCH, slice(offset + first, offset + stop))

    saved = rollout.sde_noise_seed, rollout.StepNoise
    rollout.sde_noise_seed = lambda round_seed, process_index: round_seed
    rollout.StepNoise = GlobalBatchNoise
    try:
        yield
    finally:
        rollout.sde_noise_seed, rollout.StepNoise = saved


class Counting(DiffusionGRPOTrainer):
    """Counts backwards and, under DDP, the all-reduces of the gradient buckets."""

    backwards = 0
    all_reduces = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        if isinstance(model, DistributedDataParallel) and not getattr(model, "_counted", False):
            model.register_comm_hook(None, self._counting_hook)
            model._counted = True
        return super().training_step(model, inputs, num_items_in_batch)

    def _counting_hook(self, process_group, bucket):
        self.all_reduces += 1
        return allreduce_hook(process_group, bucket)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        scale = self.engine.backward_scale

        def counting(num_trained, gradient_accumulation_steps):
            self.backwards += num_trained
            return scale(num_trained, gradient_accumulation_steps)

        self.engine.backward_scale = counting

    def _save_rng_state(self, output_dir):
        """A slow rank: the others write their RNG file a second after rank 0, as on a loaded machine, so a
        checkpoint put in place before every rank has written would lose their files (and run "b" could not
        resume it exactly)."""
        if self.args.process_index > 0:
            time.sleep(1.0)
        super()._save_rng_state(output_dir)


def trainer(out, world):
    return Counting(
        model="tiny:sd3",
        reward_funcs="red_channel",
        args=DiffusionGRPOConfig(
            output_dir=os.path.join(out, "run"),
            num_generations=4,
            per_device_train_batch_size=GLOBAL_BATCH // world,
            gradient_accumulation_steps=2,
            num_iterations=3,
            max_steps=2,
            num_inference_steps=4,
            timestep_fraction=0.5,
            exclude_last_step=False,
            height=32,
            width=32,
            max_sequence_length=16,
            guidance_scale=1.0,
            optim="sgd",
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            report_to="none",
            save_strategy="steps",
            save_steps=1,
            disable_tqdm=True,
            use_cpu=True,
            ddp_bucket_cap_mb=64,
        ),
        train_dataset=Dataset.from_dict({"prompt": ["a cat", "a dog", "a red car", "a tree"]}),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"]),
    )


def main(out: str, resume: bool = True) -> None:
    """Train straight (run "a"), then, with ``resume``, cut off at the step-1 checkpoint and resumed (run "b");
    save both LoRAs and the counts."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with global_batch_noise(int(os.environ.get("RANK", "0"))):
        straight = trainer(out, world)
        straight.train()
        straight.save_model(os.path.join(out, "a"))
        straight.create_model_card()  # rank 0 samples alone under DDP: no collective may hide in it
        straight.accelerator.wait_for_everyone()
        if resume:
            resumed = trainer(out, world)
            resumed.train(resume_from_checkpoint=os.path.join(out, "run", "checkpoint-1"))
            resumed.save_model(os.path.join(out, "b"))
    counts = {
        "world": straight.accelerator.num_processes,
        "backwards": straight.backwards,
        "all_reduces": straight.all_reduces,
        "optimizer_steps": straight.state.global_step,
    }
    with open(os.path.join(out, f"rank{straight.accelerator.process_index}.json"), "w") as handle:
        json.dump(counts, handle)
    if world > 1:
        write_sharded_lora(os.path.join(out, "fsdp"))  # FSDP2's LoRA gathering, in the same processes
        # tear the gloo group down before exit (see two_process_grpo.py)
        straight.accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
