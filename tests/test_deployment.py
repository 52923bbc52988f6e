"""Real deployment on loopback: every Flower message runs in a fresh process, so a device's model must come from its disk.

`python -m server` and three `python -m client` processes, as a user types them, with profiles
shaped like the demo fleet's but sized for tiny-5m: a board that compresses on the device, a
board that brings a base compressed elsewhere (`python -m edgecore compress`), and a phone that
keeps the dense model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_bbc
from federation.processes import free_port
from test_federation import _overrides, _stop

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"model": "tiny-5m", "data": "bbc", "partition": "iid", "num-rounds": 2, "local-steps": 2, "batch-size": 2,
          "seq-len": 160, "lora-r": 4, "min-clients": 3, "eval-samples": 16, "device-eval-samples": 8, "vote-samples": 8,
          "calib-samples": 2, "fleet": ""}


def _profile(folder: Path, name: str, budget: float, bits: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(f'name = "{name}"\nmemory_budget_mb = {budget}\nweight_bits = {bits}\nprecision = "fp32"\n'
                    '[sparsity]\nunstructured = [0.0, 0.5]\n')
    return path


def _start(env, *args):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env)


@needs_bbc
@pytest.mark.slow
def test_round_two_loads_every_compressed_device_model_from_disk(tmp_path):
    env = {**os.environ, "EDGECORE_CACHE": str(tmp_path / "cache")}  # each "device" starts with an empty disk store
    board = _profile(tmp_path, "tiny-board", 50, "[4, 8]")
    carried = _profile(tmp_path, "tiny-carried", 50, "[4, 8]")
    phone = _profile(tmp_path, "tiny-phone", 400, "[8, 16, 32]")
    folder = tmp_path / "carried-base"
    made = subprocess.run([sys.executable, "-m", "edgecore", "compress", "--model", "tiny-5m", "--device", str(carried),
                           "--data", "bbc", "--calib-samples", "2", "--batch", "2", "--seq-len", "160", "--out", str(folder),
                           "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]

    port = free_port()
    server = _start(env, "-m", "server", "--insecure", "--host", "127.0.0.1", "--port", str(port), "--flwr-home", str(tmp_path / "link"),
                    "-c", _overrides({**CONFIG, "run-dir": str(tmp_path / "runs")}))
    devices = [(board, []), (carried, ["--model", str(folder)]), (phone, [])]
    clients = [
        _start(env, "-m", "client", "--server", f"127.0.0.1:{port}", "--data", "bbc", "--partition-id", str(i),
               "--num-partitions", "3", "--device-profile", str(profile), *extra, "--runtime-port", str(free_port()),
               "--flwr-home", str(tmp_path / f"node{i}"))
        for i, (profile, extra) in enumerate(devices)
    ]
    try:
        out, _ = server.communicate(timeout=600)
    finally:
        for process in [server, *clients]:
            _stop(process)
    logs = [c.stdout.read() for c in clients]
    assert server.returncode == 0, out[-3000:] + "\n".join(log[-1500:] for log in logs)
    outcome = json.loads(out.strip().splitlines()[-1])
    assert outcome["status"] == "finished:completed"
    rounds = [json.loads(line) for line in (Path(outcome["run_folder"]) / "rounds.jsonl").read_text().splitlines()]
    first, second = ({c["device"]: c for c in r["clients"]} for r in rounds[1:3])
    assert set(first) == set(second) == {"tiny-board", "tiny-carried", "tiny-phone"}  # every device, every round
    # The board compressed on the device in round 1, in its own fresh process, and kept it on its disk.
    assert first["tiny-board"]["compressed"] == 1 and first["tiny-board"]["built"] == 1
    assert first["tiny-board"]["from-disk"] == 0 and first["tiny-board"]["build-peak-mb"] > 0
    # Round 2 is another fresh process: it loads the packed base from disk and compresses nothing.
    assert second["tiny-board"]["from-disk"] == 1 and second["tiny-board"]["built"] == 0
    assert second["tiny-board"]["prepare-s"] < first["tiny-board"]["prepare-s"]
    # The carried base is used as it came, every round; the phone keeps the dense model.
    assert first["tiny-carried"]["from-disk"] == second["tiny-carried"]["from-disk"] == 1
    assert first["tiny-carried"]["built"] == 0 and first["tiny-carried"]["compressed"] == 1
    assert first["tiny-phone"]["compressed"] == 0
    for by_device in (first, second):
        assert all(c["job-peak-mb"] <= c["budget-mb"] for c in by_device.values())


def test_a_carried_base_the_device_cannot_run_is_refused_before_connecting(tmp_path):
    folder = tmp_path / "not-a-base"
    folder.mkdir()
    done = subprocess.run([sys.executable, "-m", "client", "--server", "127.0.0.1:8080", "--data", "bbc",
                           "--device-profile", "pi-zero-2w", "--model", str(folder)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not a compressed model folder" in done.stderr
    assert "Traceback" not in done.stderr
