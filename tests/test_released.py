"""The papers' released settings stay one option away: the time-shifted sampling schedule of the released
samplers, and the released recipes (examples/configs/*_released.yaml)."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from PIL import Image

from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer
from trl_visual.cli import ModelArguments, ScriptArguments, load_command, parse_args
from trl_visual.core.advantages import group_advantages
from trl_visual.core.bpgo import batch_reward_scale, crt_transform_paper
from trl_visual.models import get_adapter
from trl_visual.models.base import shift_sigmas
from trl_visual.testing import load_tiny_pipeline

FAMILIES = ["sd3", "flux", "wan", "wan-i2v"]


def released_schedule(num_steps: int, shift: float) -> torch.Tensor:
    """The released samplers' σ, written out independently: ``s σ / (1 + (s − 1) σ)`` on ``linspace(1, 0, T+1)``."""
    sigmas = [1 - i / num_steps for i in range(num_steps + 1)]
    return torch.tensor([shift * s / (1 + (shift - 1) * s) for s in sigmas], dtype=torch.float64)


def tiny_trainer(tmp_path, model: str, **overrides) -> DiffusionGRPOTrainer:
    data = {"prompt": ["a cat", "a dog"]}
    if model == "wan-i2v":
        data["image"] = [Image.new("RGB", (32, 32), (200, 30, 30))] * 2
    settings = dict(
        output_dir=str(tmp_path / model), num_generations=2, per_device_train_batch_size=4, max_steps=1,
        height=32, width=32, num_frames=5, num_inference_steps=16, max_sequence_length=16,
        guidance_scale=1.0, report_to="none", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    settings.update(overrides)
    return DiffusionGRPOTrainer(
        model=f"tiny:{model}",
        reward_funcs="red_channel",
        args=DiffusionGRPOConfig(**settings),
        train_dataset=Dataset.from_dict(data),
    )


@pytest.mark.parametrize("model", FAMILIES)
def test_time_shift_gives_the_released_schedule_for_every_family(tmp_path, model):
    """``time_shift=s``: ``sampling_sigmas()`` is the shift formula on ``linspace(1, 0, T + 1)`` (s = 3, 5, 8 of the
    released runs), whatever the family's own scheduler does; ``None`` keeps the scheduler's schedule."""
    trainer = tiny_trainer(tmp_path, model, time_shift=3.0)
    for shift in (3.0, 5.0, 8.0):
        trainer.args.time_shift = shift
        sigmas = trainer.sampling_sigmas()
        assert sigmas.shape == (17,)
        torch.testing.assert_close(sigmas.double(), released_schedule(16, shift), atol=1e-6, rtol=0)
    trainer.args.time_shift = None
    adapter = get_adapter(load_tiny_pipeline(f"tiny:{model}"))
    own = adapter.scheduler_sigmas(16, trainer.latent_shape)
    torch.testing.assert_close(trainer.sampling_sigmas(), own)
    assert not torch.allclose(own.double(), released_schedule(16, 5.0), atol=1e-3)


def test_rollouts_sample_on_the_shifted_schedule(tmp_path):
    """The transitions a rollout stores sit on ``sampling_sigmas()``: σ and σ' of each step are consecutive values."""
    trainer = tiny_trainer(tmp_path, "sd3", time_shift=5.0, num_inference_steps=4)
    rollouts = trainer.sample(["a cat", "a cat"], torch.tensor([0, 0]), seed=0)
    expected = released_schedule(4, 5.0).float()
    torch.testing.assert_close(rollouts.sigmas, expected[:-1])
    torch.testing.assert_close(rollouts.sigmas_next, expected[1:])


def test_shift_sigmas_formula_and_errors():
    sigmas = torch.tensor([1.0, 0.5, 0.25, 0.0])
    torch.testing.assert_close(shift_sigmas(sigmas, 3.0), torch.tensor([1.0, 0.75, 0.5, 0.0]))
    torch.testing.assert_close(shift_sigmas(sigmas, 1.0), sigmas)
    with pytest.raises(ValueError, match="positive"):
        shift_sigmas(sigmas, 0.0)
    with pytest.raises(ValueError, match=r"time_shift.*must be in \(0, 1000\]"):
        DiffusionGRPOConfig(output_dir="/tmp/x", time_shift=-1.0, report_to="none")


# ------------------------------------------------------------------------------------------------------
# Recipes: examples/configs/*_released.yaml and the paper forms
# ------------------------------------------------------------------------------------------------------
CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"

#: BPGO's reference runs (DanceGRPO SDE, 16 steps, shift 5, fraction 0.6, clip 1e-4, advantage clip 5, shared
#: noise, lr 2e-6) with the released RAS (posterior, α = 1, v_0 = 1) and CRT (replace, a = 50, τ = 5).
BPGO_RELEASED = dict(
    sde_type="dance_grpo", num_inference_steps=16, time_shift=5.0, timestep_fraction=0.6,
    timestep_selection="random", init_same_noise=True, learning_rate=2e-6, epsilon=1e-4, adv_clip_max=5.0,
    beta=0.0, prior_source="column", ras_mode="posterior", ras_alpha=1.0, ras_prior_var=1.0,
    crt_mode="replace", crt_a=50.0, crt_tau=5.0,
)  # fmt: skip
#: BPGO's paper form: the same sampler and group settings, sigmoid RAS with α = 0.5, auxiliary CRT.
BPGO_PAPER = dict(
    sde_type="dance_grpo", num_inference_steps=16, time_shift=5.0, timestep_fraction=0.6,
    timestep_selection="random", init_same_noise=True, epsilon=1e-4, adv_clip_max=5.0, beta=0.0,
    ras_mode="sigmoid", ras_alpha=0.5, crt_mode="auxiliary",
)  # fmt: skip
#: ViPO's map (DINOv2 ViT-L/14, K = 3, explained-variance weights, σ = 1 patch, min-max), no KL.
VIPO_MAP = dict(
    backbone="facebook/dinov2-large", pca_components=3, aggregation="weighted", smoothing_sigma=1.0,
    map_normalization="minmax", map_target="advantage", beta=0.0, adv_clip_max=5.0, sde_type="dance_grpo",
)  # fmt: skip

RECIPES = {
    "bpgo_wan_t2v_released.yaml": ("bpgo", {**BPGO_RELEASED, "num_generations": 8, "noise_level": 0.25}),
    "bpgo_wan_i2v_released.yaml": ("bpgo", {**BPGO_RELEASED, "num_generations": 8, "noise_level": 0.25}),
    "bpgo_flux_released.yaml": ("bpgo", {**BPGO_RELEASED, "num_generations": 12, "noise_level": 0.3}),
    "vipo_flux_released.yaml": (
        "vipo",
        {
            **VIPO_MAP,
            "map_variant": "released",
            "dense_level": "sample",
            "noise_level": 0.3,
            "time_shift": 3.0,
        },
    ),
    "vipo_wan_released.yaml": (
        "vipo",
        {
            **VIPO_MAP,
            "map_variant": "released",
            "dense_level": "position",
            "temporal_sigma": 0.3,
            "noise_level": 0.25,
            "time_shift": 8.0,
        },
    ),
    "flux_hpsv2_bpgo.yaml": (
        "bpgo",
        {**BPGO_PAPER, "prior_source": "ema", "num_generations": 12, "noise_level": 0.3},
    ),
    "wan_video_bpgo.yaml": (
        "bpgo",
        {**BPGO_PAPER, "prior_source": "base_model", "num_generations": 8, "noise_level": 0.25},
    ),
    "flux_hpsv2_vipo.yaml": ("vipo", {**VIPO_MAP, "map_variant": "default", "dense_level": "position"}),
}
#: what a run trains, on what and where: named, not justified
IDENTITY_KEYS = {"model_name_or_path", "output_dir", "lora_target_modules", "prior_column"}


def load_recipe(name: str, tmp_path):
    """The recipe through the CLI's own parse path (bf16 off: this runs on a CPU)."""
    argv = [
        RECIPES[name][0],
        "--config",
        str(CONFIGS / name),
        "--bf16",
        "false",
        "--output_dir",
        str(tmp_path),
    ]
    return parse_args(argv)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_resolves_to_the_released_values(name, tmp_path):
    """Each recipe, parsed as ``trl-visual`` parses it, resolves to the table of the released (or paper) values."""
    _, script_args, config, model_args = load_recipe(name, tmp_path)
    wrong = {
        field: (getattr(config, field), value)
        for field, value in RECIPES[name][1].items()
        if getattr(config, field) != pytest.approx(value) and getattr(config, field) != value
    }
    assert not wrong, f"{name}: (resolved, expected) = {wrong}"
    assert script_args.reward_funcs and model_args.model_name_or_path


def _field_defaults(command: str) -> dict[str, object]:
    config_class, _ = load_command(command)
    defaults = {}
    for cls in (config_class, ScriptArguments, ModelArguments):
        for f in dataclasses.fields(cls):
            has_factory = f.default_factory is not dataclasses.MISSING
            defaults[f.name] = f.default_factory() if has_factory else f.default
    return defaults


@pytest.mark.parametrize("name", sorted(n for n in RECIPES if n.endswith("_released.yaml")))
def test_released_recipe_names_its_source_and_explains_every_change(name):
    """The header names the paper and the reference code; every value that differs from trl_visual's defaults
    carries a comment on its line (why, or where it comes from)."""
    text = (CONFIGS / name).read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert "Source:" in header and "arXiv" in header and "reference code" in header
    assert "ALGORITHMS" not in text
    defaults = _field_defaults(RECIPES[name][0])
    unexplained = []
    for line in text.splitlines():
        match = re.match(r"^(\w+):([^#]*)(#.*)?$", line)
        if not match or match.group(1) in IDENTITY_KEYS:
            continue
        key, value, comment = match.group(1), yaml.safe_load(match.group(2)), match.group(3)
        assert key in defaults, f"{name}: {key!r} is not a field"
        if value != defaults[key] and not comment:
            unexplained.append(key)
    assert not unexplained, f"{name}: values that differ from the defaults without a comment: {unexplained}"


def test_exclude_last_step_never_trains_the_step_landing_on_zero(tmp_path):
    """``exclude_last_step``: the released BPGO code trains ``int(0.6 · 15) = 9`` of the first 15 of 16 steps and
    never the last; here the same count comes out, and the last step (σ' = 0) is never among the trained ones."""
    rows = [{"prompt": p} for p in ("a cat", "a cat", "a dog", "a dog")]
    trainer = tiny_trainer(
        tmp_path, "sd3", num_inference_steps=16, timestep_fraction=0.6, timestep_selection="random",
        exclude_last_step=True, time_shift=5.0,
    )  # fmt: skip
    rollouts = trainer._make_rollouts(rows)
    assert rollouts.train_steps.shape == (4, 9)
    assert (rollouts.train_steps < 15).all()
    assert (rollouts.sigmas_next[rollouts.train_steps] > 0).all()
    trainer.args.exclude_last_step = False
    trainer.args.timestep_fraction = 1.0
    assert (
        (trainer._make_rollouts(rows).train_steps == 15).any(dim=1).all()
    )  # without it, every sample trains it


# ------------------------------------------------------------------------------------------------------
# CRT with a scale-free contrast
# ------------------------------------------------------------------------------------------------------
def test_crt_paper_contrast_in_batch_stds_by_hand():
    """``R̃ = [λ (R − R_prior) / s + 1{R > R_prior}] · exp(R)``: R = 0, 1, 2, prior 1, λ = 2, s = 0.5 gives
    ``[2·(−2) + 0, 0 + 0, 2·2 + 1] · exp(R) = [−4, 0, 5 e²]``."""
    out = crt_transform_paper(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([1.0]), lam=2.0, scale=0.5)
    torch.testing.assert_close(out, torch.tensor([[-4.0, 0.0, 5.0 * math.exp(2.0)]]))


def test_bpgo_crt_delta_scale_reaches_the_auxiliary_advantages(tmp_path):
    """``crt_delta_scale="batch_std"``: the auxiliary CRT advantages are those of R̃ with the contrast divided by
    the batch's reward std; ``"none"`` keeps the literal Eq. 4 (different advantages on the same rewards)."""
    from trl_visual.trainer.bpgo_config import BPGOConfig
    from trl_visual.trainer.bpgo_trainer import BPGOTrainer

    rows = [{"prompt": p, "prior": 0.5} for p in ["a cat"] * 4 + ["a dog"] * 4]
    rewards = torch.tensor([0.2, 0.45, 0.55, 0.9, 0.3, 0.48, 0.6, 0.7])[:, None]
    settings = dict(
        output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, max_steps=1, height=32,
        width=32, num_inference_steps=2, max_sequence_length=16, guidance_scale=1.0, report_to="none",
        prior_source="column", crt_mode="auxiliary", crt_lambda=1.0, ras_mode="none",
    )  # fmt: skip
    trainer = BPGOTrainer(
        model="tiny:sd3",
        reward_funcs="red_channel",
        args=BPGOConfig(**settings, crt_delta_scale="batch_std"),
        train_dataset=Dataset.from_dict({"prompt": ["a cat", "a dog"], "prior": [0.5, 0.5]}),
    )
    (scaled_term,) = trainer.compute_advantages(rewards, rows).auxiliary
    scaled = scaled_term.advantages
    grouped = rewards.view(2, 4)
    transformed = crt_transform_paper(grouped, torch.tensor([0.5, 0.5]), 1.0, batch_reward_scale(grouped))
    torch.testing.assert_close(scaled, group_advantages(transformed.reshape(-1), 4, "group", clip=5.0))
    trainer.args.crt_delta_scale = "none"
    literal = trainer.compute_advantages(rewards, rows).auxiliary[0].advantages
    assert (literal - scaled).abs().max() > 1e-2
    with pytest.raises(ValueError, match="crt_delta_scale"):
        BPGOConfig(**settings, crt_delta_scale="std")
