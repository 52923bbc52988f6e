"""The cost model: measured seconds per (format, kernel, rows, role) on this machine, and the rest of the model.

`CostTable.kernel_seconds` times one kernel on a synthetic weight of the format (random
values, the same storage), on demand: forward only for the `infer` role, forward plus the
backward to the input for `train`. `rest_seconds` times a workload on the real model with
every scheduled weight replaced by a stub that returns zeros: attention, norms, activations,
LoRA, the exit adapters and the Python around them. A plan's predicted time is the rest plus
its kernels' times (and, for layers streamed from disk, what each read of one adds to a run:
`stream_read_seconds`); the benchmark compares that with the measured time.

Tables are JSON files under $EDGECORE_CACHE/schedule, one per device profile and machine
(CPU model, cores, torch version and threads: a timing from another machine means nothing
here), with the seconds spent measuring. A profile measured on the real device can be copied
in under the same name, or given to the planner as a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from edgecore import lm, models
from edgecore.errors import EdgecoreError
from edgecore.luc.config import FP32_BITS
from edgecore.luc.layer import CompressedLinear
from edgecore.luc.table import QuantizedHead, QuantizedTable
from edgecore.measure import machine
from edgecore.schedule.formats import WeightFormat, WeightSource, source_of
from edgecore.schedule.kernels import Kernel
from edgecore.schedule.streaming import measure_read_cost
from edgecore.schedule.workload import INFER, Workload

log = logging.getLogger(__name__)
MIN_SECONDS, MAX_REPEATS = 0.05, 30  # each timing repeats until this long (at least 3 calls)


def machine_id() -> str:
    info = machine()
    text = f"{info['cpu']}|{info['cores']}|{info['torch']}|{info['torch_threads']}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_dir() -> Path:
    return models.cache_root() / "schedule"


def time_call(fn, min_seconds: float = MIN_SECONDS, max_repeats: int = MAX_REPEATS) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_seconds and len(times) < max_repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@lru_cache(maxsize=8)
def synthetic_source(fmt: WeightFormat) -> WeightSource:
    """A random weight stored like `fmt` (the same bits, kept count per row, group size, table or not)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(fmt.out_features, fmt.in_features, generator=generator) * 0.02
    if fmt.table:
        return source_of(QuantizedHead(QuantizedTable.from_weight(weight, fmt.bits, fmt.group_size)))
    linear = nn.Linear(fmt.in_features, fmt.out_features, bias=fmt.bias)
    linear.weight.data = weight
    if not fmt.luc:
        linear.to({FP32_BITS: torch.float32, 16: torch.bfloat16}[fmt.bits])
        return source_of(linear)
    keep = None
    if fmt.sparse:
        per_row = max(1, fmt.kept // fmt.out_features)  # LUC's masks keep the same count in every row
        order = torch.rand(fmt.out_features, fmt.in_features, generator=generator).argsort(dim=1)[:, :per_row]
        keep = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, order, True)
    return source_of(CompressedLinear.from_linear(linear, bits=fmt.bits, keep=keep, group_size=fmt.group_size))


class _Stub:
    """Stands in for every scheduled weight while the rest of the model is timed: zeros, still in the graph."""

    def __init__(self, out_features: int):
        self.out_features = out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x[..., :1] * 0).expand(*x.shape[:-1], self.out_features)


