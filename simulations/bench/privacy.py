"""`privacy`: what differential privacy costs in accuracy, and what one hostile device can do with and without the defences.

Part 1, three real Flower simulations of the default experiment (the `demo` fleet, BBC,
SmolLM2-135M, same seeds and rounds), one after the other in this run:
  (a) no DP (every accepted update is kept in the run folder, for part 2);
  (b) central DP at a low noise multiplier, (c) at a high one: clients clip their whole update
      to C, the server re-clips, averages with equal weights and adds Gaussian noise per
      element (server.privacy).
C is the median L2 change of (a)'s accepted updates, so about half of the honest updates are
clipped. (Choosing C from a private run leaks a little itself; a deployment sets it from a
public proxy run.) Reported: test accuracy per round, the epsilon each reaches at delta = 1e-5,
and the accuracy cost against (a).

Part 2, real Flower Messages through the project's FleetStrategy: (a)'s round-1 honest updates,
replayed with one hostile reply added, under each of RULES (no round-level defences; the
defaults: weights capped at 3x the low median claim, updates beyond 5x the median RMS change
dropped; the cap at 1x; the coordinate-wise median). The hostile reply copies the deepest
honest window (where it shares most elements with a single honest holder):
  - "claims 1e12 examples": that client's change reversed, claiming 10^12 examples;
  - "same update, honest claim": the same change claiming what its owner claimed: what any
    device can do within the bounds, the reference for what a claim buys;
  - "just under max-update-norm": an update 0.99 x max-update-norm from the global adapter.
Reported: the L2 distance of the resulting global adapter from the honest-only aggregate under
the same rule, also in honest rounds' worth (the honest round's own step).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from edgecore import lm, wire
from edgecore.experiment import Experiment
from federation import protocol
from federation.protocol import TrainReply
from federation.records import from_record, to_metrics, to_record
from server import run_config
from server.aggregation import ServerOptimizer
from server.evaluation import GlobalModel
from server.strategy import FleetStrategy
from simulations.bench import benchmark, target
from simulations.bench.fleet import simulate_fleet

ROUNDS = 3
NOISE_MULTIPLIERS = (0.3, 1.0)
DELTA = 1e-5


@benchmark("privacy")
def run(options: dict) -> dict:
    base = run_config.resolve(None)
    fleet = base.load_fleet()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = {**base.as_run_config(), "model": options["model"], "num-rounds": options.get("rounds") or ROUNDS,
              "min-clients": len(fleet.slots)}

    def experiment(name: str, **settings) -> Experiment:
        return Experiment.from_mapping({**common, **settings, "run-name": f"bench-privacy-{stamp}-{name}"})

    plain, rounds = simulate_fleet("a_no_dp", experiment("a_no_dp", **{"save-client-updates": True}), fleet)
    norms = [c["update_norm"] for r in rounds[1:] for c in r["clients"]]
    clip = float(np.median(norms))
    signal = float(np.median([c["update_rms"] for r in rounds[1:] for c in r["clients"]]))  # an honest change per element
    results = [{**plain, "dp_mode": "off", "epsilon": None}]
    for label, z in zip("bc", NOISE_MULTIPLIERS):
        name = f"{label}_central_z{z:g}"
        settings = {"dp-mode": "central", "dp-clip-norm": clip, "dp-noise-multiplier": z, "dp-delta": DELTA}
        row, dp_rounds = simulate_fleet(name, experiment(name, **settings), fleet)
        results.append({**row, "dp_mode": "central", "noise_multiplier": z, "clip_norm": clip,
                        # the noise per element of the mean (z*C/n, n holders) against an honest change per element
                        "noise_std_over_honest_rms": {n: z * clip / n / signal for n in (1, 3)},
                        "epsilon_per_round": [r.get("privacy", {}).get("epsilon") for r in dp_rounds[1:]],
                        "epsilon": dp_rounds[-1].get("privacy", {}).get("epsilon")})
    final = {row["config"]: row["accuracy_per_round"][-1] for row in results}
    ratios = {f"accuracy_cost_{row['config']}": final["a_no_dp"] - final[row["config"]] for row in results[1:]}
    hostile = hostile_replay(Path(plain["run_folder"]), experiment("replay"))
    targets = _targets(results, hostile)
    return {"results": results, "clip_norm": clip, "update_norms": norms, "honest_update_rms": signal, "ratios": ratios,
            "hostile": hostile,
            "targets": targets, "fleet": fleet.name}


def _targets(results: list[dict], hostile: dict) -> list[dict]:
    claim, honest_claim = hostile["claims 1e12 examples"], hostile["same update, honest claim"]
    central = results[1]
    return [
        # The cap bounds what a claim buys: at max-weight-ratio 1 a 1e12 claim does no more than an honest claim.
        target("claim_over_honest_claim_at_weight_ratio_1", claim["max-weight-ratio 1"]["honest_rounds"]
               / honest_claim["max-weight-ratio 1"]["honest_rounds"], 1.01, higher_is_better=False),
        target("claim_with_defaults_over_without_defences", claim["defaults"]["honest_rounds"]
               / claim["no defences"]["honest_rounds"], 1.0, higher_is_better=False),
        target("near_limit_update_moves_with_defaults_in_honest_rounds",
               hostile["just under max-update-norm"]["defaults"]["honest_rounds"], 0.01, higher_is_better=False),
        target("b_epsilon_reported", float(central["epsilon"] is not None and math.isfinite(central["epsilon"])), 1.0),
        # A client that failed or was dropped in any run makes its comparison unfair: it fails here.
        target("every_client_contributed_in_every_run", min(row["contributed_fraction"] for row in results), 1.0),
    ]


@contextlib.contextmanager
def _as_a_run():
    """Flower Messages can only be made inside a run; give this process the identity a run would."""
    saved = {f: getattr(TaskIdentity, f"_{f}", None) for f in ("run_id", "task_id", "node_id")}
    for field, value in (("run_id", 1), ("task_id", 1), ("node_id", 0)):
        setattr(TaskIdentity, f"_{field}", value)
    try:
        yield
    finally:
        for field, value in saved.items():
            setattr(TaskIdentity, f"_{field}", value)


def _reply(node: int, reply: TrainReply) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(reply.to_records(), reply_to=instruction)


def _honest_round(folder: Path, rounds: list[dict]) -> list[tuple[int, TrainReply]]:
    """Round 1's accepted updates as their clients sent them: the kept arrays and the recorded metrics."""
    replies = []
    for client in rounds[1]["clients"]:
        arrays = load_file(str(folder / "checkpoints" / "round-1" / "clients" / f"node-{client['node_id']}.safetensors"))
        metrics = {k: v for k, v in client.items() if k not in ("node_id", "device", "assigned_exit", "weight",
                                                                  "update_norm", "update_rms")}
        content = RecordDict({protocol.ARRAYS: to_record(arrays), protocol.METRICS: to_metrics(metrics),
                              protocol.DEVICE: ConfigRecord({protocol.DEVICE_NAME: client["device"]})})
        replies.append((client["node_id"], TrainReply.parse(content)))
    return replies


