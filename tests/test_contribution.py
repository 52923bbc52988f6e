"""A client that failed, was rejected or never replied counts as not contributing: in the strategy's
round records, the run summary, the per-round print and the fleet benchmark's targets."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from federation.records import to_record
from conftest import needs_bbc
from edgecore.errors import EdgecoreError
from server.aggregation import ServerOptimizer
from server.run_folder import RoundPrinter, clients_within_budget, contribution
from server.strategy import FleetStrategy
from simulations.bench import fleet as fleet_bench

ROOT = Path(__file__).resolve().parent.parent
DEMO = {"pi-zero-2w": 200.0, "pi4-1gb": 450.0, "phone-8gb": 1500.0}  # configs/fleets/demo.toml, slots 0, 1, 2


def _client(node, device, peak=100.0):
    return {"node_id": node, "device": device, "partition-id": node % 3, "job-peak-mb": peak, "budget-mb": DEMO[device],
            "bytes-up": 10, "num-examples": 5, "compressed": 0, "weights-mb": 50.0, "window": 2, "lora-rank": 4}


def _round(number, clients, dropped=(), sampled=None):
    clients, dropped = list(clients), list(dropped)
    return {"round": number, "test_accuracy": 0.5, "test_n": 16, "round_s": 1.0, "bytes_up": 10 * len(clients),
            "bytes_down": 0, "sampled": sampled if sampled is not None else [c["node_id"] for c in clients + dropped],
            "clients": clients, "dropped": dropped, "devices": []}


def _healthy(number):
    return _round(number, [_client(3, "pi-zero-2w"), _client(4, "pi4-1gb", 300.0), _client(5, "phone-8gb", 1200.0)])


def _without_pi_zero(number, cause="error", device=""):
    failure = {"node_id": 3, "device": device, "cause": cause, "reason": "client error: EdgecoreError: out of memory"}
    return _round(number, [_client(4, "pi4-1gb", 300.0), _client(5, "phone-8gb", 1200.0)], [failure])


ROUND0 = _round(0, [])  # the untuned adapter: no training, no client expected


def test_a_healthy_run_has_every_client_contributing_within_budget():
    rounds = [ROUND0, _healthy(1), _healthy(2)]
    share = contribution(rounds, expected=3)
    assert (share["fraction"], share["all_contributed"], share["missing"]) == (1.0, True, [])
    assert (share["expected"], share["contributed"]) == (6, 6)
    table = clients_within_budget(rounds, expected_profiles=DEMO)
    assert set(table) == set(DEMO) and all(row["within"] for row in table.values())
    assert table["pi-zero-2w"] == {"budget_mb": 200.0, "max_job_peak_mb": 100.0, "contributed_rounds": 2, "rounds_run": 2,
                                   "missing_rounds": [], "within": True}


@pytest.mark.parametrize("cause", ["error", "rejected", "no-reply"])
def test_a_client_dropped_in_every_round_is_never_within_budget(cause):
    rounds = [ROUND0, *(_without_pi_zero(n, cause, device="pi-zero-2w") for n in (1, 2, 3))]
    share = contribution(rounds, expected=3)
    assert share["fraction"] == pytest.approx(6 / 9) and not share["all_contributed"]
    assert [(m["round"], m["node_id"], m["device"], m["cause"]) for m in share["missing"]] == [
        (n, 3, "pi-zero-2w", cause) for n in (1, 2, 3)]
    # Named by its failure alone, or expected by the fleet: a row that never contributed, not within budget.
    for expected in ((), DEMO):
        row = clients_within_budget(rounds, expected_profiles=expected)["pi-zero-2w"]
        assert row == {"budget_mb": None, "max_job_peak_mb": None, "contributed_rounds": 0, "rounds_run": 3,
                       "missing_rounds": [1, 2, 3], "within": False}


def test_an_errored_client_of_unknown_device_is_named_from_its_other_records():
    evaluated = _without_pi_zero(1)
    evaluated["devices"] = [{"node_id": 3, "device": "pi-zero-2w", "accuracy": 0.3, "num-examples": 4}]
    rounds = [ROUND0, evaluated, _healthy(2)]
    share = contribution(rounds)
    assert [(m["node_id"], m["device"], m["cause"]) for m in share["missing"]] == [(3, "pi-zero-2w", "error")]
    row = clients_within_budget(rounds)["pi-zero-2w"]
    assert (row["contributed_rounds"], row["missing_rounds"], row["within"]) == (1, [1], True)  # within, when it ran
    # A failure that no record names is still a missing pair, and the fleet's profile is then reported unmeasured.
    unnamed = [ROUND0, _without_pi_zero(1), _without_pi_zero(2)]
    assert [m["device"] for m in contribution(unnamed)["missing"]] == ["", ""]
    assert not clients_within_budget(unnamed, expected_profiles=DEMO)["pi-zero-2w"]["within"]
    assert "pi-zero-2w" not in clients_within_budget(unnamed)


def test_a_round_that_sampled_fewer_clients_than_expected_misses_the_rest():
    short = _round(2, [_client(4, "pi4-1gb", 300.0), _client(5, "phone-8gb", 1200.0)])
    rounds = [ROUND0, _healthy(1), short]
    assert contribution(rounds)["all_contributed"]  # every sampled client did contribute ...
    share = contribution(rounds, expected=3)  # ... but the fleet has three
    assert share["fraction"] == pytest.approx(5 / 6) and not share["all_contributed"]
    assert [(m["round"], m["cause"]) for m in share["missing"]] == [(2, "not-sampled")]
    assert "sampled 2 of the 3" in share["missing"][0]["reason"]
    assert clients_within_budget(rounds, expected_profiles=DEMO)["pi-zero-2w"]["missing_rounds"] == [2]


def test_no_training_round_means_nothing_contributed():
    assert contribution([ROUND0], expected=3)["fraction"] == 0.0
    assert not contribution([ROUND0])["all_contributed"]


def test_malformed_records_are_refused_with_the_field_named():
    with pytest.raises(EdgecoreError, match="round 1 record: no 'dropped' field"):
        contribution([{"round": 1, "clients": []}])
    with pytest.raises(EdgecoreError, match="no 'round' field"):
        contribution([{"clients": []}])
    record = _healthy(1)
    del record["clients"][0]["job-peak-mb"]
    with pytest.raises(EdgecoreError, match="round 1, node 3: no 'job-peak-mb' field"):
        clients_within_budget([record])


def test_the_round_print_says_who_did_not_contribute_and_why(tmp_path, capsys):
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                   [ROUND0, _without_pi_zero(1, device="pi-zero-2w"), _healthy(2)]))
    RoundPrinter(tmp_path)()
    out = capsys.readouterr().out.splitlines()
    assert "contributed" not in out[0]  # round 0 trains nothing
    assert out[1].startswith("round 1: test accuracy 50.0% (n=16), 2 of 3 contributed, ")
    assert out[2] == "  did not contribute: pi-zero-2w (node 3), error: client error: EdgecoreError: out of memory"
    round2 = next(i for i, line in enumerate(out) if line.startswith("round 2:"))
    assert out[round2].startswith("round 2: test accuracy 50.0% (n=16), 3 of 3 contributed, ")
    assert sum("did not contribute" in line for line in out) == 1


# ---------------------------------------------------------------- the strategy records every sampled client


def test_the_strategy_records_error_replies_rejections_and_silence_per_sampled_node(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for field, value in (("run_id", 1), ("task_id", 1), ("node_id", 0)):  # what a real run sets
        monkeypatch.setattr(TaskIdentity, f"_{field}", value)
    strategy = FleetStrategy(exits=(), layers=4, optimizer=ServerOptimizer(), max_update_norm=50.0)
    strategy.global_arrays = ref = {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 8), np.float32)}
    strategy.node_devices[13] = "pi-zero-2w"  # known from an earlier reply
    # What configure_train returns and the grid pushes: one instruction per sampled node, each given its message id.
    strategy.sent = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="train") for n in (11, 12, 13, 14)]
    for m in strategy.sent:
        m.metadata.__dict__["_message_id"] = f"instruction-{m.metadata.dst_node_id}"
    strategy.round_sampled[1] = [11, 12, 13, 14]
    by_node = {m.metadata.dst_node_id: m for m in strategy.sent}

    def content(examples):
        return RecordDict({"arrays": to_record({k: v + 0.1 for k, v in ref.items()}),
                           "metrics": MetricRecord({"num-examples": examples}), "device": ConfigRecord({"device": "phone-8gb"})})

    good = Message(content(10), reply_to=by_node[11])
    rejected = Message(content(0), reply_to=by_node[12])
    unreachable = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=by_node[13])
    unreachable.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for a node it cannot reach
    arrays, _ = strategy.aggregate_train(1, [good, rejected, unreachable])  # node 14: no reply
    assert arrays is not None
    assert [c["node_id"] for c in strategy.round_clients[1]] == [11]
    dropped = {d["node_id"]: (d["device"], d["cause"]) for d in strategy.round_dropped[1]}
    assert dropped == {12: ("phone-8gb", "rejected"), 13: ("pi-zero-2w", "error"), 14: ("", "no-reply")}
    assert "Node Unavailable" in next(d["reason"] for d in strategy.round_dropped[1] if d["node_id"] == 13)
    share = contribution([{"round": 1, "sampled": strategy.round_sampled[1], "clients": strategy.round_clients[1],
                           "dropped": strategy.round_dropped[1]}])
    assert (share["contributed"], share["expected"]) == (1, 4)


# ---------------------------------------------------------------- the fleet benchmark's targets


def _bench(monkeypatch, tmp_path, edge_rounds):
    """fleet_bench.run with its two simulations replaced by run folders holding these round records."""
    plain_rounds = [ROUND0, *(_healthy(n) for n in (1, 2, 3))]
    for r in plain_rounds:
        for c in r["clients"]:
            del c["budget-mb"]  # the plain pipeline knows no device
            c["device"], c["job-peak-mb"], c["bytes-up"] = "dense (plain)", 600.0, 100

    def fake_simulate(clients, experiment, timeout_s):
        assert clients == 3 == experiment.min_clients
        folder = tmp_path / experiment.run_name
        folder.mkdir()
        rounds = plain_rounds if experiment.pipeline == "plain" else edge_rounds
        (folder / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
        (folder / "summary.json").write_text("{}")
        return {"status": "finished:completed", "run_folder": str(folder), "wall_s": 1.0}

    monkeypatch.setattr(fleet_bench, "simulate", fake_simulate)
    report = fleet_bench.run({"model": "tiny-micro"})
    return {t["metric"]: t for t in report["targets"]}, report


def test_the_fleet_bench_passes_a_healthy_edge_run(monkeypatch, tmp_path):
    targets, report = _bench(monkeypatch, tmp_path, [ROUND0, *(_healthy(n) for n in (1, 2, 3))])
    assert targets["b_clients_contributed"]["value"] == 1.0 and targets["b_clients_contributed"]["met"]
    assert targets["b_clients_within_budget"]["met"]
    assert report["a_worst_over_budget"] == 3.0  # plain: 600 MB on the 200 MB board, matched by partition


@pytest.mark.parametrize("cause", ["error", "rejected", "no-reply"])
def test_the_fleet_bench_fails_when_a_device_never_contributes(monkeypatch, tmp_path, cause):
    targets, report = _bench(monkeypatch, tmp_path, [ROUND0, *(_without_pi_zero(n, cause) for n in (1, 2, 3))])
    assert targets["b_clients_contributed"]["value"] == pytest.approx(6 / 9) and not targets["b_clients_contributed"]["met"]
    assert targets["b_clients_within_budget"]["value"] == 0.0 and not targets["b_clients_within_budget"]["met"]
    row = report["memory_by_device"]["b_edge"]["pi-zero-2w"]
    assert (row["contributed_rounds"], row["missing_rounds"], row["within"]) == (0, [1, 2, 3], False)
    edge = report["results"][1]
    assert [(m["round"], m["cause"]) for m in edge["not_contributed"]] == [(n, cause) for n in (1, 2, 3)]


def test_the_fleet_bench_counts_a_client_missing_from_one_round(monkeypatch, tmp_path):
    short = _round(2, [_client(4, "pi4-1gb", 300.0), _client(5, "phone-8gb", 1200.0)])  # pi-zero not even sampled
    targets, report = _bench(monkeypatch, tmp_path, [ROUND0, _healthy(1), short, _healthy(3)])
    assert targets["b_clients_contributed"]["value"] == pytest.approx(8 / 9) and not targets["b_clients_contributed"]["met"]
    assert targets["b_clients_within_budget"]["met"]  # over its two contributions, the board stayed within budget
    assert report["memory_by_device"]["b_edge"]["pi-zero-2w"]["missing_rounds"] == [2]


# ---------------------------------------------------------------- a real simulation with a client that cannot run


@needs_bbc
@pytest.mark.slow
def test_a_client_whose_device_cannot_run_is_reported_as_not_contributing(tmp_path):
    """tiny-micro, 2 rounds: a 400 MB laptop trains; a device with a 0.001 MB budget raises in every round."""
    profiles = {}
    for name, budget in (("tiny-laptop", 400), ("impossible", 0.001)):
        profiles[name] = tmp_path / f"{name}.toml"
        profiles[name].write_text(f'name = "{name}"\nmemory_budget_mb = {budget}\nweight_bits = [4, 8, 16, 32]\n'
                                  'precision = "fp32"\n[sparsity]\nunstructured = [0.0]\n')
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("".join(f'[[clients]]\ndevice = "{path}"\n\n' for path in profiles.values()))
    config = {"model": "tiny-micro", "data": "bbc", "partition": "iid", "num-rounds": 2, "local-steps": 2, "batch-size": 4,
              "seq-len": 160, "lora-r": 4, "min-clients": 2, "eval-samples": 16, "device-eval-samples": 8,
              "vote-samples": 8, "fleet": str(fleet), "run-dir": str(tmp_path / "runs"), "pipeline": "edge"}
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    done = subprocess.run([sys.executable, "-m", "simulations.simulate", "--num-clients", "2", "-c", overrides],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 of 2 contributed" in done.stdout and "did not contribute: " in done.stdout
    run = Path(json.loads(done.stdout.strip().splitlines()[-1])["run_folder"])
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    for r in rounds[1:]:
        assert len(r["sampled"]) == 2 and [c["device"] for c in r["clients"]] == ["tiny-laptop"]
        [failure] = r["dropped"]
        assert failure["cause"] == "error" and "memory_budget_mb" in failure["reason"]
        assert failure["node_id"] in r["sampled"] and failure["node_id"] != r["clients"][0]["node_id"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["all_clients_contributed"] is False
    assert (summary["contribution"]["contributed"], summary["contribution"]["expected"]) == (2, 4)
    assert summary["clients_within_budget"]["tiny-laptop"]["within"]
    # What the benchmark does with the fleet's devices: the one that never contributed is not within budget.
    table = clients_within_budget(rounds, expected_profiles=["tiny-laptop", "impossible"])
    assert table["impossible"]["contributed_rounds"] == 0 and not table["impossible"]["within"]
