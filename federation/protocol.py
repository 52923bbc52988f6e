"""The messages between the server and a client, with their Flower record keys defined once.

Each round the server sends a client a `TrainInstruction` (the global adapter cut to the
client's rank, the round, the global exit weights, the exit whose window to train) and the
client answers with a `TrainReply` (the tensors that trained, its number of examples, exit
votes, layer importance and per-layer steps, its device, and what it measured). Evaluation is
the same pair: `EvaluateInstruction` (the global adapter) and `EvaluateReply`.

On the wire a message is a Flower RecordDict; its records and keys are the constants below,
the strings deployments have always used, so older and newer sides interoperate:

    train instruction     "arrays": ArrayRecord, "config": ConfigRecord {server-round,
                          num-rounds, exit-weights, assigned-exit}
    train reply           "arrays": ArrayRecord, "metrics": MetricRecord {num-examples,
                          lora-rank, window, compressed, votes, importance, layer-steps, and
                          the report}, "device": ConfigRecord {device}
    evaluate instruction  "arrays", "config" {server-round}
    evaluate reply        "metrics" {num-examples, accuracy, and the report}, "device" {device}

The node config (NODE_*) is what a device's SuperNode is started with, between `python -m
client` and the ClientApp.

A reply is parsed in one place, `TrainReply.parse` / `EvaluateReply.parse`: a missing record, a
value of the wrong type or out of range raises `ProtocolError` naming the key and the value.
What can only be judged against the round (the tensors against the global adapter, the window
against the assignment, the votes against the exits) is `TrainReply.problems(Expectation)`,
which calls `federation.validation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from edgecore import wire
from edgecore.errors import EdgecoreError
from federation.privacy import DpSettings, mode_problem
from federation.records import from_record, to_metrics, to_record
from federation.validation import (
    device_name, finite_number, flag, fraction, nonnegative_list, nonnegative_number, positive_integer, positive_number, report_problems,
    step_counts, update_distance, update_problems,
)

# The records of a message.
ARRAYS = "arrays"  # ArrayRecord: adapter tensors (edgecore.wire names)
CONFIG = "config"  # ConfigRecord: an instruction's settings
METRICS = "metrics"  # MetricRecord: a reply's numbers
DEVICE = "device"  # ConfigRecord: the device a reply comes from

# An instruction's config keys.
SERVER_ROUND = "server-round"
NUM_ROUNDS = "num-rounds"
EXIT_WEIGHTS = "exit-weights"
ASSIGNED_EXIT = "assigned-exit"
# Client-level differential privacy (federation.privacy.DpSettings); absent or "off": none.
DP_MODE = "dp-mode"
DP_CLIP_NORM = "dp-clip-norm"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"

# A reply's metric keys that the server reads (every other metric is the client's report).
NUM_EXAMPLES = "num-examples"
LORA_RANK = "lora-rank"
WINDOW = "window"
COMPRESSED = "compressed"
VOTES = "votes"
IMPORTANCE = "importance"
LAYER_STEPS = "layer-steps"
ACCURACY = "accuracy"

# Report keys the server reads (what it sums, and holds against the device's budget); the rest
# of a report is recorded as it arrives.
BYTES_UP = "bytes-up"
BYTES_DOWN = "bytes-down"
JOB_PEAK_MB = "job-peak-mb"  # the job's measured peak: the stored base plus what training added
BUDGET_MB = "budget-mb"  # the device's memory budget for the job
PARTITION_ID = "partition-id"

DEVICE_NAME = "device"  # the key of the device record's one entry: the device profile's name
PLAIN_DEVICE = "dense (plain)"  # the device a client of the plain pipeline names

# The node config a SuperNode is started with: `python -m client` writes it (--node-config), the
# ClientApp reads it; Flower's simulation sets only the partition keys.
NODE_DATA = "data"
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_PARTITION = "partition"
NODE_DEVICE_PROFILE = "device-profile"
NODE_MODEL = "model"
NODE_LORA_RANK = "lora-rank"

Report = Mapping[str, int | float | list]


class ProtocolError(EdgecoreError):
    """A message that does not follow the protocol; says which record or key, and its value."""


# --- Reading records ----------------------------------------------------------------------


def _record(content: RecordDict, name: str, kind: type, what: str):
    records = {ArrayRecord: content.array_records, MetricRecord: content.metric_records,
               ConfigRecord: content.config_records}[kind]
    if name in records:
        return records[name]
    if name in content:
        raise ProtocolError(f"{what}: record {name!r} is a {type(content[name]).__name__}, expected {kind.__name__}")
    raise ProtocolError(f"{what} lacks its {name!r} record ({kind.__name__})")


def _checked(values: Mapping, key: str, check: Callable[[object], str], what: str, required: bool = False):
    """values[key] after `check` (None when absent and not required); a ProtocolError names the key and value."""
    if key not in values:
        if required:
            raise ProtocolError(f"{what} lacks {key!r}; it has {sorted(values)}")
        return None
    value = values[key]
    problem = check(value)
    if problem:
        raise ProtocolError(f"{what} {key!r} = {value!r}: {problem}")
    return value


def device_of(content: RecordDict) -> str:
    """The device profile a message names ("" when it names none or a bad name); lenient, for the
    records of a reply that may be rejected. `TrainReply.parse` reads the same record strictly."""
    if DEVICE not in content.config_records:
        return ""
    name = dict(content.config_records[DEVICE]).get(DEVICE_NAME, "")
    return "" if device_name(name) else name


def _device(content: RecordDict, what: str) -> str:
    if DEVICE not in content:
        return ""
    record = _record(content, DEVICE, ConfigRecord, what)
    name = record.get(DEVICE_NAME, "")
    if device_name(name):
        raise ProtocolError(f"{what} device record {DEVICE_NAME!r} = {repr(name)[:80]}: {device_name(name)}")
    return name


def _arrays(content: RecordDict, what: str) -> wire.Arrays:
    """The arrays record as numpy arrays; an array that does not decode is named."""
    record = _record(content, ARRAYS, ArrayRecord, what)
    arrays = {}
    for name in record:
        try:
            arrays[name] = record[name].numpy()
        except Exception as err:  # anything the bytes make numpy raise: they come from a remote device
            raise ProtocolError(f"{what} tensor {str(name)[:200]!r} could not be decoded as a numpy array "
                                f"({type(err).__name__}: {str(err)[:200]})") from None
    return arrays


def _report(values: Mapping, keys: tuple[str, ...], what: str) -> dict:
    """A reply's metrics other than the protocol's `keys`: its report, checked before anything records it."""
    report = {k: v for k, v in values.items() if k not in keys}
    problems = report_problems(report)
    if problems:
        raise ProtocolError(f"{what} report: {'; '.join(problems[:3])}")
    return report


def _reply_records(device: str, metrics: dict, records: dict | None = None) -> RecordDict:
    """A reply's records: `records`, its metrics and, when it names one, its device."""
    content = {**(records or {}), METRICS: to_metrics(metrics)}
    if device:
        content[DEVICE] = ConfigRecord({DEVICE_NAME: device})
    return RecordDict(content)


