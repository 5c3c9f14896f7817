"""Tests of ViPOTrainer: the dense loss against GRPO's, the maps on every latent layout, training runs on the
tiny offline SD3 pipeline with a tiny random DINOv2 saved to a temp folder, and the fallbacks."""

import os

import helpers
import pytest
import torch
from helpers import PROMPTS, logged

from trl_visual.backbones import BackboneError
from trl_visual.core.advantages import group_advantages
from trl_visual.core.vipo import dense_policy_loss, perceptual_map, pool_to_tokens, reward_map_advantages
from trl_visual.trainer.bpgo_vipo import BPGOViPOConfig, BPGOViPOTrainer
from trl_visual.trainer.diffusion_grpo_trainer import DiffusionGRPOTrainer
from trl_visual.trainer.hooks import Advantages, AuxiliaryObjective
from trl_visual.trainer.rollout import Rollouts
from trl_visual.trainer.vipo_config import ViPOConfig
from trl_visual.trainer.vipo_trainer import ViPOTrainer

EPS = 1e-4


def make_trainer(output_dir, backbone=None, trainer_class=ViPOTrainer, reward="red_channel", **overrides):
    """The shared tiny run, writing to ``output_dir`` itself (the map overlays land in ``output_dir/samples``)."""
    return helpers.make_trainer(
        output_dir,
        reward,
        trainer_class=trainer_class,
        output_dir=str(output_dir),
        trainer_kwargs={"backbone": backbone},
        **overrides,
    )


@pytest.fixture(scope="module")
def trainer(dinov2_path, tmp_path_factory):
    """One tiny ViPO trainer (SD3 latents 4×8×8) for the hook-level tests."""
    return make_trainer(tmp_path_factory.mktemp("vipo"), backbone=dinov2_path)


def rollouts_with(samples, rewards=None):
    """A Rollouts holding only what the advantage hooks read."""
    empty = torch.zeros(len(samples), 0)
    return Rollouts(
        prompts=["a cat"] * len(samples),
        embeds={},
        negative_embeds=None,
        latents=empty,
        next_latents=empty,
        log_probs=empty,
        sigmas=torch.zeros(0),
        sigmas_next=torch.zeros(0),
        sigma_max=1.0,
        samples=samples,
        rewards=rewards,
    )


def scored(advantages, rewards=None, **fields):
    """Advantages as compute_advantages returns them (rewards zero unless given)."""
    rewards = torch.zeros(len(advantages)) if rewards is None else rewards
    return Advantages(reward=rewards, advantages=advantages, **fields)


def log_probs_around(shape, scale=3e-4):
    """Old and new per-element log-probs whose ratios fall inside and outside the ±1e-4 trust region."""
    old = torch.randn(shape)
    return old + scale * torch.randn(shape), old


# ------------------------------------------------------------------------------------------------------
# The dense loss against GRPO's
# ------------------------------------------------------------------------------------------------------
def test_dense_loss_equals_grpo_with_ones_map_and_one_position(trainer):
    """One latent position (one channel on a 1×1 grid) and an all-ones map: the dense hook is GRPO exactly."""
    log_prob, old = log_probs_around((64, 1, 1, 1))
    advantages = torch.randn(64)
    maps = torch.ones(64, 1, 1)
    dense = trainer.policy_loss(log_prob, old, scored(advantages[:, None, None] * maps))
    grpo, grpo_clipped = DiffusionGRPOTrainer.clipped_objective(trainer, log_prob, old, advantages)
    assert torch.equal(dense.loss, grpo) and torch.equal(dense.clipped, grpo_clipped)
    assert 0 < grpo_clipped.mean() < 1  # both branches of the clip were exercised


def test_dense_ratio_is_the_joint_ratio_over_channels():
    """With C channels at one position, ρ_p = exp(Σ_c Δ) (the joint density's ratio), i.e. GRPO's
    exp(mean_c Δ) on C·Δ."""
    log_prob, old = log_probs_around((32, 4, 1, 1), scale=5e-5)
    advantages = torch.randn(32)
    dense, _ = dense_policy_loss(log_prob - old, advantages[:, None, None], EPS)
    expected = torch.maximum(
        -advantages * torch.exp((log_prob - old).sum(dim=(1, 2, 3))),
        -advantages * torch.exp((log_prob - old).sum(dim=(1, 2, 3))).clamp(1 - EPS, 1 + EPS),
    )
    torch.testing.assert_close(dense, expected)


