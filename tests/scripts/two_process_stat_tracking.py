"""Run by tests/test_stat_tracking.py under `torchrun --nproc_per_node 2`: one prompt, one group of 8 samples split
4 + 4 across the two ranks, two steps with `per_prompt_stat_tracking`: each rank must record all 16 rewards."""

import json
import sys

import torch
from datasets import Dataset
from peft import LoraConfig

from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer

torch.set_num_threads(1)


class Recorder(DiffusionGRPOTrainer):
    """Keeps the last step's local advantages."""

    def _score(self, rollouts, inputs, mode="train"):
        super()._score(rollouts, inputs, mode)
        self.local_advantages = rollouts.advantages.advantages.tolist()


args = DiffusionGRPOConfig(
    output_dir=sys.argv[1], num_generations=8, per_device_train_batch_size=4, max_steps=2, height=32, width=32,
    num_inference_steps=2, max_sequence_length=16, guidance_scale=1.0, report_to="none", save_strategy="no",
    disable_tqdm=True, use_cpu=True, learning_rate=1e-2, per_prompt_stat_tracking=True,
    per_prompt_stat_tracking_buffer_size=16,
)  # fmt: skip
trainer = Recorder(
    model="tiny:sd3",
    reward_funcs="red_channel",
    args=args,
    train_dataset=Dataset.from_dict({"prompt": ["a cat"]}),
    peft_config=LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]),
)
trainer.train()
record = {"buffers": trainer.stat_tracker.buffers, "local_advantages": trainer.local_advantages}
with open(f"{sys.argv[1]}/rank{trainer.accelerator.process_index}.json", "w") as handle:
    json.dump(record, handle)
trainer.accelerator.wait_for_everyone()  # tear gloo down before exit (see two_process_grpo.py)
torch.distributed.destroy_process_group()
