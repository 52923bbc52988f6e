"""edgecore.schedule: kernels against the reference matmul, the planner against its budget, the executor and
streaming against the unscheduled model. Every cost table is pre-filled with fake timings (nothing is measured)
and lives under tmp_path."""

import copy
import gc
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgecore import lm, models
from edgecore.errors import EdgecoreError
from edgecore.finetune import LoraSettings, add_lora
from edgecore import luc
from edgecore.luc.layer import CompressedLinear
from edgecore.luc import FP32_BITS, Calibration, Candidate
from edgecore.luc.table import QuantizedHead, QuantizedTable
from edgecore.measure import peak_rss_mb, reset_peak, rss_mb
from edgecore.memory import MIB, ModelShape
from edgecore.schedule import streaming
from edgecore.schedule.costs import CostTable, machine_id, scheduled_modules
from edgecore.schedule.executor import Executor
from edgecore.schedule.formats import source_of
from edgecore.schedule.kernels import BASELINE, KERNELS, kernels_for
from edgecore.schedule.planner import plan
from edgecore.schedule.workload import INFER, TRAIN, Calls, Workload
from edgecore.tuning.exits import Exits, default_exits
from edgecore.tuning.window import window_loss

GROUP = 64

# ------------------------------------------------------------------------------------------ helpers


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of `a` against the reference `b`."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def keep_half(out_features: int, in_features: int, seed: int = 1) -> torch.Tensor:
    """A keep-mask with the same count (half) in every row, as edgecore.luc.prune builds them."""
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(out_features, in_features, generator=g).argsort(dim=1)[:, : in_features // 2]
    return torch.zeros(out_features, in_features, dtype=torch.bool).scatter_(1, order, True)


def make_linear(out_features: int, in_features: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight, std=0.05)
    if bias:
        nn.init.normal_(linear.bias, std=0.5)
    return linear


def compressed_linear(bits, pruned: bool, bias: bool, out_features: int = 64, in_features: int = 128):
    keep = keep_half(out_features, in_features) if pruned else None
    return CompressedLinear.from_linear(make_linear(out_features, in_features, bias), bits=bits, keep=keep,
                                        group_size=GROUP)


def quantized_head(rows: int = 96, dim: int = 128, bits: int = 4) -> QuantizedHead:
    torch.manual_seed(3)
    return QuantizedHead(QuantizedTable.from_weight(torch.randn(rows, dim) * 0.05, bits, GROUP))


MODULE_CASES = {
    **{f"linear-{'fp32' if b == FP32_BITS else f'{b}bit'}-{'pruned' if p else 'dense'}-{'bias' if s else 'nobias'}":
       (lambda b=b, p=p, s=s: compressed_linear(b, p, s))
       for b in (2, 3, 4, 8, 16, FP32_BITS) for p in (False, True) for s in (False, True)},
    "head-4bit-table": quantized_head,
    "nn-linear-bias": lambda: make_linear(64, 128, True),
    "nn-linear-nobias": lambda: make_linear(64, 128, False),
}


def tensor_bytes(t: torch.Tensor) -> int:
    if t.layout == torch.sparse_csr:
        return sum(p.numel() * p.element_size() for p in (t.values(), t.crow_indices(), t.col_indices()))
    assert t.layout == torch.strided
    return t.numel() * t.element_size()


def ms_per_row(table: dict[str, float], train_factor: float = 3.0):
    """Fake timings: table[kernel] (or a function of rows) milliseconds per row, `train_factor` times more with a backward."""
    def seconds(kernel: str, fmt, rows: int, role: str) -> float:
        per_row = table[kernel](rows) if callable(table[kernel]) else table[kernel]
        return 1e-3 * per_row * rows * (train_factor if role == TRAIN else 1.0)
    return seconds


# Roughly the ranking on the 2-core test machine at many rows: unpacked fp32 first, bf16 last.
TYPICAL = ms_per_row({"luc-dequant": 1.0, "dequant-bf16": 4.0, "unpacked-fp32": 0.3, "int8-weight-only": 0.5,
                      "int4-weight-only": 0.6, "csr-fp32": 0.7})


def prefill(costs: CostTable, model, workload: Workload, model_key: str, seconds, rest: float = 0.01) -> None:
    """Fake timings for every key `plan` can ask for, so it measures nothing."""
    layers = lm.causal_lm(model).config.num_hidden_layers
    rows = {c.rows for i in range(layers) for c in workload.layer_calls(i, layers)} | {c.rows for c in workload.head_calls()}
    for module in scheduled_modules(model).values():
        fmt = source_of(module).format
        for kernel in KERNELS.values():
            if kernel.applies(fmt):
                for r in rows:
                    for role in (INFER, TRAIN):
                        costs.entries[CostTable.kernel_key(kernel, fmt, r, role)] = seconds(kernel.name, fmt, r, role)
    costs.entries[f"rest|{model_key}|{workload.key}"] = rest
    costs.entries["stream|seconds_per_byte"] = 1e-9
    costs.entries[CostTable.STREAM_READ_KEY], costs.entries[CostTable.STREAM_BYTE_KEY] = 0.0, 1e-9


class PrefilledCosts(CostTable):
    """A cost table that refuses to time a kernel: every key a plan needs must have been pre-filled."""

    @staticmethod
    def _measure_kernel(kernel, fmt, rows, role):
        raise AssertionError(f"no fake timing for {kernel.name} on {fmt.key}, {rows} rows, {role}")


def fake_costs(tmp_path: Path, model, workloads, model_key: str, seconds=TYPICAL) -> CostTable:
    costs = PrefilledCosts(tmp_path / "costs.json", "test")
    for workload in workloads:
        prefill(costs, model, workload, model_key, seconds)
    return costs


def compress_tiny(layer_candidates) -> nn.Module:
    torch.manual_seed(0)
    model, _ = models.load("tiny-5m", seed=0)
    shape = ModelShape.from_config(model.config)
    layers = tuple(layer_candidates[i % len(layer_candidates)] for i in range(shape.layers))
    policy = luc.uniform_policy("tiny-5m", shape, layer_candidates[0], 4, GROUP)
    policy = replace(policy, layers=layers, weight_bytes=luc.policy_nbytes(shape, layers, 4, GROUP))
    batch = Workload.forward(2, 16).synthetic_batch(model.config.vocab_size)
    luc.apply_policy(model, policy, Calibration(model, [batch]))
    return model.eval()


MIXED = [Candidate(0.0, "unstructured", 4), Candidate(0.5, "unstructured", 4), Candidate(0.0, "unstructured", 8)]


@pytest.fixture(scope="module")
def compressed():
    """tiny-5m with layers 4-bit / 4-bit 50% pruned / 8-bit in turn and a 4-bit tied head table."""
    model = compress_tiny(MIXED)
    assert isinstance(model.get_output_embeddings(), QuantizedHead)
    return model


@pytest.fixture(scope="module")
def lora(compressed):
    """The compressed model under LoRA, with non-zero B so both LoRA matrices get gradients."""
    model = add_lora(copy.deepcopy(compressed), LoraSettings(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj")))
    torch.manual_seed(5)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.05)
    return model


def assert_unscheduled(model):
    assert not any("forward" in m.__dict__ for m in scheduled_modules(model).values())


# ------------------------------------------------------------------------------------------ 1. kernels


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_every_applicable_kernel_matches_the_reference_matmul(case):
    source = source_of(MODULE_CASES[case]())
    fmt = source.format
    weight, bias = source.dense(torch.float32), source.bias(torch.float32)
    torch.manual_seed(7)
    x = torch.randn(2, 5, fmt.in_features)
    grad_out = torch.randn(2, 5, fmt.out_features)
    xr = x.clone().requires_grad_(True)
    reference = F.linear(xr, weight, bias)
    reference.backward(grad_out)
    kernels = kernels_for(fmt)
    assert kernels[0].name == BASELINE and all(k.applies(fmt) for k in kernels)
    for kernel in kernels:
        state = kernel.prepare(source)
        with torch.no_grad():
            y = kernel(state, source, x)
        assert y.shape == reference.shape and y.dtype == torch.float32
        assert rel_err(y, reference.detach()) <= kernel.tolerance, f"{kernel.name} on {fmt.label}"
        if kernel.differentiable:
            xk = x.clone().requires_grad_(True)
            kernel(state, source, xk).backward(grad_out)
            assert rel_err(xk.grad, xr.grad) <= kernel.tolerance, f"{kernel.name} gradient on {fmt.label}"
    differentiable = kernels_for(fmt, differentiable=True)
    assert differentiable and all(k.differentiable for k in differentiable)
    assert [k.name for k in differentiable] == [k.name for k in kernels if k.differentiable]


@pytest.mark.parametrize("case, expected", [
    ("linear-4bit-dense-nobias", {"luc-dequant", "dequant-bf16", "unpacked-fp32", "int8-weight-only", "int4-weight-only"}),
    ("linear-2bit-dense-bias", {"luc-dequant", "dequant-bf16", "unpacked-fp32", "int8-weight-only", "int4-weight-only"}),
    ("linear-4bit-pruned-nobias", {"luc-dequant", "dequant-bf16", "unpacked-fp32", "int8-weight-only", "csr-fp32"}),
    ("linear-8bit-dense-nobias", {"luc-dequant", "dequant-bf16", "unpacked-fp32", "int8-weight-only"}),
    ("linear-16bit-dense-nobias", {"luc-dequant", "dequant-bf16", "unpacked-fp32", "int8-weight-only"}),
    ("linear-fp32-dense-nobias", {"luc-dequant", "dequant-bf16"}),
    ("linear-fp32-pruned-bias", {"luc-dequant", "dequant-bf16", "unpacked-fp32", "csr-fp32"}),
    ("head-4bit-table", {"luc-dequant", "unpacked-fp32", "int8-weight-only", "int4-weight-only"}),
    ("nn-linear-nobias", {"luc-dequant", "dequant-bf16"}),
])
def test_which_kernels_apply(case, expected):
    """Pins the coverage of the accuracy test above: the fast kernels really run on the formats they claim."""
    assert {k.name for k in kernels_for(source_of(MODULE_CASES[case]()).format)} == expected


def test_int4_needs_a_multiple_of_16_rows_and_whole_groups():
    assert not KERNELS["int4-weight-only"].applies(source_of(compressed_linear(4, False, False, 40, 128)).format)
    assert not KERNELS["int4-weight-only"].applies(source_of(compressed_linear(4, False, False, 64, 96)).format)
    assert not KERNELS["int4-weight-only"].applies(source_of(quantized_head(rows=90)).format)


# ------------------------------------------------------------------------------------------ 2. kept bytes


@pytest.mark.parametrize("kernel_name, case", [
    ("unpacked-fp32", "linear-4bit-dense-nobias"), ("unpacked-fp32", "linear-4bit-pruned-bias"),
    ("unpacked-fp32", "linear-16bit-dense-nobias"), ("unpacked-fp32", "head-4bit-table"),
    ("int8-weight-only", "linear-8bit-dense-nobias"), ("int8-weight-only", "linear-3bit-pruned-bias"),
    ("int8-weight-only", "head-4bit-table"),
    ("int4-weight-only", "linear-2bit-dense-nobias"), ("int4-weight-only", "linear-3bit-dense-bias"),
    ("int4-weight-only", "linear-4bit-dense-nobias"), ("int4-weight-only", "head-4bit-table"),
])
def test_extra_bytes_are_the_bytes_prepare_keeps(kernel_name, case):
    kernel, source = KERNELS[kernel_name], source_of(MODULE_CASES[case]())
    state = kernel.prepare(source)
    assert state and sum(tensor_bytes(t) for t in state.values()) == kernel.extra_bytes(source.format)


@pytest.mark.parametrize("case", ["linear-4bit-pruned-nobias", "linear-8bit-pruned-bias", "linear-fp32-pruned-nobias"])
def test_csr_extra_bytes_bound_what_it_keeps(case):
    kernel, source = KERNELS["csr-fp32"], source_of(MODULE_CASES[case]())
    held = sum(tensor_bytes(t) for t in kernel.prepare(source).values())
    assert 0.95 * kernel.extra_bytes(source.format) <= held <= kernel.extra_bytes(source.format)
    if source.format.bits == FP32_BITS:  # random fp32 values: no kept weight is exactly zero
        assert held == kernel.extra_bytes(source.format)


# ------------------------------------------------------------------------------------------ 3. measured choice


def test_the_plan_takes_the_kernel_measured_fastest_and_follows_the_numbers(compressed, tmp_path):
    decode, forward = Workload.decode(4, 8), Workload.forward(4, 32)  # layers: 4 and 1 rows; 128 rows
    few = lambda fast, slow: (lambda rows: fast if rows <= 4 else slow)  # noqa: E731
    base = {"luc-dequant": 2.0, "dequant-bf16": 4.0, "int8-weight-only": 1.5, "csr-fp32": 1.8}
    int4 = KERNELS["int4-weight-only"]
    for int4_ms, unpacked_ms, want_decode, want_forward in [
        (few(0.1, 5.0), few(0.5, 0.2), "int4-weight-only", "unpacked-fp32"),
        (few(5.0, 0.1), few(0.2, 0.5), "unpacked-fp32", "int4-weight-only"),
    ]:
        seconds = ms_per_row({**base, "int4-weight-only": int4_ms, "unpacked-fp32": unpacked_ms})
        costs = fake_costs(tmp_path, compressed, [decode, forward], "mixed", seconds)
        keys = set(costs.entries)
        for workload, want in ((decode, want_decode), (forward, want_forward)):
            result = plan(compressed, workload, costs, model_key="mixed")
            int4_layers = [c for c in result.choices if int4.applies(c.format)]
            assert len(int4_layers) == 14  # the unpruned 4-bit layers 0 and 3; the 310-row head cannot
            for choice in result.choices:
                expected = want if int4.applies(choice.format) else "unpacked-fp32"
                assert choice.kernels == {INFER: expected}, (workload.label, choice.name)
        assert costs.measured_now == 0 and set(costs.entries) == keys  # nothing was measured
        assert json.loads(costs.path.read_text())["entries"] == costs.entries  # plan saved the table


# ------------------------------------------------------------------------------------------ 4. budget


def test_a_plan_never_exceeds_its_budget_and_more_budget_is_never_slower(compressed, tmp_path):
    workload = Workload.forward(2, 32)
    costs = fake_costs(tmp_path, compressed, [workload], "mixed")
    free = plan(compressed, workload, costs, model_key="mixed")
    lucs = plan(compressed, workload, costs, model_key="mixed", allowed=set())
    assert set(lucs.kernel_counts()) == {f"{INFER}:{BASELINE}"}
    assert lucs.peak_bytes < free.peak_bytes and free.predicted_seconds < lucs.predicted_seconds
    previous = None
    for step in range(9):
        budget = lucs.peak_bytes + (free.peak_bytes - lucs.peak_bytes) * step // 8
        result = plan(compressed, workload, costs, model_key="mixed", budget_bytes=budget)
        assert result.fits and result.peak_bytes <= budget
        if previous is not None:
            assert result.predicted_seconds <= previous + 1e-12, budget
        previous = result.predicted_seconds
    assert previous == pytest.approx(free.predicted_seconds)
    assert costs.measured_now == 0


def test_a_budget_below_what_streaming_needs_is_refused_naming_it(compressed, tmp_path):
    workload = Workload.forward(2, 32)
    costs = fake_costs(tmp_path, compressed, [workload], "mixed")
    budget = plan(compressed, workload, costs, model_key="mixed").workload_bytes  # no room left for any weight
    with pytest.raises(EdgecoreError, match=f"budget is {budget / MIB:.0f} MB"):
        plan(compressed, workload, costs, model_key="mixed", budget_bytes=budget)


def test_a_tiny_budget_is_refused_with_edgecore_error(compressed, tmp_path):
    workload = Workload.forward(2, 32)
    costs = fake_costs(tmp_path, compressed, [workload], "mixed")
    with pytest.raises(EdgecoreError, match="budget is 0 MB"):
        plan(compressed, workload, costs, model_key="mixed", budget_bytes=64 * 1024)


def test_layers_stream_only_when_the_budget_needs_it(compressed, tmp_path):
    workload = Workload.decode(4, 8)
    costs = fake_costs(tmp_path, compressed, [workload], "mixed")
    lucs = plan(compressed, workload, costs, model_key="mixed", allowed=set())
    result = plan(compressed, workload, costs, model_key="mixed", budget_bytes=lucs.peak_bytes)
    resident = copy.deepcopy(result)
    for choice in resident.choices:
        choice.streamed = False
    assert not result.streamed_layers or not resident.fits, (
        f"layers {result.streamed_layers} stream, yet the same kernels fit without streaming "
        f"({resident.peak_bytes} <= {result.budget_bytes} bytes, {resident.predicted_seconds:.4f} s against "
        f"{result.predicted_seconds:.4f} s)")


def test_an_installed_plan_holds_no_more_than_its_budget(compressed, tmp_path):
    workload = Workload.forward(4, 64)
    costs = fake_costs(tmp_path, compressed, [workload], "mixed")
    free = plan(compressed, workload, costs, model_key="mixed")
    lucs = plan(compressed, workload, costs, model_key="mixed", allowed=set())
    budget = (lucs.peak_bytes + free.peak_bytes) // 2
    result = plan(compressed, workload, costs, model_key="mixed", budget_bytes=budget)
    kernels = {k for c in result.choices for _, k in c.option.kernels}
    assert BASELINE in kernels and kernels - {BASELINE}, "the budget should drop some extras, not all"
    assert "csr-fp32" not in kernels  # (its state may be smaller than its extra_bytes)
    assert lucs.peak_bytes == luc.stored_nbytes(compressed) + lucs.workload_bytes + 3 * 768 * 256 * 4  # unpacking: 3 fp32 copies
    assert not result.streamed_layers
    stored = luc.stored_nbytes(compressed)
    reference = workload.run(compressed)  # warm up: torch's first calls allocate for good
    gc.collect()
    can_reset = reset_peak()
    before = rss_mb()
    with Executor(compressed, result) as executor:
        held = executor.state_bytes + luc.stored_nbytes(compressed)
        assert held + result.workload_bytes <= budget
        # the prediction is made of what is really held: kernel state, the stored weights not parked on disk,
        # plus the workload and the largest per-call rebuild (a weight LUC dequantizes to fp32 at every call)
        assert executor.state_bytes == sum(c.option.extra_bytes for c in result.choices)
        assert luc.stored_nbytes(compressed) == stored - sum(c.stored_bytes for c in result.choices if c.parked)
        rebuilt = max(4 * c.format.numel for c in result.choices if BASELINE in c.kernels.values())
        assert result.peak_bytes == held + result.workload_bytes + rebuilt
        out = workload.run(compressed)
        grown = peak_rss_mb() - before
    assert luc.stored_nbytes(compressed) == stored
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)
    if not can_reset:
        pytest.skip("this OS cannot reset the peak RSS: only the counted bytes were checked")
    # RSS: the stored weights were resident before; what the plan adds must fit in the rest of the budget.
    # Slack: allocator rounding and torch's per-thread scratch on first use of a kernel (a few MiB).
    slack_mb = 4.0
    print(f"RSS grew {grown:.1f} MiB; budget less stored weights {(budget - stored) / MIB:.1f} MiB; counted "
          f"{(held + result.workload_bytes - stored) / MIB:.1f} MiB")
    assert grown <= (budget - stored) / MIB + slack_mb, f"RSS grew {grown:.1f} MiB for a budget of {budget / MIB:.1f} MiB"


# ------------------------------------------------------------------------------------------ 5. streaming


def _streaming_plan(model, workload, costs, key):
    """A plan whose budget is just below what LUC's own kernels need with every weight in memory."""
    budget = plan(model, workload, costs, model_key=key, allowed=set()).peak_bytes - 1
    result = plan(model, workload, costs, model_key=key, budget_bytes=budget, allowed={"unpacked-fp32"})
    assert result.streamed_layers and result.peak_bytes <= budget
    return result


def test_streamed_layers_give_the_same_logits_and_tokens_and_are_put_back(compressed, tmp_path):
    forward, decode = Workload.forward(1, 8), Workload.decode(4, 4)
    costs = fake_costs(tmp_path, compressed, [forward, decode], "mixed", ms_per_row({**dict.fromkeys(KERNELS, 1.0),
                                                                                        "unpacked-fp32": 0.1}))
    stored = luc.stored_nbytes(compressed)
    modules = scheduled_modules(compressed)
    for workload in (forward, decode):
        result = _streaming_plan(compressed, workload, costs, "mixed")
        streamed = result.streamed_layers
        on_disk = sum(c.stored_bytes for c in result.choices if c.streamed)
        assert on_disk > 0 and result.peak_bytes <= result.budget_bytes
        reference = workload.run(compressed)
        spill = tmp_path / workload.kind
        with Executor(compressed, result, spill_dir=spill) as executor:
            stream_file = spill / streaming.FILE_NAME
            assert stream_file.exists() and executor.stream.path == stream_file
            on_disk = sum(c.stored_bytes for c in result.choices if c.streamed)
            parked = sum(c.stored_bytes for c in result.choices if c.parked)
            assert executor.stream.stored_bytes == on_disk
            assert luc.stored_nbytes(compressed) == stored - on_disk - parked  # really out of memory
            out = workload.run(compressed)
            runs = 1 if workload.kind == "forward" else workload.new_tokens
            assert executor.stream.reads == len(streamed) * runs
            assert luc.stored_nbytes(compressed) == stored - on_disk - parked  # dropped again after the run
            calls = executor.kernel_calls()
            for choice in result.choices:
                if choice.streamed:
                    assert choice.kernels == {INFER: BASELINE}
                    assert executor.runners[choice.name].calls == {BASELINE: runs}
        assert torch.equal(out, reference), workload.label
        assert not stream_file.exists() and not any(spill.iterdir())
        assert luc.stored_nbytes(compressed) == stored
        assert_unscheduled(compressed)
        assert torch.equal(workload.run(compressed), reference)
        assert sum(calls.values()) == len(modules) * runs


def test_the_default_spill_folder_is_removed(compressed, tmp_path):
    workload = Workload.forward(1, 8)
    costs = fake_costs(tmp_path, compressed, [workload], "mixed")
    result = _streaming_plan(compressed, workload, costs, "mixed")
    executor = Executor(compressed, result).install()
    folder = executor.stream.path.parent
    assert folder.exists()
    executor.uninstall()
    assert not folder.exists()


def test_a_training_step_streams_only_layers_below_its_window(lora, tmp_path):
    workload = Workload.train(1, 8, 2)
    layers = lm.causal_lm(lora).config.num_hidden_layers
    first, _ = workload.window(layers)
    costs = fake_costs(tmp_path, lora, [workload], "lora")
    lucs = plan(lora, workload, costs, model_key="lora", allowed=set())
    result = plan(lora, workload, costs, model_key="lora", budget_bytes=lucs.peak_bytes - 1, allowed=set())
    assert result.streamed_layers and all(layer < first for layer in result.streamed_layers)
    torch.manual_seed(0)
    loss = workload.run(lora)
    with Executor(lora, result) as executor:
        torch.manual_seed(0)
        assert torch.equal(workload.run(lora), loss)
        assert executor.stream.reads == len(result.streamed_layers)
    # every layer trained by some exit keeps its weights in memory
    exits = Workload.train(1, 8, 1, exits=(1, 5))
    costs = fake_costs(tmp_path, lora, [exits], "lora")
    lucs = plan(lora, exits, costs, model_key="lora", allowed=set())
    result = plan(lora, exits, costs, model_key="lora", budget_bytes=lucs.peak_bytes - 1, allowed=set())
    assert result.streamed_layers and not {1, 5} & set(result.streamed_layers)


def test_streaming_a_dense_layer_frees_what_the_plan_predicts(tmp_path):
    model = compress_tiny([Candidate(0.0, "unstructured", FP32_BITS), Candidate(0.0, "unstructured", 4)])
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    workload = Workload.forward(1, 8)
    costs = fake_costs(tmp_path, model, [workload], "half-dense")
    lucs = plan(model, workload, costs, model_key="half-dense", allowed=set())
    result = plan(model, workload, costs, model_key="half-dense", budget_bytes=lucs.peak_bytes - 1)
    assert result.fits and 0 not in result.streamed_layers  # a layer with plain nn.Linear weights stays in memory
    assert all(c.parkable for c in result.choices if c.streamed)
    predicted_resident = result.stored_bytes - sum(c.stored_bytes for c in result.choices if c.streamed or c.parked)
    with Executor(model, result):
        assert luc.stored_nbytes(model) == predicted_resident


# ------------------------------------------------------------------------------------------ 6. executor


def test_the_planned_kernels_really_run(compressed, tmp_path):
    forward, decode = Workload.forward(2, 16), Workload.decode(4, 5)
    seconds = ms_per_row({**dict.fromkeys(KERNELS, 1.0), "int4-weight-only": 0.1, "int8-weight-only": 0.2,
                          "unpacked-fp32": 0.3})
    costs = fake_costs(tmp_path, compressed, [forward, decode], "mixed", seconds)
    layers = compressed.config.num_hidden_layers
    for workload in (forward, decode):
        result = plan(compressed, workload, costs, model_key="mixed")
        planned: dict[str, int] = {}
        for choice in result.choices:
            runs = sum(c.count for c in (workload.head_calls() if choice.layer is None
                                         else workload.layer_calls(choice.layer, layers)))
            (kernel,) = choice.kernels.values()
            planned[kernel] = planned.get(kernel, 0) + runs
        assert {"int4-weight-only", "int8-weight-only"} <= set(planned)  # a mixed plan, as the fake timings say
        reference = workload.run(compressed)
        with Executor(compressed, result) as executor:
            out = workload.run(compressed)
            assert executor.kernel_calls() == dict(sorted(planned.items()))
            for choice in result.choices:  # each weight ran its kernel as often as the workload model says
                runs = sum(c.count for c in (workload.head_calls() if choice.layer is None
                                             else workload.layer_calls(choice.layer, layers)))
                assert executor.runners[choice.name].calls == {choice.kernels[INFER]: runs}, choice.name
        if workload.kind == "forward":
            torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)
        assert_unscheduled(compressed)


