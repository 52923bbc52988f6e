"""edgecore.schedule: streaming priced per read, and the guard that checks a plan's first steps against its
prediction and falls back to LUC's own kernels. Nothing here asserts on a real timing: step records carry
crafted seconds, and cost tables are pre-filled (tests/test_schedule.py's helpers)."""

import copy
import json
from dataclasses import replace

import pytest
import torch

from edgecore import lm
from edgecore.errors import EdgecoreError
from edgecore.finetune import StepRecord
from edgecore.schedule import streaming
from edgecore.schedule.costs import CostTable
from edgecore.schedule.executor import Executor
from edgecore.schedule.guard import LUC, PLAN, TOLERANCE, PlanCheck, Verdict, plan_key, should_install, verdict_path
from edgecore.schedule.kernels import KERNELS
from edgecore.schedule.planner import plan
from edgecore.schedule.workload import Workload
from edgecore.tuning.exits import Exits, default_exits
from edgecore.tuning.window import window_loss
from test_schedule import assert_unscheduled, compressed, fake_costs, lora, ms_per_row  # noqa: F401 (fixtures)

FAST_UNPACKED = ms_per_row({**dict.fromkeys(KERNELS, 1.0), "unpacked-fp32": 0.2})
TRAIN = Workload.train(2, 16, 2)



def buffers(model) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


def assert_same_buffers(model, expected):
    found = dict(model.named_buffers())
    assert found.keys() == expected.keys()
    for name, tensor in expected.items():
        assert found[name].dtype == tensor.dtype and torch.equal(found[name], tensor), name


# ------------------------------------------------------------------------------------- streaming price


def _streaming_plan(model, workload, costs, key):
    budget = plan(model, workload, costs, model_key=key, allowed=set()).peak_bytes - 1
    result = plan(model, workload, costs, model_key=key, budget_bytes=budget, allowed={"unpacked-fp32"})
    assert result.streamed_layers
    return result


def test_streaming_is_priced_per_read_and_per_byte(compressed, tmp_path):
    workload = Workload.decode(4, 3)  # every streamed layer is read once per token
    costs = fake_costs(tmp_path, compressed, [workload], "mixed", FAST_UNPACKED)
    per_read, per_byte = 2e-3, 1e-9
    costs.entries[CostTable.STREAM_READ_KEY], costs.entries[CostTable.STREAM_BYTE_KEY] = per_read, per_byte
    result = _streaming_plan(compressed, workload, costs, "mixed")
    assert (result.stream_seconds_per_read, result.stream_seconds_per_byte) == (per_read, per_byte)
    streamed = [c for c in result.choices if c.streamed]
    reads = len(result.streamed_layers) * workload.new_tokens
    stream_s = reads * per_read + workload.new_tokens * sum(c.stored_bytes for c in streamed) * per_byte
    kernels_s = sum(c.option.seconds for c in result.choices)
    assert result.predicted_seconds == pytest.approx(result.rest_seconds + kernels_s + stream_s)
    per_weight = sum(map(result.choice_seconds, result.choices))  # the reads shared among the layer's weights
    assert result.predicted_seconds == pytest.approx(result.rest_seconds + per_weight)
    assert result.summary()["stream_s"] == pytest.approx(stream_s)

    # The same bytes in fewer reads: every streamed weight counted as one layer's
    fewer = copy.deepcopy(result)
    first = fewer.streamed_layers[0]
    for choice in fewer.choices:
        if choice.streamed:
            choice.layer = first
    assert fewer.streamed_layers == [first] and len(result.streamed_layers) > 1
    assert sum(c.stored_bytes for c in fewer.choices if c.streamed) == sum(c.stored_bytes for c in streamed)
    saved = (len(result.streamed_layers) - 1) * workload.new_tokens * per_read
    assert result.predicted_seconds - fewer.predicted_seconds == pytest.approx(saved)
    assert result.predicted_seconds > fewer.predicted_seconds


def test_a_dear_read_makes_the_planner_give_memory_back_another_way(compressed, tmp_path):
    workload = Workload.decode(4, 3)
    costs = fake_costs(tmp_path, compressed, [workload], "mixed", FAST_UNPACKED)
    budget = plan(compressed, workload, costs, model_key="mixed", allowed=set()).peak_bytes  # LUC's own fits
    cheap = plan(compressed, workload, costs, model_key="mixed", budget_bytes=budget, allowed={"unpacked-fp32"})
    assert cheap.streamed_layers  # reads cost nothing: streaming frees memory for faster kernels
    costs.entries[CostTable.STREAM_READ_KEY] = 1.0  # a second a read
    dear = plan(compressed, workload, costs, model_key="mixed", budget_bytes=budget, allowed={"unpacked-fp32"})
    assert dear.fits and not dear.streamed_layers
    repriced = replace(cheap, stream_seconds_per_read=1.0)
    assert dear.predicted_seconds < repriced.predicted_seconds


