"""The client/server protocol: instructions and replies through real Flower records and their wire
(protobuf) form, and malformed replies refused with the key and the value named."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.supercore.task_identity import TaskIdentity

from edgecore import wire
from federation import protocol
from federation.protocol import (
    EvaluateInstruction,
    EvaluateReply,
    Expectation,
    ProtocolError,
    TrainInstruction,
    TrainReply,
)

LORA_A = "base_model.model.model.layers.{}.self_attn.q_proj.lora_A.weight"
LORA_B = "base_model.model.model.layers.{}.self_attn.q_proj.lora_B.weight"


def _adapter(rank=4, layers=2):
    rng = np.random.default_rng(0)
    arrays = {}
    for layer in range(layers):
        arrays[LORA_A.format(layer)] = rng.normal(size=(rank, 6)).astype(np.float32)
        arrays[LORA_B.format(layer)] = rng.normal(size=(6, rank)).astype(np.float32)
    arrays["exit.1.down"] = rng.normal(size=(rank, 6)).astype(np.float32)
    arrays["exit.1.up"] = rng.normal(size=(6, rank)).astype(np.float32)
    return arrays


@pytest.fixture(autouse=True)
def _in_a_run(monkeypatch):
    """A Message is made inside a run: what a real run sets."""
    for field, value in (("run_id", 1), ("task_id", 1), ("node_id", 0)):
        monkeypatch.setattr(TaskIdentity, f"_{field}", value)


def _over_the_wire(content: RecordDict) -> RecordDict:
    """What the other side receives: the records serialized to Flower's protobuf and back."""
    return recorddict_from_proto(recorddict_to_proto(content))