def _window_step(model, exits, batch, last, depth):
    loss = window_loss(model, exits, batch, last, depth)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    model.zero_grad(set_to_none=True)
    exits.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_a_training_step_through_exact_kernels_matches_the_plain_step(lora, tmp_path):
    workload = Workload.train(2, 16, 2)
    base = lm.causal_lm(lora)
    layers = base.config.num_hidden_layers
    first, last = workload.window(layers)
    costs = fake_costs(tmp_path, lora, [workload], "lora", ms_per_row({**dict.fromkeys(KERNELS, 1.0),
                                                                        "unpacked-fp32": 0.2}))
    result = plan(lora, workload, costs, model_key="lora", allowed={"unpacked-fp32"})
    assert all(set(c.kernels.values()) == {"unpacked-fp32"} for c in result.choices)
    torch.manual_seed(0)
    exits = Exits(sorted({*default_exits(layers), last}), base.config.hidden_size)
    batch = workload.synthetic_batch(base.config.vocab_size)
    loss, grads = _window_step(lora, exits, batch, last, last - first + 1)
    assert len(grads) == 2 * 2 * 2 and all(g.abs().sum() > 0 for g in grads.values())  # A and B, q and v, 2 layers
    with Executor(lora, result) as executor:
        loss2, grads2 = _window_step(lora, exits, batch, last, last - first + 1)
        calls = executor.kernel_calls()
    assert calls == {"unpacked-fp32": len(scheduled_modules(lora)) - 7 * (layers - 1 - last)}
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=0)
    assert grads2.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=1e-5, atol=1e-8, msg=name)


