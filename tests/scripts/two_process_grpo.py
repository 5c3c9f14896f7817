"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: one group of 8 samples is split 4 + 4
across the two ranks, so its statistics are only right if rewards are gathered before the advantages."""

import json
import sys

import torch
from datasets import Dataset
from peft import LoraConfig

from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer

torch.set_num_threads(1)


class Recorder(DiffusionGRPOTrainer):
    def compute_advantages(self, rewards_per_func, inputs):
        result = super().compute_advantages(rewards_per_func, inputs)
        self.recorded = {
            "global_rewards": rewards_per_func[:, 0].tolist(),
            "prompts": [r["prompt"] for r in inputs],
        }
        return result

    def _score(self, rollouts, inputs, mode="train"):
        super()._score(rollouts, inputs, mode)
        self.recorded.update(
            local_rewards=rollouts.rewards.tolist(), local_advantages=rollouts.advantages.advantages.tolist()
        )


trainer = Recorder(
    model="tiny:sd3",
    reward_funcs="red_channel",
    args=DiffusionGRPOConfig(
        output_dir=sys.argv[1],
        num_generations=8,
        per_device_train_batch_size=4,
        max_steps=1,
        height=32,
        width=32,
        num_inference_steps=3,
        max_sequence_length=16,
        guidance_scale=1.0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        learning_rate=1e-2,
    ),
    train_dataset=Dataset.from_dict({"prompt": ["a cat", "a dog"]}),
    peft_config=LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]),
)
trainer.train()
weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])
trainer.recorded.update(
    rank=trainer.accelerator.process_index,
    world=trainer.accelerator.num_processes,
    logged_reward=trainer.state.log_history[0]["reward"],
    weights_checksum=weights.double().sum().item(),
)
with open(f"{sys.argv[1]}/rank{trainer.accelerator.process_index}.json", "w") as handle:
    json.dump(trainer.recorded, handle)
# Tear the gloo group down before exit: left to interpreter shutdown, a rank can abort now and then
# ("terminate called without an active exception") after all its work is done.
trainer.accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()
