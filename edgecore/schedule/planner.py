"""The scheduler: per weight, the kernel for each role, the fastest plan whose predicted peak fits the budget.

Every scheduled weight (the decoder's linears and the LM head) starts at the combination of
kernels (one per role it takes in the workload) the cost table says is fastest. While the
predicted peak exceeds the budget, the move that gives back the most memory per second lost
is taken (typically: a layer goes back from a kept unpacked weight to LUC's rebuild-per-call).
If even LUC's own kernels do not fit, frozen decoder layers (those the workload never trains)
are streamed from a memory-mapped file, lowest first, keeping two resident at a time.

A weight whose kernels all keep their own copy (int4 repacked, unpacked, ...) needs LUC's packed
buffers no more while the plan is installed: they wait on disk (`parked`), so a repacked layer
costs no more memory than LUC's own.

Predicted peak = stored weights (less those streamed or parked) + kernels' kept state + what autograd
keeps for the window + the largest per-call transient + the workload's own memory
(activations, adapters, optimizer state, KV cache: `edgecore.memory` for a training step).
Predicted time = the measured rest of the model + each weight's kernel times (`costs`) + for each
streamed layer, per run, a measured fixed cost per read plus its bytes at the measured rate.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field, replace

from edgecore.errors import EdgecoreError
from edgecore.luc.layer import CompressedLinear
from edgecore import lm
from edgecore.luc.compress import stored_nbytes
from edgecore.memory import MIB, ModelShape, StepPlan, estimate_step, inference_bytes
from edgecore.schedule.costs import CostTable, scheduled_modules, synthetic_source
from edgecore.schedule.formats import WeightFormat, source_of
from edgecore.schedule.kernels import BASELINE, KERNELS, kernels_for
from edgecore.schedule.workload import INFER, TRAIN, Calls, Workload

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Option:
    kernels: tuple[tuple[str, str], ...]  # (role, kernel name)
    seconds: float  # per run of the workload
    call_seconds: float  # one call per role: ranks kernels of roles the predicted window does not use
    extra_bytes: int
    saved_bytes: int
    transient_bytes: int

    @property
    def replaces_storage(self) -> bool:
        """No role falls back on LUC's packed weights: the executor can park them on disk."""
        return bool(self.kernels) and not any(KERNELS[k].reads_packed for _, k in self.kernels)


@dataclass
class Choice:
    name: str
    layer: int | None  # decoder layer index; None for the head
    format: WeightFormat
    options: list[Option] = field(repr=False)
    index: int = 0  # the option in use
    streamed: bool = False
    stored_bytes: int = 0
    parkable: bool = False  # LUC-packed (a CompressedLinear): its buffers can wait on disk

    @property
    def option(self) -> Option:
        return self.options[self.index]

    @property
    def parked(self) -> bool:
        return self.parkable and not self.streamed and self.option.replaces_storage

    def held_bytes(self, option: Option) -> int:
        """Memory this weight adds to the stored weights under `option`: kernel state and autograd's
        copies, less its packed weights when the option parks them."""
        parked = self.parkable and not self.streamed and option.replaces_storage
        return option.extra_bytes + option.saved_bytes - (self.stored_bytes if parked else 0)

    @property
    def kernels(self) -> dict[str, str]:
        return dict(self.option.kernels)


