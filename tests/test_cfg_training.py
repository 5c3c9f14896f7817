"""Classifier-free guidance in training: the unconditional branch is detached by default (``cfg_uncond_grad``),
the denoiser then runs with gradient on the conditional half only, and the sampling-time ``v_u`` is reused
when training runs on the sampling weights (``num_iterations == 1``)."""

import pytest
import torch
from helpers import RecordingTrainer, logged, make_trainer
from PIL import Image
from transformers import TrainerCallback

from trl_visual import DiffusionGRPOTrainer
from trl_visual.core.policy_loss import clipped_policy_loss
from trl_visual.core.sde import sde_step_with_logprob
from trl_visual.models import get_adapter, guided, load_pipeline
from trl_visual.models.base import unconditional_embeds
from trl_visual.trainer.rollout import transition_at

GUIDANCE = 4.5


class GradientRecorder(TrainerCallback):
    """Keeps a copy of the LoRA gradients of the last optimizer step, before the optimizer sees them."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {
            name: param.grad.detach().clone()
            for name, param in self.model.named_parameters()
            if param.requires_grad and param.grad is not None
        }


class LossRecorder(RecordingTrainer):
    """Also keeps what each training step returned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.losses.append(loss.item())
        return loss


def train_at_lr_zero(tmp_path, **overrides) -> tuple[LossRecorder, GradientRecorder]:
    """A short run with CFG 4.5 in training and learning rate 0, so the weights stay those that sampled; the
    recorded gradients are the raw ones (no clipping)."""
    settings = dict(guidance_scale=GUIDANCE, learning_rate=0.0, max_grad_norm=0.0)
    trainer = make_trainer(tmp_path, trainer_class=LossRecorder, **{**settings, **overrides})
    recorder = GradientRecorder(trainer.model)
    trainer.add_callback(recorder)
    trainer.train()
    return trainer, recorder