def test_the_kernel_follows_the_inputs_role(lora, tmp_path):
    """A layer one exit trains and another reads frozen gets a kernel per role; the input picks it at every call."""
    workload = Workload.train(1, 8, 1, exits=(2, 5))
    base = lm.causal_lm(lora)
    costs = fake_costs(tmp_path, lora, [workload], "lora", ms_per_row({**dict.fromkeys(KERNELS, 1.0),
                                                                        "int8-weight-only": 0.1, "unpacked-fp32": 0.2}))
    result = plan(lora, workload, costs, model_key="lora")
    layer2 = [c for c in result.choices if c.layer == 2]
    assert len(layer2) == 7 and all(c.kernels == {INFER: "int8-weight-only", TRAIN: "unpacked-fp32"} for c in layer2)
    torch.manual_seed(0)
    exits = Exits([2, 5], base.config.hidden_size)
    batch = workload.synthetic_batch(base.config.vocab_size)
    with Executor(lora, result) as executor:
        runners = {c.name.split("layers.2.")[1].split(".")[1]: executor.runners[c.name] for c in layer2}
        window_loss(lora, exits, batch, 5, 1).backward()  # layer 2 is frozen: no-grad inputs
        assert all(r.calls == {"int8-weight-only": 1} for r in runners.values())
        for runner in runners.values():
            runner.calls.clear()
        window_loss(lora, exits, batch, 2, 1).backward()  # layer 2 trains: inputs downstream of LoRA need grad
        lora.zero_grad(set_to_none=True)
    # q/k/v read the frozen layer 1's output (no gradient); o/gate/up/down read what LoRA on q/v produced
    assert {name: dict(r.calls) for name, r in runners.items()} == {
        **{p: {"int8-weight-only": 1} for p in ("q_proj", "k_proj", "v_proj")},
        **{p: {"unpacked-fp32": 1} for p in ("o_proj", "gate_proj", "up_proj", "down_proj")}}


