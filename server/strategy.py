"""The server's strategy for a heterogeneous fleet: partial, rank-aware aggregation, exit votes, window assignment.

Per round:
  configure_train: each client gets the global adapter cut to its rank (learnt from its last
      reply; the whole adapter before that), the global exit weights, and, once the server
      knows its window depth, the exit whose window it trains (LayerLedger.assign_windows:
      the fleet covers the least-trained, most important layers first, deep windows going
      to the devices that can afford them);
  aggregate_train: every update is checked (server.aggregation.update_problems: only the
      tensors of its assigned window, at its declared rank, finite, not too far from the
      global); every sampled client whose update was not accepted is recorded with why: an
      error reply (its ClientApp raised, or the SuperLink could not reach it), a rejected
      update, or no reply at all; the accepted ones are averaged tensor by tensor over the
      clients that sent them (partial_average), then the server optimizer (FedAvg / FedProx /
      FedAdam) steps;
      the votes become next round's global exit weights and the layer importance and the
      trained layers go into the ledger;
  configure/aggregate_evaluate: every client with a compressed base scores the new global
      adapter on it (the dense base is the server's own evaluation), so the run folder shows
      what the adapter does on each device.
Clients of the plain pipeline send every LoRA tensor at the global rank and no votes; they
are averaged the same way, which is then exactly FedAvg.
"""

from __future__ import annotations

import logging
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from federation.records import from_record, to_record
from edgecore import wire
from server import aggregation

log = logging.getLogger(__name__)