def test_dense_loss_averages_positions():
    """Per position: ratio from the channel sum, advantage A·M(p); then the mean over positions."""
    log_prob, old = log_probs_around((4, 3, 2, 5))
    maps = torch.rand(4, 2, 5)
    advantages = torch.randn(4)
    loss, clipped = dense_policy_loss(log_prob - old, advantages[:, None, None] * maps, EPS)
    for b in range(4):
        for i in range(2):
            for j in range(5):
                ratio = torch.exp((log_prob - old)[b, :, i, j].sum())
                a = advantages[b] * maps[b, i, j]
                term = torch.maximum(-a * ratio, -a * ratio.clamp(1 - EPS, 1 + EPS))
                loss[b] -= term / 10
    torch.testing.assert_close(loss, torch.zeros(4), atol=1e-6, rtol=0)
    assert clipped.shape == (4,) and ((clipped >= 0) & (clipped <= 1)).all()
    with pytest.raises(ValueError, match="does not match"):
        dense_policy_loss(log_prob - old, maps[:, :1], EPS)


def test_position_level_advantage_is_the_map_times_the_advantage(trainer):
    samples = torch.rand(8, 3, 32, 32)
    advantages = torch.randn(8)
    maps, fallback = trainer.compute_maps(samples)
    assert maps.shape == (8, 8, 8) and not fallback.any()
    assert maps.amin() >= 0 and maps.amax() <= 1
    expanded = trainer.expand_advantages(scored(advantages), rollouts_with(samples))
    torch.testing.assert_close(expanded.advantages, advantages[:, None, None] * maps)
    assert torch.equal(expanded.maps, maps)
    assert set(expanded.metrics) == {"vipo/map_mean", "vipo/map_std", "vipo/map_fallbacks"}
    torch.testing.assert_close(expanded.metrics["vipo/map_mean"], maps.mean())
    assert expanded.metrics["vipo/map_fallbacks"].item() == 0


def test_maps_spread_every_set_of_advantages(trainer):
    """expand_advantages spreads the auxiliary objectives' advantages (BPGO's CRT) over the same maps as the
    main ones and keeps the weight, so BPGO-ViPO needs no override of its own."""
    samples = torch.rand(8, 3, 32, 32)
    maps, _ = trainer.compute_maps(samples)
    advantages, crt, weight = torch.randn(8), torch.randn(8), torch.rand(8)
    given = scored(advantages, weight=weight, auxiliary=[AuxiliaryObjective(0.3, crt, "aux")])
    expanded = trainer.expand_advantages(given, rollouts_with(samples))
    (term,) = expanded.auxiliary
    assert (term.coefficient, term.name) == (0.3, "aux")
    torch.testing.assert_close(term.advantages, (crt[:, None, None] * maps).clamp(-5, 5))
    assert torch.equal(expanded.weight, weight)


def test_zero_advantage_samples_get_no_map_and_the_same_loss(trainer, monkeypatch):
    """Two whole groups with advantage 0 (main and auxiliary): only the other 4 samples go through the backbone,
    and the loss, clipped fraction and advantage maps equal those computed with every map."""
    samples = torch.rand(8, 3, 32, 32)
    advantages = torch.tensor([0.0, 0.0, 1.2, -0.7, 0.0, 0.0, 0.4, -1.5])
    crt = advantages * 0.5
    given = scored(advantages, weight=torch.rand(8), auxiliary=[AuxiliaryObjective(0.3, crt, "aux")])
    seen = []
    original = trainer.backbone.forward
    monkeypatch.setattr(trainer.backbone, "forward", lambda x: seen.append(len(x)) or original(x))
    skipped = trainer.expand_advantages(given, rollouts_with(samples))
    assert seen == [4]
    monkeypatch.setattr(trainer.args, "log_images", True)  # logged maps: every one is computed
    full = trainer.expand_advantages(given, rollouts_with(samples))
    assert seen == [4, 8]
    torch.testing.assert_close(skipped.maps[[2, 3, 6, 7]], full.maps[[2, 3, 6, 7]], rtol=1e-6, atol=1e-6)
    assert torch.equal(skipped.maps[[0, 1, 4, 5]], torch.ones(4, 8, 8))
    log_prob, old = log_probs_around((8, *trainer.latent_shape))
    fast, slow = trainer.policy_loss(log_prob, old, skipped), trainer.policy_loss(log_prob, old, full)
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-6, atol=1e-9)
    assert torch.equal(fast.clipped, slow.clipped)
    assert torch.equal(fast.loss[[0, 1, 4, 5]], slow.loss[[0, 1, 4, 5]])
    torch.testing.assert_close(
        skipped.metrics["vipo/map_mean"], full.maps[[2, 3, 6, 7]].mean(), rtol=1e-6, atol=1e-6
    )


