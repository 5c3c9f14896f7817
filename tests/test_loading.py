"""Model loading: named models come from a registry, and production code never imports ``testing``."""

from __future__ import annotations

import subprocess
import sys

import pytest
from diffusers import StableDiffusion3Pipeline

from trl_visual.models import PIPELINE_LOADERS, load_pipeline, register_pipeline_loader
from trl_visual.testing import tiny_sd3_pipeline


def test_a_registered_prefix_is_answered_by_its_loader(monkeypatch):
    monkeypatch.setitem(PIPELINE_LOADERS, "toy:", lambda name: ("built", name))
    assert load_pipeline("toy:anything") == ("built", "toy:anything")


def test_tiny_names_build_the_tiny_pipeline():
    pipeline = load_pipeline("tiny:sd3")
    assert isinstance(pipeline, StableDiffusion3Pipeline)
    reference = tiny_sd3_pipeline()
    assert pipeline.transformer.pos_embed.proj.weight.equal(reference.transformer.pos_embed.proj.weight)


def test_an_unknown_tiny_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="tiny:sd3"):
        load_pipeline("tiny:nope")


def test_a_prefix_must_end_with_a_colon():
    with pytest.raises(ValueError, match="must end with ':'"):
        register_pipeline_loader("toy", lambda name: name)


def test_a_pipeline_object_refuses_model_init_kwargs():
    with pytest.raises(ValueError, match="model_init_kwargs"):
        load_pipeline(tiny_sd3_pipeline(), {"torch_dtype": "float16"})


def test_production_modules_do_not_import_testing():
    code = (
        "import sys, trl_visual.trainer, trl_visual.cli, trl_visual.hub, trl_visual.models;"
        "print('trl_visual.testing' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
