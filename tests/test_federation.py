"""The federated system: update screening, a real simulation, and a real loopback deployment."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from peft import PeftModel
from safetensors.numpy import load_file

from federation.records import to_record
from conftest import needs_bbc
from edgecore import models, wire
from edgecore.experiment import Experiment
from edgecore.finetune import add_lora
from federation.processes import free_port
from server.aggregation import ServerOptimizer
from server.strategy import FleetStrategy

ROOT = Path(__file__).resolve().parent.parent
TINY = {"model": "tiny-micro", "num-rounds": 2, "local-steps": 2, "batch-size": 4, "seq-len": 160,
        "min-clients": 2, "eval-samples": 16, "lora-r": 4, "partition": "iid"}


def _reference_arrays():
    model, _ = models.load("tiny-micro")
    return wire.adapter_arrays(add_lora(model, Experiment.from_mapping(TINY).lora()))


def _content(arrays, examples=10):
    return RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord({"num-examples": examples})})


def _strategy():
    return FleetStrategy(exits=(), layers=4, optimizer=ServerOptimizer(), max_update_norm=50.0)


def test_bad_updates_are_screened_out_with_a_reason():
    strategy = _strategy()
    strategy.global_arrays = ref = _reference_arrays()
    name = sorted(ref)[0]
    assert strategy.problems_of(1, _content({k: v + 0.01 for k, v in ref.items()})) == []
    nan = {**ref, name: np.full_like(ref[name], np.nan)}
    assert "non-finite" in strategy.problems_of(1, _content(nan))[0]
    wrong_shape = {**ref, name: np.zeros((1, 1), np.float32)}
    assert "shape" in strategy.problems_of(1, _content(wrong_shape))[0]
    assert "num-examples" in strategy.problems_of(1, _content(ref, examples=0))[0]
    assert "'num-examples' = nan" in strategy.problems_of(1, _content(ref, examples=float("nan")))[0]
    scaled = {k: v * 1e4 for k, v in ref.items()}
    assert "exceeds the limit" in strategy.problems_of(1, _content(scaled))[0]
    assert "lacks" in strategy.problems_of(1, RecordDict({"metrics": MetricRecord({"num-examples": 3})}))[0]


def test_an_assigned_client_may_send_only_its_window_at_its_rank():
    strategy = FleetStrategy(exits=(1, 3), layers=4, optimizer=ServerOptimizer(), max_update_norm=50.0)
    strategy.global_arrays = ref = _reference_arrays()  # tiny-micro: 4 layers, LoRA rank 4
    strategy.assigned, strategy.nodes = {7: 1}, {7: {"window": 1, "rank": 2}}

    def reply(arrays, window=1, rank=2):
        metrics = MetricRecord({"num-examples": 5, "window": window, "lora-rank": rank})
        return RecordDict({"arrays": to_record(arrays), "metrics": metrics})

    layer1 = wire.truncate_rank({k: v for k, v in ref.items() if wire.layer_of(k) == 1}, 2)
    assert strategy.problems_of(7, reply(layer1)) == []
    layer0 = wire.truncate_rank({k: v for k, v in ref.items() if wire.layer_of(k) == 0}, 2)
    assert "not assigned" in strategy.problems_of(7, reply({**layer1, **layer0}))[0]
    assert "shape" in strategy.problems_of(7, reply(wire.truncate_rank(layer1, 1)))[0]
    assert "declared" in strategy.problems_of(7, reply(layer1, window=2))[0]


def test_a_round_goes_on_without_the_bad_updates(monkeypatch):
    from flwr.app import ConfigRecord, Message
    from flwr.supercore.task_identity import TaskIdentity

    for field, value in (("run_id", 1), ("task_id", 1), ("node_id", 0)):  # what a real run sets
        monkeypatch.setattr(TaskIdentity, f"_{field}", value)
    strategy = _strategy()
    strategy.global_arrays = ref = _reference_arrays()
    name = sorted(ref)[0]
    updates = {
        11: _content({k: v + 0.1 for k, v in ref.items()}, examples=10),
        12: _content({k: v + 0.5 for k, v in ref.items()}, examples=30),
        13: _content({**ref, name: np.full_like(ref[name], np.nan)}, examples=500),
        14: _content({**ref, name: np.zeros((2, 2), np.float32)}, examples=500),
    }
    replies = []
    for node, content in updates.items():
        instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")
        replies.append(Message(content, reply_to=instruction))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    for key, value in arrays.items():
        np.testing.assert_allclose(value.numpy(), ref[key] + 0.4, rtol=1e-6, atol=1e-6)
    assert [c["node_id"] for c in strategy.round_clients[1]] == [11, 12]
    dropped = {d["node_id"]: d["reason"] for d in strategy.round_dropped[1]}
    assert "non-finite" in dropped[13] and "shape" in dropped[14]


def _overrides(values: dict) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


@needs_bbc
def test_simulation_averages_client_updates_weighted_by_examples():
    config = {**TINY, "partition": "dirichlet:0.5", "save-client-updates": True, "pipeline": "plain"}
    done = subprocess.run([sys.executable, "-m", "simulations.simulate", "--num-clients", "2", "-c", _overrides(config)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "finished:completed"
    run = Path(outcome["run_folder"])
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(len(r["clients"]) == 2 and not r["dropped"] for r in rounds[1:])
    assert all(sorted(r["sampled"]) == sorted(c["node_id"] for c in r["clients"]) for r in rounds[1:])
    assert all(c["bytes-up"] > 0 and c["peak-rss-mb"] > 0 for r in rounds[1:] for c in r["clients"])

    # The round-1 global adapter is the example-weighted mean of the updates the server kept, each
    # claim capped at max-weight-ratio (3) times the smaller one.
    saved = load_file(run / "checkpoints" / "round-1" / "adapter" / "adapter_model.safetensors")
    start = load_file(run / "checkpoints" / "round-0" / "adapter" / "adapter_model.safetensors")
    weights = {c["node_id"]: c["weight"] for c in rounds[1]["clients"]}
    claims = [c["num-examples"] for c in rounds[1]["clients"]]
    assert sorted(weights.values()) == sorted(min(n, 3 * min(claims)) for n in claims)
    assert len(set(weights.values())) == 2  # Dirichlet shares differ, so weighting matters
    updates = {node: load_file(run / "checkpoints" / "round-1" / "clients" / f"node-{node}.safetensors") for node in weights}
    total = sum(weights.values())
    for key, value in saved.items():
        mean = sum(weights[n] * updates[n][key] for n in weights) / total
        np.testing.assert_allclose(value, mean, rtol=1e-5, atol=1e-7, err_msg=key)
    assert any(not np.allclose(saved[k], start[k]) for k in saved)
    unweighted = {k: sum(u[k] for u in updates.values()) / 2 for k in saved}
    assert any(not np.allclose(saved[k], unweighted[k], rtol=1e-5, atol=1e-7) for k in saved)

    base, _ = models.load("tiny-micro")
    assert isinstance(PeftModel.from_pretrained(base, run / "adapter"), PeftModel)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and set(summary["metric_per_round"]) == {"0", "1", "2"}
    assert summary["all_clients_contributed"] is True and summary["contribution"]["fraction"] == 1.0


def _start(*args):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _stop(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@needs_bbc
def test_loopback_deployment_with_the_commands_a_user_types(tmp_path):
    port = free_port()
    server = _start("-m", "server", "--insecure", "--host", "127.0.0.1", "--port", str(port), "--flwr-home",
                    str(tmp_path / "link"), "-c", _overrides({**TINY, "num-rounds": 1, "run-dir": str(tmp_path / "runs")}))
    clients = [
        _start("-m", "client", "--server", f"127.0.0.1:{port}", "--data", "bbc", "--partition-id", str(i),
               "--num-partitions", "2", "--runtime-port", str(free_port()), "--flwr-home", str(tmp_path / f"node{i}"))
        for i in range(2)
    ]
    try:
        out, _ = server.communicate(timeout=400)
    finally:
        for process in [server, *clients]:
            _stop(process)
    assert server.returncode == 0, out[-3000:]
    outcome = json.loads(out.strip().splitlines()[-1])
    assert outcome["status"] == "finished:completed"
    rounds = (Path(outcome["run_folder"]) / "rounds.jsonl").read_text().splitlines()
    assert len(rounds) == 2 and len(json.loads(rounds[1])["clients"]) == 2
    # Real devices run the edge pipeline for their detected profile ("local"): this machine fits full depth.
    assert all(c["window"] == 4 and c["budget-mb"] > 0 for c in json.loads(rounds[1])["clients"])
    assert "round 1: test accuracy" in out
    # Stopping the wrappers stops the SuperNodes they started (each in its own session).
    deadline = time.monotonic() + 20
    while _supernodes_of(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _supernodes_of(tmp_path)


def _supernodes_of(tmp_path) -> list[str]:
    """Command lines of live flower-supernode processes that use this test's folders."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if "flower-supernode" in cmd and str(tmp_path) in environ:
            found.append(cmd)
    return found


