"""Heterogeneous-rank aggregation, update checks, server optimizers, exit weights, window assignment."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edgecore.errors import EdgecoreError
from edgecore.wire import layer_of, rank_axis
from edgecore.wire import pad_rank as pad
from edgecore.wire import truncate_rank as truncate
from federation.validation import tensors_of_window, update_problems
from server.aggregation import LayerLedger, ServerOptimizer, global_exit_weights, partial_average

LAYERS, TARGETS, WIDTH, EXITS = range(4), ("q_proj", "v_proj"), 6, (1, 3)
FAST = settings(max_examples=50, deadline=None)


def lora_key(layer: int, target: str, part: str) -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.{target}.lora_{part}.weight"


def adapter(rank: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """A small adapter: LoRA on q/v of layers 0..3 and exits after layers 1 and 3, all at `rank`."""
    rng = np.random.default_rng(seed)
    shapes = {}
    for layer in LAYERS:
        for target in TARGETS:
            shapes[lora_key(layer, target, "A")] = (rank, WIDTH)
            shapes[lora_key(layer, target, "B")] = (WIDTH, rank)
    for e in EXITS:
        shapes[f"exit.{e}.down"], shapes[f"exit.{e}.up"] = (rank, WIDTH), (WIDTH, rank)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


NAMES = sorted(adapter())


def reference_average(global_arrays, updates):
    """Element by element, the weighted mean over the updates that hold the element."""
    out = {}
    for name, g in global_arrays.items():
        result = g.astype(np.float64).copy()
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                held = [(arrays[name][i, j], w) for arrays, w in updates
                        if name in arrays and i < arrays[name].shape[0] and j < arrays[name].shape[1]]
                if held:
                    result[i, j] = sum(v * w for v, w in held) / sum(w for _, w in held)
        out[name] = result
    return out


updates_strategy = st.lists(
    st.tuples(
        st.integers(1, 4),  # client rank
        st.lists(st.sampled_from(NAMES), min_size=1, max_size=6, unique=True),  # tensors it sends
        st.integers(1, 500),  # num_examples
        st.integers(0, 2**16),  # seed of its values
    ),
    min_size=0, max_size=4,
)


def client_updates(global_arrays, drawn):
    updates = []
    for rank, names, examples, seed in drawn:
        trained = adapter(rank=4, seed=seed)
        updates.append((truncate({n: trained[n] for n in names}, rank), examples))
    return updates


# --- keys and ranks --------------------------------------------------------------------------


def test_layer_and_rank_axis_of_each_key_kind():
    assert layer_of(lora_key(12, "q_proj", "A")) == 12
    assert layer_of(lora_key(3, "v_proj", "B")) == 3
    assert layer_of("exit.22.down") == 22
    assert layer_of("model.embed_tokens.weight") is None
    assert layer_of("base_model.model.model.layers.2.mlp.weight") is None
    assert [rank_axis(lora_key(0, "q_proj", p)) for p in "AB"] == [0, 1]
    assert [rank_axis(f"exit.1.{p}") for p in ("down", "up")] == [0, 1]
    with pytest.raises(EdgecoreError, match="embed_tokens"):
        rank_axis("model.embed_tokens.weight")


@FAST
@given(rank=st.integers(1, 4), target=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_pad_then_truncate_round_trips(rank, target, seed):
    arrays = adapter(rank=rank, seed=seed)
    if target < rank:
        with pytest.raises(EdgecoreError, match="above the requested"):
            pad(arrays, target)
        return
    padded = pad(arrays, target)
    for name, value in padded.items():
        assert value.shape[rank_axis(name)] == target and value.dtype == np.float32
        extra = np.take(value, range(rank, target), axis=rank_axis(name))
        assert not extra.any()
    back = truncate(padded, rank)
    assert all(np.array_equal(back[n], arrays[n]) for n in arrays)


@FAST
@given(rank=st.integers(1, 6))
def test_truncate_cuts_the_rank_axis_and_copies(rank):
    arrays = adapter(rank=4)
    if rank > 4:
        with pytest.raises(EdgecoreError, match="below the requested"):
            truncate(arrays, rank)
        return
    cut = truncate(arrays, rank)
    assert cut[lora_key(0, "q_proj", "A")].shape == (rank, WIDTH)
    assert cut[lora_key(0, "q_proj", "B")].shape == (WIDTH, rank)
    assert cut["exit.1.down"].shape == (rank, WIDTH) and cut["exit.1.up"].shape == (WIDTH, rank)
    name = lora_key(2, "v_proj", "B")
    assert np.array_equal(cut[name], arrays[name][:, :rank])
    cut[name][...] = 7.0
    assert not (arrays[name] == 7.0).any()


def test_window_names():
    names = tensors_of_window(adapter(), 2, 3, 3)
    expected = {lora_key(layer, t, p) for layer in (2, 3) for t in TARGETS for p in "AB"} | {"exit.3.down", "exit.3.up"}
    assert names == expected
    assert tensors_of_window(adapter(), 0, 0, 2) == {lora_key(0, t, p) for t in TARGETS for p in "AB"}  # no exit at 2


# --- update checks -------------------------------------------------------------------------


def small_step(arrays, size=0.01):
    return {n: (v + size).astype(np.float32) for n, v in arrays.items()}


@FAST
@given(rank=st.integers(1, 4), first=st.integers(0, 3), span=st.integers(0, 3))
def test_a_valid_truncated_window_update_passes(rank, first, span):
    global_arrays = adapter()
    last = min(3, first + span)
    allowed = tensors_of_window(global_arrays, first, last, 3)
    update = small_step(truncate({n: global_arrays[n] for n in allowed}, rank))
    assert update_problems(update, global_arrays, allowed=allowed, rank=rank, max_delta_norm=1.0) == []


def test_update_problems_name_each_reason():
    g = adapter()
    allowed = tensors_of_window(g, 2, 3, 3)
    good = small_step(truncate({n: g[n] for n in allowed}, 2))

    def problems(update, rank=2, limit=1.0):
        return update_problems(update, g, allowed=allowed, rank=rank, max_delta_norm=limit)

    outside = lora_key(0, "q_proj", "A")
    (reason,) = problems({**good, outside: truncate({outside: g[outside]}, 2)[outside]})
    assert outside in reason and "not assigned this round" in reason
    assert update_problems({outside: g[outside]}, g, allowed=None, rank=4, max_delta_norm=1.0) == []

    name = lora_key(3, "v_proj", "B")
    (reason,) = problems({**good, name: g[name]})  # rank 4 tensor in a rank 2 update
    assert name in reason and "(6, 4)" in reason and "(6, 2)" in reason

    nan = good[name].copy()
    nan[0, 0] = np.nan
    (reason,) = problems({**good, name: nan})
    assert name in reason and "non-finite" in reason

    (reason,) = problems(good, limit=0.01)
    assert "exceeds the limit" in reason

    assert "empty" in problems({})[0]
    assert "not in the global adapter" in problems({**good, "exit.9.down": good["exit.3.down"]})[0]
    assert "float32" in problems({**good, name: good[name].astype(np.float64)})[0]
    assert "exceeds the global rank" in update_problems(pad(good, 5), g, allowed=allowed, rank=5, max_delta_norm=1.0)[0]


# --- partial averaging -----------------------------------------------------------------------


@FAST
@given(drawn=updates_strategy)
def test_partial_average_is_the_weighted_mean_over_holders(drawn):
    g = adapter(rank=4)
    updates = client_updates(g, drawn)
    averaged, contributors = partial_average(g, updates)
    expected = reference_average(g, updates)
    sent = {name for arrays, _ in updates for name in arrays}
    for name in g:
        assert averaged[name].shape == g[name].shape and averaged[name].dtype == np.float32
        np.testing.assert_allclose(averaged[name], expected[name], rtol=1e-6, atol=1e-6)
        assert contributors[name] == sum(name in arrays for arrays, _ in updates)
        if name not in sent:
            assert np.array_equal(averaged[name], g[name])


def test_high_rank_slices_come_from_the_high_rank_client_only():
    g = adapter(rank=4, seed=0)
    low, high = truncate(adapter(seed=1), 2), adapter(seed=2)
    averaged, contributors = partial_average(g, [(low, 300), (high, 100)])
    a, b = lora_key(1, "q_proj", "A"), lora_key(1, "q_proj", "B")
    np.testing.assert_allclose(averaged[a][2:], high[a][2:], rtol=1e-6)  # not shrunk toward zero
    np.testing.assert_allclose(averaged[b][:, 2:], high[b][:, 2:], rtol=1e-6)
    np.testing.assert_allclose(averaged[a][:2], 0.75 * low[a] + 0.25 * high[a][:2], rtol=1e-5)
    assert contributors[a] == 2


def test_tensors_nobody_sent_keep_the_global_value():
    g = adapter()
    name = lora_key(0, "q_proj", "A")
    averaged, contributors = partial_average(g, [({name: g[name] + 1}, 10)])
    untouched = [n for n in g if n != name]
    assert all(np.array_equal(averaged[n], g[n]) for n in untouched)
    assert all(contributors[n] == 0 for n in untouched) and contributors[name] == 1


@pytest.mark.parametrize("weight", [0, -3, float("nan")])
def test_partial_average_needs_positive_weights(weight):
    g = adapter()
    with pytest.raises(EdgecoreError, match="> 0"):
        partial_average(g, [(small_step(g), weight)])


# --- server optimizers -----------------------------------------------------------------------


def test_fedavg_and_fedprox_return_the_average():
    g = adapter(seed=0)
    averaged, contributors = partial_average(g, [(adapter(seed=1), 5)])
    for kind in ("fedavg", "fedprox"):
        out = ServerOptimizer(kind).step(g, averaged, contributors)
        assert all(np.array_equal(out[n], averaged[n]) for n in g)


def test_fedadam_one_step_by_hand():
    g = {"exit.1.down": np.ones((1, 2), np.float32), "exit.1.up": np.ones((2, 1), np.float32)}
    averaged = {"exit.1.down": np.array([[3.0, 1.0]], np.float32), "exit.1.up": g["exit.1.up"]}
    opt = ServerOptimizer("fedadam", lr=0.5, beta1=0.9, beta2=0.99, tau=1e-3)
    out = opt.step(g, averaged, {"exit.1.down": 1, "exit.1.up": 0})
    # delta = [2, 0]; m = 0.1 * delta = [0.2, 0]; v = 0.01 * delta^2 = [0.04, 0]
    expected = 1 + 0.5 * np.array([[0.2 / (0.2 + 1e-3), 0.0]])
    np.testing.assert_allclose(out["exit.1.down"], expected, rtol=1e-6)
    assert out["exit.1.up"] is g["exit.1.up"] and "exit.1.up" not in opt.first_moment
    # a second round with delta 2 again: the moments carry over from the first
    out2 = opt.step(out, {"exit.1.down": out["exit.1.down"] + 2}, {"exit.1.down": 1})
    m, v = 0.9 * 0.2 + 0.1 * 2, 0.99 * 0.04 + 0.01 * 4
    np.testing.assert_allclose(out2["exit.1.down"][0, 0], out["exit.1.down"][0, 0] + 0.5 * m / (np.sqrt(v) + 1e-3), rtol=1e-6)


def test_unknown_optimizer_lists_the_kinds():
    with pytest.raises(EdgecoreError, match="fedavg, fedprox, fedadam"):
        ServerOptimizer("sgd")


# --- exit weights ----------------------------------------------------------------------------


@FAST
@given(votes=st.lists(st.tuples(st.lists(st.floats(0, 10), min_size=3, max_size=3), st.integers(1, 100)), max_size=5))
def test_exit_weights_sum_to_one(votes):
    weights = global_exit_weights(votes, 3)
    assert len(weights) == 3 and abs(sum(weights) - 1) < 1e-9 and min(weights) >= 0
    if all(sum(v) == 0 for v, _ in votes):
        assert weights == [1 / 3] * 3


def test_exit_weights_by_hand():
    # mean = (1*[1,0,0] + 3*[0,1,1]) / 4 = [.25, .75, .75]; normalised by 1.75
    np.testing.assert_allclose(global_exit_weights([([1, 0, 0], 1), ([0, 1, 1], 3)], 3), [1 / 7, 3 / 7, 3 / 7])
    assert global_exit_weights([], 4) == [0.25] * 4


@pytest.mark.parametrize("vector", [[1, 0], [1, -1, 0], [1, float("nan"), 0]])
def test_bad_exit_votes_are_rejected(vector):
    with pytest.raises(EdgecoreError, match="exit vote 1"):
        global_exit_weights([([1, 1, 1], 1), (vector, 1)], 3)


# --- layer ledger ----------------------------------------------------------------------------


def test_same_depth_clients_get_different_windows():
    ledger = LayerLedger(8)
    chosen = ledger.assign_windows({"a": 2, "b": 2}, (3, 7))
    assert chosen == {"a": 7, "b": 3}  # a fresh ledger ties: the first client takes the deeper exit
    assert list(chosen) == ["a", "b"]


def test_deep_windows_are_served_first():
    # served deepest first, d ties and takes 4..7, leaving s the untouched 2..3
    assert LayerLedger(8).assign_windows({"s": 2, "d": 4}, (3, 7)) == {"s": 3, "d": 7}


def test_a_deep_client_gets_the_last_exit():
    ledger = LayerLedger(8)
    ledger.record_training(4, 7, 100)  # even when the late layers are well covered
    assert ledger.assign_windows({"deep": 8, "shallow": 2}, (3, 7)) == {"deep": 7, "shallow": 3}


def test_importance_steers_a_shallow_window():
    ledger = LayerLedger(8)
    ledger.record_importance([([5, 5, 5, 5, 0, 0, 0, 0], 10)])
    assert ledger.assign_windows({"a": 4}, (3, 7)) == {"a": 3}
    ledger.record_importance([([0, 0, 0, 0, 9, 9, 9, 9], 10)])  # EMA: layers 4..7 now matter more
    np.testing.assert_allclose(ledger.importance, [2.5] * 4 + [4.5] * 4)
    assert ledger.assign_windows({"a": 4}, (3, 7)) == {"a": 7}


def test_rounds_spread_shallow_clients_over_every_exit():
    ledger, exits, depths = LayerLedger(30), (7, 14, 22, 29), {"a": 30, "b": 3, "c": 3}
    shallow_exits = set()
    for _ in range(4):
        chosen = ledger.assign_windows(depths, exits)
        assert chosen["a"] == 29
        for client, e in chosen.items():
            ledger.record_training(*LayerLedger.window(e, depths[client]), steps=10)
        shallow_exits |= {chosen["b"], chosen["c"]}
    assert shallow_exits == set(exits)


@pytest.mark.parametrize("depths, exits", [({"a": 0}, (1, 3)), ({"a": 2}, (3, 1)), ({"a": 2}, (1, 8)), ({"a": 2}, ())])
def test_ledger_rejects_bad_inputs(depths, exits):
    with pytest.raises(EdgecoreError):
        LayerLedger(8).assign_windows(depths, exits)


def test_exit_weights_steer_windows_toward_the_exits_the_fleet_votes_for():
    ledger = LayerLedger(30)
    ledger.record_training(24, 29, 4)  # the last window is the most covered
    exits = (7, 14, 22, 29)
    assert ledger.assign_windows({"board": 3}, exits)["board"] != 29  # coverage alone moves it away
    assert ledger.assign_windows({"board": 3}, exits, [0.0, 0.0, 0.05, 0.95])["board"] == 29
    # An exit at weight 0 keeps a floor: once the voted exit is covered enough, coverage wins again.
    ledger.record_training(27, 29, 10_000)
    assert ledger.assign_windows({"board": 3}, exits, [0.0, 0.0, 0.0, 1.0])["board"] != 29
    with pytest.raises(EdgecoreError, match="exit weights has shape"):
        ledger.assign_windows({"board": 3}, exits, [1.0])