class FleetStrategy(FedAvg):
    """FedAvg's sampling and round loop with the aggregation of the module docstring.

    What each client reported, and which sampled clients did not contribute and why, is kept per
    round for the run folder; with keep_updates, every accepted update too.
    """

    def __init__(self, *, exits: tuple[int, ...], layers: int, optimizer: aggregation.ServerOptimizer,
                 max_update_norm: float, keep_updates: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.max_update_norm = max_update_norm
        self.keep_updates = keep_updates
        self.global_arrays: dict = {}
        self.round_updates: dict[int, dict[int, dict]] = {}  # round -> node -> arrays, when kept
        self.round_clients: dict[int, list[dict]] = {}
        self.round_dropped: dict[int, list[dict]] = {}  # round -> node_id, device, cause, reason of each non-contributor
        self.round_sampled: dict[int, list[int]] = {}  # round -> the nodes sent a train instruction
        self.sent: list[Message] = []  # this round's train instructions; the grid gives each its message id
        self.node_devices: dict[int, str] = {}  # node -> the device profile any of its replies named
        self.exits = tuple(exits)
        self.ledger = aggregation.LayerLedger(layers)
        self.optimizer = optimizer
        self.exit_weights: list[float] | None = None
        self.nodes: dict[int, dict] = {}  # node -> what its last reply declared: rank, window, device
        self.assigned: dict[int, int] = {}  # node -> exit assigned this round
        self.round_assignments: dict[int, dict[int, int]] = {}
        self.round_devices: dict[int, list[dict]] = {}  # round -> each client's evaluation on its own base

    # ------------------------------------------------------------------ train

    def configure_train(self, server_round, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        self.global_arrays = from_record(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        known = {m.metadata.dst_node_id: self.nodes[m.metadata.dst_node_id]["window"] for m in messages
                 if self.nodes.get(m.metadata.dst_node_id, {}).get("window")}
        self.assigned = self.ledger.assign_windows(known, self.exits, self.exit_weights) if known and self.exits else {}
        self.round_assignments[server_round] = dict(self.assigned)
        self.sent = [self._train_message(m.metadata.dst_node_id, config, server_round) for m in messages]
        self.round_sampled[server_round] = [m.metadata.dst_node_id for m in self.sent]
        return self.sent

    def _train_message(self, node: int, config: ConfigRecord, server_round: int) -> Message:
        values = {**dict(config), "server-round": server_round}
        if self.exit_weights is not None:
            values["exit-weights"] = list(self.exit_weights)
        if node in self.assigned:
            values["assigned-exit"] = self.assigned[node]
        rank = self.nodes.get(node, {}).get("rank")
        arrays = wire.truncate_rank(self.global_arrays, rank) if rank else self.global_arrays
        content = RecordDict({"arrays": to_record(arrays), "config": ConfigRecord(values)})
        return Message(content=content, message_type="train", dst_node_id=node)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        # The SuperLink answers for a node it could not reach under its own node id (1), so a reply
        # is matched to the instruction it answers; replies to no instruction (a strategy driven
        # without configure_train) name their node themselves.
        owner = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent if m.metadata.message_id}
        self.sent = []
        sampled = self.round_sampled.setdefault(server_round, [r.metadata.src_node_id for r in replies])
        accepted, clients, dropped, answered = [], [], [], set()
        for reply in replies:
            node = owner.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if node not in sampled or node in answered:
                log.warning("round %d: ignored a reply from node %d: not sampled, or a second reply", server_round, node)
                continue
            answered.add(node)
            device = "" if reply.has_error() else _device(reply.content)
            if device:
                self.node_devices[node] = device
            if reply.has_error():
                cause, reasons = "error", [f"client error: {_last_line(reply.error.reason)}"]
            else:
                cause, reasons = "rejected", self.problems_of(node, reply.content)
            if reasons:
                log.warning("round %d: no update from node %d (%s): %s", server_round, node, cause, "; ".join(reasons))
                dropped.append({"node_id": node, "device": self.node_devices.get(node, ""), "cause": cause,
                                "reason": "; ".join(reasons)})
                continue
            metrics = dict(reply.content["metrics"])
            update = from_record(reply.content["arrays"])
            accepted.append((update, metrics))
            clients.append({"node_id": node, "device": device, "assigned_exit": self.assigned.get(node), **metrics})
            self.nodes[node] = {"rank": int(metrics.get("lora-rank", 0)) or None, "window": int(metrics.get("window", 0)) or None,
                                "device": device, "compressed": bool(metrics.get("compressed", 0))}
            if self.keep_updates:
                self.round_updates.setdefault(server_round, {})[node] = update
        for node in sampled:
            if node not in answered:
                log.warning("round %d: node %d sent no reply", server_round, node)
                dropped.append({"node_id": node, "device": self.node_devices.get(node, ""), "cause": "no-reply",
                                "reason": "no reply before the round's timeout"})
        self.round_clients[server_round] = clients
        self.round_dropped[server_round] = dropped
        if not accepted:
            log.warning("round %d: no valid update; the global adapter stays as it was", server_round)
            return None, None
        averaged, contributors = aggregation.partial_average(
            self.global_arrays, [(update, float(m["num-examples"])) for update, m in accepted])
        new_global = self.optimizer.step(self.global_arrays, averaged, contributors)
        self._learn_from_votes(accepted)
        trained = sum(1 for n in contributors.values() if n)
        log.info("round %d: %d updates, %d of %d tensors trained", server_round, len(accepted), trained, len(contributors))
        return to_record(new_global), MetricRecord({"clients": len(accepted), "tensors-trained": trained})

    def problems_of(self, node: int, content: RecordDict) -> list[str]:
        """Why a reply must not count (empty when it is fine); see the module docstring."""
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            return ["reply lacks its 'arrays' or 'metrics' record"]
        metrics = content["metrics"]
        examples = metrics.get(self.weighted_by_key)
        if not isinstance(examples, (int, float)) or examples <= 0:
            return [f"metric {self.weighted_by_key!r} is {examples!r}, expected a positive number"]
        global_rank = max((v.shape[wire.rank_axis(k)] for k, v in self.global_arrays.items()), default=0)
        rank = int(metrics.get("lora-rank", global_rank))
        allowed = None
        if node in self.assigned:
            exit_layer, depth = self.assigned[node], int(metrics.get("window", 0))
            if depth != self.nodes[node]["window"]:
                return [f"window of {depth} layers, but {self.nodes[node]['window']} was declared and assigned"]
            first, last = self.ledger.window(exit_layer, depth)
            allowed = aggregation.tensors_of_window(self.global_arrays, first, last, exit_layer)
        votes = metrics.get("votes")
        if votes is not None and len(votes) != len(self.exits):
            return [f"{len(votes)} exit votes for {len(self.exits)} exits"]
        return aggregation.update_problems(from_record(content["arrays"]), self.global_arrays, allowed=allowed, rank=rank,
                                           max_delta_norm=self.max_update_norm)

    def _learn_from_votes(self, accepted: list[tuple[dict, dict]]) -> None:
        voters = [(m["votes"], float(m["num-examples"])) for _, m in accepted if m.get("votes")]
        if voters:
            self.exit_weights = aggregation.global_exit_weights(voters, len(self.exits))
        important = [(m["importance"], float(m["num-examples"])) for _, m in accepted if m.get("importance")]
        if important:
            self.ledger.record_importance(important)
        for _, m in accepted:
            for layer, steps in enumerate(m.get("layer-steps") or []):
                if steps:
                    self.ledger.record_training(layer, layer, steps)

    # ------------------------------------------------------------------ evaluate

    def configure_evaluate(self, server_round, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        """Only clients with a compressed base: a dense base is what the server evaluates itself."""
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        return [m for m in messages if self.nodes.get(m.metadata.dst_node_id, {}).get("compressed", True)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        results = []
        for reply in replies:
            if reply.has_error():
                log.warning("round %d: node %d could not evaluate: %s", server_round, reply.metadata.src_node_id,
                            _last_line(reply.error.reason))
                continue
            device = _device(reply.content)
            if device:
                self.node_devices[reply.metadata.src_node_id] = device
            results.append({"node_id": reply.metadata.src_node_id, "device": device, **dict(reply.content["metrics"])})
        self.round_devices[server_round] = results
        for failure in self.round_dropped.get(server_round, []):  # a client that failed to train may still evaluate
            failure["device"] = failure["device"] or self.node_devices.get(failure["node_id"], "")
        if not results:
            return None
        total = sum(r["num-examples"] for r in results)
        return MetricRecord({"accuracy": sum(r.get("accuracy", 0.0) * r["num-examples"] for r in results) / total})


def _device(content: RecordDict) -> str:
    """The device profile a reply names ("" when it names none)."""
    return str(dict(content["device"]).get("device", "")) if "device" in content.config_records else ""


def _last_line(reason: str) -> str:
    """A client's exception arrives with the whole remote traceback; its last line says what went wrong."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    return lines[-1][:500] if lines else str(reason)
