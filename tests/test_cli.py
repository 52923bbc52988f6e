import json
import subprocess
import sys

import pytest

from conftest import needs_bbc
from edgecore.cli import build_parser


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgecore", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_finetune_help_documents_every_option():
    parser = build_parser()
    finetune = parser._subparsers._group_actions[0].choices["finetune"]
    text = finetune.format_help()
    for action in finetune._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{action.option_strings} has no help"


@needs_bbc
def test_finetune_writes_a_run_folder_that_stock_peft_loads(tmp_path):
    out = tmp_path / "run"
    done = run_cli("finetune", "--model", "tiny-micro", "--data", "bbc", "--steps", "3", "--batch-size", "4",
                   "--seq-len", "160", "--eval-samples", "8", "--num-partitions", "4", "--partition", "dirichlet:0.5",
                   "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "before: accuracy" in done.stdout and "after:  accuracy" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["before"]["n"] == 8 and "accuracy" in summary["eval"]["after"]
    assert summary["train"]["steps"] == 3
    assert len((out / "steps.jsonl").read_text().splitlines()) == 3

    from peft import PeftModel
    from edgecore import models
    base, _ = models.load("tiny-micro")
    assert isinstance(PeftModel.from_pretrained(base, out / "adapter"), PeftModel)

    again = run_cli("finetune", "--model", "tiny-micro", "--data", "bbc", "--steps", "1", "--out", str(out))
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert (out / "summary.json").read_text() == json.dumps(summary, indent=2)  # nothing lost


@pytest.mark.parametrize("args, message", [
    (["--data", "no-such-data"], "unknown dataset"),
    (["--data", "missing.jsonl"], "missing.jsonl"),
    (["--model", "no-such-model"], "neither a known name"),
    (["--steps", "0"], "steps=0"),
    (["--precision", "fp8"], "invalid choice"),
    (["--num-partitions", "2", "--partition-id", "5"], "partition id 5"),
    (["--partition", "zipf"], "zipf"),
])
def test_bad_input_is_one_clear_line_without_a_traceback(tmp_path, args, message):
    done = run_cli("finetune", "--model", "tiny-micro", "--steps", "1", "--out", str(tmp_path / "r"), *args, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "r" / "summary.json").exists()


def _board(tmp_path, budget_mb: float) -> str:
    path = tmp_path / "board.toml"
    path.write_text(f'name = "tiny-board"\nmemory_budget_mb = {budget_mb}\nweight_bits = [4, 8]\nprecision = "fp32"\n'
                    "[sparsity]\nunstructured = [0.0, 0.5]\n")
    return str(path)


@needs_bbc
def test_schedule_compresses_plans_and_prints_every_weight_then_reuses_its_cost_table(tmp_path):
    env = {**__import__("os").environ, "EDGECORE_CACHE": str(tmp_path / "cache")}
    args = ["schedule", "--model", "tiny-5m", "--device", _board(tmp_path, 60), "--workload", "decode",
            "--seq-len", "8", "--new-tokens", "4", "--json", str(tmp_path / "plan.json")]
    first = subprocess.run([sys.executable, "-m", "edgecore", *args], capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["weights"]) == 6 * 7 + 1 and plan["weights"][-1]["name"] == "lm_head"
    assert all(w["kernels"] for w in plan["weights"]) and plan["predicted_peak_mb"] <= 60
    assert "model.layers.5.mlp.down_proj" in first.stdout and "predicted" in first.stdout
    assert "0 measured now" not in first.stdout
    again = subprocess.run([sys.executable, "-m", "edgecore", *args[:-2]], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "0 measured now" in again.stdout  # every timing came from the cache


@pytest.mark.parametrize("args, message", [
    (["--costs", "missing.json"], "--costs missing.json is not a file"),
    (["--budget-mb", "-1"], "--budget-mb -1"),
    (["--new-tokens", "0"], "--new-tokens 0"),
    (["--workload", "finetune"], "invalid choice"),
])
def test_schedule_bad_input_is_one_clear_line(tmp_path, args, message):
    done = run_cli("schedule", "--model", "tiny-5m", "--device", _board(tmp_path, 60), *args, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
