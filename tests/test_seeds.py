"""The seed derivations keep the values runs have always used, and keep the streams apart."""

from __future__ import annotations

import itertools

from trl_visual.trainer.seeds import (
    MicroStepCounter,
    generation_seed,
    prior_estimation_seed,
    sde_noise_seed,
    timestep_selection_seed,
)


def test_seeds_reproduce_the_formulas_earlier_runs_used():
    for seed, step, process in itertools.product((0, 42, 1234), (0, 1, 999), (0, 1, 3)):
        round_seed = generation_seed(seed, step)
        assert round_seed == seed * 1_000_003 + step
        assert sde_noise_seed(round_seed, process) == round_seed * 31 + process + 1
        assert timestep_selection_seed(round_seed) == round_seed + 7
        assert prior_estimation_seed(seed, step) == seed * 7_919 + 500_000_000 + step


def test_streams_of_a_run_do_not_share_seeds():
    seed, rounds, processes = 42, range(2000), range(4)
    generation = {generation_seed(seed, r) for r in rounds}
    noise = {sde_noise_seed(generation_seed(seed, r), p) for r in rounds for p in processes}
    priors = {prior_estimation_seed(seed, c) for c in range(2000)}
    assert len(noise) == len(rounds) * len(processes)  # no two (round, process) pairs collide
    assert not generation & priors and not noise & priors


def test_micro_steps_count_from_the_optimizer_step_so_a_resumed_run_counts_the_same():
    """With 3 micro-steps per optimizer step: step 0 runs micro-steps 0, 1, 2 and step 1 runs 3, 4, 5; a counter
    made fresh at step 7 (a resumed run) starts at 7 × 3 = 21, as the uninterrupted run's did."""
    counter = MicroStepCounter(gradient_accumulation_steps=3)
    assert [counter.advance(step) for step in (0, 0, 0, 1, 1, 1)] == [0, 1, 2, 3, 4, 5]
    resumed = MicroStepCounter(gradient_accumulation_steps=3)
    assert [resumed.advance(7), resumed.advance(7), resumed.advance(8)] == [21, 22, 24]
    assert resumed.count == 24