def test_installing_twice_or_on_another_format_is_refused(compressed, tmp_path):
    workload = Workload.forward(1, 8)
    costs = fake_costs(tmp_path, compressed, [workload], "mixed")
    result = plan(compressed, workload, costs, model_key="mixed")
    executor = Executor(compressed, result).install()
    try:
        with pytest.raises(EdgecoreError, match="installed already"):
            executor.install()
    finally:
        executor.uninstall()
    assert_unscheduled(compressed)
    other = copy.deepcopy(compressed)
    other.model.layers[5].mlp.down_proj = CompressedLinear.from_linear(make_linear(256, 768, False), bits=2,
                                                                       group_size=GROUP)
    with pytest.raises(EdgecoreError, match=r"layers\.5\.mlp\.down_proj is 2-bit"):
        Executor(other, result).install()
    tiny, _ = models.load("tiny-micro", seed=0)
    with pytest.raises(EdgecoreError, match="does not have"):
        Executor(tiny, result).install()


def test_a_refused_install_leaves_the_model_untouched(compressed, tmp_path):
    workload = Workload.forward(1, 8)
    costs = fake_costs(tmp_path, compressed, [workload], "mixed")
    result = plan(compressed, workload, costs, model_key="mixed")
    other = copy.deepcopy(compressed)
    other.model.layers[5].mlp.down_proj = CompressedLinear.from_linear(make_linear(256, 768, False), bits=2,
                                                                       group_size=GROUP)
    with pytest.raises(EdgecoreError):
        Executor(other, result).install()
    assert_unscheduled(other)


