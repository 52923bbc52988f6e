"""server.robust: bounded weights, outliers against the round's median, and the robust averages over
rank-heterogeneous, partial updates (against Flower's own FedMedian / FedTrimmedAvg rules where
every update holds everything)."""

import numpy as np
import pytest
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from edgecore import wire
from server import robust
from server.aggregation import partial_average

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
EXIT = "exit.1.down"


def _global(rank=4):
    rng = np.random.default_rng(0)
    return {A: rng.normal(size=(rank, 5)).astype(np.float32), B: rng.normal(size=(5, rank)).astype(np.float32),
            EXIT: rng.normal(size=(rank, 5)).astype(np.float32)}


def _updates(n, seed=1, rank=4):
    rng = np.random.default_rng(seed)
    return [{k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in _global(rank).items()} for _ in range(n)]


def test_low_median_is_an_honest_value_while_honest_values_are_at_least_half():
    assert robust.low_median([10, 1e12]) == 10
    assert robust.low_median([3, 1, 2]) == 2
    assert robust.low_median([5, 1e12, 7, 1e12]) == 7


def test_bounded_weights_cap_a_claim_at_the_ratio_times_the_median_claim():
    assert robust.bounded_weights([10, 12, 14, 1e12], 3.0) == [10, 12, 14, 36]
    assert robust.bounded_weights([10, 1e12], 2.0) == [10, 20]
    assert robust.bounded_weights([10, 1e12], 0) == [10, 1e12]


def test_outliers_are_the_distances_beyond_the_ratio_times_their_median():
    assert robust.outliers([1.0, 1.1, 0.9, 6.0], 5.0) == [3]
    assert robust.outliers([1.0, 1.1, 0.9, 4.0], 5.0) == []
    assert robust.outliers([1.0, 100.0], 5.0) == [1]
    assert robust.outliers([1.0, 100.0], 0) == []


@pytest.mark.parametrize("n", [3, 4, 7])
def test_with_full_updates_the_median_and_trimmed_mean_are_flowers_rules(n):
    g, updates = _global(), _updates(n)
    median, contributors = robust.coordinate_median(g, updates)
    trimmed, _ = robust.trimmed_mean(g, updates, 0.2)
    assert contributors == {name: n for name in g}
    for name in g:
        stack = np.stack([u[name] for u in updates])
        np.testing.assert_allclose(median[name], np.median(stack, axis=0), rtol=1e-6)  # FedMedian
        np.testing.assert_allclose(trimmed[name], trim_mean(stack, 0.2), rtol=1e-6)  # FedTrimmedAvg
        assert median[name].dtype == np.float32


def test_over_rank_heterogeneous_partial_updates_each_element_uses_only_its_holders():
    g = _global(rank=4)
    full = _updates(3, seed=2)
    low = [wire.truncate_rank({A: u[A], B: u[B]}, 2) for u in _updates(2, seed=3)]  # no exit, rank 2
    median, contributors = robust.coordinate_median(g, full + low)
    assert contributors == {A: 5, B: 5, EXIT: 3}
    np.testing.assert_allclose(median[A][:2], np.median(np.stack([u[A][:2] for u in full] + [u[A] for u in low]), axis=0))
    np.testing.assert_allclose(median[A][2:], np.median(np.stack([u[A][2:] for u in full]), axis=0))  # rank-2 clients hold none
    np.testing.assert_allclose(median[B][:, 2:], np.median(np.stack([u[B][:, 2:] for u in full]), axis=0))
    np.testing.assert_allclose(median[EXIT], np.median(np.stack([u[EXIT] for u in full]), axis=0))


def test_tensors_nobody_sent_keep_the_global_value_and_a_trim_of_zero_is_the_plain_mean():
    g = _global()
    updates = [{A: u[A]} for u in _updates(3)]
    trimmed, contributors = robust.trimmed_mean(g, updates, 0.0)
    mean, _ = partial_average(g, [(u, 1.0) for u in updates])
    assert trimmed[B] is g[B] and contributors[B] == 0
    np.testing.assert_allclose(trimmed[A], mean[A], rtol=1e-6)


def test_one_far_update_moves_the_median_not_at_all_beyond_the_honest_range():
    g = _global()
    honest = _updates(4)
    hostile = {k: v + 1e3 for k, v in g.items()}
    median, _ = robust.coordinate_median(g, honest + [hostile])
    for name in g:
        stack = np.stack([u[name] for u in honest])
        assert (median[name] <= stack.max(axis=0) + 1e-6).all() and (median[name] >= stack.min(axis=0) - 1e-6).all()


def test_a_trim_fraction_outside_its_range_is_refused_by_name():
    with pytest.raises(Exception, match="trim-fraction"):
        robust.trimmed_mean(_global(), _updates(3), 0.5)