def two_branch_loss_and_grads(trainer: DiffusionGRPOTrainer, detach_uncond: bool):
    """The last step's loss and LoRA gradients, written out: per trained timestep one forward of the SD3
    transformer on ``2B`` inputs (negative prompt, then prompt), ``v = v_u + w (v_c − v_u)`` with ``v_u``
    detached or not, the clipped objective on the stored transition, averaged over timesteps."""
    rollouts, denoiser = trainer._rollouts, trainer.model
    denoiser.zero_grad()
    embeds, negative = rollouts.embeds, rollouts.negative_embeds
    text = torch.cat([negative["prompt_embeds"], embeds["prompt_embeds"]])
    pooled = torch.cat([negative["pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]])
    num_trained = rollouts.train_steps.shape[1]
    total = 0.0
    for k in range(num_trained):
        transition = transition_at(rollouts, k)
        both = denoiser(
            hidden_states=torch.cat([transition.latents, transition.latents]),
            timestep=torch.cat([transition.sigma, transition.sigma]) * 1000,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        uncond, cond = both.chunk(2)
        if detach_uncond:
            uncond = uncond.detach()
        velocity = uncond + GUIDANCE * (cond - uncond)
        step = sde_step_with_logprob(
            trainer.args.sde_type,
            transition.latents,
            velocity,
            transition.sigma,
            transition.sigma_next,
            trainer.args.noise_level,
            sigma_max=rollouts.sigma_max,
            prev_sample=transition.next_latents,
        )
        log_ratio = (step.log_prob - transition.old_log_prob).flatten(1).mean(dim=1)
        loss = clipped_policy_loss(log_ratio, rollouts.advantages.advantages, trainer.args.epsilon)[0].mean()
        (loss / num_trained).backward()
        total += loss.item() / num_trained
    grads = {
        name: param.grad.detach().clone()
        for name, param in denoiser.named_parameters()
        if param.requires_grad
    }
    denoiser.zero_grad()
    return total, grads


def max_gap(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max((first[name] - second[name]).abs().max().item() for name in first)


def largest(grads: dict[str, torch.Tensor]) -> float:
    return max(grad.abs().max().item() for grad in grads.values())


@pytest.mark.parametrize(
    "num_iterations, cfg_uncond_grad", [(1, False), (2, False), (1, True)], ids=["reuse", "recompute", "2B"]
)
def test_cfg_training_matches_the_two_branch_computation(tmp_path, num_iterations, cfg_uncond_grad):
    """The trainer's loss and LoRA gradients equal the explicit two-branch computation with the unconditional
    branch detached (``cfg_uncond_grad=False``, whether ``v_u`` is reused from sampling or recomputed) or not
    (``True``, the 2B forward and backward), and differ from the other mode's; on the sampling weights the
    ratio is 1, so nothing is clipped."""
    trainer, recorder = train_at_lr_zero(
        tmp_path, num_iterations=num_iterations, cfg_uncond_grad=cfg_uncond_grad, max_steps=num_iterations
    )
    stored = trainer._rollouts.uncond_velocities is not None
    assert stored == (num_iterations == 1 and not cfg_uncond_grad)

    loss, grads = two_branch_loss_and_grads(trainer, detach_uncond=not cfg_uncond_grad)
    assert trainer.losses[-1] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    scale = largest(grads)
    assert scale > 0
    assert max_gap(recorder.grads, grads) < 1e-4 * scale

    _, other_mode = two_branch_loss_and_grads(trainer, detach_uncond=cfg_uncond_grad)
    assert max_gap(recorder.grads, other_mode) > 1e-2 * scale  # the unconditional branch's gradient counts

    assert logged(trainer, "clip_ratio") == [0.0] * num_iterations
    assert trainer.log_probs_match(), (trainer.max_log_prob_gap, trainer.max_log_prob)


def test_stored_unconditional_velocity_is_the_recomputed_one(tmp_path):
    """What sampling stores is the unconditional velocity of the sampling weights at each stored state."""
    trainer, _ = train_at_lr_zero(tmp_path, max_steps=1)
    rollouts = trainer._rollouts
    adapter = trainer.adapter
    for k in range(rollouts.latents.shape[1]):
        sigma = rollouts.sigmas[k].expand(len(rollouts.prompts))
        with torch.no_grad():
            uncond, _ = adapter.cfg_velocities(
                trainer.model, rollouts.latents[:, k], sigma, rollouts.embeds, rollouts.negative_embeds
            )
        torch.testing.assert_close(rollouts.uncond_velocities[:, k], uncond, rtol=1e-5, atol=1e-6)


def test_without_cfg_nothing_is_stored(tmp_path):
    trainer, _ = train_at_lr_zero(tmp_path, max_steps=1, guidance_scale=1.0)
    assert trainer._rollouts.negative_embeds is None
    assert trainer._rollouts.uncond_velocities is None


@pytest.mark.slow
def test_torch_compile_gives_the_same_loss_and_gradients(tmp_path):
    """``torch_compile=True`` (TrainingArguments' field: accelerate compiles the denoiser that the training
    passes run) gives the eager run's loss and LoRA gradients on the conditional-only CFG path. The
    ``aot_eager`` backend traces forward and backward as inductor does, without generating C++ (inductor
    takes minutes on this CPU; a GPU run uses it); even so this test takes about a minute, hence ``slow``."""
    torch.manual_seed(0)
    eager, eager_recorder = train_at_lr_zero(tmp_path / "eager", max_steps=1)
    torch.manual_seed(0)
    compiled, compiled_recorder = train_at_lr_zero(
        tmp_path / "compiled", max_steps=1, torch_compile=True, torch_compile_backend="aot_eager"
    )
    assert type(compiled.model_wrapped).__name__ == "OptimizedModule"  # the training passes ran compiled
    assert compiled.losses == pytest.approx(eager.losses, abs=1e-7)
    scale = largest(eager_recorder.grads)
    assert scale > 0
    assert max_gap(compiled_recorder.grads, eager_recorder.grads) < 1e-4 * scale


@pytest.mark.parametrize("name", ["sd3", "flux", "wan", "wan-i2v"])
def test_one_branch_at_a_time_equals_the_batched_guided_velocity(name):
    """Every family: the conditional branch alone (B inputs) guided with the unconditional one computed on its
    own equals :meth:`velocity`'s batched 2B CFG, the image-to-video conditioning kept in the unconditional
    branch. Guidance-distilled FLUX runs no unconditional pass: its velocity is the conditional one."""
    adapter = get_adapter(load_pipeline(f"tiny:{name}"))
    shape = adapter.latent_shape(32, 32, 5)
    embeds = adapter.encode_prompts(["a cat", "a dog"], 16)
    if name == "wan-i2v":
        images = [Image.new("RGB", (32, 32), colour) for colour in ((200, 30, 30), (30, 30, 200))]
        embeds = {**embeds, **adapter.encode_conditioning([{"image": image} for image in images])}
    negative = adapter.encode_prompts(["", ""], 16)
    latents = adapter.prepare_noise(2, shape, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.6])
    with torch.no_grad():
        batched = adapter.velocity(adapter.denoiser, latents, sigma, embeds, negative, GUIDANCE)
        cond = adapter.conditional_velocity(adapter.denoiser, latents, sigma, embeds, GUIDANCE)
        uncond = adapter.conditional_velocity(
            adapter.denoiser, latents, sigma, unconditional_embeds(embeds, negative), GUIDANCE
        )
    assert adapter.runs_cfg == (name != "flux")
    if adapter.runs_cfg:
        assert (uncond - cond).abs().max() > 1e-3  # the negative prompt changes the prediction
        torch.testing.assert_close(batched, guided(uncond, cond, GUIDANCE), rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(batched, cond, rtol=1e-5, atol=1e-6)
