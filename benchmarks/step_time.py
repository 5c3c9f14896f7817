"""Time per training step: GRPO, BPGO and ViPO against each other, or the trainer against a reference loop.

    python benchmarks/step_time.py [--model sd3|flux|wan|wan-i2v] [--methods GRPO BPGO ViPO] [--steps 12] [--repeats 3]
    python benchmarks/step_time.py --reference [--rounds 5] [--steps 4]
    python benchmarks/step_time.py --reference --device cuda --dtype bfloat16

**Methods** (the first form): each method trains the same configuration from the same start on a tiny model, in
CPU seconds of this process (one thread); each repeat is a round that runs every method once, in an order that
rotates between rounds, and the ratio to GRPO is taken within the round. The first two steps of each run are
warm-up and not timed. Prints the median seconds per step and the median ratio with its range over the rounds.
``--profile`` instead runs each method once under ``torch.profiler`` and prints the CPU time of each trainer hook
per step and, for a hook that costs more than GRPO's, the ops that take its time (:class:`Profiled`).

**Reference** (``--reference``): ``DiffusionGRPOTrainer`` against :class:`ReferenceLoop`, a loop written here in
the shape of Flow-GRPO's released training script (each sample's prompt encoded, sampling with CFG on ``2B``
inputs, per trained timestep one ``2B`` forward with the gradient through the conditional half only, the
clipped loss, one optimizer step per iteration), on the same model with the same settings: SD3 with 2 prompts
× 4 generations (B = 8), 8 sampling steps of which 7 are trained, CFG 4.5 (and 1, no CFG), LoRA r 8. Then BPGO
and ViPO on the same settings. Every round runs each contender once, in a rotated order, and a ratio is taken
within the round; the median ratio over rounds is printed, so a shared machine's load cancels out.

- CPU (default): the tiny random-weight SD3 with a 4-layer transformer, 64×64 images, one thread.
  On the CPU the times are CPU seconds of this process (one thread), which other jobs on a shared machine do
  not inflate as they do wall time.
- ``--device cuda --dtype bfloat16``: SD3.5-Medium's real architecture (transformer, CLIP-L, CLIP-G, T5-XXL and
  VAE built from their published configs, random weights) at 512×512 with G = 8 (one prompt, B = 8), bf16
  autocast with float32 LoRA, wall seconds; adds the peak GPU memory and the model FLOP utilisation (MFU:
  the denoiser FLOPs a step needs, counted with ``torch.utils.flop_counter`` on one forward, over the
  step's time and ``--peak-tflops``). One round of 2 timed steps per contender is sized to finish in under
  5 minutes on one H100-class GPU (not yet run on one). ``--num-layers``, ``--text-layers``,
  ``--width-divisor`` and ``--max-sequence-length`` shrink that architecture, so that the same path runs on a CPU.
- ``--backbone dinov2-large`` gives ViPO DINOv2-L's architecture (random weights) with its widths divided by the
  same ``--width-divisor`` and ``--backbone-layers`` blocks, so that backbone and denoiser keep the real size
  ratio; ``--methods-only`` times GRPO, BPGO and ViPO only (no reference loop), ``--profile`` adds each hook's
  CPU time per step. ViPO's overhead at the real size ratio, on a CPU::

      python benchmarks/step_time.py --reference --methods-only --methods GRPO ViPO --arch sd35-medium \
          --width-divisor 8 --num-layers 3 --text-layers 1 --resolution 128 --backbone dinov2-large \
          --backbone-layers 3 --rounds 3 --steps 2 --profile
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from architectures import (
    CLIP_G,
    CLIP_L,
    SD3_FLUX_VAE,
    SD35_MEDIUM_TRANSFORMER,
    T5_XXL,
    Shrink,
    clip_text,
    dinov2_model,
    image_vae,
    sd3_transformer,
    t5_encoder,
)
from datasets import Dataset
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
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
from trl_visual.core.advantages import group_advantages
from trl_visual.core.policy_loss import clipped_policy_loss
from trl_visual.core.sde import sde_step_with_logprob
from trl_visual.rewards import resolve_reward
from trl_visual.testing import tiny_dinov2, tiny_sd3_pipeline

PROMPTS = ["a cat", "a dog", "a red car", "a tree"]
#: FLUX.1-dev trains with its distilled guidance 3.5; the others without CFG
GUIDANCE = {"sd3": 1.0, "flux": 3.5, "wan": 1.0, "wan-i2v": 1.0}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class StepTimer(TrainerCallback):
    """Seconds per optimizer step on ``clock`` (waiting for the GPU at both ends)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self._start = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.times.append(self.clock() - self._start)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------------
