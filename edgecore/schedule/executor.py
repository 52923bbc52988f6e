"""Runs a plan: every scheduled weight's forward goes through the kernel planned for its input's role.

`Executor(model, plan).install()` prepares each kernel's state once (an unpacked weight,
torch's int8 / int4 packing) and puts a `Runner` in place of the module's forward, so whatever
runs the model (the window trainer, early-exit inference, `generate`, a plain forward) goes
through the plan without knowing it. The role is read from the input at every call: a
gradient must flow back through the weight when the input requires one (inside the trained
window), and only kernels that allow it are used then; otherwise the plan's no-grad kernel
runs. A role the plan did not price falls back to LUC's own forward. Streamed layers
(`streaming.LayerStream`) are set up here too, and the packed weights of layers whose kernels
keep their own copy are parked on disk (`streaming.Spill`) until the plan is taken out. `uninstall()` (or leaving the `with` block)
restores the model exactly as it was, and `install()` may put the plan back in again (`guard.PlanCheck` swaps it
in and out between training steps).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from edgecore import lm
from edgecore.errors import EdgecoreError
from edgecore.schedule.costs import scheduled_modules
from edgecore.schedule.formats import WeightSource, source_of
from edgecore.schedule.kernels import BASELINE, KERNELS, Kernel
from edgecore.schedule.planner import ExecutionPlan
from edgecore.schedule.streaming import LayerStream, Spill
from edgecore.schedule.workload import INFER, TRAIN


PARKED_FILE = "parked-weights.safetensors"


class Runner:
    """A module's forward under a plan: role -> (kernel, state)."""

    def __init__(self, source: WeightSource, by_role: dict[str, tuple[Kernel, dict]], name: str = ""):
        self.source, self.name = source, name
        self.by_role = by_role
        self.baseline = (KERNELS[BASELINE], {})
        self.calls: dict[str, int] = {}
        self.parked = False

    def kernel_for(self, x: torch.Tensor) -> tuple[Kernel, dict]:
        if x.requires_grad and torch.is_grad_enabled():
            return self.by_role.get(TRAIN, self.baseline)
        return self.by_role.get(INFER) or self.by_role.get(TRAIN) or self.baseline

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kernel, state = self.kernel_for(x)
        if self.parked and kernel.reads_packed:
            raise EdgecoreError(
                f"{self.name}: the installed plan parked this layer's packed weights and has no kernel for input "
                f"{'with' if x.requires_grad else 'without'} gradient; plan for a workload that trains it")
        self.calls[kernel.name] = self.calls.get(kernel.name, 0) + 1
        return kernel(state, self.source, x)

    @property
    def state_bytes(self) -> int:
        seen = {id(s): s for _, s in self.by_role.values()}
        return sum(t.numel() * t.element_size() if t.layout == torch.strided else _sparse_bytes(t)
                   for s in seen.values() for t in s.values())


def _sparse_bytes(t: torch.Tensor) -> int:
    parts = (t.values(), t.crow_indices(), t.col_indices())
    return sum(p.numel() * p.element_size() for p in parts)


class Executor:
    """Installs `plan` into `model` and takes it out again (see the module docstring)."""

    def __init__(self, model, plan: ExecutionPlan, spill_dir: Path | str | None = None):
        self.model, self.plan = model, plan
        self.spill_dir = spill_dir
        self.runners: dict[str, Runner] = {}
        self.stream: LayerStream | None = None
        self.parked: Spill | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def installed(self) -> bool:
        return bool(self.runners)

    def install(self) -> Executor:
        """Put the plan in place; on any failure the model is left exactly as it was."""
        if self.installed or self.stream is not None or self.parked is not None:
            raise EdgecoreError("this plan is installed already")
        modules = scheduled_modules(self.model)
        missing = [c.name for c in self.plan.choices if c.name not in modules]
        if missing:
            raise EdgecoreError(f"the plan schedules {missing[:3]}, which this model does not have: plan for this model")
        for choice in self.plan.choices:
            found = source_of(modules[choice.name]).format
            if found != choice.format:
                raise EdgecoreError(f"{choice.name} is {found.label} here but {choice.format.label} in the plan: "
                                    "plan for this model")
        try:
            self._install(modules)
        except BaseException:
            self.uninstall()
            raise
        return self

    def _install(self, modules: dict) -> None:
        for choice in self.plan.choices:
            module = modules[choice.name]
            source = source_of(module)
            states: dict[str, dict] = {}
            by_role = {}
            for role, name in choice.option.kernels:
                kernel = KERNELS[name]
                if name not in states:
                    states[name] = kernel.prepare(source)
                by_role[role] = (kernel, states[name])
            runner = Runner(source, by_role, choice.name)
            module.forward = runner
            self.runners[choice.name] = runner
        parked = {c.name: [(c.name, modules[c.name])] for c in self.plan.choices if c.parked}
        streamed = self.plan.streamed_layers
        if parked or streamed:
            if self.spill_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="edgecore-spill-")
            folder = Path(self.spill_dir or self._tmp.name)
            if parked:
                self.parked = Spill(parked, folder / PARKED_FILE)
                for name in parked:
                    self.runners[name].parked = True
            if streamed:
                self.stream = LayerStream(list(lm.causal_lm(self.model).model.layers), streamed, folder)

    def uninstall(self) -> None:
        # The kernels' own copies go first, then the packed weights come back from disk: the other
        # way round both are resident at once, over the plan's peak (seen when a plan check fell
        # back to LUC's kernels mid-round: a 200 MB board's job peaked at 218 MB).
        modules = scheduled_modules(self.model)
        for name in self.runners:
            if "forward" in modules[name].__dict__:
                del modules[name].forward
        self.runners.clear()
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if self.parked is not None:
            self.parked.close()
            self.parked = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Executor:
        return self.install() if not self.installed else self

    def __exit__(self, *exc) -> None:
        self.uninstall()

    @property
    def state_bytes(self) -> int:
        """Bytes the installed kernels keep (unpacked weights, repacked codes)."""
        return sum(r.state_bytes for r in self.runners.values())

    def kernel_calls(self) -> dict[str, int]:
        """How often each kernel ran since installation: proof of what really executed."""
        total: dict[str, int] = {}
        for runner in self.runners.values():
            for name, count in runner.calls.items():
                total[name] = total.get(name, 0) + count
        return dict(sorted(total.items()))