def _without(report: Report, keys: tuple[str, ...], what: str) -> None:
    clash = sorted(set(report) & set(keys))
    if clash:
        raise ProtocolError(f"{what}: the report may not hold the protocol's own keys {clash}; give them as fields")


# --- Train --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainInstruction:
    """What the server sends a client to train on this round."""

    arrays: wire.Arrays  # the global LoRA and exit adapters, cut to the client's rank
    server_round: int
    num_rounds: int | None = None
    exit_weights: tuple[float, ...] | None = None  # the global exit weights; None before the first votes
    assigned_exit: int | None = None  # the exit whose window to train; None: the client's adaptive choice
    dp: DpSettings | None = None  # clip (and in local mode noise) the update before replying; None: as it is

    def to_records(self) -> RecordDict:
        config: dict = {SERVER_ROUND: int(self.server_round)}
        if self.num_rounds is not None:
            config[NUM_ROUNDS] = int(self.num_rounds)
        if self.exit_weights is not None:
            config[EXIT_WEIGHTS] = [float(w) for w in self.exit_weights]
        if self.assigned_exit is not None:
            config[ASSIGNED_EXIT] = int(self.assigned_exit)
        if self.dp is not None:
            config.update({DP_MODE: self.dp.mode, DP_CLIP_NORM: float(self.dp.clip_norm),
                           DP_NOISE_MULTIPLIER: float(self.dp.noise_multiplier)})
        return RecordDict({ARRAYS: to_record(self.arrays), CONFIG: ConfigRecord(config)})

    def to_message(self, node_id: int) -> Message:
        return Message(content=self.to_records(), message_type=MessageType.TRAIN, dst_node_id=node_id)

    @classmethod
    def from_records(cls, content: RecordDict) -> "TrainInstruction":
        what = "train instruction"
        arrays = from_record(_record(content, ARRAYS, ArrayRecord, what))
        config = _record(content, CONFIG, ConfigRecord, what)
        server_round = _checked(config, SERVER_ROUND, positive_integer, f"{what} config", required=True)
        num_rounds = _checked(config, NUM_ROUNDS, positive_integer, f"{what} config")
        weights = _checked(config, EXIT_WEIGHTS, nonnegative_list, f"{what} config")
        exit_layer = _checked(config, ASSIGNED_EXIT, finite_number, f"{what} config")
        return cls(
            arrays=arrays, server_round=int(server_round), num_rounds=int(num_rounds) if num_rounds is not None else None,
            exit_weights=tuple(float(w) for w in weights) if weights else None,
            assigned_exit=int(exit_layer) if exit_layer is not None and exit_layer >= 0 else None,
            dp=cls._dp(config, f"{what} config"),
        )

    @staticmethod
    def _dp(config: Mapping, what: str) -> DpSettings | None:
        """The privacy settings: none without dp-mode or with "off"; else the clip norm and noise multiplier too."""
        mode = _checked(config, DP_MODE, mode_problem, what)
        if mode is None or mode == "off":
            return None
        clip = _checked(config, DP_CLIP_NORM, positive_number, what, required=True)
        noise = _checked(config, DP_NOISE_MULTIPLIER, nonnegative_number, what, required=True)
        try:
            return DpSettings(mode, float(clip), float(noise))
        except EdgecoreError as err:
            raise ProtocolError(f"{what}: {err}") from None

    @classmethod
    def from_message(cls, message: Message) -> "TrainInstruction":
        return cls.from_records(message.content)


