"""One hostile device among honest ones: every malformed or malicious reply is dropped with its reason
(or, for a claimed example count, bounded), the round completes with the honest clients, and the
global adapter, exit weights and layer ledger equal what the honest clients alone give.

Replies are real Flower Messages answering real train instructions, serialized to Flower's protobuf
and back as on the wire, through the project's FleetStrategy.
"""

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.supercore.task_identity import TaskIdentity

from federation import protocol
from federation.records import from_record, to_record
from server.aggregation import ServerOptimizer
from server.strategy import FleetStrategy

LAYERS, EXITS, RANK, HIDDEN = 4, (1, 3), 4, 6
LORA = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
HONEST = (11, 12, 13)
HOSTILE = 66


@pytest.fixture(autouse=True, scope="module")
def _in_a_run():
    """A Message is made inside a run: what a real run sets."""
    with pytest.MonkeyPatch.context() as patch:
        for field, value in (("run_id", 1), ("task_id", 1), ("node_id", 0)):
            patch.setattr(TaskIdentity, f"_{field}", value)
        yield


def _global():
    rng = np.random.default_rng(0)
    arrays = {}
    for layer in range(LAYERS):
        arrays[LORA.format(layer, "A")] = rng.normal(size=(RANK, HIDDEN)).astype(np.float32)
        arrays[LORA.format(layer, "B")] = rng.normal(size=(HIDDEN, RANK)).astype(np.float32)
    for layer in EXITS:
        arrays[f"exit.{layer}.down"] = rng.normal(size=(RANK, HIDDEN)).astype(np.float32)
        arrays[f"exit.{layer}.up"] = rng.normal(size=(HIDDEN, RANK)).astype(np.float32)
    return arrays


def _honest_metrics(node: int) -> dict:
    return {protocol.NUM_EXAMPLES: 10 + node % 10, protocol.LORA_RANK: RANK, protocol.WINDOW: LAYERS,
            protocol.COMPRESSED: 1, protocol.VOTES: [0.2 + node % 3, 1.0], protocol.IMPORTANCE: [1.0, 2.0, 0.5, 0.25],
            protocol.LAYER_STEPS: [4, 4, 4, 4], "train-loss": 2.5, protocol.JOB_PEAK_MB: 40.0, protocol.BUDGET_MB: 50.0,
            protocol.BYTES_UP: 4096}


def _honest_arrays(node: int, global_arrays: dict) -> dict:
    rng = np.random.default_rng(node)
    return {k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in global_arrays.items()}


def _content(arrays: dict | ArrayRecord, metrics: dict, device: str = "tiny-board") -> RecordDict:
    records = {"arrays": arrays if isinstance(arrays, ArrayRecord) else to_record(arrays), "metrics": MetricRecord(metrics)}
    if device:
        records["device"] = ConfigRecord({"device": device})
    return RecordDict(records)


