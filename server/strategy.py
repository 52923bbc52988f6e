"""The server's strategy for a heterogeneous fleet: partial, rank-aware aggregation, exit votes, window assignment.

Per round:
  configure_train: each client gets the global adapter cut to its rank (learnt from its last
      reply; the whole adapter before that), the global exit weights, and, once the server
      knows its window depth, the exit whose window it trains (LayerLedger.assign_windows:
      the fleet covers the least-trained, most important layers first, deep windows going
      to the devices that can afford them);
  aggregate_train: every reply is parsed and checked in one place (federation.protocol:
      TrainReply.parse, then TrainReply.problems: only the tensors of its assigned window, at
      its declared rank, finite, not too far from the global); then against the round
      (server.robust): an update far beyond the round's median change is dropped, and a
      claimed example count buys at most a multiple of the median claim. Every sampled client
      whose update was not accepted is recorded with why: an error reply (its ClientApp
      raised, or the SuperLink could not reach it), a rejected update, or no reply at all.
      The accepted ones are averaged element by element over the clients that hold each
      element (partial_average; or the coordinate-wise median or trimmed mean), then the
      server optimizer (FedAvg / FedProx / FedAdam) steps;
      the votes become next round's global exit weights and the layer importance and the
      trained layers go into the ledger;
  configure/aggregate_evaluate: every client with a compressed base scores the new global
      adapter on it (the dense base is the server's own evaluation), so the run folder shows
      what the adapter does on each device.
Clients of the plain pipeline send every LoRA tensor at the global rank and no votes; they
are averaged the same way, which is then exactly FedAvg. Every message is a federation.protocol
dataclass; no record key is spelled here. Nothing a reply holds can raise out of the strategy,
and a client's record in the run folder keeps the server's own fields (node_id, device, weight)
whatever the client reports.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import NamedTuple

import numpy as np
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from federation import protocol
from federation.protocol import EvaluateInstruction, EvaluateReply, Expectation, ProtocolError, TrainInstruction, TrainReply
from federation.records import from_record, to_record
from edgecore import wire
from edgecore.errors import EdgecoreError
from edgecore.experiment import AVERAGES
from federation.validation import tensors_of_window
from federation.privacy import DpSettings, noisy_norm_limit
from server import aggregation, robust
from server.privacy import PrivacyLedger, private_average

log = logging.getLogger(__name__)


class Screened(NamedTuple):
    """A reply that passed the protocol's checks, with its change to the global adapter."""

    node: int
    device: str
    reply: TrainReply
    norm: float  # L2 over every element sent
    rms: float  # per element: comparable between deep and shallow windows