# The server's rules a replay runs under: none of the round-level defences, the defaults, the strongest cap, the median.
RULES = {
    "no defences": {"max_update_norm_ratio": 0.0, "max_weight_ratio": 0.0},
    "defaults": {},
    "max-weight-ratio 1": {"max_weight_ratio": 1.0},
    "median average": {"average": "median"},
}


def _aggregate(model: GlobalModel, global_arrays: dict, replies: list[tuple[int, TrainReply]], experiment: Experiment,
               **rules) -> dict:
    layers = lm.causal_lm(model.model).config.num_hidden_layers
    settings = {"max_update_norm_ratio": experiment.max_update_norm_ratio, "max_weight_ratio": experiment.max_weight_ratio,
                **rules}
    strategy = FleetStrategy(exits=model.initial_exits().layers, layers=layers, optimizer=ServerOptimizer(),
                             max_update_norm=experiment.max_update_norm, **settings)
    strategy.global_arrays = global_arrays
    arrays, _ = strategy.aggregate_train(1, [_reply(node, reply) for node, reply in replies])
    return from_record(arrays)


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(np.square(a[k].astype(np.float64) - b[k]).sum()) for k in a))


def hostile_replay(folder: Path, experiment: Experiment) -> dict:
    """One hostile reply among round 1's honest ones, under each of RULES; distances from that rule's own
    honest-only aggregate, in L2 and in honest rounds' worth (the honest round's step under the defaults)."""
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    model = GlobalModel(Experiment.from_mapping(json.loads((folder / "config.json").read_text())))
    global_arrays = model.initial_arrays()  # seeded: round 1's global adapter
    with _as_a_run():
        honest = _honest_round(folder, rounds)
        honest_only = {name: _aggregate(model, global_arrays, honest, experiment, **rules) for name, rules in RULES.items()}
        step = _distance(honest_only["defaults"], global_arrays)
        node, template = max(honest, key=lambda h: len(h[1].arrays))  # the deepest window: the most to push
        rank = template.rank_in(global_arrays)
        start = wire.truncate_rank({k: global_arrays[k] for k in template.arrays}, rank)
        reversed_change = {k: (2 * start[k] - v).astype(np.float32) for k, v in template.arrays.items()}
        change = {k: np.random.default_rng(0).normal(size=v.shape) for k, v in template.arrays.items()}
        scale = 0.99 * experiment.max_update_norm / math.sqrt(sum(float(np.square(c).sum()) for c in change.values()))
        near_limit = {k: (start[k] + scale * c).astype(np.float32) for k, c in change.items()}
        attacks = {
            "claims 1e12 examples": {**template.__dict__, "arrays": reversed_change, "num_examples": 1e12},
            "same update, honest claim": {**template.__dict__, "arrays": reversed_change},
            "just under max-update-norm": {**template.__dict__, "arrays": near_limit},
        }
        outcome = {"honest_step_l2": step, "hostile_copies": f"the deepest honest window ({len(template.arrays)} tensors, "
                   f"rank {rank}, {template.num_examples} examples claimed by its owner)", "honest_clients": len(honest),
                   "honest_only_moved_by_the_rule": {name: _distance(a, honest_only["defaults"]) / step
                                                     for name, a in honest_only.items()}}
        for name, fields in attacks.items():
            replies = [*honest, (10**9, TrainReply(**fields))]
            outcome[name] = {}
            for rule, settings in RULES.items():
                moved = _distance(_aggregate(model, global_arrays, replies, experiment, **settings), honest_only[rule])
                outcome[name][rule] = {"l2_from_honest_only": moved, "honest_rounds": moved / step if step else math.inf}
    return outcome
