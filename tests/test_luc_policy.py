import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecore import EdgecoreError
from edgecore.luc.knapsack import Option, solve, total

layers = st.lists(
    st.lists(st.tuples(st.integers(1, 40), st.floats(0, 10, allow_nan=False)), min_size=1, max_size=4),
    min_size=1, max_size=5,
)


def _options(raw):
    return [[Option(f"{i}", cost, sens) for i, (cost, sens) in enumerate(layer)] for layer in raw]


@settings(max_examples=150, deadline=None)
@given(raw=layers, slack=st.integers(0, 60))
def test_dp_matches_brute_force(raw, slack):
    options = _options(raw)
    budget = sum(min(c for c, _ in layer) for layer in raw) + slack
    chosen = solve(options, budget, resolution=1)
    cost, sens = total(options, chosen)
    assert cost <= budget
    brute = min(
        sum(layer[i].sensitivity for layer, i in zip(options, combo))
        for combo in itertools.product(*[range(len(layer)) for layer in options])
        if sum(layer[i].cost_bytes for layer, i in zip(options, combo)) <= budget
    )
    assert sens == pytest.approx(brute, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(raw=layers, slack=st.integers(0, 400))
def test_coarse_grid_still_fits_the_budget(raw, slack):
    options = [[Option(o.label, o.cost_bytes * 1000 + 7, o.sensitivity) for o in layer] for layer in _options(raw)]
    budget = sum(min(o.cost_bytes for o in layer) for layer in options) + slack * 100
    cost, _ = total(options, solve(options, budget))
    assert cost <= budget


def test_infeasible_budget_names_the_smallest_that_fits():
    options = _options([[(10 * 2**20, 0.0), (4 * 2**20, 1.0)], [(8 * 2**20, 0.0), (3 * 2**20, 2.0)]])
    with pytest.raises(EdgecoreError, match=r"smallest budget that fits is 7.0 MB"):
        solve(options, 6 * 2**20)


def test_sensitive_layers_get_the_expensive_options():
    # Layer 0 hurts a lot when compressed, layer 1 barely: the budget goes to layer 0.
    options = _options([[(8, 0.0), (2, 5.0)], [(8, 0.0), (2, 0.1)]])
    assert solve(options, 10, resolution=1) == [0, 1]