def test_an_old_table_loads_and_measures_the_read_price(tmp_path, monkeypatch):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"profile": "phone", "entries": {"stream|seconds_per_byte": 1e-10}}))
    costs = CostTable.load(path)
    calls = []
    monkeypatch.setattr("edgecore.schedule.costs.measure_read_cost", lambda: calls.append(1) or (3e-4, 2e-10))
    assert costs.stream_read_seconds() == (3e-4, 2e-10) and costs.measured_now == 1
    assert costs.stream_read_seconds() == (3e-4, 2e-10) and len(calls) == 1  # cached
    costs.save()
    again = CostTable.load(path)
    assert again.stream_read_seconds() == (3e-4, 2e-10) and again.measured_now == 0


def test_the_read_probe_streams_through_layer_stream_and_cleans_up(monkeypatch):
    # Shape only (the numbers are this machine's): both terms non-negative, LayerStream really used, no file left.
    streams = []
    real = streaming.LayerStream

    def spy(*args, **kwargs):
        streams.append(real(*args, **kwargs))
        return streams[-1]
    monkeypatch.setattr(streaming, "LayerStream", spy)
    per_read, per_byte = streaming.measure_read_cost()
    assert per_read >= 0.0 and per_byte >= 0.0
    assert len(streams) == len(streaming.PROBE_BYTES)
    for stream, nbytes in zip(streams, streaming.PROBE_BYTES):
        assert stream.reads > 0 and not stream.path.exists()
        assert nbytes * 0.99 <= stream.stored_bytes / streaming.PROBE_LAYERS <= nbytes


# ------------------------------------------------------------------------------------- executor


def test_a_plan_reinstalls_after_uninstall_and_the_model_comes_back_exactly(compressed, tmp_path):
    workload = Workload.forward(1, 8)
    costs = fake_costs(tmp_path, compressed, [workload], "mixed", FAST_UNPACKED)
    result = _streaming_plan(compressed, workload, costs, "mixed")
    assert any(c.parked for c in result.choices)  # parked and streamed weights both go to disk and back
    reference, before = workload.run(compressed), buffers(compressed)
    executor = Executor(compressed, result, spill_dir=tmp_path / "spill")
    outputs = []
    for _ in range(2):
        executor.install()
        outputs.append(workload.run(compressed))
        assert executor.stream.reads == len(result.streamed_layers)
        executor.uninstall()
        assert_unscheduled(compressed)
        assert_same_buffers(compressed, before)
        assert torch.equal(workload.run(compressed), reference)
    assert torch.equal(outputs[0], outputs[1])
    executor.uninstall()  # twice is harmless
    assert not any((tmp_path / "spill").iterdir())


# ------------------------------------------------------------------------------------- the guard


@pytest.fixture
def setup(lora, tmp_path):
    """A training plan (unpacked weights, LUC's packed ones parked), LUC's own plan, an installed executor."""
    costs = fake_costs(tmp_path, lora, [TRAIN], "lora", FAST_UNPACKED)
    result = plan(lora, TRAIN, costs, model_key="lora", allowed={"unpacked-fp32"})
    lucs = plan(lora, TRAIN, costs, model_key="lora", allowed=set())
    assert any(c.parked for c in result.choices) and result.predicted_seconds < lucs.predicted_seconds
    probe = Workload.forward(1, 8)
    reference, before = probe.run(lora), buffers(lora)
    executor = Executor(lora, result).install()
    planned = probe.run(lora)
    yield result, lucs, executor, lambda: probe.run(lora), reference, planned, before
    executor.uninstall()
    assert_unscheduled(lora)


def feed(check, seconds):
    for step, step_s in enumerate(seconds, 1):
        check(StepRecord(step=step, loss=1.0, lr=1e-3, step_s=step_s))