class CostTable:
    """Measured seconds, keyed by kernel, format, rows and role; saved as JSON (see the module docstring)."""

    def __init__(self, path: Path | None, profile: str, entries: dict | None = None, seconds_measuring: float = 0.0):
        self.path, self.profile = path, profile
        self.entries: dict[str, float] = dict(entries or {})
        self.seconds_measuring = seconds_measuring
        self.measured_now = 0

    @classmethod
    def for_profile(cls, profile: str, folder: Path | None = None) -> CostTable:
        """The cached table of `profile` on this machine (empty when none was measured yet)."""
        path = (folder or cache_dir()) / f"{profile}-{machine_id()}.json"
        return cls.load(path, profile) if path.exists() else cls(path, profile)

    @classmethod
    def load(cls, path: Path | str, profile: str | None = None) -> CostTable:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            entries = {str(k): float(v) for k, v in raw["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise EdgecoreError(f"cost table {path} is unreadable ({err}); delete it to measure again") from err
        if raw.get("machine_id") not in (None, machine_id()):
            log.warning("cost table %s was measured on another machine (%s)", path, raw.get("machine"))
        return cls(path, profile or raw.get("profile", path.stem), entries, float(raw.get("seconds_measuring", 0.0)))

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"profile": self.profile, "machine_id": machine_id(), "machine": machine(),
                   "seconds_measuring": round(self.seconds_measuring, 3), "entries": self.entries}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
        tmp.replace(self.path)

    # -- kernels ---------------------------------------------------------------------------------

    @staticmethod
    def kernel_key(kernel: Kernel, fmt: WeightFormat, rows: int, role: str) -> str:
        return f"kernel|{kernel.name}|{fmt.key}|rows{rows}|{role}"

    def kernel_seconds(self, kernel: Kernel, fmt: WeightFormat, rows: int, role: str) -> float:
        """Seconds of one call of `kernel` on `rows` rows of a `fmt` weight, measured once and cached."""
        key = self.kernel_key(kernel, fmt, rows, role)
        if key not in self.entries:
            started = time.perf_counter()
            self.entries[key] = self._measure_kernel(kernel, fmt, rows, role)
            self.seconds_measuring += time.perf_counter() - started
            self.measured_now += 1
        return self.entries[key]

    @staticmethod
    def _measure_kernel(kernel: Kernel, fmt: WeightFormat, rows: int, role: str) -> float:
        source = synthetic_source(fmt)
        state = kernel.prepare(source)
        x = (torch.randn(rows, fmt.in_features) * 0.1).to(source.input_dtype)
        if role == INFER:
            with torch.no_grad():
                return time_call(lambda: kernel(state, source, x))
        x.requires_grad_(True)
        grad = torch.ones(rows, fmt.out_features, dtype=source.input_dtype)

        def step():
            kernel(state, source, x).backward(grad)
            x.grad = None
        return time_call(step)

    # Keys of the streaming price. Tables from before it hold "stream|seconds_per_byte" (a bare
    # 16 MB read, which missed the per-read costs): it is left unread, and these are measured.
    STREAM_READ_KEY, STREAM_BYTE_KEY = "stream|seconds_per_read", "stream|seconds_per_read_byte"

    def stream_read_seconds(self) -> tuple[float, float]:
        """(seconds per read, seconds per byte) a streamed layer adds to a run (`streaming.measure_read_cost`),
        measured once and cached."""
        if self.STREAM_READ_KEY not in self.entries or self.STREAM_BYTE_KEY not in self.entries:
            started = time.perf_counter()
            self.entries[self.STREAM_READ_KEY], self.entries[self.STREAM_BYTE_KEY] = measure_read_cost()
            self.seconds_measuring += time.perf_counter() - started
            self.measured_now += 1
        return self.entries[self.STREAM_READ_KEY], self.entries[self.STREAM_BYTE_KEY]

    # -- the rest of the model -------------------------------------------------------------------

    def rest_seconds(self, model, workload: Workload, model_key: str, exits=None) -> float:
        """Seconds of `workload` on `model` with every scheduled weight stubbed out, measured once and cached."""
        key = f"rest|{model_key}|{workload.key}"
        if key not in self.entries:
            started = time.perf_counter()
            self.entries[key] = measure_rest(model, workload, exits)
            self.seconds_measuring += time.perf_counter() - started
            self.measured_now += 1
        return self.entries[key]


def model_key(name: str, lora_r: int, lora_targets) -> str:
    """How a model is named in cost tables: the rest of the model depends on it and its LoRA."""
    return f"{name}/lora-r{lora_r}-{'.'.join(lora_targets)}"


def scheduled_modules(model) -> dict[str, nn.Module]:
    """name -> every weight module a plan schedules: the decoder's linears and the LM head."""
    base = lm.causal_lm(model)
    found = {}
    for name, module in base.named_modules():
        if isinstance(module, (CompressedLinear, QuantizedHead)) or (
            isinstance(module, nn.Linear) and ".layers." in f".{name}." and "lora_" not in name
            and not hasattr(module, "base_layer")
        ):
            found[name] = module
    head = base.get_output_embeddings()
    head_name = next((n for n, m in base.named_modules() if m is head), None)
    if head_name is not None and isinstance(head, (nn.Linear, QuantizedHead)):
        found[head_name] = head
    return found


def measure_rest(model, workload: Workload, exits=None) -> float:
    modules = scheduled_modules(model)
    for module in modules.values():
        module.forward = _Stub(source_of(module).format.out_features)
    try:
        return time_call(lambda: workload.run(model, exits), min_seconds=0.0)
    finally:
        for module in modules.values():
            del module.forward
