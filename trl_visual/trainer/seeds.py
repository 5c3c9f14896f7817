"""Where every random stream of a run gets its seed.

All seeds derive from ``args.seed`` and the trainer's position (the generation round, the process, the
chunk of prior estimation), never from a global RNG, so that a resumed run draws exactly what the
uninterrupted run would have drawn. The derivations keep the values the trainer has always used, so
existing runs and tests reproduce:

================================  =====================================================
stream                            seed
================================  =====================================================
one generation round ``r``        ``g = seed · 1_000_003 + r`` (initial noise, SDE window)
the SDE noise on process ``p``    ``g · 31 + p + 1``
the trained timesteps             ``g + 7``
BPGO prior estimation, chunk c    ``seed · 7_919 + 500_000_000 + c``
================================  =====================================================

The multipliers are primes, so that consecutive rounds or processes do not land on each other's seeds;
the prior-estimation seeds start half a billion above ``seed · 7_919``, far from the training rounds of
any run shorter than that many generation rounds.
"""

from __future__ import annotations

#: spacing between the generation seeds of two runs with consecutive ``args.seed`` (a prime above 10⁶)
ROUND_SEED_MULTIPLIER = 1_000_003
#: spacing between the SDE-noise seeds of consecutive generation rounds (leaves room for 30 processes)
PROCESS_SEED_MULTIPLIER = 31
#: offset of the trained-timestep selection seed from its round's generation seed
TIMESTEP_SEED_OFFSET = 7
#: spacing of prior-estimation seeds between runs with consecutive ``args.seed``
PRIOR_SEED_MULTIPLIER = 7_919
#: where prior-estimation seeds start, apart from the generation seeds
PRIOR_SEED_OFFSET = 500_000_000


def generation_seed(seed: int, generation_round: int) -> int:
    """``seed · 1_000_003 + round``: the seed of one generation round, the same on every process (so that
    shared initial noise agrees across processes)."""
    return seed * ROUND_SEED_MULTIPLIER + generation_round


def sde_noise_seed(round_seed: int, process_index: int) -> int:
    """``g · 31 + p + 1``: the seed of the SDE steps' noise of round seed ``g`` on process ``p`` (each process
    draws its own noise)."""
    return round_seed * PROCESS_SEED_MULTIPLIER + process_index + 1


def timestep_selection_seed(round_seed: int) -> int:
    """``g + 7``: the seed that picks which stochastic steps are trained in round seed ``g``."""
    return round_seed + TIMESTEP_SEED_OFFSET


def prior_estimation_seed(seed: int, chunk: int) -> int:
    """``seed · 7_919 + 500_000_000 + chunk``: the seed of BPGO's ``chunk``-th batch of prior-estimation
    rollouts, apart from the training rounds' seeds."""
    return seed * PRIOR_SEED_MULTIPLIER + PRIOR_SEED_OFFSET + chunk


class MicroStepCounter:
    """Counts micro-batches since the start of the run: ``global_step × gradient_accumulation_steps`` plus the
    micro-batches already done in the current step, so that a resumed run counts what the uninterrupted one
    did (the seeds above are derived from it)."""

    def __init__(self, gradient_accumulation_steps: int):
        self.gradient_accumulation_steps = gradient_accumulation_steps
        #: the micro-step being run
        self.count = 0
        self._in_step, self._origin = 0, -1

    def advance(self, global_step: int) -> int:
        """Start the next micro-step of optimizer step ``global_step``; returns its :attr:`count`."""
        if global_step != self._origin:
            self._origin, self._in_step = global_step, 0
        self.count = global_step * self.gradient_accumulation_steps + self._in_step
        self._in_step += 1
        return self.count