def _same_arrays(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        np.testing.assert_array_equal(a[name], b[name])


def _edge_reply(**changes):
    values = dict(arrays=_adapter(rank=2), num_examples=12, device="pi4-1gb", lora_rank=2, window=2, compressed=True,
                  votes=(0.25, 0.75), importance=(0.5, 1.5), layer_steps=(0, 4),
                  report={"train-loss": 2.5, "job-peak-mb": 300.0, "exits": [1, 3], "bytes-up": 4096})
    values.update(changes)
    return TrainReply(**values)


# ---------------------------------------------------------------- round trips


def test_a_train_instruction_round_trips_through_a_flower_message():
    instruction = TrainInstruction(arrays=_adapter(), server_round=3, num_rounds=5, exit_weights=(0.2, 0.8), assigned_exit=1)
    message = instruction.to_message(node_id=7)
    assert message.metadata.message_type == MessageType.TRAIN and message.metadata.dst_node_id == 7
    received = TrainInstruction.from_message(Message(_over_the_wire(message.content), dst_node_id=7, message_type="train"))
    _same_arrays(received.arrays, instruction.arrays)
    assert (received.server_round, received.num_rounds, received.exit_weights, received.assigned_exit) == (3, 5, (0.2, 0.8), 1)
    # The wire keys deployments already use.
    config = dict(message.content.config_records["config"])
    assert config == {"server-round": 3, "num-rounds": 5, "exit-weights": [0.2, 0.8], "assigned-exit": 1}
    assert set(message.content.array_records) == {"arrays"}


def test_a_first_round_instruction_has_no_weights_and_no_assignment():
    instruction = TrainInstruction(arrays=_adapter(), server_round=1)
    content = instruction.to_records()
    assert dict(content.config_records["config"]) == {"server-round": 1}
    received = TrainInstruction.from_records(_over_the_wire(content))
    assert (received.num_rounds, received.exit_weights, received.assigned_exit) == (None, None, None)
    # What a server of the dict era could send for "no assignment".
    content.config_records["config"]["assigned-exit"] = -1
    assert TrainInstruction.from_records(content).assigned_exit is None


def test_an_edge_train_reply_round_trips_through_flower_records():
    reply = _edge_reply()
    content = _over_the_wire(Message(reply.to_records(), dst_node_id=0, message_type="train").content)
    parsed = TrainReply.parse(content)
    _same_arrays(parsed.arrays, reply.arrays)
    assert parsed == TrainReply(**{**reply.__dict__, "arrays": parsed.arrays})
    assert parsed.metrics() == reply.metrics()
    metrics = dict(content.metric_records["metrics"])
    assert metrics["num-examples"] == 12 and metrics["lora-rank"] == 2 and metrics["window"] == 2
    assert metrics["compressed"] == 1 and metrics["votes"] == [0.25, 0.75] and metrics["layer-steps"] == [0, 4]
    assert dict(content.config_records["device"]) == {"device": "pi4-1gb"}


def test_a_plain_reply_sends_only_what_it_has():
    reply = TrainReply(arrays=_adapter(), num_examples=30, device=protocol.PLAIN_DEVICE, report={"train-loss": 3.0})
    content = reply.to_records()
    assert dict(content.metric_records["metrics"]) == {"num-examples": 30, "train-loss": 3.0}
    parsed = TrainReply.parse(_over_the_wire(content))
    assert (parsed.lora_rank, parsed.window, parsed.compressed, parsed.votes, parsed.importance, parsed.layer_steps) == (None,) * 6
    assert parsed.device == "dense (plain)" and parsed.report == {"train-loss": 3.0}


def test_evaluation_round_trips_through_flower_records():
    instruction = EvaluateInstruction(arrays=_adapter(), server_round=2)
    message = instruction.to_message(node_id=4)
    assert message.metadata.message_type == MessageType.EVALUATE
    received = EvaluateInstruction.from_records(_over_the_wire(message.content))
    _same_arrays(received.arrays, instruction.arrays)
    assert received.server_round == 2
    reply = EvaluateReply(num_examples=16, device="phone-8gb", accuracy=0.625, report={"loss": 1.25, "compressed": 1})
    parsed = EvaluateReply.parse(_over_the_wire(reply.to_records()))
    assert parsed == reply
    assert EvaluateReply.parse(EvaluateReply(num_examples=4).to_records()).accuracy is None


def test_a_report_may_not_shadow_the_protocol_keys():
    with pytest.raises(ProtocolError, match="num-examples"):
        TrainReply(arrays={}, num_examples=3, report={"num-examples": 5})
    with pytest.raises(ProtocolError, match="accuracy"):
        EvaluateReply(num_examples=3, report={"accuracy": 0.5})


# ---------------------------------------------------------------- malformed replies


def _content(metrics: dict, arrays=True, device=None) -> RecordDict:
    records = {"metrics": MetricRecord(metrics)}
    if arrays:
        records["arrays"] = ArrayRecord({LORA_A.format(0): Array(np.zeros((2, 6), np.float32))})
    if device is not None:
        records["device"] = ConfigRecord({"device": device})
    return RecordDict(records)


@pytest.mark.parametrize("content, named", [
    (_content({"num-examples": 3}, arrays=False), "'arrays'"),
    (RecordDict({"arrays": ArrayRecord({})}), "'metrics'"),
    (_content({"train-loss": 1.0}), "'num-examples'"),
])
def test_a_reply_missing_a_record_or_key_is_refused_by_name(content, named):
    with pytest.raises(ProtocolError, match=named):
        TrainReply.parse(content)


@pytest.mark.parametrize("metrics, named, value", [
    ({"num-examples": math.nan}, "'num-examples'", "nan"),
    ({"num-examples": 0}, "'num-examples'", "0"),
    ({"num-examples": -4}, "'num-examples'", "-4"),
    ({"num-examples": math.inf}, "'num-examples'", "inf"),
    ({"num-examples": 5, "lora-rank": 2.5}, "'lora-rank'", "2.5"),
    ({"num-examples": 5, "lora-rank": 0}, "'lora-rank'", "0"),
    ({"num-examples": 5, "window": -1}, "'window'", "-1"),
    ({"num-examples": 5, "compressed": 2}, "'compressed'", "2"),
    ({"num-examples": 5, "votes": 3}, "'votes'", "3"),
    ({"num-examples": 5, "votes": [0.5, -0.5]}, "'votes'", "-0.5"),
    ({"num-examples": 5, "importance": [1.0, math.nan]}, "'importance'", "nan"),
    ({"num-examples": 5, "layer-steps": [1, -2]}, "'layer-steps'", "-2"),
])
def test_a_reply_value_of_the_wrong_type_or_range_is_refused_with_key_and_value(metrics, named, value):
    with pytest.raises(ProtocolError, match=named) as caught:
        TrainReply.parse(_content(metrics))
    assert value in str(caught.value)


def test_a_record_of_the_wrong_kind_or_a_device_name_that_is_no_string_is_refused():
    wrong_kind = RecordDict({"arrays": MetricRecord({"x": 1}), "metrics": MetricRecord({"num-examples": 3})})
    with pytest.raises(ProtocolError, match="'arrays' is a MetricRecord, expected ArrayRecord"):
        TrainReply.parse(wrong_kind)
    with pytest.raises(ProtocolError, match="'device' = 5"):
        TrainReply.parse(_content({"num-examples": 3}, device=5))
    assert protocol.device_of(_content({"num-examples": 0}, device="pi4-1gb")) == "pi4-1gb"  # even a rejected reply names it
    with pytest.raises(ProtocolError, match="'num-examples' = nan"):
        EvaluateReply.parse(RecordDict({"metrics": MetricRecord({"num-examples": math.nan})}))
    with pytest.raises(ProtocolError, match="'server-round'"):
        TrainInstruction.from_records(RecordDict({"arrays": ArrayRecord({}), "config": ConfigRecord({})}))


# ---------------------------------------------------------------- a reply against the round


def test_a_reply_is_checked_against_what_the_round_expects():
    global_arrays = _adapter(rank=4)
    expected = Expectation(global_arrays=global_arrays, max_update_norm=1e6, exits=2, layers=2)
    reply = _edge_reply(arrays=wire.truncate_rank(global_arrays, 2))
    assert reply.problems(expected) == []
    assert "3 exit votes for 2 exits" in _edge_reply(votes=(0.1, 0.2, 0.7)).problems(expected)[0]
    assert "importance for 3 decoder layers" in _edge_reply(importance=(1.0, 1.0, 1.0)).problems(expected)[0]
    assert "layer steps for 3 decoder layers" in _edge_reply(layer_steps=(1, 1, 1)).problems(expected)[0]
    assigned = Expectation(global_arrays=global_arrays, max_update_norm=1e6, exits=2, layers=2, window=1,
                           allowed={LORA_A.format(1), LORA_B.format(1), "exit.1.down", "exit.1.up"})
    assert "window of 2 layers, but 1 was declared and assigned" in reply.problems(assigned)[0]
    one_layer = _edge_reply(window=1, arrays=wire.truncate_rank(global_arrays, 2))
    assert any("not assigned this round" in p for p in one_layer.problems(assigned))
    # A reply without a rank is read at the global rank: a rank-2 update then has the wrong shape.
    assert "shape" in _edge_reply(lora_rank=None, arrays=wire.truncate_rank(global_arrays, 2)).problems(expected)[0]
