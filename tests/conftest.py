import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny models are far faster on one thread, and pytest-xdist runs one process per core.
torch.set_num_threads(1)


#: the four training prompts the trainer tests share (one group each at batch 8, G 2)
PROMPTS = ["a cat", "a dog", "a red car", "a tree"]
#: LoRA targets of the tiny SD3/FLUX/Wan transformers, with the output projection so small runs can learn
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]


def logged(trainer, key):
    """Every value logged under ``key`` during ``trainer``'s run, in order."""
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.fixture(scope="session")
def dinov2_path(tmp_path_factory):
    """The tiny DINOv2 (patch 4: an 8×8 patch grid on 32×32 samples) saved as a user's local checkpoint."""
    from trl_visual.testing import save_tiny_dinov2

    return save_tiny_dinov2(tmp_path_factory.mktemp("backbone") / "dinov2")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
