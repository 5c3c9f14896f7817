"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: BPGO's uncertainty RAS with four groups,
two per rank. Three prompts have a reliable reward (two equal interpretations), one an ambiguous one (two
interpretations ±1 apart), so ρ is 0 or 1 and the weights are known by hand; they must be renormalized over the
whole gathered batch, not per process."""

import json
import os
import sys

import torch
from datasets import Dataset
from peft import LoraConfig

from trl_visual.rewards.builtin import red_channel
from trl_visual.trainer.bpgo_config import BPGOConfig
from trl_visual.trainer.bpgo_trainer import BPGOTrainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers import TINY_RUN  # noqa: E402

torch.set_num_threads(1)
AMBIGUOUS = "a dog"


def judged(prompts, images, **kwargs):
    """Two interpretations per sample: red_channel ± 0 (reliable prompts) or ± 1 (the ambiguous one)."""
    values = red_channel(prompts, images)
    return [[v - (p == AMBIGUOUS), v + (p == AMBIGUOUS)] for p, v in zip(prompts, values)]


class Recorder(BPGOTrainer):
    def compute_advantages(self, rewards_per_func, inputs):
        result = super().compute_advantages(rewards_per_func, inputs)
        G = self.args.num_generations
        self.recorded = {
            "global_prompts": [r["prompt"] for r in inputs[::G]],
            "global_weights": result.weight[::G].tolist(),
        }
        return result

    def _score(self, rollouts, inputs, mode="train"):
        super()._score(rollouts, inputs, mode)
        self.recorded.update(
            local_prompts=list(rollouts.prompts), local_weights=rollouts.advantages.weight.tolist()
        )


trainer = Recorder(
    model="tiny:sd3",
    reward_funcs=judged,
    args=BPGOConfig(
        output_dir=sys.argv[1],
        **{**TINY_RUN, "max_steps": 1, "num_inference_steps": 3},
        use_cpu=True,
        learning_rate=1e-2,
        prior_source="column",
        ras_mode="uncertainty",
        ras_alpha=0.5,
    ),
    train_dataset=Dataset.from_dict(
        {"prompt": ["a cat", AMBIGUOUS, "a red car", "a tree"], "prior": [0.0] * 4}
    ),
    peft_config=LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]),
)
trainer.train()
trainer.recorded.update(rank=trainer.accelerator.process_index, world=trainer.accelerator.num_processes)
with open(f"{sys.argv[1]}/rank{trainer.accelerator.process_index}.json", "w") as handle:
    json.dump(trainer.recorded, handle)
trainer.accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()
