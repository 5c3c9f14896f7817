"""The rollout engine: sampling trajectories with the log-probability of every stochastic transition.

A function over an adapter (:class:`~trl_visual.models.DiffusionAdapter`) and a denoiser, testable without a
``Trainer``. One rollout of a batch of prompts:

1. encode each distinct prompt once (:class:`PromptEncoder`) and, under CFG, the negative prompt once per run;
2. draw the initial noise for the whole global batch from one seed (:func:`initial_noise`), so that a group
   split over processes gets consistent noise, shared within the group when asked;
3. integrate ``σ_0 = 1 → σ_T = 0``: Euler (ODE) steps outside the SDE window, and inside it the stochastic
   steps of :func:`trl_visual.core.sde.sde_step_with_logprob`, keeping ``x_k``, ``x_{k+1}`` and
   ``log p(x_{k+1} | x_k)``. Steps before the window are computed once per group and then branched;
4. decode the final latents.

Training picks the transitions it trains (:func:`select_train_steps`) and re-scores each stored
:class:`Transition` with :func:`rescore_transition`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.branching import branch_points, branch_positions
from ..core.sde import SDEStep, euler_step, sde_step_with_logprob
from ..core.timesteps import select_train_timesteps, stochastic_step_indices
from ..models import DiffusionAdapter, PromptEmbeds, guided, select_embeds
from ..models.base import unconditional_embeds
from .diffusion_grpo_config import DiffusionGRPOConfig
from .hooks import Advantages
from .memory import PromptEmbedsCache, decode_in_batches
from .seeds import sde_noise_seed, timestep_selection_seed
from .window_schedule import sde_window_start


@dataclass
class Rollouts:
    """A batch of sampled trajectories: what training needs, on this process only.

    ``latents[:, k]`` is the state before the k-th stochastic step and ``next_latents[:, k]`` after it;
    ``log_probs[:, k]`` holds the per-element log-probs stored at sampling time. Scoring fills ``rewards``
    ``(B,)`` and ``advantages`` (this process's :class:`~trl_visual.trainer.hooks.Advantages`, shaped).
    ``uncond_velocities[:, k]`` is CFG's unconditional velocity ``v_u`` at ``latents[:, k]`` (float32), kept
    when training reuses it (:func:`keeps_uncond_velocities`), else None. ``means[:, k]`` is the mean ``μ_old`` of
    the k-th transition's Gaussian, kept for GRPO-Guard's ``ratio_norm`` (else None). With ``trajectory_branching``,
    ``branch_positions`` ``(B,)`` is the one stochastic step of each sample (a position among the round's branch
    points, the only step it trains); at the others its stored transition is the ODE step.
    """

    prompts: list[str]
    embeds: PromptEmbeds
    negative_embeds: PromptEmbeds | None
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    sigmas_next: torch.Tensor
    sigma_max: float
    samples: torch.Tensor
    uncond_velocities: torch.Tensor | None = None
    means: torch.Tensor | None = None
    branch_positions: torch.Tensor | None = None
    train_steps: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: Advantages | None = None


@dataclass(frozen=True)
class Transition:
    """One stored stochastic step of every sample: ``x_k → x_{k+1}`` at ``σ_k → σ_{k+1}``, with the log-prob
    ``log p_old(x_{k+1} | x_k)`` (per element) it had when it was sampled, and CFG's unconditional velocity
    ``v_u`` the sampling weights predicted at ``x_k`` (None when not stored: :func:`policy_velocity` then
    recomputes it), and the Gaussian's mean ``μ_old`` when kept (``ratio_norm``)."""

    latents: torch.Tensor
    next_latents: torch.Tensor
    old_log_prob: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    uncond_velocity: torch.Tensor | None = None
    old_mean: torch.Tensor | None = None


@dataclass(frozen=True)
class BatchPlacement:
    """Where this process's samples sit in the global batch: rows ``offset : offset + per_device_batch_size``."""

    process_index: int
    num_processes: int
    per_device_batch_size: int

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.num_processes

    @property
    def offset(self) -> int:
        return self.process_index * self.per_device_batch_size

    @property
    def local(self) -> slice:
        """This process's rows of a tensor over the global batch."""
        return slice(self.offset, self.offset + self.per_device_batch_size)


def unique_in_order(values: list[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct values in first-seen order, and for each input the index of its value."""
    positions: dict[str, int] = {}
    inverse = [positions.setdefault(v, len(positions)) for v in values]
    return list(positions), torch.tensor(inverse, dtype=torch.long)


class PromptEncoder:
    """Prompt embeddings for a batch, on the denoiser's device, encoding each distinct prompt once; the
    negative prompt is encoded once per run (the text encoders are frozen).

    With ``cache_size > 0`` the embeddings of the last ``cache_size`` prompts are kept in CPU memory
    (:class:`~trl_visual.trainer.memory.PromptEmbedsCache`), so a prompt is encoded once per run.
    """

    def __init__(
        self, adapter: DiffusionAdapter, max_sequence_length: int, negative_prompt: str, cache_size: int = 0
    ):
        self.adapter = adapter
        self.max_sequence_length = max_sequence_length
        self.negative_prompt = negative_prompt
        self.cache = PromptEmbedsCache(cache_size) if cache_size else None
        self._negative: PromptEmbeds | None = None

    @classmethod
    def for_config(cls, adapter: DiffusionAdapter, args: DiffusionGRPOConfig) -> PromptEncoder:
        """The encoder a run's ``args`` ask for: their text length and negative prompt, and a cache of
        ``prompt_embeds_cache_size`` prompts with ``cache_prompt_embeds``."""
        cache_size = args.prompt_embeds_cache_size if args.cache_prompt_embeds else 0
        return cls(adapter, args.max_sequence_length, args.negative_prompt, cache_size=cache_size)

    def __call__(self, prompts: list[str]) -> PromptEmbeds:
        unique, inverse = unique_in_order(prompts)
        return select_embeds(self._encode(unique, self.cache), inverse)

    def negative(self, batch_size: int) -> PromptEmbeds:
        """The negative prompt's embedding, repeated ``batch_size`` times."""
        if self._negative is None:
            self._negative = self._encode([self.negative_prompt])
        return select_embeds(self._negative, torch.zeros(batch_size, dtype=torch.long))

    def _encode(self, prompts: list[str], cache: PromptEmbedsCache | None = None) -> PromptEmbeds:
        """``prompts``' embeddings (through ``cache`` when given), moved to the denoiser's device."""

        def encode(batch: list[str]) -> PromptEmbeds:
            return self.adapter.encode_prompts(batch, self.max_sequence_length)

        embeds = encode(prompts) if cache is None else cache.embeds(prompts, encode)
        return {key: value.to(self.adapter.device) for key, value in embeds.items()}


@dataclass(frozen=True)
class SamplingContext:
    """What every rollout of a run shares: the settings, the prompt encoder, where this process's samples sit
    in the global batch, the ``T + 1`` values of ``σ`` sampled on, the latent shape of one sample, the device,
    the context the denoiser runs in (the trainer's autocast), and the optimizer step (which places the window of
    ``sde_window_schedule='progressive'``)."""

    args: DiffusionGRPOConfig
    encoder: PromptEncoder
    placement: BatchPlacement
    sigmas: torch.Tensor
    latent_shape: tuple[int, ...]
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    step: int = 0


def uses_cfg(args: DiffusionGRPOConfig, training: bool) -> bool:
    """Whether sampling runs classifier-free guidance: ``guidance_scale > 1``, and in training only with
    ``cfg_in_training``."""
    return args.guidance_scale > 1 and (args.cfg_in_training or not training)


def keeps_uncond_velocities(args: DiffusionGRPOConfig, training: bool) -> bool:
    """Whether sampling stores CFG's unconditional velocity of every stochastic transition for training to
    reuse: with ``num_iterations == 1`` training runs on the sampling weights, so the detached ``v_u``
    (``cfg_uncond_grad=False``) is exactly what sampling computed, and training needs the conditional branch
    only."""
    return training and uses_cfg(args, training) and not args.cfg_uncond_grad and args.num_iterations == 1


def initial_noise(
    adapter: DiffusionAdapter,
    latent_shape: tuple[int, ...],
    group_ids: torch.Tensor,
    seed: int,
    *,
    placement: BatchPlacement,
    num_generations: int,
    shared: bool,
    device: torch.device,
    training: bool = True,
    start: int = 0,
) -> torch.Tensor:
    """Initial latents for this process's samples, drawn for the whole global batch from one seed so that a
    group split across processes still gets consistent (and, if ``shared``, equal) noise; ``group_ids`` are
    the samples' global group indices. Outside training (evaluation, model cards) each sample simply gets its
    own noise. ``start`` is the index of the first of these samples among this process's, so that a chunk of
    a batch sampled in chunks gets the rows the whole batch would give it."""
    generator = torch.Generator(device=device).manual_seed(seed)
    if not training:
        return adapter.prepare_noise(start + len(group_ids), latent_shape, generator)[start:]
    global_batch = placement.global_batch_size
    rows = global_batch // num_generations if shared else global_batch
    noise = adapter.prepare_noise(rows, latent_shape, generator)
    if shared:
        return noise[group_ids.to(noise.device)]
    first = placement.offset + start
    return noise[first : first + len(group_ids)]


def _stochastic_steps(args: DiffusionGRPOConfig, seed: int, stochastic: bool, step: int = 0) -> list[int]:
    """The sampling steps that are stochastic this round: the SDE window, placed from ``seed`` or, with the
    progressive schedule, from the optimizer ``step`` (:func:`~trl_visual.trainer.window_schedule.sde_window_start`),
    or the branch points of ``trajectory_branching`` (drawn from ``seed``; each sample takes the SDE step at one)."""
    if not stochastic:
        return []
    num_steps = args.num_inference_steps
    if args.trajectory_branching != "none":
        mode, generator = args.trajectory_branching, torch.Generator().manual_seed(seed)
        return branch_points(mode, num_steps, args.num_branch_points, generator)
    window_start = sde_window_start(args, seed, step) if args.sde_window_size > 0 else 0
    return stochastic_step_indices(num_steps, args.sde_type, args.sde_window_size, window_start)


def _stacked(tensors: list[torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
    """``(B, K, ...)`` from K tensors ``(B, ...)``; ``(B, 0, ...)`` when there are none."""
    return torch.stack(tensors, 1) if tensors else latents.new_zeros((len(latents), 0, *latents.shape[1:]))


class StepNoise:
    """The SDE noise ``ε`` of one rollout on this process, from one generator: at each stochastic step a
    standard normal draw for the whole local batch of ``batch_size`` samples, of which a chunk keeps its
    ``rows``. A batch sampled in chunks thus draws exactly the noise it draws in one piece."""

    def __init__(self, seed: int, device: torch.device, batch_size: int, rows: slice):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.batch_size = batch_size
        self.rows = rows

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """``ε`` for this chunk's ``latents``, float32."""
        shape = (self.batch_size, *latents.shape[1:])
        return torch.randn(shape, generator=self.generator, device=latents.device, dtype=torch.float32)[
            self.rows
        ]


#: fields of :class:`Rollouts` that describe the sampling schedule, not a sample: the same in every chunk
SCHEDULE_FIELDS = ("sigmas", "sigmas_next", "sigma_max")


def _joined(parts: list[Any]) -> Any:
    """Per-sample values of consecutive chunks joined along the batch: tensors concatenated, lists chained,
    dicts key by key; ``None`` stays ``None``."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, list):
        return [value for part in parts for value in part]
    if isinstance(first, dict):
        return {key: _joined([part[key] for part in parts]) for key in first}
    raise TypeError(f"Cannot join rollout values of type {type(first).__name__} along the batch.")


def concat_rollouts(chunks: list[Rollouts]) -> Rollouts:
    """The rollouts of consecutive chunks of a batch as one: every per-sample field joined along the batch,
    the schedule's fields (:data:`SCHEDULE_FIELDS`) taken from the first chunk."""
    if len(chunks) == 1:
        return chunks[0]
    values = {
        spec.name: getattr(chunks[0], spec.name)
        if spec.name in SCHEDULE_FIELDS
        else _joined([getattr(chunk, spec.name) for chunk in chunks])
        for spec in dataclasses.fields(Rollouts)
    }
    return Rollouts(**values)


def generation_chunks(batch_size: int, chunk_size: int | None) -> list[slice]:
    """Consecutive slices of at most ``chunk_size`` samples covering a batch (one slice when ``None``)."""
    size = chunk_size or batch_size
    return [slice(start, min(start + size, batch_size)) for start in range(0, batch_size, size)]


@torch.no_grad()
def sample_rollouts(
    adapter: DiffusionAdapter,
    denoiser: torch.nn.Module,
    prompts: list[str],
    group_ids: torch.Tensor,
    seed: int,
    context: SamplingContext,
    *,
    stochastic: bool = True,
    training: bool = True,
    rows: list[dict[str, Any]] | None = None,
) -> Rollouts:
    """Sample one trajectory per prompt on the ``T + 1`` values of ``context.sigmas``, keeping the stochastic
    transitions and their log-probs.

    ``group_ids`` are the global group index of each sample. Steps before the first stochastic one (the SDE
    window's ODE prefix) are computed once per group and then branched to the group's samples, which share
    their initial noise in that case. ``rows`` are the dataset rows, for conditioning beyond the prompt (see
    :meth:`DiffusionAdapter.encode_conditioning`).

    The prompts are encoded once for the whole batch; the samples are then drawn in chunks of
    ``args.generation_batch_size`` (all at once when it is ``None``), so that sampling and decoding hold one
    chunk's activations, and the chunks' rollouts are concatenated. Every sample gets the initial and SDE noise
    it gets in one chunk (:class:`StepNoise`), so chunking changes results only by float rounding.
    """
    args = context.args
    embeds = {**context.encoder(prompts), **(adapter.encode_conditioning(rows) if rows else {})}
    cfg = uses_cfg(args, training) and adapter.runs_cfg
    negative = context.encoder.negative(len(prompts)) if cfg else None
    chunks = [
        _sample_chunk(
            adapter,
            denoiser,
            context,
            group_ids,
            seed,
            chunk,
            prompts=prompts,
            embeds=embeds,
            negative=negative,
            stochastic=stochastic,
            training=training,
        )
        for chunk in generation_chunks(len(prompts), args.generation_batch_size)
    ]
    return concat_rollouts(chunks)


def _sample_chunk(
    adapter: DiffusionAdapter,
    denoiser: torch.nn.Module,
    context: SamplingContext,
    group_ids: torch.Tensor,
    seed: int,
    chunk: slice,
    *,
    prompts: list[str],
    embeds: PromptEmbeds,
    negative: PromptEmbeds | None,
    stochastic: bool,
    training: bool,
) -> Rollouts:
    """The rollouts of the samples ``chunk`` of a batch (see :func:`sample_rollouts`)."""
    args, placement, device = context.args, context.placement, context.device
    num_steps = args.num_inference_steps
    steps = _stochastic_steps(args, seed, stochastic, context.step)
    sigma_max = float(context.sigmas[1])  # read once, not from the device at every step
    sigmas = context.sigmas.to(device)
    batch_size, prompts, group_ids = len(prompts), prompts[chunk], group_ids[chunk]
    chunk_rows = torch.arange(batch_size)[chunk]
    embeds = select_embeds(embeds, chunk_rows)
    negative = select_embeds(negative, chunk_rows) if negative is not None else None
    keep_uncond = negative is not None and keeps_uncond_velocities(args, training)
    noise = {"placement": placement, "num_generations": args.num_generations, "device": device}

    branching = bool(steps) and args.trajectory_branching != "none"
    if branching:  # the step each sample branches at (TempFlow-GRPO): ODE before and after it
        global_rows = placement.offset + chunk_rows
        positions = branch_positions(global_rows, args.num_generations, len(steps)).to(device)
        branches_at = torch.tensor(steps, device=device)[positions]
    branch = bool(steps) and steps[0] > 0
    if branch:  # one trajectory per group until the window opens
        groups, group_index = torch.unique(group_ids, return_inverse=True)
        first_rows = torch.stack([(group_index == g).nonzero()[0, 0] for g in range(len(groups))])
        latents = initial_noise(adapter, context.latent_shape, groups, seed, shared=True, **noise)
        prefix_embeds = select_embeds(embeds, first_rows)
        prefix_negative = select_embeds(negative, first_rows) if negative is not None else None
    else:
        latents = initial_noise(
            adapter,
            context.latent_shape,
            group_ids,
            seed,
            shared=args.init_same_noise or branching,
            training=training,
            start=chunk.start,
            **noise,
        )
        prefix_embeds, prefix_negative = embeds, negative
    step_noise = StepNoise(sde_noise_seed(seed, placement.process_index), device, batch_size, chunk)

    states, next_states, log_probs, unconds, means = [], [], [], [], []
    with context.autocast():
        for i in range(num_steps):
            if branch and i == steps[0]:
                latents = latents[group_index.to(device)]
                prefix_embeds, prefix_negative = embeds, negative
            sigma, sigma_next = sigmas[i].expand(len(latents)), sigmas[i + 1].expand(len(latents))
            if keep_uncond and i in steps:
                uncond, cond = adapter.cfg_velocities(
                    denoiser, latents, sigma, prefix_embeds, prefix_negative
                )
                velocity = guided(uncond, cond, args.guidance_scale)
                unconds.append(uncond)
            else:
                velocity = adapter.velocity(
                    denoiser, latents, sigma, prefix_embeds, prefix_negative, args.guidance_scale
                )
            if i not in steps:
                latents = euler_step(latents, velocity, sigma, sigma_next)
                continue
            step = sde_step_with_logprob(
                args.sde_type,
                latents,
                velocity,
                sigma,
                sigma_next,
                args.noise_level,
                sigma_max=sigma_max,
                noise=step_noise(latents),
            )
            states.append(latents)
            latents = step.prev_sample
            if branching:
                at_branch = (branches_at == i).reshape(-1, *[1] * (latents.ndim - 1))
                latents = torch.where(at_branch, latents, euler_step(states[-1], velocity, sigma, sigma_next))
            next_states.append(latents)
            log_probs.append(step.log_prob)
            if args.ratio_norm:
                means.append(step.mean)

    index = torch.tensor(steps, dtype=torch.long, device=device)
    return Rollouts(
        prompts=prompts,
        embeds=embeds,
        negative_embeds=negative,
        latents=_stacked(states, latents),
        next_latents=_stacked(next_states, latents),
        log_probs=_stacked(log_probs, latents),
        uncond_velocities=_stacked(unconds, latents) if keep_uncond else None,
        means=_stacked(means, latents) if args.ratio_norm else None,
        branch_positions=positions if branching else None,
        sigmas=sigmas[index],
        sigmas_next=sigmas[index + 1],
        sigma_max=sigma_max,
        samples=decode_in_batches(adapter, latents, args.vae_decode_batch_size),
    )


def trainable_steps(
    adapter: DiffusionAdapter, sigmas: torch.Tensor, sigmas_next: torch.Tensor, exclude_last_step: bool
) -> torch.Tensor:
    """Which stochastic steps ``σ → σ'`` can be trained, ``(K,)`` bool: those where the trained denoiser
    predicts (not a frozen expert), less, with ``exclude_last_step``, the step landing on ``σ' = 0`` (the
    released BPGO code never trains it)."""
    trains = adapter.trains_at(sigmas)
    if exclude_last_step:
        trains &= sigmas_next > 0
    return trains


def select_train_steps(
    adapter: DiffusionAdapter, rollouts: Rollouts, args: DiffusionGRPOConfig, round_seed: int
) -> torch.Tensor:
    """The positions among the rollouts' stochastic steps that each sample trains, ``(B, K)``: ``K =
    max(1, round(timestep_fraction · S))`` of the ``S`` :func:`trainable_steps`, picked as
    ``timestep_selection`` says from a generator seeded by the round's seed. No trainable step is an error
    naming the settings to change. Under ``trajectory_branching`` each sample trains its branch step only."""
    if rollouts.log_probs.shape[1] == 0:
        raise RuntimeError(
            "No stochastic step was sampled: check `sde_window_size` and `num_inference_steps`."
        )
    trains = trainable_steps(adapter, rollouts.sigmas, rollouts.sigmas_next, args.exclude_last_step)
    if rollouts.branch_positions is not None:  # trajectory branching: each sample trains its branch step only
        if not bool(trains.all()):
            raise RuntimeError(
                "`trajectory_branching` put a branch point where the trained denoiser does not predict (a frozen "
                "expert's steps): use trajectory_branching='first' with `num_branch_points` within its steps."
            )
        return rollouts.branch_positions[:, None]
    trainable = trains.nonzero().flatten()
    if len(trainable) == 0:
        raise RuntimeError(
            "No sampled stochastic step can be trained (`exclude_last_step` leaves none in this SDE window): "
            "widen `sde_window_size`, move `sde_window_range` earlier, or set `exclude_last_step=False`."
        )
    selected = select_train_timesteps(
        trainable.tolist(),
        len(rollouts.prompts),
        args.timestep_fraction,
        args.timestep_selection,
        torch.Generator().manual_seed(timestep_selection_seed(round_seed)),
    )
    return trainable[selected.to(trainable.device)]


def transition_at(rollouts: Rollouts, k: int) -> Transition:
    """The k-th trained transition of every sample (``rollouts.train_steps[:, k]``)."""
    rows = torch.arange(len(rollouts.prompts), device=rollouts.latents.device)
    position = rollouts.train_steps[:, k]
    uncond = rollouts.uncond_velocities
    return Transition(
        latents=rollouts.latents[rows, position],
        next_latents=rollouts.next_latents[rows, position],
        old_log_prob=rollouts.log_probs[rows, position],
        sigma=rollouts.sigmas[position],
        sigma_next=rollouts.sigmas_next[position],
        uncond_velocity=uncond[rows, position] if uncond is not None else None,
        old_mean=rollouts.means[rows, position] if rollouts.means is not None else None,
    )


def policy_velocity(
    adapter: DiffusionAdapter,
    denoiser: torch.nn.Module,
    rollouts: Rollouts,
    transition: Transition,
    args: DiffusionGRPOConfig,
) -> torch.Tensor:
    """The guided velocity ``v = v_u + w (v_c − v_u)`` training differentiates, at a stored transition.

    ``cfg_uncond_grad=False`` (the default, as Flow-GRPO's released code): ``v_u`` is detached, so the
    denoiser runs with gradient on the conditional half only (``B`` inputs); ``v_u`` is the one stored at
    sampling when there is one, else recomputed under ``torch.no_grad()`` on ``B`` inputs.
    ``cfg_uncond_grad=True``, or no CFG: :meth:`DiffusionAdapter.velocity` (``2B`` inputs under CFG, both
    branches differentiated).
    """
    negative = rollouts.negative_embeds
    latents, sigma = transition.latents, transition.sigma
    if negative is None or args.cfg_uncond_grad or not adapter.runs_cfg:
        return adapter.velocity(denoiser, latents, sigma, rollouts.embeds, negative, args.guidance_scale)
    uncond = transition.uncond_velocity
    if uncond is None:
        with torch.no_grad():
            uncond_embeds = unconditional_embeds(rollouts.embeds, negative)
            uncond = adapter.conditional_velocity(denoiser, latents, sigma, uncond_embeds)
    cond = adapter.conditional_velocity(denoiser, latents, sigma, rollouts.embeds, args.guidance_scale)
    return guided(uncond, cond, args.guidance_scale)


def rescore_transition(
    adapter: DiffusionAdapter,
    denoiser: torch.nn.Module,
    rollouts: Rollouts,
    transition: Transition,
    args: DiffusionGRPOConfig,
) -> SDEStep:
    """The current policy's Gaussian for a stored transition: its mean, std and ``log p_θ(x_{k+1} | x_k)``, on
    :func:`policy_velocity`."""
    velocity = policy_velocity(adapter, denoiser, rollouts, transition, args)
    return sde_step_with_logprob(
        args.sde_type,
        transition.latents,
        velocity,
        transition.sigma,
        transition.sigma_next,
        args.noise_level,
        sigma_max=rollouts.sigma_max,
        prev_sample=transition.next_latents,
    )
