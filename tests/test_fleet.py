"""Fleets: the files, the client's device model, and a real heterogeneous simulation on a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from client.device import client_lora
from conftest import needs_bbc
from edgecore import wire
from edgecore.errors import EdgecoreError
from edgecore.experiment import Experiment
from edgecore.fleet import resolve_fleet

ROOT = Path(__file__).resolve().parent.parent


def test_the_default_fleet_has_three_distinct_devices_the_smallest_forcing_compression():
    fleet = resolve_fleet("demo")
    names = [slot.device.name for slot in fleet.slots]
    assert len(set(names)) == 3 and fleet.client(4).device.name == names[1]
    smallest = min(fleet.slots, key=lambda s: s.device.memory_budget_mb).device
    assert smallest.memory_budget_mb < 513  # SmolLM2's dense fp32 weights alone do not fit


def test_fleet_files_are_checked_with_the_file_and_field_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[clients]]\ndevice = "pi4-1gb"\nrank = 4\n')
    with pytest.raises(EdgecoreError, match=r"bad.toml, clients\[0\]: unknown keys \['rank'\]"):
        resolve_fleet(str(bad))
    bad.write_text('[[clients]]\ndevice = "pi9"\n')
    with pytest.raises(EdgecoreError, match="clients\\[0\\]: unknown device profile 'pi9'"):
        resolve_fleet(str(bad))
    bad.write_text('[[clients]]\ndevice = "pi4-1gb"\nlora-rank = 0\n')
    with pytest.raises(EdgecoreError, match="lora-rank = 0 must be a positive integer"):
        resolve_fleet(str(bad))
    bad.write_text("description = 'none'\n")
    with pytest.raises(EdgecoreError, match="lists no clients"):
        resolve_fleet(str(bad))
    with pytest.raises(EdgecoreError, match="fleet 'nowhere' not found"):
        resolve_fleet("nowhere")
    bad.write_text('[[clients]]\ndevice = "pi4-1gb"\nlora-rank = 16\n')
    with pytest.raises(EdgecoreError, match="exceed lora-r = 8"):
        Experiment.from_mapping({"fleet": str(bad), "lora-r": 8})


def test_every_rank_applies_the_same_lora_scale():
    experiment = Experiment.from_mapping({"lora-r": 8, "lora-alpha": 16})
    for rank in (1, 2, 4, 8):
        lora = client_lora(experiment, rank)
        assert lora.r == rank and lora.alpha / lora.r == 2.0
    assert client_lora(experiment, None).r == 8


def _profile(folder: Path, name: str, budget: float, bits: str, sparsity: str = "[0.0]") -> str:
    path = folder / f"{name}.toml"
    path.write_text(f'name = "{name}"\nmemory_budget_mb = {budget}\nweight_bits = {bits}\nprecision = "fp32"\n'
                    f"[sparsity]\nunstructured = {sparsity}\n")
    return str(path)


@needs_bbc
@pytest.mark.slow
def test_a_two_profile_fleet_trains_with_both_kinds_of_client_within_budget(tmp_path):
    """tiny-5m: a 70 MB board must compress and train a short window at rank 2; a 400 MB laptop stays dense."""
    board = _profile(tmp_path, "tiny-board", 70, "[4, 8]", "[0.0, 0.5]")
    laptop = _profile(tmp_path, "tiny-laptop", 400, "[8, 16, 32]")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[clients]]\ndevice = "{board}"\nlora-rank = 2\n\n[[clients]]\ndevice = "{laptop}"\n')
    config = {"model": "tiny-5m", "data": "bbc", "partition": "iid", "num-rounds": 2, "local-steps": 2, "batch-size": 4,
              "seq-len": 160, "lora-r": 4, "min-clients": 2, "eval-samples": 16, "device-eval-samples": 8,
              "vote-samples": 8, "fleet": str(fleet), "run-dir": str(tmp_path / "runs"), "save-client-updates": True}
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    done = subprocess.run([sys.executable, "-m", "simulations.simulate", "--num-clients", "2", "-c", overrides],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    run = Path(json.loads(done.stdout.strip().splitlines()[-1])["run_folder"])
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    for r in rounds[1:]:
        assert not r["dropped"], r["dropped"]
        by_device = {c["device"]: c for c in r["clients"]}
        assert set(by_device) == {"tiny-board", "tiny-laptop"}
        small, big = by_device["tiny-board"], by_device["tiny-laptop"]
        assert small["compressed"] == 1 and big["compressed"] == 0
        assert small["scheduled"] == 1 and big["scheduled"] == 0  # the compressed base runs through its plan
        assert small["predicted-step-s"] > 0
        assert small["window"] < big["window"] == 6 and small["lora-rank"] == 2
        assert all(c["job-peak-mb"] <= c["budget-mb"] for c in r["clients"])
        assert {d["device"] for d in r["devices"]} == {"tiny-board"}  # the dense base is the server's evaluation
        # The board sent only its window's tensors, at its rank.
        update = load_file(run / "checkpoints" / f"round-{r['round']}" / "clients" / f"node-{small['node_id']}.safetensors")
        layers = {wire.layer_of(k) for k in update if not k.startswith(wire.EXIT_PREFIX)}
        trained = [e for e, n in zip(small["exits"], small["exit-steps"]) if n]
        windows = {l for e in trained for l in range(max(0, e - small["window"] + 1), e + 1)}
        assert layers <= windows and all(v.shape[wire.rank_axis(k)] == 2 for k, v in update.items())
        if small["assigned_exit"] is not None:  # from round 2: one window, the one the server assigned
            assert trained == [small["assigned_exit"]] and len(layers) <= small["window"]
    assert not rounds[1]["assigned_exits"] and len(rounds[2]["assigned_exits"]) == 2  # once the windows are known
    assert len(rounds[1]["exit_weights"]) == 4 and sum(rounds[1]["exit_weights"]) == pytest.approx(1.0)
    summary = json.loads((run / "summary.json").read_text())
    assert all(row["within"] for row in summary["clients_within_budget"].values())
    assert set(summary["device_accuracy_per_round"]) == {"tiny-board"}
    assert set(summary["clients_within_budget"]) == {"tiny-board", "tiny-laptop"}
