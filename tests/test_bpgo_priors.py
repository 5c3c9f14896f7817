"""BPGO's prior stores, without a trainer: one interface, checkpoint round trips, the cache."""

from __future__ import annotations

import json

import pytest
import torch

from trl_visual.trainer.bpgo_priors import (
    BaseModelPriors,
    ColumnPriors,
    EMAPriors,
    make_prior_store,
    read_prior_cache,
)

PROMPTS = ["a cat", "a dog"]
ROWS = [{"prompt": "a cat", "prior": 0.25}, {"prompt": "a dog", "prior": -1.0}]


def test_column_priors_read_the_rows_and_refuse_non_numbers():
    means = torch.tensor([0.0, 0.0], dtype=torch.float64)
    priors = ColumnPriors("prior").priors(PROMPTS, ROWS, means)
    assert priors.tolist() == [0.25, -1.0] and priors.dtype == torch.float64
    with pytest.raises(ValueError, match="prompt 'a dog'.*finite numbers"):
        ColumnPriors("prior").priors(PROMPTS, [ROWS[0], {"prompt": "a dog", "prior": None}], means)


def test_ema_priors_start_at_the_group_mean_then_follow_the_ema():
    store = EMAPriors(decay=0.75)
    first = torch.tensor([1.0, 3.0])
    assert store.priors(PROMPTS, ROWS, first).tolist() == [1.0, 3.0]  # first visit: Δ = 0
    store.update(["a cat", "a dog", "a cat"], torch.tensor([1.0, 3.0, 2.0]))  # a cat twice: mean 1.5
    assert store.values == {"a cat": 1.5, "a dog": 3.0}
    store.update(["a cat"], torch.tensor([3.5]))
    assert store.values["a cat"] == pytest.approx(0.75 * 1.5 + 0.25 * 3.5)
    assert store.priors(PROMPTS, ROWS, torch.tensor([9.0, 9.0])).tolist() == [pytest.approx(2.0), 3.0]


def test_ema_update_of_distinct_prompts_equals_the_per_prompt_means():
    """Each prompt once (the fast path: the group means as they are) gives exactly what averaging each prompt's
    groups gives (the path for repeated prompts), NaN group means (no valid reward) included."""
    prompts, means = ["a", "b", "c", "d"], torch.tensor([0.3, float("nan"), 0.1, -0.7], dtype=torch.float32)
    fast, slow = EMAPriors(0.8), EMAPriors(0.8)
    for step in range(3):
        fast.update(prompts, means + step)
        for prompt, mean in zip(prompts, means + step):  # one prompt per call: the per-prompt nanmean path
            slow.update([prompt, prompt], torch.stack([mean, mean]))
    assert fast.values == slow.values and set(fast.values) == {"a", "c", "d"}
    assert fast.values["a"] == pytest.approx(0.8 * (0.8 * 0.3 + 0.2 * 1.3) + 0.2 * 2.3)


def test_every_store_round_trips_through_its_state_dict():
    ema = EMAPriors(0.9)
    ema.update(PROMPTS, torch.tensor([0.5, 0.7]))
    base = BaseModelPriors()
    base.values = {"a cat": 0.1, "a dog": 0.2}
    for store, fresh in ((ema, EMAPriors(0.9)), (base, BaseModelPriors())):
        fresh.load_state_dict(store.state_dict())
        means = torch.zeros(2)
        assert torch.equal(fresh.priors(PROMPTS, ROWS, means), store.priors(PROMPTS, ROWS, means))
    assert make_prior_store("column", "prior", 0.9).state_dict() == {}


def test_base_model_priors_are_estimated_only_for_prompts_the_cache_lacks(tmp_path):
    path, fingerprint = str(tmp_path / "priors.json"), {"model": "tiny:sd3", "seed": 0}
    asked = []

    def estimate(rows):
        asked.append(sorted(rows))
        return {prompt: float(len(prompt)) for prompt in rows}

    first = BaseModelPriors()
    first.load_or_estimate(path, fingerprint, {"a cat": {}}, estimate, write=True)
    second = BaseModelPriors()
    second.load_or_estimate(path, fingerprint, {"a cat": {}, "a dog": {}}, estimate, write=True)
    assert asked == [["a cat"], ["a dog"]]
    assert second.values == {"a cat": 5.0, "a dog": 5.0}
    assert read_prior_cache(path, {**fingerprint, "seed": 1}) == {}  # other settings: estimate again
    with open(path, "w") as f:
        f.write(json.dumps({"fingerprint": fingerprint})[:-3])  # truncated by a crash
    assert read_prior_cache(path, fingerprint) == {}


def test_base_model_priors_before_estimation_are_a_clear_error():
    with pytest.raises(RuntimeError, match="made when `train\\(\\)` starts"):
        BaseModelPriors().priors(PROMPTS, ROWS, torch.zeros(2))


def test_prior_variances_from_a_column_or_the_base_model_cache_and_checkpoint(tmp_path):
    """The uncertainty RAS's anchor variance v_i: read from `prior_var_column`, or estimated with the means,
    cached beside them (a cache without variances is estimated again) and kept in the checkpoint state."""
    rows = [{**row, "prior_var": v} for row, v in zip(ROWS, (0.5, 2.0))]
    like = torch.zeros(2, dtype=torch.float64)
    assert ColumnPriors("prior", "prior_var").variances(PROMPTS, rows, like).tolist() == [0.5, 2.0]
    with pytest.raises(ValueError, match="column 'prior_var'.*finite numbers"):
        ColumnPriors("prior", "prior_var").variances(PROMPTS, ROWS, like)
    with pytest.raises(ValueError, match="has no variances"):
        EMAPriors(0.9).variances(PROMPTS, ROWS, like)

    path, fingerprint, asked = str(tmp_path / "priors.json"), {"seed": 0}, []

    def means_only(rows):
        asked.append("means")
        return {prompt: 1.0 for prompt in rows}

    def with_variances(rows):
        asked.append("both")
        return {prompt: 1.0 for prompt in rows}, {prompt: 0.25 for prompt in rows}

    BaseModelPriors().load_or_estimate(path, fingerprint, {"a cat": {}}, means_only, write=True)
    store = BaseModelPriors()
    store.load_or_estimate(path, fingerprint, {"a cat": {}}, with_variances, write=True, with_variances=True)
    again = BaseModelPriors()
    again.load_or_estimate(path, fingerprint, {"a cat": {}}, with_variances, write=True, with_variances=True)
    assert asked == ["means", "both"]  # the cache without variances was estimated again, then reused
    assert again.variances(["a cat"], ROWS[:1], like[:1]).tolist() == [0.25]
    restored = BaseModelPriors()
    restored.load_state_dict(json.loads(json.dumps(again.state_dict())))
    assert restored.prior_vars == {"a cat": 0.25} and restored.values == {"a cat": 1.0}


def test_variance_per_prompt_is_the_unbiased_variance():
    from trl_visual.trainer.bpgo_priors import variance_per_prompt

    scored = [("a", 1.0), ("a", 3.0), ("a", float("nan")), ("b", 2.0)]
    assert variance_per_prompt(scored) == {"a": 2.0, "b": 0.0}