def _over_the_wire(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


def _reply(node: int, content: RecordDict) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(_over_the_wire(content), reply_to=instruction)


def _strategy(**kwargs) -> FleetStrategy:
    strategy = FleetStrategy(exits=EXITS, layers=LAYERS, optimizer=ServerOptimizer(), max_update_norm=100.0, **kwargs)
    strategy.global_arrays = _global()
    return strategy


def _round(strategy: FleetStrategy, replies: list[Message]):
    arrays, _ = strategy.aggregate_train(1, replies)
    return from_record(arrays)


def _honest_replies(global_arrays) -> list[Message]:
    return [_reply(n, _content(_honest_arrays(n, global_arrays), _honest_metrics(n))) for n in HONEST]


def _with(**changes):
    """A hostile reply: an honest one with metrics changed (None removes the key)."""
    def make(g):
        metrics = {k: v for k, v in {**_honest_metrics(HOSTILE), **changes}.items() if v is not None}
        return _content(_honest_arrays(HOSTILE, g), metrics)
    return make


def _tensor(change):
    """A hostile reply: an honest one with its arrays changed by `change(arrays)`."""
    def make(g):
        return _content(change(_honest_arrays(HOSTILE, g)), _honest_metrics(HOSTILE))
    return make


def _first(arrays: dict, value) -> dict:
    name = sorted(arrays)[0]
    return {**arrays, name: value(arrays[name])}


def _raw_array(dtype: str, stype: str, data: bytes) -> ArrayRecord:
    def make(g):
        record = to_record(_honest_arrays(HOSTILE, g))
        record[sorted(g)[0]] = Array(dtype=dtype, shape=(RANK, HIDDEN), stype=stype, data=data)
        return record
    return make


def _raw(arrays_maker):
    return lambda g: _content(arrays_maker(g), _honest_metrics(HOSTILE))


def _near_the_absolute_limit(g):
    """A plausible-looking update just under max-update-norm (100): far beyond any honest round's."""
    delta = {k: np.random.default_rng(1).normal(size=v.shape) for k, v in g.items()}
    scale = 99.0 / math.sqrt(sum(float(np.square(d).sum()) for d in delta.values()))
    return _content({k: (g[k] + scale * d).astype(np.float32) for k, d in delta.items()}, _honest_metrics(HOSTILE))


HOSTILE_REPLIES = {
    "num-examples NaN": (_with(**{protocol.NUM_EXAMPLES: float("nan")}), "num-examples"),
    "num-examples inf": (_with(**{protocol.NUM_EXAMPLES: float("inf")}), "num-examples"),
    "num-examples negative": (_with(**{protocol.NUM_EXAMPLES: -5}), "num-examples"),
    "num-examples zero": (_with(**{protocol.NUM_EXAMPLES: 0}), "num-examples"),
    "num-examples missing": (_with(**{protocol.NUM_EXAMPLES: None}), "num-examples"),
    "lora-rank NaN": (_with(**{protocol.LORA_RANK: float("nan")}), "lora-rank"),
    "lora-rank zero": (_with(**{protocol.LORA_RANK: 0}), "lora-rank"),
    "lora-rank fractional": (_with(**{protocol.LORA_RANK: 2.5}), "lora-rank"),
    "lora-rank huge": (_with(**{protocol.LORA_RANK: 10**9}), "rank"),
    "window NaN": (_with(**{protocol.WINDOW: float("nan")}), "window"),
    "window zero": (_with(**{protocol.WINDOW: 0}), "window"),
    "window deeper than the model": (_with(**{protocol.WINDOW: 10**6}), "window"),
    "compressed not a flag": (_with(**{protocol.COMPRESSED: 2}), "compressed"),
    "votes NaN": (_with(**{protocol.VOTES: [float("nan"), 1.0]}), "votes"),
    "votes negative": (_with(**{protocol.VOTES: [-1.0, 1.0]}), "votes"),
    "votes wrong length": (_with(**{protocol.VOTES: [1.0, 1.0, 1.0]}), "votes"),
    "votes huge": (_with(**{protocol.VOTES: [1e308, 1e308]}), "votes"),
    "importance NaN": (_with(**{protocol.IMPORTANCE: [float("nan")] * LAYERS}), "importance"),
    "importance negative": (_with(**{protocol.IMPORTANCE: [-1.0] * LAYERS}), "importance"),
    "importance wrong length": (_with(**{protocol.IMPORTANCE: [1.0] * (LAYERS - 1)}), "importance"),
    "importance huge": (_with(**{protocol.IMPORTANCE: [1e308] * LAYERS}), "importance"),
    "layer-steps negative": (_with(**{protocol.LAYER_STEPS: [-1, 0, 0, 0]}), "layer-steps"),
    "layer-steps too long": (_with(**{protocol.LAYER_STEPS: [1] * (LAYERS + 1)}), "layer steps"),
    "layer-steps fractional": (_with(**{protocol.LAYER_STEPS: [0.5, 0.0, 0.0, 0.0]}), "layer-steps"),
    "layer-steps huge": (_with(**{protocol.LAYER_STEPS: [1e300, 0.0, 0.0, 0.0]}), "layer-steps"),
    "metric inf": (_with(**{"train-loss": float("inf")}), "train-loss"),
    "metric 1e308": (_with(**{"train-loss": 1e308}), "train-loss"),
    "metric named node_id": (_with(node_id=1), "node_id"),
    "metric named device": (_with(device=3), "device"),
    "metric name not kebab-case": (_with(**{"../../etc": 1}), "../../etc"),
    "metric name too long": (_with(**{"x" * 300: 1}), "xxxx"),
    "tensor NaN": (_tensor(lambda a: _first(a, lambda v: np.full_like(v, np.nan))), "non-finite"),
    "tensor inf": (_tensor(lambda a: _first(a, lambda v: np.full_like(v, np.inf))), "non-finite"),
    "tensor wrong shape": (_tensor(lambda a: _first(a, lambda v: np.zeros((2, 2), np.float32))), "shape"),
    "tensor three-dimensional": (_tensor(lambda a: _first(a, lambda v: v[None])), "shape"),
    "tensor float64": (_tensor(lambda a: _first(a, lambda v: v.astype(np.float64))), "dtype"),
    "tensor float16": (_tensor(lambda a: _first(a, lambda v: v.astype(np.float16))), "dtype"),
    "tensor int32": (_tensor(lambda a: _first(a, lambda v: v.astype(np.int32))), "dtype"),
    "tensor unknown": (_tensor(lambda a: {**a, "lm_head.weight": np.zeros((2, 2), np.float32)}), "not in the global"),
    "no tensor": (_tensor(lambda a: {}), "empty"),
    "update 10^4 times too large": (_tensor(lambda a: {k: v * 1e4 for k, v in a.items()}), "exceeds"),
    "update just under max-update-norm": (_near_the_absolute_limit, "times the round's median"),
    "tensor bytes undecodable": (_raw(_raw_array("float32", "numpy.ndarray", b"not an npy file")), "could not be decoded"),
    "tensor of another array type": (_raw(_raw_array("float32", "torch.Tensor", b"\0" * 96)), "could not be decoded"),
    "metrics as a config record": (lambda g: RecordDict({"arrays": to_record(_honest_arrays(HOSTILE, g)),
                                                         "metrics": ConfigRecord({"num-examples": 10})}), "metrics"),
    "no arrays record": (lambda g: RecordDict({"metrics": MetricRecord(_honest_metrics(HOSTILE))}), "arrays"),
}


def _bytes_device(g):
    content = _content(_honest_arrays(HOSTILE, g), _honest_metrics(HOSTILE), device="")
    content["device"] = ConfigRecord({"device": b"\xff\xfe"})
    return content


HOSTILE_REPLIES["device name bytes"] = (_bytes_device, "device")
HOSTILE_REPLIES["device name with control characters"] = (
    lambda g: _content(_honest_arrays(HOSTILE, g), _honest_metrics(HOSTILE), device="pi4\n{\"node_id\": 1}" * 20), "device")


@pytest.fixture(scope="module")
def honest_only():
    strategy = _strategy()
    arrays = _round(strategy, _honest_replies(strategy.global_arrays))
    return strategy, arrays


@pytest.mark.parametrize("case", sorted(HOSTILE_REPLIES))
def test_a_hostile_reply_is_dropped_with_its_reason_and_the_round_equals_the_honest_one(case, honest_only):
    reference, reference_arrays = honest_only
    strategy = _strategy()
    make, reason = HOSTILE_REPLIES[case]
    replies = _honest_replies(strategy.global_arrays)
    replies.insert(1, _reply(HOSTILE, make(strategy.global_arrays)))
    arrays = _round(strategy, replies)
    dropped = {d["node_id"]: d for d in strategy.round_dropped[1]}
    assert list(dropped) == [HOSTILE], f"{case}: dropped {dropped}"
    assert dropped[HOSTILE]["cause"] == "rejected" and reason in dropped[HOSTILE]["reason"], dropped[HOSTILE]["reason"]
    assert [c["node_id"] for c in strategy.round_clients[1]] == list(HONEST)
    assert sorted(arrays) == sorted(reference_arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, reference_arrays[name], err_msg=name)
    assert strategy.exit_weights == reference.exit_weights
    np.testing.assert_array_equal(strategy.ledger.importance, reference.ledger.importance)
    np.testing.assert_array_equal(strategy.ledger.coverage, reference.ledger.coverage)
    json.dumps({"clients": strategy.round_clients[1], "dropped": strategy.round_dropped[1]}, allow_nan=False)


def test_a_claimed_example_count_buys_at_most_the_configured_multiple_of_the_median_claim():
    honest = _strategy()
    honest_arrays = _round(honest, _honest_replies(honest.global_arrays))
    strategy = _strategy(max_weight_ratio=2.0, max_update_norm_ratio=0.0)
    g = strategy.global_arrays
    claim = {**_honest_metrics(HOSTILE), protocol.NUM_EXAMPLES: 1e12}
    update = {k: (v + 0.05).astype(np.float32) for k, v in g.items()}  # plausible size, one direction
    replies = _honest_replies(g) + [_reply(HOSTILE, _content(update, claim))]
    arrays = _round(strategy, replies)
    claims = sorted(_honest_metrics(n)[protocol.NUM_EXAMPLES] for n in HONEST)
    median = claims[1]  # with the hostile claim the low median of 4 claims is the second honest one
    share = 2.0 * median / (sum(claims) + 2.0 * median)
    for name, value in arrays.items():  # the average moved toward the hostile update by its bounded share only
        expected = (1 - share) * honest_arrays[name].astype(np.float64) + share * update[name]
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)
    hostile = next(c for c in strategy.round_clients[1] if c["node_id"] == HOSTILE)
    assert hostile[protocol.NUM_EXAMPLES] == 1e12 and hostile["weight"] == 2.0 * median


