"""The hooks' typed contract (trl_visual.trainer.hooks), without a trainer."""

from collections import defaultdict

import torch

from trl_visual.trainer.hooks import Advantages, AuxiliaryObjective, record_metrics


def scored() -> Advantages:
    return Advantages(
        reward=torch.arange(4.0),
        advantages=torch.tensor([1.0, -1.0, 2.0, -2.0]),
        weight=torch.tensor([0.5, 0.5, 1.5, 1.5]),
        auxiliary=[AuxiliaryObjective(0.25, torch.tensor([3.0, 2.0, 1.0, 0.0]), "aux")],
        per_reward=torch.arange(8.0).view(4, 2),
        metrics={"figure": torch.tensor(7.0)},
    )


def test_local_slices_every_per_sample_field_and_keeps_the_metrics():
    local = scored().local(slice(2, 4))
    assert local.reward.tolist() == [2.0, 3.0]
    assert local.advantages.tolist() == [2.0, -2.0]
    assert local.weight.tolist() == [1.5, 1.5]
    assert local.auxiliary == [AuxiliaryObjective(0.25, local.auxiliary[0].advantages, "aux")]
    assert local.auxiliary[0].advantages.tolist() == [1.0, 0.0]
    assert local.per_reward.tolist() == [[4.0, 5.0], [6.0, 7.0]]
    assert local.maps is None and local.metrics["figure"].item() == 7.0


def test_reshaped_applies_one_shaping_to_every_set_of_advantages():
    """Main, auxiliary and each reward's advantages get the same shaping; weight and reward are kept."""
    maps = torch.rand(4, 3, 3)
    shaped = scored().reshaped(lambda a: a[:, None, None] * maps)
    given = scored()
    torch.testing.assert_close(shaped.advantages, given.advantages[:, None, None] * maps)
    torch.testing.assert_close(
        shaped.auxiliary[0].advantages, given.auxiliary[0].advantages[:, None, None] * maps
    )
    assert shaped.per_reward.shape == (4, 2, 3, 3)
    torch.testing.assert_close(shaped.per_reward[:, 1], given.per_reward[:, 1, None, None] * maps)
    assert torch.equal(shaped.weight, given.weight) and torch.equal(shaped.reward, given.reward)


def test_record_metrics_appends_each_scalar_under_its_name():
    store = defaultdict(list)
    record_metrics(store, {"a": torch.tensor(1.5), "b": torch.tensor([2.0], requires_grad=True) * 2})
    record_metrics(store, {"a": torch.tensor(3, dtype=torch.int64)})
    record_metrics(store, {})
    assert store == {"a": [1.5, 3.0], "b": [4.0]}