def test_a_parked_layer_keeps_its_bias(compressed, tmp_path):
    model = copy.deepcopy(compressed)
    model.model.layers[0].self_attn.q_proj = CompressedLinear.from_linear(make_linear(256, 256, True), bits=4,
                                                                          group_size=GROUP)
    workload = Workload.forward(1, 8)
    costs = fake_costs(tmp_path, model, [workload], "bias", ms_per_row({**dict.fromkeys(KERNELS, 1.0),
                                                                         "unpacked-fp32": 0.1}))
    result = plan(model, workload, costs, model_key="bias", allowed={"unpacked-fp32"})
    (choice,) = [c for c in result.choices if c.name == "model.layers.0.self_attn.q_proj"]
    assert choice.parked and choice.format.bias
    reference = workload.run(model)
    with Executor(model, result):
        out = workload.run(model)
    assert torch.equal(out, reference)


# ------------------------------------------------------------------------------------------ 7. workload


def test_workload_calls_and_roles():
    layers = 6
    train = Workload.train(2, 16, 2)
    assert train.window(layers) == (4, 5)
    assert train.layer_calls(0, layers) == [Calls(INFER, 32)]
    assert train.layer_calls(4, layers) == train.layer_calls(5, layers) == [Calls(TRAIN, 32)]
    assert train.head_calls() == [Calls(TRAIN, 2)]
    assert train.layer_roles(3, layers) == {INFER} and train.layer_roles(4, layers) == {TRAIN}
    low = Workload.train(1, 8, 2, exits=(2,))
    assert low.window(layers) == (1, 2)
    assert [low.layer_calls(i, layers) for i in range(layers)] == [
        [Calls(INFER, 8)], [Calls(TRAIN, 8)], [Calls(TRAIN, 8)], [], [], []]
    assert [low.layer_roles(i, layers) for i in range(layers)] == [{INFER}, {TRAIN}, {TRAIN}, set(), set(), set()]
    many = Workload.train(1, 8, 1, exits=(2, 5))
    assert many.window(layers) == (5, 5) and many.window(layers, 2) == (2, 2)
    assert [many.layer_roles(i, layers) for i in range(layers)] == [
        {INFER}, {INFER}, {INFER, TRAIN}, {INFER}, {INFER}, {TRAIN}]
    assert Workload.train(1, 8, 9).window(layers) == (0, 5)
    assert many.roles(layers) == {INFER, TRAIN}

    forward = Workload.forward(3, 10)
    assert all(forward.layer_calls(i, layers) == [Calls(INFER, 30)] for i in range(layers))
    assert forward.head_calls() == [Calls(INFER, 3)] and forward.layer_roles(5, layers) == {INFER}
    assert forward.roles(layers) == {INFER}

    decode = Workload.decode(7, 5)
    assert decode.layer_calls(0, layers) == [Calls(INFER, 7), Calls(INFER, 1, 4)]
    assert decode.head_calls() == [Calls(INFER, 1, 5)] and decode.roles(layers) == {INFER}
    assert len({w.key for w in (train, low, many, forward, decode, Workload.decode(7, 6))}) == 6