def test_all_zero_advantages_need_no_backbone(trainer, monkeypatch):
    monkeypatch.setattr(trainer.backbone, "forward", lambda x: pytest.fail("the backbone was called"))
    expanded = trainer.expand_advantages(scored(torch.zeros(8)), rollouts_with(torch.rand(8, 3, 32, 32)))
    assert torch.equal(expanded.advantages, torch.zeros(8, 8, 8))
    assert torch.isnan(expanded.metrics["vipo/map_mean"]) and expanded.metrics["vipo/map_fallbacks"] == 0


def test_sample_level_equals_grpo_with_advantages_scaled_by_mean_map(trainer, monkeypatch):
    monkeypatch.setattr(trainer.args, "dense_level", "sample")
    samples = torch.rand(8, 3, 32, 32)
    advantages = torch.randn(8)
    scaled = trainer.expand_advantages(scored(advantages), rollouts_with(samples))
    maps, _ = trainer.compute_maps(samples)
    torch.testing.assert_close(scaled.advantages, advantages * maps.flatten(1).mean(dim=1))
    log_prob, old = log_probs_around((8, *trainer.latent_shape), scale=1e-3)
    result = trainer.policy_loss(log_prob, old, scaled)
    grpo, grpo_clipped = DiffusionGRPOTrainer.clipped_objective(trainer, log_prob, old, scaled.advantages)
    assert torch.equal(result.loss, grpo) and torch.equal(result.clipped, grpo_clipped)


def test_mean_one_normalization_keeps_the_mean_advantage(trainer, monkeypatch):
    """Below the clamp (|A| · max M < adv_clip_max), a mean-one map keeps each sample's mean advantage."""
    monkeypatch.setattr(trainer.args, "map_normalization", "mean_one")
    advantages = 0.1 * torch.randn(8)
    expanded = trainer.expand_advantages(scored(advantages), rollouts_with(torch.rand(8, 3, 32, 32)))
    torch.testing.assert_close(expanded.advantages.flatten(1).mean(dim=1), advantages)


def test_mean_one_advantage_maps_are_clamped_again(trainer, monkeypatch):
    """``A(p) = clamp(M(p) · A, ±adv_clip_max)`` per position, as the released code does: a mean-one map peaks
    above 1, so large advantages would otherwise leave the clip range."""
    monkeypatch.setattr(trainer.args, "map_normalization", "mean_one")
    samples = torch.rand(8, 3, 32, 32)
    maps, _ = trainer.compute_maps(samples)
    advantages = torch.tensor([5.0, -5.0, 4.0, -3.0, 2.0, 1.0, 0.5, -0.5])
    assert (advantages[:2, None] * maps[:2].flatten(1)).abs().max() > 6  # the clamp has work to do
    expanded = trainer.expand_advantages(scored(advantages), rollouts_with(samples)).advantages
    assert expanded.abs().max() <= trainer.args.adv_clip_max
    torch.testing.assert_close(expanded, (advantages[:, None, None] * maps).clamp(-5, 5))


def test_released_map_variant_reaches_the_maps(trainer, monkeypatch):
    """``map_variant="released"``: the trainer's maps are ``perceptual_map(..., variant="released")`` of the
    backbone features; a ``sign_rule`` beside it is refused, since the released variant fixes the sign."""
    samples = torch.rand(4, 3, 32, 32)
    features = trainer._features(samples)
    default, _ = trainer.compute_maps(samples)
    monkeypatch.setattr(trainer.args, "map_variant", "released")
    released, _ = trainer.compute_maps(samples)
    expected, _ = perceptual_map(features, trainer.position_grid, variant="released")
    torch.testing.assert_close(released, expected)
    assert (released - default).abs().max() > 1e-3
    with pytest.raises(ValueError, match="sign_rule='skew'.*map_variant='released'"):
        ViPOConfig(output_dir="/tmp/x", report_to="none", map_variant="released", sign_rule="skew")