def test_the_guard_falls_back_to_lucs_kernels_when_the_plan_runs_slower(setup):
    result, lucs, executor, run, reference, planned, before = setup
    p = result.predicted_seconds
    check = PlanCheck(executor, 10 * p)
    feed(check, [50 * p, 3 * p])  # warm-up, then one of two timed steps
    assert executor.installed and check.verdict is None
    feed(check, [3 * p])  # median 3x the prediction: over TOLERANCE
    assert check.verdict is None and not executor.installed and check.running == LUC
    assert_unscheduled(executor.model)
    assert_same_buffers(executor.model, before)  # the parked weights are back
    assert torch.equal(run(), reference)  # LUC's own outputs
    feed(check, [50 * p, 2 * p, 2 * p])  # warm-up on LUC's kernels, then two timed steps
    verdict = check.finish()
    assert verdict == check.verdict and verdict.kept == LUC
    assert (verdict.plan_s, verdict.luc_s, verdict.predicted_s, verdict.luc_predicted_s) == (3 * p, 2 * p, p, 10 * p)
    assert verdict.plan_key == plan_key(result) and not should_install(verdict, result)
    assert not executor.installed and torch.equal(run(), reference)
    feed(check, [100 * p] * 5)  # decided: later steps change nothing
    assert not executor.installed


def test_the_guard_keeps_a_plan_that_runs_as_predicted(setup):
    result, lucs, executor, run, reference, planned, before = setup
    p = result.predicted_seconds
    runners = dict(executor.runners)
    check = PlanCheck(executor, lucs.predicted_seconds)
    feed(check, [50 * p, 1.2 * p, 0.9 * TOLERANCE * p, 100 * p])
    verdict = check.finish()
    assert verdict.kept == PLAN and verdict.luc_s is None
    assert verdict.plan_s == pytest.approx((1.2 + 0.9 * TOLERANCE) / 2 * p)
    assert executor.installed and executor.runners == runners  # never taken out
    assert should_install(verdict, result) and torch.equal(run(), planned)


def test_a_plan_slower_than_lucs_prediction_is_checked_too(setup):
    result, lucs, executor, run, reference, planned, before = setup
    p = result.predicted_seconds
    check = PlanCheck(executor, 1.1 * p)  # within TOLERANCE of its own prediction, yet over LUC's
    feed(check, [p, 1.2 * p, 1.2 * p])
    assert not executor.installed and check.running == LUC


def test_the_guard_reinstalls_the_plan_when_lucs_kernels_run_slower_still(setup):
    result, lucs, executor, run, reference, planned, before = setup
    p = result.predicted_seconds
    check = PlanCheck(executor, 10 * p)
    feed(check, [p, 3 * p, 3 * p])
    assert not executor.installed
    feed(check, [p, 4 * p, 5 * p])
    verdict = check.finish()
    assert verdict.kept == PLAN and (verdict.plan_s, verdict.luc_s) == (3 * p, 4.5 * p)
    assert executor.installed and torch.equal(run(), planned) and should_install(verdict, result)
    assert any(r.parked for r in executor.runners.values())  # parked again


def test_a_short_run_leaves_the_plan_installed_and_no_verdict(setup, tmp_path):
    result, lucs, executor, run, reference, planned, before = setup
    p = result.predicted_seconds
    path = tmp_path / "verdict.json"
    check = PlanCheck(executor, 10 * p, path=path)
    feed(check, [100 * p, 100 * p])  # a warm-up and one step of the two the check needs
    assert check.finish() is None and executor.installed and not path.exists()
    # Cut short while timing LUC's own kernels: the plan goes back in
    check = PlanCheck(executor, 10 * p, path=path)
    feed(check, [p, 3 * p, 3 * p, p])
    assert not executor.installed
    assert check.finish() is None and executor.installed and not path.exists()
    assert torch.equal(run(), planned)


def test_the_verdict_round_trips_through_json_and_names_its_plan(setup, tmp_path):
    result, lucs, executor, run, reference, planned, before = setup
    p = result.predicted_seconds
    path = verdict_path(result, tmp_path)
    assert Verdict.load(path) is None and should_install(Verdict.load(path), result)
    check = PlanCheck(executor, 10 * p, path=path)
    feed(check, [p, 3 * p, 3 * p, p, 2 * p, 2 * p])
    assert check.verdict.kept == LUC
    loaded = Verdict.load(path)
    assert loaded == check.verdict and isinstance(loaded.luc_s, float)
    assert Verdict.from_dict(json.loads(json.dumps(loaded.to_dict()))) == loaded  # e.g. kept in a device store
    assert not should_install(loaded, result)  # a later process keeps LUC's own kernels
    assert should_install(loaded, lucs)  # a verdict on one plan says nothing about another
    assert verdict_path(lucs, tmp_path) != path
    kept_plan = replace(loaded, kept=PLAN, luc_s=None)
    kept_plan.save(path)
    assert Verdict.load(path) == kept_plan and should_install(Verdict.load(path), result)


