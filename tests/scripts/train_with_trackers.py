"""Run by tests/test_trackers.py in a fresh process (trackio fixes its storage folder when first imported, and
wandb and MLflow keep a global run): two logged steps of LoRA GRPO on tiny:sd3 with sample images (or one step
on tiny:wan with sample videos), reporting to the trackers named on the command line (``all``: every one
installed, transformers 4's default).

    python train_with_trackers.py OUTPUT_DIR REPORT_TO [sd3|wan]

Writes ``OUTPUT_DIR/result.json``: the tracker callbacks that were active and the trainer's log history.
"""

import json
import os
import sys

import torch
from datasets import Dataset
from peft import LoraConfig

from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer

torch.set_num_threads(1)


def main(output_dir: str, report_to: str, model: str = "sd3") -> None:
    args = DiffusionGRPOConfig(
        output_dir=output_dir,
        num_generations=4,
        per_device_train_batch_size=8,
        max_steps=1 if model == "wan" else 2,
        height=32,
        width=32,
        num_frames=5 if model == "wan" else None,
        num_inference_steps=4,
        max_sequence_length=16,
        guidance_scale=1.0,
        report_to=report_to if report_to == "all" else report_to.split(","),
        run_name="trackers-test",
        save_strategy="no",
        disable_tqdm=True,
        log_images=True,
        num_images_to_log=4,
    )
    trainer = DiffusionGRPOTrainer(
        model=f"tiny:{model}",
        reward_funcs="red_channel",
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a cat", "a dog", "a red car", "a tree"]}),
        peft_config=LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
    )
    trainer.train()
    result = {
        "callbacks": [type(callback).__name__ for callback in trainer.callback_handler.callbacks],
        "log_history": trainer.state.log_history,
    }
    with open(os.path.join(output_dir, "result.json"), "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