@pytest.mark.parametrize(
    "bf16, backbone_dtype, expected",
    [(True, None, torch.bfloat16), (True, "float32", torch.float32), (False, "bfloat16", torch.bfloat16)],
)
def test_backbone_dtype_overrides_the_training_precision(dinov2_path, bf16, backbone_dtype, expected):
    """``backbone_dtype="float32"`` keeps DINOv2 in float32 under bf16 training, as the released code does; unset,
    the backbone follows the training precision. (Arguments as a namespace: bf16 configs refuse a CPU.)"""
    from types import SimpleNamespace

    args = SimpleNamespace(
        aggregation="weighted", backbone=dinov2_path, backbone_image_size=None, bf16=bf16, fp16=False,
        backbone_dtype=backbone_dtype,
    )  # fmt: skip
    backbone = ViPOTrainer._build_backbone(None, args)
    assert {p.dtype for p in backbone.parameters()} == {expected}
    assert backbone(torch.rand(1, 3, 28, 28)).dtype == torch.float32
    with pytest.raises(ValueError, match="backbone_dtype"):
        ViPOConfig(output_dir="/tmp/x", report_to="none", backbone_dtype="fp32")


def _green(prompts, images, **kwargs):
    return images[:, 1].mean(dim=(1, 2)).tolist()


def test_per_reward_loss_sums_one_clipped_loss_per_reward(dinov2_path, tmp_path):
    """``multi_objective_loss="per_reward"``: each reward's own group advantages, spread by the same map and
    re-clamped, each through its own clipped objective, ``L = Σ_f w_f L(M · A_f)``; not the loss of the summed
    advantages."""
    trainer = make_trainer(
        tmp_path, dinov2_path, reward=["red_channel", _green], max_steps=1, num_inference_steps=2,
        reward_weights=[1.0, 0.5], multi_objective_loss="per_reward",
    )  # fmt: skip
    rewards = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    out = trainer.compute_advantages(rewards, [{"prompt": p} for p in PROMPTS * 2])
    columns = [group_advantages(rewards[:, f], 4) for f in range(2)]
    torch.testing.assert_close(out.per_reward, torch.stack(columns, dim=1))

    samples = torch.rand(8, 3, 32, 32)
    expanded = trainer.expand_advantages(out, rollouts_with(samples))
    maps, spread, combined = expanded.maps, expanded.per_reward, expanded.advantages
    assert spread.shape == (8, 2, 8, 8)
    torch.testing.assert_close(spread[:, 1], (columns[1][:, None, None] * maps).clamp(-5, 5))

    log_prob, old = log_probs_around((8, *trainer.latent_shape))
    loss = trainer.policy_loss(log_prob, old, expanded).loss
    expected = (
        dense_policy_loss(log_prob - old, spread[:, 0], EPS)[0]
        + 0.5 * dense_policy_loss(log_prob - old, spread[:, 1], EPS)[0]
    )
    torch.testing.assert_close(loss, expected)
    summed, _ = dense_policy_loss(log_prob - old, combined, EPS)
    assert (loss - summed).abs().max() > 1e-6
    trainer.train()  # the whole loop carries the per-reward maps through sampling, scoring and the loss
    losses = logged(trainer, "loss")
    assert losses and torch.isfinite(torch.tensor(losses)).all()
    with pytest.raises(ValueError, match="per_reward.*map_target='advantage'"):
        ViPOConfig(
            output_dir="/tmp/x", report_to="none", multi_objective_loss="per_reward", map_target="reward"
        )


def test_reward_target_normalizes_each_position_within_groups():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 5.0, 2.0])
    maps = torch.rand(8, 3, 2)
    advantages = reward_map_advantages(rewards, maps, num_generations=4)
    reward_maps = (rewards[:, None, None] * maps).view(2, 4, 3, 2)
    expected = (reward_maps - reward_maps.mean(dim=1, keepdim=True)) / (
        reward_maps.std(dim=1, keepdim=True) + 1e-4
    )
    torch.testing.assert_close(advantages, expected.clamp(-5, 5).view(8, 3, 2))


