"""FedAvg over adapter tensors, with every client update validated before it counts."""

from __future__ import annotations

import logging
from typing import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from client.records import from_record
from edgecore import wire

log = logging.getLogger(__name__)


class ValidatedFedAvg(FedAvg):
    """FedAvg (weighted by num-examples) that first drops malformed or outlying updates.

    An update is checked against the global adapter sent that round (keys, shapes, fp32,
    finite values, distance from the global adapter); a bad one is logged with the client's
    node id and reason and left out, and the round goes on with the others. What each client
    reported, and what was dropped, is kept per round for the run folder.
    """

    def __init__(self, *, max_update_norm: float, keep_updates: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.max_update_norm = max_update_norm
        self.keep_updates = keep_updates
        self.round_updates: dict[int, dict[int, dict]] = {}  # round -> node -> arrays, when kept
        self.global_arrays: dict = {}
        self.round_clients: dict[int, list[dict]] = {}
        self.round_dropped: dict[int, list[dict]] = {}

    def configure_train(self, server_round, arrays: ArrayRecord, config, grid):
        self.global_arrays = from_record(arrays)  # the reference every update is checked against
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept, clients, dropped = [], [], []
        for reply in replies:
            node = reply.metadata.src_node_id
            reasons = [f"client error: {reply.error.reason}"] if reply.has_error() else self.problems(reply.content)
            if reasons:
                log.warning("round %d: dropped the update of node %d: %s", server_round, node, "; ".join(reasons))
                dropped.append({"node_id": node, "reason": "; ".join(reasons)})
                continue
            kept.append(reply)
            clients.append({"node_id": node, **dict(reply.content["metrics"])})
            if self.keep_updates:
                self.round_updates.setdefault(server_round, {})[node] = from_record(reply.content["arrays"])
        self.round_clients[server_round] = clients
        self.round_dropped[server_round] = dropped
        if not kept:
            log.warning("round %d: no valid update; the global adapter stays as it was", server_round)
            return None, None
        return super().aggregate_train(server_round, kept)

    def problems(self, content: RecordDict) -> list[str]:
        """Why a reply's content must not count this round (empty when it is fine)."""
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            return ["reply lacks its 'arrays' or 'metrics' record"]
        examples = content["metrics"].get(self.weighted_by_key)
        if not isinstance(examples, (int, float)) or examples <= 0:
            return [f"metric {self.weighted_by_key!r} is {examples!r}, expected a positive number"]
        return wire.update_problems(from_record(content["arrays"]), self.global_arrays, self.max_update_norm)
