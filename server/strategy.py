"""FedAvg over adapter tensors, with every client update validated before it counts."""

from __future__ import annotations

import logging
from typing import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
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

    def __init__(self, *, max_update_norm: float, **kwargs):
        super().__init__(**kwargs)
        self.max_update_norm = max_update_norm
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
            if reply.has_error():
                dropped.append({"node_id": node, "reason": f"client error: {reply.error.reason}"})
                continue
            reasons = self._problems(reply)
            if reasons:
                log.warning("round %d: dropped the update of node %d: %s", server_round, node, "; ".join(reasons))
                dropped.append({"node_id": node, "reason": "; ".join(reasons)})
                continue
            kept.append(reply)
            clients.append({"node_id": node, **dict(reply.content["metrics"])})
        self.round_clients[server_round] = clients
        self.round_dropped[server_round] = dropped
        if not kept:
            log.warning("round %d: no valid update; the global adapter stays as it was", server_round)
            return None, None
        return super().aggregate_train(server_round, kept)

    def _problems(self, reply: Message) -> list[str]:
        content = reply.content
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            return ["reply lacks its 'arrays' or 'metrics' record"]
        examples = content["metrics"].get(self.weighted_by_key)
        if not isinstance(examples, (int, float)) or examples <= 0:
            return [f"metric {self.weighted_by_key!r} is {examples!r}, expected a positive number"]
        return wire.update_problems(from_record(content["arrays"]), self.global_arrays, self.max_update_norm)