# ------------------------------------------------------------------------------------------------------
# Maps on other latent layouts
# ------------------------------------------------------------------------------------------------------
def test_packed_token_maps_are_pooled_from_the_latent_grid(trainer, monkeypatch):
    """A packed-token adapter (FLUX: 2×2 latent pixels per token) gets the latent-grid map, average-pooled."""
    samples = torch.rand(4, 3, 32, 32)
    pixel_maps, _ = trainer.compute_maps(samples)
    monkeypatch.setattr(trainer, "position_grid", (4, 4))
    monkeypatch.setattr(trainer, "token_patch_size", 2)
    token_maps, _ = trainer.compute_maps(samples)
    torch.testing.assert_close(token_maps, pool_to_tokens(pixel_maps, 2))


def test_video_maps_have_the_latent_frame_count_and_a_dense_loss(trainer, monkeypatch):
    monkeypatch.setattr(trainer, "position_grid", (2, 8, 8))
    videos = torch.rand(2, 5, 3, 32, 32)
    maps, fallback = trainer.compute_maps(videos)
    assert maps.shape == (2, 2, 8, 8) and not fallback.any()
    assert torch.isclose(maps.amin(), torch.tensor(0.0)) and torch.isclose(maps.amax(), torch.tensor(1.0))
    log_prob, old = log_probs_around((2, 4, 2, 8, 8))
    loss, clipped = dense_policy_loss(log_prob - old, torch.randn(2)[:, None, None, None] * maps, EPS)
    assert loss.shape == clipped.shape == (2,)


# ------------------------------------------------------------------------------------------------------
# Training runs
# ------------------------------------------------------------------------------------------------------
class RecordingViPOTrainer(ViPOTrainer):
    """Records the largest per-position log-ratio |Σ_c (log p_θ − log p_old)| seen in training."""

    max_position_log_ratio = 0.0

    def policy_loss(self, log_prob, old_log_prob, advantages):
        gap = self.adapter.to_position_grid(log_prob.detach() - old_log_prob).sum(dim=1).abs().max().item()
        self.max_position_log_ratio = max(self.max_position_log_ratio, gap)
        return super().policy_loss(log_prob, old_log_prob, advantages)


def test_on_policy_every_position_ratio_is_one_and_maps_are_logged(tmp_path, dinov2_path):
    """Learning rate 0 over two passes per batch: every per-position ratio is 1, nothing is clipped; with
    log_images the heat-map overlays land in output_dir/samples/."""
    trainer = make_trainer(
        tmp_path,
        backbone=dinov2_path,
        trainer_class=RecordingViPOTrainer,
        learning_rate=0.0,
        num_iterations=2,
        max_steps=2,
        log_images=True,
        num_images_to_log=4,
    )
    trainer.train()
    assert logged(trainer, "clip_ratio") == [0.0, 0.0]
    assert trainer.max_position_log_ratio < 1e-5
    assert os.path.exists(tmp_path / "samples" / "vipo_maps_step_000001.png")


@pytest.mark.slow
def test_vipo_raises_the_red_channel_reward(tmp_path, dinov2_path):
    """40 steps of LoRA ViPO on red_channel (GRPO's known-good tiny settings). Measured: the first-5-step mean
    is about −0.017 and the last-5 about −0.006; the noise of a 5-step mean is about 0.0005."""
    trainer = make_trainer(
        tmp_path,
        backbone=dinov2_path,
        num_generations=8,
        per_device_train_batch_size=32,
        learning_rate=3e-2,
        max_steps=40,
        seed=0,
    )
    trainer.train()
    rewards = logged(trainer, "reward")
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.004
    assert logged(trainer, "vipo/map_fallbacks") == [0.0] * 40
    assert all(0.2 < m < 0.8 for m in logged(trainer, "vipo/map_mean"))
    assert all(s > 0.05 for s in logged(trainer, "vipo/map_std"))