@dataclass(frozen=True)
class Expectation:
    """What the server expects of one client's train reply this round."""

    global_arrays: wire.Arrays
    max_update_norm: float  # the largest L2 distance of an update from the global adapter
    exits: int = 0  # how many exit votes a voting reply carries
    layers: int | None = None  # decoder layers: an importance vector's length, the most layer-steps entries
    window: int | None = None  # the window depth the client declared and was assigned; None: not assigned
    allowed: set[str] | None = None  # the tensors of its assigned window; None: any global tensor


@dataclass(frozen=True)
class TrainReply:
    """What a client sends back after training: the tensors that trained and what the server learns from it.

    Optional fields are None when the client does not send them (a client of the plain pipeline
    sends no rank, window, votes, importance or layer steps: its update is every tensor at the
    global rank). `report` is everything else it measured (losses, timings, memory, bytes), kept
    in the run folder as it arrives.
    """

    arrays: wire.Arrays
    num_examples: int | float  # the update's weight in every average
    device: str = ""  # the device profile's name ("" when none is named)
    lora_rank: int | None = None  # the rank it trained at; None: the global rank
    window: int | None = None  # its tuning window's depth in decoder layers
    compressed: bool | None = None  # whether its base is compressed (it then also evaluates on its own base)
    votes: tuple[float, ...] | None = None  # one per exit: how much each exit should count
    importance: tuple[float, ...] | None = None  # one per decoder layer: how far its LoRA update moved
    layer_steps: tuple[int, ...] | None = None  # per decoder layer: the steps that trained it
    report: Report = field(default_factory=dict)

    KEYS = (NUM_EXAMPLES, LORA_RANK, WINDOW, COMPRESSED, VOTES, IMPORTANCE, LAYER_STEPS)

    def __post_init__(self):
        _without(self.report, self.KEYS, "train reply")

    def metrics(self) -> dict:
        """The reply's metrics record as plain values: what the run folder records of a client."""
        values = {NUM_EXAMPLES: self.num_examples, **self.report}
        optional = {LORA_RANK: self.lora_rank, WINDOW: self.window,
                    COMPRESSED: None if self.compressed is None else int(self.compressed),
                    VOTES: self.votes, IMPORTANCE: self.importance, LAYER_STEPS: self.layer_steps}
        values.update({k: list(v) if isinstance(v, tuple) else v for k, v in optional.items() if v is not None})
        return values

    def to_records(self) -> RecordDict:
        return _reply_records(self.device, self.metrics(), {ARRAYS: to_record(self.arrays)})

    @classmethod
    def parse(cls, content: RecordDict) -> "TrainReply":
        """The reply in `content`, every value checked; ProtocolError names the first bad record or key."""
        what = "train reply"
        arrays = _arrays(content, what)
        values = dict(_record(content, METRICS, MetricRecord, what))
        metric = f"{what} metric"

        def vector(key):
            value = _checked(values, key, nonnegative_list, metric)
            return None if value is None else tuple(value)

        rank = _checked(values, LORA_RANK, positive_integer, metric)
        window = _checked(values, WINDOW, positive_integer, metric)
        compressed = _checked(values, COMPRESSED, flag, metric)
        steps = _checked(values, LAYER_STEPS, step_counts, metric)
        return cls(
            arrays=arrays,
            num_examples=_checked(values, NUM_EXAMPLES, positive_number, metric, required=True),
            device=_device(content, what),
            lora_rank=None if rank is None else int(rank),
            window=None if window is None else int(window),
            compressed=None if compressed is None else bool(compressed),
            votes=vector(VOTES), importance=vector(IMPORTANCE),
            layer_steps=None if steps is None else tuple(int(s) for s in steps),
            report=_report(values, cls.KEYS, what),
        )

    def problems(self, expected: Expectation) -> list[str]:
        """Why this reply must not count this round (empty when it is fine): its window, votes, importance
        and layer steps against the round, then its tensors (`federation.validation.update_problems`)."""
        if expected.window is not None and self.window != expected.window:
            return [f"window of {self.window or 0} layers, but {expected.window} was declared and assigned"]
        if expected.layers is not None and self.window is not None and self.window > expected.layers:
            return [f"window of {self.window} layers, but the model has {expected.layers}"]
        if self.votes is not None and len(self.votes) != expected.exits:
            return [f"{len(self.votes)} exit votes for {expected.exits} exits"]
        if expected.layers is not None and self.importance and len(self.importance) != expected.layers:
            return [f"importance for {len(self.importance)} decoder layers, but the model has {expected.layers}"]
        if expected.layers is not None and self.layer_steps and len(self.layer_steps) > expected.layers:
            return [f"layer steps for {len(self.layer_steps)} decoder layers, but the model has {expected.layers}"]
        return update_problems(self.arrays, expected.global_arrays, allowed=expected.allowed,
                               rank=self.rank_in(expected.global_arrays), max_delta_norm=expected.max_update_norm)

    def rank_in(self, global_arrays: wire.Arrays) -> int:
        """The rank its tensors are at: the declared one, else the global adapter's."""
        return self.lora_rank or max((v.shape[wire.rank_axis(k)] for k, v in global_arrays.items()), default=0)

    def change(self, global_arrays: wire.Arrays) -> tuple[float, float]:
        """Its change to the global adapter (for a reply without problems): the L2 norm over every element
        sent, and the root mean square per element (comparable between deep and shallow windows)."""
        distance, elements = update_distance(self.arrays, global_arrays, self.rank_in(global_arrays))
        return distance, distance / math.sqrt(elements) if elements else 0.0


