"""The Flower ServerApp: federated averaging of LoRA adapters with server-side evaluation.

The round loop is server.strategy.FleetStrategy's; what travels between it and the clients is
federation.protocol's. Each round's global adapter is evaluated here on the dense base and
recorded, with what every client reported, in the run folder (server.run_folder).
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from edgecore import lm
from edgecore.experiment import Experiment
from federation import protocol
from federation.records import from_record, to_metrics, to_record
from server.aggregation import ServerOptimizer
from server.evaluation import GlobalModel
from server.run_folder import RunFolder, clients_within_budget, contribution
from federation.privacy import DpSettings
from server.privacy import PrivacyLedger
from server.strategy import FleetStrategy, PrivacyBudgetSpent

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    experiment = Experiment.from_mapping(context.run_config)
    name = experiment.run_name or f"fl-{time.strftime('%Y%m%d-%H%M%S')}-run{context.run_id}"
    run = RunFolder(experiment.run_dir, name=name)
    run.write_config(experiment.as_run_config())
    log.info("run folder: %s", run.path)
    global_model = GlobalModel(experiment)
    edge = experiment.pipeline == "edge"
    layers = lm.causal_lm(global_model.model).config.num_hidden_layers
    strategy = FleetStrategy(
        exits=global_model.initial_exits().layers if edge else (),
        layers=layers,
        optimizer=ServerOptimizer(experiment.aggregation, lr=experiment.server_lr),
        max_update_norm=experiment.max_update_norm,
        max_update_norm_ratio=experiment.max_update_norm_ratio,
        max_weight_ratio=experiment.max_weight_ratio,
        average=experiment.average,
        trim_fraction=experiment.trim_fraction,
        privacy=DpSettings.of(experiment),
        privacy_ledger=PrivacyLedger.for_experiment(experiment, population=experiment.min_clients),
        keep_updates=experiment.save_client_updates,
        fraction_train=experiment.fraction_train,
        # The dense base is evaluated here; with the edge pipeline every client also scores
        # the global adapter on its own (compressed) base.
        fraction_evaluate=1.0 if edge else 0.0,
        min_train_nodes=max(1, round(experiment.fraction_train * experiment.min_clients)),
        min_evaluate_nodes=max(1, round(experiment.fraction_train * experiment.min_clients)),
        min_available_nodes=experiment.min_clients,
    )
    initial = global_model.initial_arrays()
    started = time.perf_counter()
    round_started = [started]

    def evaluate_and_record(server_round: int, arrays) -> MetricRecord:
        adapter = from_record(arrays)
        metrics = global_model.evaluate(adapter)
        now = time.perf_counter()
        clients = strategy.round_clients.get(server_round, [])
        record = {
            "round": server_round,
            **{f"test_{k}": v for k, v in metrics.items()},
            "round_s": now - round_started[0],
            "sampled": strategy.round_sampled.get(server_round, []),
            "clients": clients,
            "dropped": strategy.round_dropped.get(server_round, []),
            "bytes_up": sum(c.get(protocol.BYTES_UP, 0) for c in clients),
            "bytes_down": sum(c.get(protocol.BYTES_DOWN, 0) for c in clients),
            "devices": strategy.round_devices.get(server_round, []),
            "assigned_exits": {str(n): e for n, e in strategy.round_assignments.get(server_round, {}).items()},
            "exit_weights": strategy.exit_weights,
        }
        if server_round in strategy.round_privacy:
            record["privacy"] = strategy.round_privacy[server_round]
        run.add_round(record)
        folder = run.checkpoint_dir(server_round)
        global_model.save(adapter, folder / "adapter")
        for node, update in strategy.round_updates.pop(server_round, {}).items():
            run.save_client_update(server_round, node, update)
        run.write_state(server_round, {"round": server_round, "metrics": metrics, "config": experiment.as_run_config()})
        log.info("round %d: test %s", server_round, _short(metrics))
        round_started[0] = time.perf_counter()
        return to_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    status, stopped = "completed", None
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=to_record(initial),
            num_rounds=experiment.num_rounds,
            train_config=ConfigRecord({protocol.NUM_ROUNDS: experiment.num_rounds}),
            evaluate_fn=evaluate_and_record,
        )
        final = from_record(result.arrays) or initial  # no round produced an update: the initial adapter stands
    except PrivacyBudgetSpent as spent:  # before the round's instructions went out: its global adapter stands
        log.warning("%s", spent)
        status, stopped, final = "stopped-privacy-budget", str(spent), strategy.global_arrays
    global_model.save(final, run.path / "adapter")
    first, last = run.rounds[0], run.rounds[-1]
    share = contribution(run.rounds)
    run.write_summary({
        "status": status,
        **({"stopped": stopped} if stopped else {}),
        "rounds": experiment.num_rounds,
        "rounds_run": len(run.rounds) - 1,
        "wall_s": time.perf_counter() - started,
        "metric_per_round": {r["round"]: r.get("test_accuracy", r["test_perplexity"]) for r in run.rounds},
        "initial": {k: v for k, v in first.items() if k.startswith("test_")},
        "final": {k: v for k, v in last.items() if k.startswith("test_")},
        "bytes_up_total": sum(r["bytes_up"] for r in run.rounds),
        "bytes_down_total": sum(r["bytes_down"] for r in run.rounds),
        "adapter": str(run.path / "adapter"),
        "device_accuracy_per_round": _device_accuracy(run.rounds),
        "clients_within_budget": clients_within_budget(run.rounds),
        "all_clients_contributed": share["all_contributed"],
        "contribution": {k: share[k] for k in ("expected", "contributed", "fraction", "missing")},
        **({"privacy": {**strategy.round_privacy[max(strategy.round_privacy)]} if strategy.round_privacy
            else {"mode": experiment.dp_mode, "epsilon": 0.0}} if experiment.dp_mode != "off" else {}),
    })
    log.info("done: %s -> %s; run folder %s", _short(first), _short(last), run.path)


def _device_accuracy(rounds: list[dict]) -> dict:
    """Per device profile, the accuracy of each round's global adapter on that device's own base."""
    table: dict[str, dict] = {}
    for r in rounds:
        for d in r.get("devices", []):
            table.setdefault(d["device"], {})[r["round"]] = d.get("accuracy")
    return table


def _short(metrics: dict) -> str:
    keys = [k for k in metrics if k.endswith(("accuracy", "loss", "perplexity"))]
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys)