@pytest.mark.slow
def test_bpgo_vipo_raises_the_red_channel_reward_and_composes_the_losses(tmp_path, dinov2_path):
    """BPGO (EMA priors, sigmoid RAS, auxiliary CRT) on ViPO's maps: the reward rises as with ViPO, and the
    per-sample loss is w · L_dense(M·A) + ς · L_dense(M·Ã)."""
    trainer = make_trainer(
        tmp_path,
        backbone=dinov2_path,
        trainer_class=BPGOViPOTrainer,
        config_class=BPGOViPOConfig,
        num_generations=8,
        per_device_train_batch_size=32,
        learning_rate=3e-2,
        max_steps=40,
        seed=0,
    )
    trainer.train()
    rewards = logged(trainer, "reward")
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.004
    assert logged(trainer, "bpgo/crt_loss") and logged(trainer, "vipo/map_mean")

    maps, advantages, crt, weight = torch.rand(6, 8, 8), torch.randn(6), torch.randn(6), 0.5 + torch.rand(6)
    # expand_advantages has already spread the auxiliary advantages over the maps (M·Ã) at this point
    spread = scored(
        advantages[:, None, None] * maps,
        weight=weight,
        auxiliary=[AuxiliaryObjective(trainer.args.crt_weight, crt[:, None, None] * maps, "bpgo/crt_loss")],
    )
    log_prob, old = log_probs_around((6, *trainer.latent_shape), scale=1e-4)
    loss = trainer.policy_loss(log_prob, old, spread).loss
    main, _ = dense_policy_loss(log_prob - old, advantages[:, None, None] * maps, EPS)
    auxiliary, _ = dense_policy_loss(log_prob - old, crt[:, None, None] * maps, EPS)
    torch.testing.assert_close(loss, weight * main + trainer.args.crt_weight * auxiliary)


def test_bpgo_vipo_refuses_reward_maps(tmp_path):
    with pytest.raises(ValueError, match="map_target='advantage'"):
        BPGOViPOConfig(output_dir=str(tmp_path), map_target="reward")


# ------------------------------------------------------------------------------------------------------
# Failures
# ------------------------------------------------------------------------------------------------------
class FlakyBackbone(torch.nn.Module):
    """Passes the construction dry run, then raises at every training step."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("backbone exploded")
        return x.permute(0, 2, 3, 1)[:, ::4, ::4]


class NaNBackbone(torch.nn.Module):
    """Finite features for the first image of a batch, NaN for the others."""

    def forward(self, x):
        features = x.permute(0, 2, 3, 1)[:, ::4, ::4].clone()
        features[1:] = float("nan")
        return features


def test_backbone_that_raises_at_a_step_falls_back_to_ones_and_warns_once(tmp_path):
    trainer = make_trainer(tmp_path, backbone=FlakyBackbone(), max_steps=2)
    with pytest.warns(RuntimeWarning, match="backbone exploded") as record:
        trainer.train()
    assert sum("backbone exploded" in str(w.message) for w in record) == 1
    assert trainer.state.global_step == 2
    assert logged(trainer, "vipo/map_fallbacks") == [8.0, 8.0]
    assert logged(trainer, "vipo/map_mean") == [1.0, 1.0]


def test_non_finite_features_fall_back_per_sample(trainer, monkeypatch):
    monkeypatch.setattr(trainer, "backbone", NaNBackbone())
    monkeypatch.setattr(trainer, "_warned", set())
    with pytest.warns(RuntimeWarning, match="non-finite"):
        maps, fallback = trainer.compute_maps(torch.rand(4, 3, 32, 32))
    assert fallback.tolist() == [False, True, True, True]
    assert (maps[1:] == 1).all() and maps[0].amin() == 0


def test_unreadable_backbone_fails_at_construction(tmp_path):
    channels_first = torch.nn.Conv2d(3, 32, kernel_size=4, stride=4)  # (B, D, h, w), not (B, h, w, D)

    with pytest.raises(BackboneError, match="cannot read it as patch features"):
        make_trainer(tmp_path, backbone=channels_first)


def test_ones_aggregation_needs_no_backbone(tmp_path):
    trainer = make_trainer(tmp_path, backbone="/nonexistent/backbone", aggregation="ones")
    assert trainer.backbone is None
    maps, fallback = trainer.compute_maps(torch.rand(2, 3, 32, 32))
    assert (maps == 1).all() and not fallback.any()


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("aggregation", "max", "aggregation"),
        ("sign_rule", "random", "sign_rule"),
        ("map_normalization", "l2", "map_normalization"),
        ("map_target", "loss", "map_target"),
        ("dense_level", "token", "dense_level"),
        ("pca_components", 0, "pca_components"),
        ("smoothing_sigma", -1.0, "smoothing_sigma"),
    ],
)
def test_config_validation(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        ViPOConfig(output_dir=str(tmp_path), **{field: value})


def test_perceptual_map_is_what_the_trainer_uses(trainer):
    """The trainer's map is core.vipo's perceptual_map on the backbone's features, nothing more."""
    samples = torch.rand(4, 3, 32, 32)
    expected, _ = perceptual_map(trainer.backbone(samples), (8, 8))
    torch.testing.assert_close(trainer.compute_maps(samples)[0], expected)