def test_without_the_bound_a_claimed_example_count_captures_the_round():
    strategy = _strategy(max_weight_ratio=0.0, max_update_norm_ratio=0.0)
    g = strategy.global_arrays
    update = {k: (v + 0.05).astype(np.float32) for k, v in g.items()}
    replies = _honest_replies(g) + [_reply(HOSTILE, _content(update, {**_honest_metrics(HOSTILE), protocol.NUM_EXAMPLES: 1e12}))]
    arrays = _round(strategy, replies)
    for name, value in arrays.items():
        np.testing.assert_allclose(value, update[name], rtol=1e-6, atol=1e-6)


def test_replies_to_no_instruction_of_this_round_and_second_replies_are_ignored(honest_only):
    _, reference_arrays = honest_only
    strategy = _strategy()
    g = strategy.global_arrays
    replies = _honest_replies(g)
    replies.append(_reply(HONEST[0], _content({k: v + 1.0 for k, v in g.items()}, _honest_metrics(HONEST[0]))))
    strategy.round_sampled[1] = list(HONEST)
    replies.append(_reply(HOSTILE, _content(_honest_arrays(HOSTILE, g), _honest_metrics(HOSTILE))))
    arrays = _round(strategy, replies)
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, reference_arrays[name])


def _evaluation(node: int, metrics: dict, device: str = "tiny-board") -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.EVALUATE)
    records = {"metrics": MetricRecord(metrics), "device": ConfigRecord({"device": device})}
    return Message(_over_the_wire(RecordDict(records)), reply_to=instruction)