# The methods on the tiny models
# ------------------------------------------------------------------------------------------------------
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


def make_trainer(method: str, model, config: dict, peft_config: LoraConfig, dataset: Dataset, backbone=None):
    """``method``'s trainer on ``model`` with the config values ``config``; ViPO's ``backbone`` is the tiny DINOv2
    unless given."""
    common = dict(model=model, reward_funcs="red_channel", train_dataset=dataset, peft_config=peft_config)
    if method == "GRPO":
        return DiffusionGRPOTrainer(args=DiffusionGRPOConfig(**config), **common)
    if method == "BPGO":
        return BPGOTrainer(args=BPGOConfig(**config), **common)
    return ViPOTrainer(args=ViPOConfig(**config), backbone=backbone or tiny_dinov2(), **common)


def run(method: str, steps: int, model: str, profiler: Profiled | None = None) -> float:
    """Median CPU seconds (of this process, one thread) of ``method``'s steps after two warm-up steps;
    ``profiler`` records those steps with ``torch.profiler``."""
    config = settings(tempfile.mkdtemp(), steps, model)
    peft_config = LoraConfig(r=8, lora_alpha=8, target_modules=LORA_TARGETS + ["proj_out"])
    trainer = make_trainer(method, f"tiny:{model}", config, peft_config, prompts(model))
    timer = StepTimer(time.process_time)
    trainer.add_callback(timer)
    if profiler is not None:
        profiler.attach(trainer, start_step=2)
    trainer.train()
    return statistics.median(timer.times[2:])


def compare_methods(args: argparse.Namespace) -> None:
    """Every repeat (a round) runs each method once, in a rotated order; the ratio to the first method is taken
    within the round, and its median and range over the rounds are printed."""
    methods = args.methods
    times: dict[str, list[float]] = {m: [] for m in methods}
    for repeat in range(args.repeats):
        shift = repeat % len(methods)
        for method in methods[shift:] + methods[:shift]:
            times[method].append(run(method, args.steps, args.model))
    first = methods[0]
    print(
        f"tiny:{args.model}, batch 32, 8 generations per prompt, 4 sampling steps, {torch.get_num_threads()} CPU "
        f"thread(s), CPU seconds; {args.repeats} rounds × {args.steps - 2} timed steps"
    )
    print(f"{'method':8} {'s/step (median)':>16} {'vs ' + first + ' (range over rounds)':>30}   per round")
    for method in methods:
        ratios = [t / f for t, f in zip(times[method], times[first])]
        relative = f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})"
        median = statistics.median(times[method])
        print(f"{method:8} {median:16.3f} {relative:>30}   {[round(t, 3) for t in times[method]]}")


