import functools
import os

import pytest
import torch
from helpers import make_trainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny models are far faster on one thread, and pytest-xdist runs one process per core.
torch.set_num_threads(1)


@pytest.fixture
def tiny_trainer(tmp_path):
    """:func:`helpers.make_trainer` bound to this test's ``tmp_path``: ``tiny_trainer(max_steps=1, ...)``."""
    return functools.partial(make_trainer, tmp_path)


@pytest.fixture(scope="session")
def dinov2_path(tmp_path_factory):
    """The tiny DINOv2 (patch 4: an 8×8 patch grid on 32×32 samples) saved as a user's local checkpoint."""
    from trl_visual.testing import save_tiny_dinov2

    return save_tiny_dinov2(tmp_path_factory.mktemp("backbone") / "dinov2")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