class FleetStrategy(FedAvg):
    """FedAvg's sampling and round loop with the aggregation of the module docstring.

    What each client reported, and which sampled clients did not contribute and why, is kept per
    round for the run folder; with keep_updates, every accepted update too.
    """

    def __init__(self, *, exits: tuple[int, ...], layers: int, optimizer: aggregation.ServerOptimizer,
                 max_update_norm: float, max_update_norm_ratio: float = 5.0, max_weight_ratio: float = 3.0,
                 average: str = "weighted-mean", trim_fraction: float = 0.2, keep_updates: bool = False,
                 privacy: DpSettings | None = None, privacy_ledger: PrivacyLedger | None = None, **kwargs):
        super().__init__(weighted_by_key=protocol.NUM_EXAMPLES, arrayrecord_key=protocol.ARRAYS,
                         configrecord_key=protocol.CONFIG, **kwargs)
        if average not in AVERAGES:
            raise EdgecoreError(f"average = {average!r}; use one of {', '.join(AVERAGES)}")
        self.max_update_norm = max_update_norm
        self.max_update_norm_ratio = max_update_norm_ratio  # server.robust.outliers; 0 = off
        self.max_weight_ratio = max_weight_ratio  # server.robust.bounded_weights; 0 = off
        self.average, self.trim_fraction = average, trim_fraction
        # Client-level DP (server.privacy): every instruction carries the settings; in central mode the
        # clip replaces the median-relative rules (a rule coupling clients has no bounded sensitivity)
        # and the noisy equal-weight average replaces the weighted one. The noise is drawn from the
        # operating system's entropy, never from the run's public seed.
        self.privacy, self.privacy_ledger = privacy, privacy_ledger
        self.noise = np.random.default_rng()
        self.available = 0  # the connected nodes this round sampled from (the ledger's event)
        self.round_privacy: dict[int, dict] = {}  # round -> epsilon spent so far and the settings
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
        self.available = max(len(list(grid.get_node_ids())), len(messages))
        if self.privacy_ledger is not None and messages and self.privacy_ledger.would_exceed(len(messages), self.available):
            raise PrivacyBudgetSpent(server_round, self.privacy_ledger)
        known = {m.metadata.dst_node_id: self.nodes[m.metadata.dst_node_id]["window"] for m in messages
                 if self.nodes.get(m.metadata.dst_node_id, {}).get("window")}
        self.assigned = self.ledger.assign_windows(known, self.exits, self.exit_weights) if known and self.exits else {}
        self.round_assignments[server_round] = dict(self.assigned)
        self.sent = [self._train_message(m.metadata.dst_node_id, config, server_round) for m in messages]
        self.round_sampled[server_round] = [m.metadata.dst_node_id for m in self.sent]
        return self.sent

    def _train_message(self, node: int, config: ConfigRecord, server_round: int) -> Message:
        rank = self.nodes.get(node, {}).get("rank")
        num_rounds = config.get(protocol.NUM_ROUNDS)
        return TrainInstruction(
            arrays=wire.truncate_rank(self.global_arrays, rank) if rank else self.global_arrays,
            server_round=server_round,
            num_rounds=int(num_rounds) if num_rounds is not None else None,
            exit_weights=tuple(self.exit_weights) if self.exit_weights is not None else None,
            assigned_exit=self.assigned.get(node),
            dp=self.privacy,
        ).to_message(node)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        # The SuperLink answers for a node it could not reach under its own node id (1), so a reply
        # is matched to the instruction it answers; replies to no instruction (a strategy driven
        # without configure_train) name their node themselves.
        owner = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent if m.metadata.message_id}
        self.sent = []
        sampled = self.round_sampled.setdefault(server_round, [r.metadata.src_node_id for r in replies])
        screened, dropped, answered = [], [], set()
        for reply in replies:
            node = owner.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if node not in sampled or node in answered:
                log.warning("round %d: ignored a reply from node %d: not sampled, or a second reply", server_round, node)
                continue
            answered.add(node)
            device = "" if reply.has_error() else protocol.device_of(reply.content)
            if device:
                self.node_devices[node] = device
            if reply.has_error():
                parsed, cause, reasons = None, "error", [f"client error: {_last_line(reply.error.reason)}"]
            else:
                parsed, reasons = self._screen(node, reply.content)
                cause = "rejected"
            if reasons:
                dropped.append(self._dropped(server_round, node, cause, reasons))
                continue
            screened.append(Screened(node, device, parsed, *parsed.change(self.global_arrays)))
        accepted = screened if self._central else self._without_outliers(server_round, screened, dropped)
        for node in sampled:
            if node not in answered:
                dropped.append(self._dropped(server_round, node, "no-reply", ["no reply before the round's timeout"]))
        claims = [float(entry.reply.num_examples) for entry in accepted]
        weights = [1.0] * len(claims) if self._central else robust.bounded_weights(claims, self.max_weight_ratio)
        self.round_clients[server_round] = [self._accept(server_round, entry, weight) for entry, weight in zip(accepted, weights)]
        self.round_dropped[server_round] = dropped
        if not accepted:
            log.warning("round %d: no valid update; the global adapter stays as it was", server_round)
            return None, None
        updates = [entry.reply for entry in accepted]
        averaged, contributors = self._average([(reply.arrays, weight) for reply, weight in zip(updates, weights)])
        new_global = self.optimizer.step(self.global_arrays, averaged, contributors)
        self._learn_from_votes(updates, weights)
        self._account(server_round, len(sampled))
        trained = sum(1 for n in contributors.values() if n)
        log.info("round %d: %d updates, %d of %d tensors trained", server_round, len(accepted), trained, len(contributors))
        return to_record(new_global), MetricRecord({"clients": len(accepted), "tensors-trained": trained})

    def _dropped(self, server_round: int, node: int, cause: str, reasons: list[str]) -> dict:
        reason = "; ".join(reasons)
        log.warning("round %d: no update from node %d (%s): %s", server_round, node, cause, reason)
        return {"node_id": node, "device": self.node_devices.get(node, ""), "cause": cause, "reason": reason}

    def _without_outliers(self, server_round: int, screened: list[Screened], dropped: list[dict]) -> list[Screened]:
        """The screened updates less those far beyond the round's median change (server.robust.outliers)."""
        rms = [entry.rms for entry in screened]
        far = set(robust.outliers(rms, self.max_update_norm_ratio))
        for index in sorted(far):
            dropped.append(self._dropped(server_round, screened[index].node, "rejected", [
                f"update RMS change {rms[index]:.3g} is {rms[index] / robust.low_median(rms):.3g} times the round's median "
                f"{robust.low_median(rms):.3g}, above max-update-norm-ratio = {self.max_update_norm_ratio:g}"]))
        return [entry for index, entry in enumerate(screened) if index not in far]

    def _accept(self, server_round: int, entry: Screened, weight: float) -> dict:
        """Book an accepted update; its record for the run folder (the server's fields win over any report)."""
        node, reply = entry.node, entry.reply
        self.nodes[node] = {"rank": reply.lora_rank, "window": reply.window, "device": entry.device,
                            "compressed": bool(reply.compressed)}
        if self.keep_updates:
            self.round_updates.setdefault(server_round, {})[node] = reply.arrays
        return {**reply.metrics(), "node_id": node, "device": entry.device, "assigned_exit": self.assigned.get(node),
                "weight": weight, "update_norm": entry.norm, "update_rms": entry.rms}

    @property
    def _central(self) -> bool:
        return self.privacy is not None and self.privacy.mode == "central"

    def _account(self, server_round: int, sampled: int) -> None:
        """A round that released an aggregate spends privacy: its epsilon so far goes in the round's record."""
        ledger = self.privacy_ledger
        if ledger is None:
            return
        # FedAvg samples only once min-clients (the ledger's population) are connected.
        epsilon = ledger.record_round(max(sampled, 1), max(self.available, sampled, ledger.population))
        delta = ledger.config.target_delta
        self.round_privacy[server_round] = {
            "mode": self.privacy.mode, "epsilon": epsilon, "delta": delta, "rounds": ledger.accountant.num_releases,
            "noise_multiplier": self.privacy.noise_multiplier, "clip_norm": self.privacy.clip_norm}
        log.info("round %d: privacy spent so far: epsilon %.4g at delta %g", server_round, epsilon, delta)

    def _average(self, updates: list[tuple[dict, float]]) -> tuple[dict, dict[str, int]]:
        """The round's merged update, element by element over the clients holding each element."""
        if self._central:
            return private_average(self.global_arrays, [arrays for arrays, _ in updates], self.privacy, self.noise)
        if self.average == "median":
            return robust.coordinate_median(self.global_arrays, [arrays for arrays, _ in updates])
        if self.average == "trimmed-mean":
            return robust.trimmed_mean(self.global_arrays, [arrays for arrays, _ in updates], self.trim_fraction)
        return aggregation.partial_average(self.global_arrays, updates)

    def problems_of(self, node: int, content: RecordDict) -> list[str]:
        """Why a reply must not count (empty when it is fine); see the module docstring."""
        return self._screen(node, content)[1]

    def _screen(self, node: int, content: RecordDict) -> tuple[TrainReply | None, list[str]]:
        """The parsed reply and why it must not count: malformed (TrainReply.parse), or not what
        this round asked of the node (TrainReply.problems)."""
        try:
            reply = TrainReply.parse(content)
        except ProtocolError as err:
            return None, [str(err)]
        except Exception as err:  # a remote device's bytes: whatever they make a library raise drops the reply, not the run
            return None, [f"unreadable reply ({type(err).__name__}: {str(err)[:300]})"]
        limit = self.max_update_norm
        if self.privacy is not None and self.privacy.mode == "local":  # an honest noisy update is this far, no further
            limit = max(limit, noisy_norm_limit(self.privacy, sum(int(np.size(a)) for a in reply.arrays.values())))
        expected = Expectation(global_arrays=self.global_arrays, max_update_norm=limit,
                               exits=len(self.exits), layers=self.ledger.layers)
        if node in self.assigned:
            exit_layer, depth = self.assigned[node], self.nodes[node]["window"]  # a reply of another depth is refused
            first, last = self.ledger.window(exit_layer, depth)
            expected = replace(expected, window=depth,
                               allowed=tensors_of_window(self.global_arrays, first, last, exit_layer))
        return reply, reply.problems(expected)

    def _learn_from_votes(self, accepted: list[TrainReply], weights: list[float]) -> None:
        voters = [(r.votes, weight) for r, weight in zip(accepted, weights) if r.votes]
        if voters:
            self.exit_weights = aggregation.global_exit_weights(voters, len(self.exits))
        important = [(r.importance, weight) for r, weight in zip(accepted, weights) if r.importance]
        if important:
            self.ledger.record_importance(important)
        for r in accepted:
            for layer, steps in enumerate(r.layer_steps or ()):
                if steps:
                    self.ledger.record_training(layer, layer, steps)

    # ------------------------------------------------------------------ evaluate

    def configure_evaluate(self, server_round, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        """The clients this round sampled for training, and of those only the ones with a compressed base
        (a dense base is what the server evaluates itself): the evaluate phase grows with the clients
        sampled, not with the fleet (at 100 clients, 10 sampled, it asked 72-90 nodes a round)."""
        sampled = [m.metadata.dst_node_id for m in super().configure_evaluate(server_round, arrays, config, grid)]
        trained = set(self.round_sampled.get(server_round, sampled))
        nodes = [node for node in sampled if node in trained and self.nodes.get(node, {}).get("compressed", True)]
        if not nodes:
            return []
        instruction = EvaluateInstruction(from_record(arrays), server_round)
        return [instruction.to_message(node) for node in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        results, seen = [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if node in seen:
                log.warning("round %d: ignored a second evaluation from node %d", server_round, node)
                continue
            seen.add(node)
            if reply.has_error():
                log.warning("round %d: node %d could not evaluate: %s", server_round, node, _last_line(reply.error.reason))
                continue
            device = protocol.device_of(reply.content)
            if device:
                self.node_devices[node] = device
            try:
                parsed = EvaluateReply.parse(reply.content)
            except Exception as err:  # a ProtocolError, or whatever a remote device's bytes make a library raise
                log.warning("round %d: ignored node %d's evaluation: %s", server_round, node, str(err)[:500])
                continue
            results.append((node, parsed))
        weights = robust.bounded_weights([float(r.num_examples) for _, r in results], self.max_weight_ratio)
        self.round_devices[server_round] = [{**r.metrics(), "node_id": node, "device": r.device, "weight": weight}
                                            for (node, r), weight in zip(results, weights)]
        for failure in self.round_dropped.get(server_round, []):  # a client that failed to train may still evaluate
            failure["device"] = failure["device"] or self.node_devices.get(failure["node_id"], "")
        if not results:
            return None
        total = sum(weights)
        return MetricRecord({protocol.ACCURACY: sum((r.accuracy or 0.0) * w for (_, r), w in zip(results, weights)) / total})


def _last_line(reason: str) -> str:
    """A client's exception arrives with the whole remote traceback; its last line says what went wrong."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    return lines[-1][:500] if lines else str(reason)


class PrivacyBudgetSpent(EdgecoreError):
    """The next round would take the run's epsilon past dp-max-epsilon: the run ends before it, cleanly."""

    def __init__(self, server_round: int, ledger: PrivacyLedger):
        self.server_round, self.epsilon, self.budget = server_round, ledger.epsilon, ledger.config.max_epsilon
        super().__init__(f"stopped before round {server_round}: it would take epsilon past dp-max-epsilon = "
                         f"{self.budget:g} (spent {self.epsilon:.4g} at delta {ledger.config.target_delta:g})")
