"""Time per training step of GRPO, BPGO and ViPO on a tiny model (CPU, one thread).

    python benchmarks/step_time.py [--model sd3|flux|wan|wan-i2v] [--methods GRPO BPGO ViPO] [--steps 12] [--repeats 3]

Each method trains the same configuration from the same start; the order of the methods rotates between
repeats so that a slow patch of a shared machine does not land on one method. The first two steps of each
run are warm-up and not timed. Prints the median seconds per step and the ratio to GRPO.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image
from transformers import TrainerCallback

from trl_visual import (
    BPGOConfig,
    BPGOTrainer,
    DiffusionGRPOConfig,
    DiffusionGRPOTrainer,
    ViPOConfig,
    ViPOTrainer,
)
from trl_visual.testing import tiny_dinov2

PROMPTS = ["a cat", "a dog", "a red car", "a tree"]
#: FLUX.1-dev trains with its distilled guidance 3.5; the others without CFG
GUIDANCE = {"sd3": 1.0, "flux": 3.5, "wan": 1.0, "wan-i2v": 1.0}


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def settings(output_dir: str, steps: int, model: str) -> dict:
    return dict(
        output_dir=output_dir,
        num_generations=8,
        per_device_train_batch_size=32,
        max_steps=steps,
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=4,
        max_sequence_length=16,
        guidance_scale=GUIDANCE[model],
        learning_rate=3e-2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )


def prompts(model: str) -> Dataset:
    """The prompts; image-to-video also gets one plain coloured conditioning image per prompt."""
    data: dict[str, list] = {"prompt": PROMPTS}
    if model == "wan-i2v":
        data["image"] = [Image.new("RGB", (32, 32), (60 * i, 200 - 40 * i, 90)) for i in range(len(PROMPTS))]
    return Dataset.from_dict(data)


def run(method: str, steps: int, model: str) -> float:
    folder = tempfile.mkdtemp()
    config = settings(folder, steps, model)
    common = dict(
        model=f"tiny:{model}",
        reward_funcs="red_channel",
        train_dataset=prompts(model),
        peft_config=LoraConfig(
            r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"]
        ),
    )
    if method == "GRPO":
        trainer = DiffusionGRPOTrainer(args=DiffusionGRPOConfig(**config), **common)
    elif method == "BPGO":
        trainer = BPGOTrainer(args=BPGOConfig(**config), **common)
    else:
        trainer = ViPOTrainer(args=ViPOConfig(**config), backbone=tiny_dinov2(), **common)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return statistics.median(timer.times[2:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sd3", choices=sorted(GUIDANCE))
    parser.add_argument(
        "--methods", nargs="+", default=["GRPO", "BPGO", "ViPO"], choices=["GRPO", "BPGO", "ViPO"]
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = args.methods
    times: dict[str, list[float]] = {m: [] for m in methods}
    for repeat in range(args.repeats):
        shift = repeat % len(methods)
        for method in methods[shift:] + methods[:shift]:
            times[method].append(run(method, args.steps, args.model))
    first = statistics.median(times[methods[0]])
    print(f"tiny:{args.model}, batch 32, 8 generations per prompt, 4 sampling steps, 1 CPU thread")
    print(f"{'method':8} {'s/step (median)':>16} {'vs ' + methods[0]:>8}   per repeat")
    for method in methods:
        median = statistics.median(times[method])
        print(f"{method:8} {median:16.3f} {median / first:7.2f}x   {[round(t, 3) for t in times[method]]}")


if __name__ == "__main__":
    main()