@pytest.mark.parametrize("metrics, reason", [
    ({protocol.NUM_EXAMPLES: 10, protocol.ACCURACY: 1.5}, "accuracy"),
    ({protocol.NUM_EXAMPLES: 10, protocol.ACCURACY: float("nan")}, "accuracy"),
    ({protocol.NUM_EXAMPLES: 10, protocol.ACCURACY: 0.5, "node_id": 1}, "node_id"),
    ({protocol.NUM_EXAMPLES: 10, protocol.ACCURACY: 0.5, "loss": 1e308}, "loss"),
])
def test_a_hostile_evaluation_is_ignored_with_its_reason(metrics, reason, caplog):
    strategy = _strategy()
    honest = [_evaluation(n, {protocol.NUM_EXAMPLES: 10, protocol.ACCURACY: 0.5}) for n in HONEST]
    result = strategy.aggregate_evaluate(1, [*honest, _evaluation(HOSTILE, metrics)])
    assert result[protocol.ACCURACY] == pytest.approx(0.5)
    assert [d["node_id"] for d in strategy.round_devices[1]] == list(HONEST)
    assert any(str(HOSTILE) in r.message and reason in r.message for r in caplog.records)


def test_a_claimed_test_count_cannot_capture_the_fleet_accuracy():
    strategy = _strategy(max_weight_ratio=2.0)
    honest = [_evaluation(n, {protocol.NUM_EXAMPLES: 10, protocol.ACCURACY: 0.5}) for n in HONEST]
    hostile = _evaluation(HOSTILE, {protocol.NUM_EXAMPLES: 1e12, protocol.ACCURACY: 1.0})
    result = strategy.aggregate_evaluate(1, [*honest, hostile])
    assert result[protocol.ACCURACY] == pytest.approx((3 * 10 * 0.5 + 20 * 1.0) / 50)


def test_under_local_dp_honest_noisy_updates_pass_and_a_round_spends_the_ledgers_epsilon():
    from federation.privacy import DpSettings, privatize
    from server.privacy import PrivacyLedger

    dp = DpSettings("local", clip_norm=0.05, noise_multiplier=1.0)
    ledger = PrivacyLedger("local", 1.0, population=3)
    strategy = _strategy(privacy=dp, privacy_ledger=ledger)
    g = strategy.global_arrays
    noisy = [_reply(n, _content(privatize(_honest_arrays(n, g), g, dp, np.random.default_rng(n)), _honest_metrics(n)))
             for n in HONEST]
    _round(strategy, noisy)
    assert [c["node_id"] for c in strategy.round_clients[1]] == list(HONEST) and not strategy.round_dropped[1]
    assert strategy.round_privacy[1]["epsilon"] == PrivacyLedger("local", 1.0, population=3).record_round(3)
    # Noise does not hide an update far beyond an honest noisy one.
    far = {k: v + 10.0 for k, v in g.items()}
    strategy = _strategy(privacy=dp, privacy_ledger=PrivacyLedger("local", 1.0, population=3))
    _round(strategy, noisy[:2] + [_reply(HOSTILE, _content(far, _honest_metrics(HOSTILE)))])
    assert [d["node_id"] for d in strategy.round_dropped[1]] == [HOSTILE]