# --- Evaluate -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluateInstruction:
    """What the server sends a client to evaluate: the global adapter, on the client's own base."""

    arrays: wire.Arrays
    server_round: int

    def to_records(self) -> RecordDict:
        return RecordDict({ARRAYS: to_record(self.arrays), CONFIG: ConfigRecord({SERVER_ROUND: int(self.server_round)})})

    def to_message(self, node_id: int) -> Message:
        return Message(content=self.to_records(), message_type=MessageType.EVALUATE, dst_node_id=node_id)

    @classmethod
    def from_records(cls, content: RecordDict) -> "EvaluateInstruction":
        what = "evaluate instruction"
        arrays = from_record(_record(content, ARRAYS, ArrayRecord, what))
        config = _record(content, CONFIG, ConfigRecord, what)
        return cls(arrays, int(_checked(config, SERVER_ROUND, positive_integer, f"{what} config", required=True)))

    @classmethod
    def from_message(cls, message: Message) -> "EvaluateInstruction":
        return cls.from_records(message.content)


@dataclass(frozen=True)
class EvaluateReply:
    """What a client's evaluation of the global adapter on its own base says."""

    num_examples: int | float  # its test samples: the reply's weight in the fleet's accuracy
    device: str = ""
    accuracy: float | None = None  # None when the data set has no choices to score
    report: Report = field(default_factory=dict)  # loss, perplexity, its base's size, ...

    KEYS = (NUM_EXAMPLES, ACCURACY)

    def __post_init__(self):
        _without(self.report, self.KEYS, "evaluate reply")

    def metrics(self) -> dict:
        """The reply's metrics record as plain values: what the run folder records of a device."""
        values = {NUM_EXAMPLES: self.num_examples, **self.report}
        if self.accuracy is not None:
            values[ACCURACY] = self.accuracy
        return values

    def to_records(self) -> RecordDict:
        return _reply_records(self.device, self.metrics())

    @classmethod
    def parse(cls, content: RecordDict) -> "EvaluateReply":
        """The reply in `content`, every value checked; ProtocolError names the first bad record or key."""
        what = "evaluate reply"
        values = dict(_record(content, METRICS, MetricRecord, what))
        accuracy = _checked(values, ACCURACY, fraction, f"{what} metric")
        return cls(
            num_examples=_checked(values, NUM_EXAMPLES, positive_number, f"{what} metric", required=True),
            device=_device(content, what),
            accuracy=None if accuracy is None else float(accuracy),
            report=_report(values, cls.KEYS, what),
        )