@dataclass
class ExecutionPlan:
    workload: Workload
    budget_bytes: int | None
    stored_bytes: int
    workload_bytes: int  # activations, adapters, optimizer, KV cache
    rest_seconds: float
    choices: list[Choice]
    layers: int  # decoder layers of the model
    stream_seconds_per_read: float = 0.0  # a streamed layer's read: fixed cost (costs.stream_read_seconds)
    stream_seconds_per_byte: float = 0.0  # and per byte read

    # -- predictions -----------------------------------------------------------------------------

    @property
    def streamed_layers(self) -> list[int]:
        return sorted({c.layer for c in self.choices if c.streamed})

    def _layer_stored(self, layer: int) -> int:
        """Bytes streaming `layer` keeps on disk: its LUC-packed weights (plain nn.Linear weights stay)."""
        return sum(c.stored_bytes for c in self.choices if c.layer == layer and c.parkable)

    @property
    def peak_bytes(self) -> int:
        streamed = self.streamed_layers
        resident = self.stored_bytes - sum(self._layer_stored(layer) for layer in streamed)
        window = sum(sorted((self._layer_stored(layer) for layer in streamed), reverse=True)[:2])  # current + prefetched
        return (resident + window + self.workload_bytes + sum(c.held_bytes(c.option) for c in self.choices)
                + max((c.option.transient_bytes for c in self.choices), default=0))

    def layer_stream_seconds(self, layer: int) -> float:
        """Seconds streamed `layer` adds per run of the workload: one read per run of the layer, a fixed cost
        (opening the file, placing the tensors, the prefetch thread's contention) plus its bytes."""
        runs = sum(c.count for c in self.workload.layer_calls(layer, self.layers))
        return runs * (self.stream_seconds_per_read + self._layer_stored(layer) * self.stream_seconds_per_byte)

    def choice_seconds(self, choice: Choice) -> float:
        """The weight's kernel time, plus its share (by bytes) of its layer's reads when it streams."""
        if not choice.streamed:
            return choice.option.seconds
        share = choice.stored_bytes / (self._layer_stored(choice.layer) or 1)
        return choice.option.seconds + share * self.layer_stream_seconds(choice.layer)

    @property
    def predicted_seconds(self) -> float:
        return (self.rest_seconds + sum(c.option.seconds for c in self.choices)
                + sum(self.layer_stream_seconds(layer) for layer in self.streamed_layers))

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.peak_bytes <= self.budget_bytes

    # -- reports ---------------------------------------------------------------------------------

    def kernel_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for choice in self.choices:
            for role, kernel in choice.option.kernels:
                counts[f"{role}:{kernel}"] = counts.get(f"{role}:{kernel}", 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> dict:
        return {
            "workload": self.workload.label, "budget_mb": None if self.budget_bytes is None else self.budget_bytes / MIB,
            "predicted_s": self.predicted_seconds, "predicted_peak_mb": self.peak_bytes / MIB,
            "stored_mb": self.stored_bytes / MIB, "workload_mb": self.workload_bytes / MIB,
            "rest_s": self.rest_seconds, "streamed_layers": self.streamed_layers,
            "stream_s": sum(self.layer_stream_seconds(layer) for layer in self.streamed_layers),
            "parked_mb": sum(c.stored_bytes for c in self.choices if c.parked) / MIB, "kernels": self.kernel_counts(),
        }

    def to_dict(self) -> dict:
        rows = [{"name": c.name, "format": c.format.label, "kernels": c.kernels, "streamed": c.streamed, "parked": c.parked,
                 "predicted_ms": 1e3 * self.choice_seconds(c), "extra_mb": c.option.extra_bytes / MIB,
                 "format_detail": asdict(c.format)} for c in self.choices]
        return {**self.summary(), "weights": rows}

    def table(self) -> str:
        """The plan as text: one line per weight, then the totals."""
        lines = [f"{'weight':<44} {'format':<18} {'kernels (role: kernel)':<46} {'ms':>8} {'extra MB':>8}"]
        for c in self.choices:
            kernels = ", ".join(f"{r}: {k}" for r, k in c.option.kernels) or "(does not run)"
            if c.streamed:
                kernels += " [streamed]"
            lines.append(f"{c.name:<44} {c.format.label:<18} {kernels:<46} {1e3 * self.choice_seconds(c):>8.2f} "
                         f"{c.option.extra_bytes / MIB:>8.2f}")
        budget = "no budget" if self.budget_bytes is None else f"budget {self.budget_bytes / MIB:.1f} MB"
        parked = sum(c.stored_bytes for c in self.choices if c.parked)
        if parked:
            lines.append(f"packed weights of {sum(c.parked for c in self.choices)} layers wait on disk while their "
                         f"kernels hold their own copy ({parked / MIB:.1f} MB)")
        lines.append(f"{self.workload.label}: predicted {self.predicted_seconds:.3f} s "
                     f"(rest of the model {self.rest_seconds:.3f} s), peak {self.peak_bytes / MIB:.1f} MB of {budget} "
                     f"(stored weights {self.stored_bytes / MIB:.1f} MB, workload {self.workload_bytes / MIB:.1f} MB"
                     + (f", layers {self.streamed_layers} streamed from disk" if self.streamed_layers else "") + ")")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- planning


def _options(fmt: WeightFormat, calls, costs: CostTable, allowed: set[str] | None, budget: int | None) -> list[Option]:
    """Every combination of one kernel per role, priced; kernels over the budget on their own are left out
    (LUC's own never is: it is what the plan falls back to, and `_fit` names the budget if even that fails)."""
    roles = sorted({c.role for c in calls})
    per_role = []
    for role in roles:
        kernels = [k for k in kernels_for(fmt, differentiable=role == TRAIN) if allowed is None or k.name in allowed
                   or k.name == BASELINE]
        if budget is not None:
            kernels = [k for k in kernels if k.name == BASELINE or k.extra_bytes(fmt) + k.transient_bytes(fmt) <= budget]
        per_role.append(kernels)
    options = []
    for combo in itertools.product(*per_role):
        chosen = dict(zip(roles, combo))
        timed = [(c, costs.kernel_seconds(chosen[c.role], fmt, c.rows, c.role)) for c in calls]
        distinct = {k.name: k for k in combo}.values()
        options.append(Option(
            kernels=tuple((r, k.name) for r, k in chosen.items()),
            seconds=sum(c.count * t for c, t in timed),
            call_seconds=sum(t for _, t in timed),
            extra_bytes=sum(k.extra_bytes(fmt) for k in distinct),
            saved_bytes=chosen[TRAIN].saved_bytes(fmt) * sum(c.count for c in calls if c.role == TRAIN) if TRAIN in chosen else 0,
            transient_bytes=max(k.transient_bytes(fmt) for k in combo),
        ))
    return sorted(options, key=lambda o: (o.seconds, o.call_seconds, o.extra_bytes))


def workload_bytes(model, workload: Workload, step_plan: StepPlan | None = None) -> int:
    """What the workload itself holds besides the weights, from the memory estimator."""
    shape = ModelShape.from_config(lm.causal_lm(model).config)
    if workload.kind == "train":
        plan = step_plan or StepPlan(batch=workload.batch, seq_len=workload.seq_len, allocator="returning")
        plan = replace(plan, window=workload.window(shape.layers), weight_bytes=0, packed_weights=False)
        return int(estimate_step(shape, plan).workload_mb * MIB)
    cached = workload.seq_len + workload.new_tokens if workload.kind == "decode" else 0
    return inference_bytes(shape, workload.batch, workload.seq_len, cached)


def plan(model, workload: Workload, costs: CostTable, *, budget_bytes: int | None = None, model_key: str,
         exits=None, step_plan: StepPlan | None = None, allowed: set[str] | None = None) -> ExecutionPlan:
    """The fastest plan for `workload` on `model` whose predicted peak fits `budget_bytes` (see the module docstring).

    `model_key` names the model in the cost table (the rest of the model is measured per model
    and workload); `allowed` limits the kernels (LUC's own is always allowed); `step_plan`
    carries the training step's LoRA settings for the memory estimate.
    """
    modules = scheduled_modules(model)
    layers = 1 + max((int(m[1]) for n in modules if (m := _LAYER.search(f".{n}."))), default=-1)
    choices = []
    for name, module in modules.items():
        match = _LAYER.search(f".{name}.")
        layer = int(match[1]) if match else None
        fmt = source_of(module).format
        calls = workload.layer_calls(layer, layers) if layer is not None else workload.head_calls()
        if layer is not None and calls:  # a kernel, not counted in the time, for roles other windows give it
            calls += [Calls(role, calls[0].rows, 0) for role in workload.layer_roles(layer, layers) - {c.role for c in calls}]
        options = _options(fmt, calls, costs, allowed, budget_bytes) if calls else [Option((), 0.0, 0.0, 0, 0, 0)]
        stored = sum(b.numel() * b.element_size() for b in module.buffers(recurse=False) if b is not None)
        stored += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        choices.append(Choice(name, layer, fmt, options, stored_bytes=stored, parkable=isinstance(module, CompressedLinear)))
    result = ExecutionPlan(workload, budget_bytes, stored_nbytes(model), workload_bytes(model, workload, step_plan),
                  costs.rest_seconds(model, workload, model_key, exits), choices, layers)
    synthetic_source.cache_clear()  # the random weights kernels were timed on
    if budget_bytes is not None:
        _fit(result, layers, costs)
    costs.save()
    return result


def _fit(result: ExecutionPlan, layers: int, costs: CostTable) -> None:
    """Give back memory until the plan fits, the fewest seconds lost per byte freed first; else refuse.

    A move is one weight going to a leaner option, or frozen layers (the workload never trains
    them; all their weights LUC-packed) going to disk: their weights then run LUC's kernel on
    buffers read back at every run. Two streamed layers stay resident (the one running and the
    one read ahead), so the first streaming move takes as many layers as it needs to free memory.
    """
    frozen = [i for i in range(layers) if result.workload.layer_roles(i, layers) == {INFER}
              and all(c.parkable for c in result.choices if c.layer == i)]
    while not result.fits:
        best, best_ratio = None, None
        for choice in result.choices:
            if choice.streamed:
                continue
            now = choice.option
            for index, option in enumerate(choice.options):
                freed = choice.held_bytes(now) - choice.held_bytes(option)
                if freed > 0:
                    lost = max(option.seconds - now.seconds, 0.0) + 1e-3 * max(option.call_seconds - now.call_seconds, 0.0)
                    if best_ratio is None or lost / freed < best_ratio:
                        best, best_ratio = (choice, index), lost / freed
        stream = _stream_move(result, frozen, costs)
        if stream is not None and (best_ratio is None or stream[1] < best_ratio):
            best, best_ratio = stream
        if best is None:
            break
        if isinstance(best, list):
            _set_streamed(result, best)
        else:
            best[0].index = best[1]
    if not result.fits:
        raise EdgecoreError(
            f"{result.workload.label} needs {result.peak_bytes / MIB:.0f} MB even with LUC's own kernels"
            f"{' and ' + str(len(frozen)) + ' frozen layers streamed from disk' if frozen else ''}, "
            f"but the budget is {result.budget_bytes / MIB:.0f} MB: compress the model further or shrink the workload "
            "(batch, sequence length, window)")


def _set_streamed(result: ExecutionPlan, layers: list[int]) -> dict:
    """Stream `layers` (their weights on LUC's kernel); returns what each choice was before, to undo it."""
    before = {}
    for choice in result.choices:
        if choice.layer in layers:
            before[id(choice)] = (choice, choice.streamed, choice.index)
            choice.streamed, choice.index = True, choice.options.index(_baseline(choice))
    return before


def _stream_move(result: ExecutionPlan, frozen: list[int], costs: CostTable) -> tuple[list[int], float] | None:
    """The next frozen layers to stream, lowest first, as few as free memory: (layers, seconds lost per byte)."""
    waiting = [layer for layer in frozen if not any(c.streamed for c in result.choices if c.layer == layer)]
    if not waiting:
        return None
    result.stream_seconds_per_read, result.stream_seconds_per_byte = costs.stream_read_seconds()
    peak, seconds = result.peak_bytes, result.predicted_seconds
    for count in range(1, min(3, len(waiting)) + 1):
        before = _set_streamed(result, waiting[:count])
        freed, lost = peak - result.peak_bytes, result.predicted_seconds - seconds
        for choice, streamed, index in before.values():
            choice.streamed, choice.index = streamed, index
        if freed > 0:
            return waiting[:count], max(lost, 0.0) / freed
    return None


def _baseline(choice: Choice) -> Option:
    """LUC's own kernel in every role: what a streamed layer runs (it reads the buffers just streamed in)."""
    return next(o for o in choice.options if all(k == BASELINE for _, k in o.kernels))