@pytest.mark.parametrize("make", [
    lambda: Workload("eval"), lambda: Workload.forward(0, 16), lambda: Workload.forward(2, -1),
    lambda: Workload.train(2, 16, 0), lambda: Workload.decode(4, 0), lambda: Workload.forward(1.5, 16),
    lambda: Workload("forward", batch=None),
    lambda: Workload.train(1, 8, 1, exits=(6,)).window(6),
    lambda: Workload.train(1, 8, 1, exits=(-1,)).layer_calls(0, 6),
])
def test_invalid_workloads_are_refused(make):
    with pytest.raises(EdgecoreError):
        make()


# ------------------------------------------------------------------------------------------ 8. cost table


def test_a_saved_cost_table_reloads(tmp_path):
    costs = CostTable.for_profile("phone", tmp_path)
    assert costs.entries == {} and costs.path == tmp_path / f"phone-{machine_id()}.json" and not costs.path.exists()
    costs.entries.update({"kernel|x|1": 0.25, "rest|m|w": 1.5, "stream|seconds_per_byte": 3e-10})
    costs.seconds_measuring = 2.0
    costs.save()
    again = CostTable.for_profile("phone", tmp_path)
    assert again.entries == costs.entries and again.profile == "phone" and again.seconds_measuring == 2.0
    assert again.measured_now == 0
    assert CostTable.for_profile("tablet", tmp_path).entries == {}


@pytest.mark.parametrize("text", ["{not json", json.dumps({"profile": "phone"}), json.dumps([1, 2]),
                                  json.dumps({"entries": {"a": "fast"}}), json.dumps({"entries": [1]})])
def test_a_corrupt_cost_table_names_its_path(tmp_path, text):
    path = tmp_path / f"phone-{machine_id()}.json"
    path.write_text(text)
    with pytest.raises(EdgecoreError, match=re.escape(str(path))):
        CostTable.for_profile("phone", tmp_path)