def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("address, message", [
    ("nonsense", "is not HOST:PORT"),
    ("127.0.0.1:99999", "out of range"),
    ("127.0.0.1:http", "is not a number"),
])
def test_client_refuses_malformed_addresses(address, message):
    done = _cli("-m", "client", "--server", address, "--data", "bbc")
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_client_gives_up_on_an_unreachable_server_with_a_clear_message():
    started = time.monotonic()
    done = _cli("-m", "client", "--server", f"127.0.0.1:{free_port()}", "--data", "bbc", "--connect-tries", "2")
    assert done.returncode == 2 and "cannot reach the server" in done.stderr
    assert time.monotonic() - started < 30


def test_client_refuses_missing_data_before_connecting(tmp_path):
    missing = tmp_path / "mine.jsonl"
    done = _cli("-m", "client", "--server", "127.0.0.1:8080", "--data", str(missing))
    assert done.returncode == 2 and "mine.jsonl" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--port", "80808"], "out of range"),
    (["-c", "num-rounds=0"], "num-rounds = 0"),
    (["-c", "no-such-key=1"], "unknown key 'no-such-key'"),
    (["--config", "missing.toml"], "does not exist"),
    (["-c", 'data="nowhere.jsonl"'], "nowhere.jsonl"),
    (["-c", 'model="tiny-giant"'], "unknown tiny model"),
])
def test_server_refuses_bad_settings_before_starting(args, message):
    done = _cli("-m", "server", *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