class Profiled:
    """``torch.profiler`` over a trainer's steps from ``start_step`` on, with each hook of the trainer named in
    the trace (``hook:compute_advantages``, …) and its CPU seconds (of this thread: a shared machine's load does
    not inflate them) summed, so that a method's extra time is put on a hook and on the ops inside it."""

    #: the trainer's hooks, then the whole step's parts: ``training_step`` (sampling, scoring and the per-timestep
    #: losses with their backwards, which ``backward`` times alone); the optimizer step is the rest of a step
    HOOKS = ("sample", "compute_rewards", "compute_advantages", "expand_advantages", "policy_loss")
    PARTS = ("training_step", "backward")

    def __init__(self) -> None:
        self.profile: torch.profiler.profile | None = None
        self.cpu_seconds: dict[str, float] = {hook: 0.0 for hook in self.HOOKS + self.PARTS}

    def attach(self, trainer, start_step: int) -> None:
        for hook in self.HOOKS + ("training_step",):
            setattr(trainer, hook, self._named(hook, getattr(trainer, hook)))
        trainer.accelerator.backward = self._named("backward", trainer.accelerator.backward)
        owner = self

        class Start(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == start_step:  # each run: its own timed steps only
                    owner.cpu_seconds = {hook: 0.0 for hook in owner.HOOKS + owner.PARTS}
                    owner.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    owner.profile.__enter__()

            def on_train_end(self, args, state, control, **kwargs):
                owner.profile.__exit__(None, None, None)

        trainer.add_callback(Start())

    def _named(self, name: str, function: Callable) -> Callable:
        def named(*args, **kwargs):
            start = time.thread_time()
            try:
                with torch.profiler.record_function(f"hook:{name}"):
                    return function(*args, **kwargs)
            finally:
                self.cpu_seconds[name] += time.thread_time() - start

        return named

    def inside(self, hook: str) -> dict[str, float]:
        """Share of ``hook``'s time that each op called inside it takes (its self time over the hook's total,
        both on the profiler's clock), times the hook's CPU seconds: the profiler's clock is wall time, which a
        shared machine's load inflates, its shares are not."""
        totals: dict[str, float] = {}
        hook_total = 0.0

        def walk(event) -> None:
            for child in event.cpu_children:
                totals[child.name] = totals.get(child.name, 0.0) + child.self_cpu_time_total
                walk(child)

        for event in self.profile.events():
            if event.name == f"hook:{hook}":
                hook_total += event.cpu_time_total
                walk(event)
        seconds = self.cpu_seconds[hook]
        return {name: seconds * value / max(hook_total, 1e-9) for name, value in totals.items()}


def profile_methods(args: argparse.Namespace, top: int = 8) -> None:
    """Each method profiled over the same steps: the CPU time of each hook per step, then, for every hook that
    costs a method more than the first method, the ops inside it that take the most time."""
    profiles = {}
    step_times = {}
    for method in args.methods:
        profiler = Profiled()
        step_times[method] = run(method, args.steps, args.model, profiler)
        profiles[method] = profiler
    steps, first = args.steps - 2, args.methods[0]
    print(
        f"torch.profiler, tiny:{args.model}, {steps} profiled steps per method; CPU milliseconds per step of one "
        "thread (hooks: time.thread_time; ops inside them: the profiler's clock)"
    )
    print(f"{'':28}" + "".join(f"{m:>10}" for m in args.methods))
    print(f"{'step (median, profiled)':28}" + "".join(f"{1e3 * step_times[m]:10.1f}" for m in args.methods))
    for hook in Profiled.HOOKS + Profiled.PARTS:
        row = "".join(f"{1e3 * profiles[m].cpu_seconds[hook] / steps:10.2f}" for m in args.methods)
        print(f"{'hook:' + hook if hook in Profiled.HOOKS else hook:28}" + row)
    for method in args.methods[1:]:
        for hook in Profiled.HOOKS:
            extra = (profiles[method].cpu_seconds[hook] - profiles[first].cpu_seconds[hook]) / steps
            if extra < 1e-3:  # under a millisecond per step
                continue
            ops = profiles[method].inside(hook)
            print(
                f"\n{method}, hook:{hook}: {1e3 * extra:+.2f} ms/step over {first}; its largest ops (CPU ms/step):"
            )
            for name, value in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
                print(f"  {name[:70]:70} {1e3 * value / steps:8.2f}")


# ------------------------------------------------------------------------------------------------------
# The trainer against a reference loop
# ------------------------------------------------------------------------------------------------------
@dataclass
class Bench:
    """The model and the settings every contender of ``--reference`` runs with."""

    device: str
    dtype: torch.dtype
    arch: str  # "tiny" or "sd35-medium"
    resolution: int
    num_layers: int
    text_layers: int | None = None
    prompts_per_step: int = 2
    num_generations: int = 4
    num_inference_steps: int = 8
    trained_steps: int = 7
    lora_rank: int = 8
    learning_rate: float = 1e-4
    noise_level: float = 0.7
    max_sequence_length: int = 16
    gradient_checkpointing: bool = False
    #: SD3.5-M's widths (and the backbone's) divided by this (:class:`architectures.Shrink`)
    width_divisor: int = 1
    #: ViPO's backbone: "tiny" (:func:`tiny_dinov2`) or "dinov2-large" (its architecture, shrunk as SD3.5-M is)
    backbone: str = "tiny"
    backbone_layers: int | None = None

    @property
    def batch(self) -> int:
        return self.prompts_per_step * self.num_generations

    def shrink(self) -> Shrink:
        return Shrink(self.width_divisor, self.num_layers, self.text_layers)

    def vision_backbone(self) -> torch.nn.Module:
        """ViPO's backbone: the tiny DINOv2, or DINOv2-L's architecture with its widths divided as the
        denoiser's and ``backbone_layers`` blocks (random weights)."""
        if self.backbone == "tiny":
            return tiny_dinov2()
        return dinov2_model(Shrink(self.width_divisor, self.backbone_layers))

    @property
    def backbone_image_size(self) -> int:
        """The tiny DINOv2 at min(224, resolution); DINOv2-L at 224 pixels for 512² samples (16 × 16 patches of
        14), scaled with the resolution (a 128² sample: 56 pixels, 4 × 4 patches)."""
        if self.backbone == "tiny":
            return min(224, self.resolution)
        return 14 * max(2, round(16 * self.resolution / 512))

    def clock(self) -> float:
        """CPU seconds of this process on the CPU (one thread: what the other tenants of a shared machine
        take does not count), wall seconds on a GPU."""
        return time.process_time() if self.device == "cpu" else time.perf_counter()

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast over float32 LoRA, as the trainer's ``bf16=True``; nothing in float32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.dtype)

    def lora(self) -> LoraConfig:
        return LoraConfig(r=self.lora_rank, lora_alpha=self.lora_rank, target_modules=LORA_TARGETS)


class PipelineFactory:
    """Fresh pipelines of one architecture: the frozen parts (text encoders, VAE) are built once and shared, the
    transformer is rebuilt from the same seed for every contender (each adds its own LoRA to it)."""

    def __init__(self, bench: Bench):
        self.bench = bench
        with torch.device(bench.device):
            base = tiny_sd3_pipeline() if bench.arch == "tiny" else sd35_medium_pipeline(bench.shrink())
        self.components = {name: module for name, module in base.components.items() if name != "transformer"}
        for module in self.components.values():
            if isinstance(module, torch.nn.Module):
                to_bench(module, bench).eval()
        self.transformer_config = {**base.transformer.config, "num_layers": bench.num_layers}

    def __call__(self) -> StableDiffusion3Pipeline:
        torch.manual_seed(0)
        with torch.device(self.bench.device):
            transformer = SD3Transformer2DModel.from_config(self.transformer_config)
        to_bench(transformer, self.bench).eval()
        return StableDiffusion3Pipeline(transformer=transformer, **self.components)


def to_bench(module: torch.nn.Module, bench: Bench) -> torch.nn.Module:
    """``module`` on the bench's device and, unless float32 (diffusers warns at every float32 cast), dtype."""
    return module.to(bench.device) if bench.dtype == torch.float32 else module.to(bench.device, bench.dtype)


def sd35_medium_pipeline(shrink: Shrink | None = None) -> StableDiffusion3Pipeline:
    """SD3.5-Medium's architecture from its published configs (:mod:`architectures`), random weights, on the
    default device. The tokenizers are the tiny in-memory ones (their ids fit every vocabulary). ``shrink``
    divides the widths and cuts the transformer's and text encoders' blocks (a CPU check of this path)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)  # the tiny tokenizers' special tokens
    tokenizers, shrink = tiny_sd3_pipeline(), shrink or Shrink()
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**sd3_transformer(SD35_MEDIUM_TRANSFORMER, shrink)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(**image_vae(SD3_FLUX_VAE, shrink), shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip_text(CLIP_L, shrink), **ids)),
        tokenizer=tokenizers.tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip_text(CLIP_G, shrink), **ids)),
        tokenizer_2=tokenizers.tokenizer_2,
        text_encoder_3=T5EncoderModel(T5Config(**t5_encoder(T5_XXL, shrink))),
        tokenizer_3=tokenizers.tokenizer_3,
    )


class ReferenceLoop:
    """One GRPO iteration in the shape of Flow-GRPO's released training script, on a diffusers SD3 pipeline.

    Per iteration: every sample's prompt is encoded (B rows, repeats included; the negative prompt once per
    run); B trajectories are sampled with the Flow-GRPO SDE, CFG running both branches on 2B inputs; the decoded
    images get the ``red_channel`` reward and group-normalised advantages; then per trained timestep one forward
    on 2B inputs with the unconditional half detached, ``v = v_u + w (v_c − v_u)``, the clipped objective and a
    backward; finally one clipped-gradient AdamW step.
    """

    def __init__(self, pipeline: StableDiffusion3Pipeline, bench: Bench, guidance_scale: float):
        self.pipeline, self.bench, self.guidance_scale = pipeline, bench, guidance_scale
        self.transformer = pipeline.transformer
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(bench.lora())
        if bench.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.parameters = [p for p in self.transformer.parameters() if p.requires_grad]
        for parameter in self.parameters:
            parameter.data = parameter.data.float()
        self.optimizer = torch.optim.AdamW(self.parameters, lr=bench.learning_rate, weight_decay=0.0)
        self.reward = resolve_reward("red_channel")
        self.negative = self.encode([""])
        pipeline.scheduler.set_timesteps(bench.num_inference_steps, device=bench.device)
        self.sigmas = pipeline.scheduler.sigmas.float()
        self.sigma_max = float(self.sigmas[1])
        factor = pipeline.vae_scale_factor
        channels = self.transformer.config.in_channels
        self.latent_shape = (channels, bench.resolution // factor, bench.resolution // factor)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=torch.device(self.bench.device),
            do_classifier_free_guidance=False,
            max_sequence_length=self.bench.max_sequence_length,
        )
        return embeds, pooled

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor]):
        """The guided velocity; under CFG one forward on 2B inputs, the unconditional half detached."""
        embeds, pooled = text
        cfg = self.guidance_scale > 1
        if cfg:
            batch = len(latents)
            negative_embeds, negative_pooled = (t.expand(batch, *t.shape[1:]) for t in self.negative)
            latents, sigma = torch.cat([latents, latents]), torch.cat([sigma, sigma])
            embeds, pooled = torch.cat([negative_embeds, embeds]), torch.cat([negative_pooled, pooled])
        with self.bench.autocast():
            prediction = self.transformer(
                hidden_states=latents.to(self.bench.dtype),
                timestep=sigma * 1000,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0].float()
        if not cfg:
            return prediction
        uncond, cond = prediction.chunk(2)
        uncond = uncond.detach()
        return uncond + self.guidance_scale * (cond - uncond)

    def transition(self, latents, velocity, k: int, prev_sample=None):
        batch = len(latents)
        return sde_step_with_logprob(
            "flow_grpo",
            latents,
            velocity,
            self.sigmas[k].expand(batch),
            self.sigmas[k + 1].expand(batch),
            self.bench.noise_level,
            sigma_max=self.sigma_max,
            prev_sample=prev_sample,
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(latents, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    def step(self, prompts: list[str], seed: int) -> None:
        """One iteration on ``prompts`` (each prompt repeated ``num_generations`` times, consecutively)."""
        samples = [p for p in prompts for _ in range(self.bench.num_generations)]
        text = self.encode(samples)
        generator = torch.Generator(self.bench.device).manual_seed(seed)
        latents = torch.randn(
            (len(samples), *self.latent_shape), generator=generator, device=self.bench.device
        )
        states, log_probs = [latents], []
        with torch.no_grad():
            for k in range(self.bench.num_inference_steps):
                step = self.transition(
                    latents, self.velocity(latents, self.sigmas[k].expand(len(latents)), text), k
                )
                latents = step.prev_sample
                states.append(latents)
                log_probs.append(step.log_prob)
            images = self.decode(latents)
        rewards = torch.tensor(self.reward(samples, images), device=self.bench.device)
        advantages = group_advantages(rewards, self.bench.num_generations)
        trained = self.bench.trained_steps
        for k in range(trained):
            sigma = self.sigmas[k].expand(len(samples))
            step = self.transition(
                states[k], self.velocity(states[k], sigma, text), k, prev_sample=states[k + 1]
            )
            log_ratio = (step.log_prob - log_probs[k]).flatten(1).mean(dim=1)
            loss = clipped_policy_loss(log_ratio, advantages, 1e-4)[0].mean()
            (loss / trained).backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()


@dataclass
class Measured:
    """One contender's run: seconds of each timed step, peak device memory and the denoiser FLOPs per step."""

    times: list[float]
    peak_memory: float | None
    flops_per_step: float

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def forward_flops(pipeline: StableDiffusion3Pipeline, bench: Bench) -> float:
    """FLOPs of one denoiser forward on one sample at the bench's resolution, counted by
    ``torch.utils.flop_counter`` (matrix products and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    factor, transformer = pipeline.vae_scale_factor, pipeline.transformer
    size = bench.resolution // factor
    latents = torch.zeros(
        1, transformer.config.in_channels, size, size, device=bench.device, dtype=bench.dtype
    )
    text_length = 77 + min(bench.max_sequence_length, pipeline.tokenizer_3.model_max_length)
    embeds = torch.zeros(1, text_length, transformer.config.joint_attention_dim, device=bench.device)
    pooled = torch.zeros(1, transformer.config.pooled_projection_dim, device=bench.device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, bench.autocast():
        transformer(
            hidden_states=latents,
            timestep=torch.ones(1, device=bench.device),
            encoder_hidden_states=embeds.to(bench.dtype),
            pooled_projections=pooled.to(bench.dtype),
            return_dict=False,
        )
    return float(counter.get_total_flops())


def step_flops(forward: float, bench: Bench, cfg: bool, trained_passes: int) -> float:
    """Denoiser FLOPs of one iteration: sampling ``T`` steps on ``B`` (× 2 with CFG) samples, and per trained
    step a forward and a backward (≈ 2 forwards) on ``trained_passes × B`` samples."""
    sampling = bench.num_inference_steps * bench.batch * (2 if cfg else 1)
    training = bench.trained_steps * bench.batch * trained_passes * 3
    return forward * (sampling + training)


def measured(run: Callable[[], list[float]], bench: Bench, flops: float) -> Measured:
    """Run ``run`` (which returns its step times), recording the peak device memory."""
    cuda = torch.device(bench.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = run()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return Measured(times, peak, flops)


def time_trainer(
    method: str,
    factory: Callable[[], object],
    bench: Bench,
    guidance: float,
    steps: int,
    profiler: Profiled | None = None,
    **extra,
) -> list[float]:
    """Seconds of each of ``steps`` trainer steps after one warm-up step on a pipeline from ``factory``; ``extra``
    are more config values (or replace the bench's); ``profiler`` times the hooks of the timed steps."""
    config = dict(
        output_dir=tempfile.mkdtemp(),
        num_generations=bench.num_generations,
        per_device_train_batch_size=bench.batch,
        max_steps=steps + 1,
        height=bench.resolution,
        width=bench.resolution,
        num_inference_steps=bench.num_inference_steps,
        timestep_fraction=bench.trained_steps / bench.num_inference_steps,
        guidance_scale=guidance,
        learning_rate=bench.learning_rate,
        max_sequence_length=bench.max_sequence_length,
        bf16=bench.dtype == torch.bfloat16,
        use_cpu=bench.device == "cpu",
        gradient_checkpointing=bench.gradient_checkpointing,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    config.update(extra)
    backbone = None
    if method == "ViPO":  # DINOv2's usual 224 pixels, not 512²'s 16,384 patches of 4 (the tiny one's)
        config["backbone_image_size"] = bench.backbone_image_size
        backbone = bench.vision_backbone()
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    trainer = make_trainer(method, factory(), config, bench.lora(), dataset, backbone)
    timer = StepTimer(bench.clock)
    trainer.add_callback(timer)
    if profiler is not None:
        profiler.attach(trainer, start_step=1)
    trainer.train()
    return timer.times[1:]


def time_reference(factory: PipelineFactory, bench: Bench, guidance: float, steps: int) -> list[float]:
    """Seconds of each of ``steps`` reference iterations after one warm-up iteration."""
    loop = ReferenceLoop(factory(), bench, guidance)
    times = []
    for i in range(steps + 1):
        batch = [
            PROMPTS[(bench.prompts_per_step * i + j) % len(PROMPTS)] for j in range(bench.prompts_per_step)
        ]
        synchronize()
        start = bench.clock()
        loop.step(batch, seed=i)
        synchronize()
        times.append(bench.clock() - start)
    return times[1:]


def compare_with_reference(args: argparse.Namespace) -> None:
    bench = bench_from_args(args)
    factory = PipelineFactory(bench)
    forward = forward_flops(factory(), bench)
    contenders: dict[str, tuple[Callable[[], list[float]], float]] = {}
    profilers = {m: Profiled() for m in args.methods} if args.profile else {}
    if args.methods_only:  # GRPO, BPGO and ViPO under CFG 4.5 only
        contenders["GRPO, CFG 4.5"] = (
            lambda: time_trainer("GRPO", factory, bench, 4.5, args.steps, profilers.get("GRPO")),
            step_flops(forward, bench, True, 1),
        )
    for guidance in () if args.methods_only else (4.5, 1.0):
        cfg = guidance > 1
        trainer_passes = 1  # the conditional branch only (v_u is reused from sampling), or no CFG
        reference_passes = 2 if cfg else 1  # 2B, the unconditional half detached
        contenders[f"GRPO, CFG {guidance}"] = (
            lambda g=guidance: time_trainer("GRPO", factory, bench, g, args.steps),
            step_flops(forward, bench, cfg, trainer_passes),
        )
        contenders[f"reference, CFG {guidance}"] = (
            lambda g=guidance: time_reference(factory, bench, g, args.steps),
            step_flops(forward, bench, cfg, reference_passes),
        )
    if not args.methods_only:  # the trainer before issue 15: 2B with both gradients
        contenders["GRPO cfg_uncond_grad, CFG 4.5"] = (
            lambda: time_trainer("GRPO", factory, bench, 4.5, args.steps, cfg_uncond_grad=True),
            step_flops(forward, bench, True, 2),
        )
    for method in args.methods:
        if method != "GRPO":
            contenders[f"{method}, CFG 4.5"] = (
                lambda m=method: time_trainer(m, factory, bench, 4.5, args.steps, profilers.get(m)),
                step_flops(forward, bench, True, 1),
            )
    names = list(contenders)
    rounds: list[dict[str, Measured]] = []
    for index in range(args.rounds):
        shift = index % len(names)
        result = {}
        for name in names[shift:] + names[:shift]:
            run, flops = contenders[name]
            result[name] = measured(run, bench, flops)
        rounds.append(result)
    report(bench, args, rounds, names)
    if profilers:
        print("CPU ms per step in each hook (the last round's timed steps):")
        print(f"{'':28}" + "".join(f"{m:>10}" for m in profilers))
        for hook in Profiled.HOOKS:
            row = "".join(f"{1e3 * p.cpu_seconds[hook] / args.steps:10.2f}" for p in profilers.values())
            print(f"{'hook:' + hook:28}" + row)


def ratio(rounds: list[dict[str, Measured]], name: str, over: str) -> str:
    """Median over rounds of ``name``'s median step time over ``over``'s within each round, and their range."""
    ratios = [r[name].median / r[over].median for r in rounds]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) × {over}"


def report(
    bench: Bench, args: argparse.Namespace, rounds: list[dict[str, Measured]], names: list[str]
) -> None:
    threads = f", {torch.get_num_threads()} CPU thread(s), CPU seconds" if bench.device == "cpu" else ""
    print(
        f"{bench.arch} SD3 ({bench.num_layers} transformer layers), {bench.resolution}², {bench.device} "
        f"{str(bench.dtype).removeprefix('torch.')}{threads}; B = {bench.prompts_per_step} prompts × "
        f"{bench.num_generations}, {bench.num_inference_steps} steps, {bench.trained_steps} trained, LoRA r "
        f"{bench.lora_rank}; {args.rounds} rounds × {args.steps} timed steps"
    )
    cuda = torch.device(bench.device).type == "cuda"
    header = f"{'contender':30} {'s/step':>8} {'ratio (range over rounds)':>36}"
    print(header + (f" {'peak GiB':>9} {'TFLOP/step':>11} {'MFU':>6}" if cuda else f" {'TFLOP/step':>11}"))
    for name in names:
        seconds = statistics.median(r[name].median for r in rounds)
        cfg = name.split("CFG ")[-1]
        over = f"reference, CFG {cfg}" if name.startswith("GRPO") else f"GRPO, CFG {cfg}"
        relative = "" if over not in rounds[0] or name.startswith("reference") else ratio(rounds, name, over)
        flops = rounds[0][name].flops_per_step
        line = f"{name:30} {seconds:8.3f} {relative:>36}"
        if cuda:
            peak = max(r[name].peak_memory for r in rounds)
            mfu = flops / seconds / (args.peak_tflops * 1e12)
            line += f" {peak:9.1f} {flops / 1e12:11.1f} {mfu:6.1%}"
        else:
            line += f" {flops / 1e12:11.4f}"
        print(line)
    if bench.device == "cpu":
        print(
            f"max resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
        )


def bench_from_args(args: argparse.Namespace) -> Bench:
    dtype = getattr(torch, args.dtype)
    arch = args.arch or ("sd35-medium" if args.device == "cuda" else "tiny")
    resolution = args.resolution or (512 if arch == "sd35-medium" else 64)
    num_layers = args.num_layers or (24 if arch == "sd35-medium" else 4)
    return Bench(
        device=args.device,
        dtype=dtype,
        arch=arch,
        resolution=resolution,
        num_layers=num_layers,
        text_layers=args.text_layers,
        gradient_checkpointing=args.gradient_checkpointing,
        max_sequence_length=args.max_sequence_length or (256 if arch == "sd35-medium" else 16),
        # SD3.5-M: one prompt × G = 8 (the papers' group size); tiny: 2 prompts × 4
        prompts_per_step=1 if arch == "sd35-medium" else 2,
        num_generations=8 if arch == "sd35-medium" else 4,
        width_divisor=args.width_divisor,
        backbone=args.backbone,
        backbone_layers=args.backbone_layers,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd3", choices=sorted(GUIDANCE))
    parser.add_argument(
        "--methods", nargs="+", default=["GRPO", "BPGO", "ViPO"], choices=["GRPO", "BPGO", "ViPO"]
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per run (12; 4 with --reference)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--profile", action="store_true", help="methods form: torch.profiler of each method, by hook and op"
    )
    parser.add_argument("--reference", action="store_true", help="the trainer against the reference loop")
    parser.add_argument("--rounds", type=int, default=None, help="--reference rounds (5 on CPU, 1 on CUDA)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--arch", default=None, choices=["tiny", "sd35-medium"])
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument(
        "--num-layers", type=int, default=None, help="transformer layers (24 for SD3.5-M, 4 tiny)"
    )
    parser.add_argument(
        "--max-sequence-length", type=int, default=None, help="T5 tokens (256 SD3.5-M, 16 tiny)"
    )
    parser.add_argument("--text-layers", type=int, default=None, help="shrink SD3.5-M's text encoders")
    parser.add_argument(
        "--width-divisor", type=int, default=1, help="divide SD3.5-M's widths (and DINOv2-L's) by this"
    )
    parser.add_argument(
        "--backbone", default="tiny", choices=["tiny", "dinov2-large"], help="ViPO's backbone"
    )
    parser.add_argument("--backbone-layers", type=int, default=None, help="DINOv2-L blocks (24)")
    parser.add_argument(
        "--methods-only",
        action="store_true",
        help="--reference: GRPO, BPGO and ViPO only (no reference loop)",
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="in the trainer and the reference alike"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200)"
    )
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    if not args.reference:
        args.steps = args.steps or 12
        (profile_methods if args.profile else compare_methods)(args)
        return
    args.steps = args.steps or (4 if args.device == "cpu" else 2)
    args.rounds = args.rounds or (5 if args.device == "cpu" else 1)
    compare_with_reference(args)


if __name__ == "__main__":
    main()
