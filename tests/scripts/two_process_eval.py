"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: evaluate() on 5 prompts in batches of 2,
which two processes cannot share evenly (3 batches). Each rank writes the metrics it returns."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers import eval_on_five_prompts  # noqa: E402

torch.set_num_threads(1)
trainer = eval_on_five_prompts(sys.argv[1], use_cpu=True)
metrics = trainer.evaluate()
with open(f"{sys.argv[1]}/rank{trainer.accelerator.process_index}.json", "w") as handle:
    json.dump({"world": trainer.accelerator.num_processes, **metrics}, handle)
trainer.accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()