def test_where_lucs_own_kernels_must_stream_the_guard_falls_back_to_lucs_streaming_plan(lora, tmp_path):
    costs = fake_costs(tmp_path, lora, [TRAIN], "lora", FAST_UNPACKED)
    budget = plan(lora, TRAIN, costs, model_key="lora", allowed=set()).peak_bytes - 1  # every weight in memory: over
    lucs = plan(lora, TRAIN, costs, model_key="lora", budget_bytes=budget, allowed=set())
    result = plan(lora, TRAIN, costs, model_key="lora", budget_bytes=budget, allowed={"unpacked-fp32"})
    assert lucs.streamed_layers and lucs.fits and result.fits
    probe = Workload.forward(1, 8)
    reference = probe.run(lora)
    executor, fallback = Executor(lora, result).install(), Executor(lora, lucs)
    try:
        p = result.predicted_seconds
        check = PlanCheck(executor, lucs.predicted_seconds, luc=fallback)
        feed(check, [p, 3 * p, 3 * p])
        assert not executor.installed and fallback.installed and fallback.stream is not None  # within the budget
        assert torch.equal(probe.run(lora), reference)
        feed(check, [p, 4 * p, 4 * p])
        assert check.finish().kept == PLAN and executor.installed and not fallback.installed
    finally:
        fallback.uninstall()
        executor.uninstall()
    assert_unscheduled(lora)


@pytest.mark.parametrize("text", ["{not json", json.dumps({"kept": "plan"}), json.dumps([1]),
                                  json.dumps({"kept": "maybe", "plan_s": 1.0, "luc_s": None, "predicted_s": 1.0,
                                              "luc_predicted_s": 1.0, "reason": ""})])
def test_an_unreadable_verdict_names_its_path(tmp_path, text):
    path = tmp_path / "verdict.json"
    path.write_text(text)
    with pytest.raises(EdgecoreError, match="verdict.json"):
        Verdict.load(path)


def test_the_guard_needs_an_installed_plan(setup):
    result, lucs, executor, *_ = setup
    executor.uninstall()
    with pytest.raises(EdgecoreError, match="install the plan"):
        PlanCheck(executor, lucs.predicted_seconds)


def test_switching_kernels_between_optimizer_steps_trains_as_lucs_own_would(lora, tmp_path):
    """Real optimizer steps, the guard taking the plan out and putting it back between them: the losses are
    those of the same steps on LUC's own kernels (unpacked fp32 is exact up to rounding)."""
    layers = lm.causal_lm(lora).config.num_hidden_layers
    first, last = TRAIN.window(layers)
    costs = fake_costs(tmp_path, lora, [TRAIN], "lora", FAST_UNPACKED)
    result = plan(lora, TRAIN, costs, model_key="lora", allowed={"unpacked-fp32"})
    p = result.predicted_seconds
    step_s = [3 * p, 3 * p, 4 * p, 4 * p, p]  # slower than predicted, then LUC's own slower still

    def train(scheduled: bool):
        model = copy.deepcopy(lora)
        torch.manual_seed(0)
        exits = Exits(sorted({*default_exits(layers), last}), lm.causal_lm(model).config.hidden_size)
        batch = TRAIN.synthetic_batch(lm.causal_lm(model).config.vocab_size)
        params = [q for q in model.parameters() if q.requires_grad] + list(exits.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        executor = Executor(model, result).install() if scheduled else None
        check = PlanCheck(executor, 10 * p, warmup=0) if scheduled else None
        losses, installed = [], []
        for step, seconds in enumerate(step_s, 1):
            loss = window_loss(model, exits, batch, last, last - first + 1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if check is not None:
                installed.append(executor.installed)
                check(StepRecord(step, loss.item(), 1e-2, seconds))
        if executor is not None:
            assert check.finish().kept == PLAN and executor.installed
            executor.uninstall()
        return losses, installed

    scheduled, installed = train(True)
    assert installed == [True, True, False, False, True]
    plain, _ = train(False)
    assert plain[0] > plain[-1]  # it trains
    torch.testing.assert_close(scheduled, plain, rtol=1e-4, atol=0)


def test_taking_a_plan_out_frees_the_kernels_copies_before_the_parked_weights_come_back(setup, monkeypatch):
    """Both at once would be over the plan's peak, on the device, in the middle of a round."""
    executor = setup[2]
    restore = streaming.Spill.close
    seen = []

    def close(spill):
        seen.append((len(executor.runners), executor.state_bytes))
        restore(spill)

    monkeypatch.setattr(streaming.Spill, "close", close)
    assert executor.state_bytes > 0
    executor.uninstall()
    assert seen == [(0, 0)]
    assert_unscheduled(executor.model)
