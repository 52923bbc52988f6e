"""The LUC and tuning benchmarks run end to end on a tiny model (their figures are for SmolLM2)."""

import json
import subprocess
import sys


def _bench(name, tmp_path, *extra):
    out = tmp_path / f"{name}.json"
    done = subprocess.run([sys.executable, "-m", "simulations.bench", name, "--model", "tiny-5m", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_luc_bench_reports_every_configuration(tmp_path):
    report = _bench("luc", tmp_path, "--eval-samples", "4")
    configs = {r["config"]: r for r in report["results"]}
    assert set(configs) == {"dense", "uniform", "luc"}
    for kind in ("uniform", "luc"):
        assert configs[kind]["weights_mb"] == configs[kind]["promised_mb"]
        assert configs[kind]["fresh_process"]["stored_mb"] == configs[kind]["weights_mb"]
    assert configs["luc"]["weights_mb"] <= configs["uniform"]["weights_mb"]
    assert {t["metric"] for t in report["targets"]} >= {"luc_ppl_reduction_vs_uniform", "weights_measured_vs_promised_gap"}
    assert len(report["measure_check"]["policies"]) == 10


def test_tuning_bench_reports_every_configuration(tmp_path):
    report = _bench("tuning", tmp_path, "--steps", "2", "--eval-samples", "4")
    names = [r["config"] for r in report["results"]]
    assert names == ["a_plain", "c_luc_adaptive", "b_adaptive", "c_luc_adaptive_same_wall_time"]
    luc, dense = report["results"][1], report["results"][2]
    assert luc["window"] == dense["window"] >= 1
    assert luc["inference"]["full_depth"]["mean_layers"] == 6
    assert "a_over_c_step_s" in report["ratios"]
