"""Frozen decoder layers kept on disk: read from a memory-mapped safetensors file just before they run.

When even the compressed weights exceed the budget, the layers a workload never trains are
written once to `frozen-layers.safetensors` and their packed buffers in memory are replaced by
empty placeholders. A forward pre-hook reads a layer's buffers back (safetensors maps the file
and copies the layer's bytes out) and a forward hook drops them again after it ran. While one
layer computes, a background thread reads the next streamed layer (in running order, wrapping
round to the first for the next step or token), so at most two streamed layers are resident.
Each read opens the file anew: a mapping kept open would leave every page it touched counted
in the process's resident memory. Only layers that run without gradient may stream: nothing is
kept for a backward pass. `measure_read_cost` prices a read for the planner, through this same
machinery.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from edgecore.errors import EdgecoreError
from edgecore.luc.storage import PackedStorage

FILE_NAME = "frozen-layers.safetensors"


class Spill:
    """Packed buffers of groups of modules, written once to a safetensors file and dropped from memory.

    `read(group)` copies a group's buffers back out of the file (opened anew each time),
    `place` puts them into the modules, `drop` swaps them for empty placeholders again, and
    `close` restores every group for good and deletes the file.
    """

    def __init__(self, groups: dict, path: Path):
        self.path = path
        self.slots: dict = {}
        tensors = {}
        for group, modules in groups.items():
            slots = []
            for module_name, module in modules:
                for buffer_name, buffer in module._buffers.items():
                    # The packed weights only: a bias is small, and the kernels that replace them read it.
                    if buffer is not None and buffer.numel() and buffer_name != "bias":
                        key = f"{group}.{module_name}.{buffer_name}"
                        tensors[key] = buffer.contiguous()
                        slots.append((module, buffer_name, key, buffer.dtype))
            self.slots[group] = slots
        if not tensors:
            raise EdgecoreError(f"{list(groups)} hold no packed weights to spill")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(self.path))
        self.stored_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        for group in self.slots:
            self.drop(group)

    def read(self, group) -> dict[str, torch.Tensor]:
        with safe_open(str(self.path), framework="pt") as file:
            return {key: file.get_tensor(key) for _, _, key, _ in self.slots[group]}

    def place(self, group, tensors: dict[str, torch.Tensor]) -> None:
        for module, buffer_name, key, _ in self.slots[group]:
            module._buffers[buffer_name] = tensors[key]

    def drop(self, group) -> None:
        for module, buffer_name, _, dtype in self.slots[group]:
            module._buffers[buffer_name] = torch.empty(0, dtype=dtype)

    def close(self) -> None:
        for group in self.slots:
            self.place(group, self.read(group))
        self.path.unlink(missing_ok=True)


def packed_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in root.named_modules() if isinstance(m, PackedStorage)]


class LayerStream:
    """Streams `indices` of `layers` from a file in `folder` (see the module docstring); `close()` restores them."""

    def __init__(self, layers: list[nn.Module], indices: list[int], folder: Path | str):
        if not indices:
            raise EdgecoreError("no layers to stream")
        self.order = sorted(indices)
        self.spill = Spill({i: packed_modules(layers[i]) for i in self.order}, Path(folder) / FILE_NAME)
        self.path, self.stored_bytes = self.spill.path, self.spill.stored_bytes
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-stream")
        self.pending: dict[int, Future] = {}
        self.reads = 0
        self.hooks = []
        for index in self.order:
            self.hooks.append(layers[index].register_forward_pre_hook(self._before(index)))
            self.hooks.append(layers[index].register_forward_hook(self._after(index)))

    def _next(self, index: int) -> int:
        position = self.order.index(index)
        return self.order[(position + 1) % len(self.order)]

    def _before(self, index: int):
        def hook(module, args):
            future = self.pending.pop(index, None)
            self.spill.place(index, future.result() if future is not None else self.spill.read(index))
            self.reads += 1
            upcoming = self._next(index)
            if upcoming != index and upcoming not in self.pending:
                self.pending[upcoming] = self.pool.submit(self.spill.read, upcoming)
        return hook

    def _after(self, index: int):
        def hook(module, args, output):
            self.spill.drop(index)
        return hook

    def close(self) -> None:
        """Put every streamed layer back in memory for good and delete the file."""
        for hook in self.hooks:
            hook.remove()
        for future in self.pending.values():
            future.result()
        self.pending.clear()
        self.pool.shutdown(wait=True)
        self.spill.close()


# The read probe (`measure_read_cost`), sized after SmolLM2-135M, the model the edge devices run.
PROBE_TENSORS = 21  # packed buffers of one decoder layer: 7 linears x (qweight, scale, zero)
PROBE_BYTES = (64 * 2**10, 2 * 2**20)  # a small group, and one 4-bit layer (3.5 M weights + fp16 scales: ~2 MB)
PROBE_LAYERS = 4  # streamed in turn: each read runs in the background while the layer before computes
PROBE_ROWS, PROBE_WIDTH = 64, 512  # each layer's compute on torch's threads: ~0.3 ms on 2 cores, about a read's time
PROBE_PAIRS = (3, 9)  # paired runs (resident, then streamed) per size: their median difference shrugs off other load
PROBE_SECONDS = 0.25  # past the first 3 pairs, stop after this long: a loaded machine still measures in about a second


class _ProbeStorage(PackedStorage):
    def __init__(self, nbytes: int):
        super().__init__()
        self.register_buffer("qweight", torch.full((nbytes,), 7, dtype=torch.uint8))


class _ProbeLayer(nn.Module):
    """A decoder layer's packed buffers (`PROBE_TENSORS` of them) and a matmul the prefetch thread contends with."""

    def __init__(self, nbytes: int, weight: torch.Tensor):
        super().__init__()
        self.parts = nn.ModuleList(_ProbeStorage(max(nbytes // PROBE_TENSORS, 1)) for _ in range(PROBE_TENSORS))
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight)


def _seconds_added_per_read(nbytes: int) -> float:
    """Seconds a run of `PROBE_LAYERS` layers of `nbytes` takes longer streamed than resident, per layer read."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(PROBE_WIDTH, PROBE_WIDTH, generator=generator) / PROBE_WIDTH ** 0.5
    x = torch.randn(PROBE_ROWS, PROBE_WIDTH, generator=generator)
    resident = [_ProbeLayer(0, weight) for _ in range(PROBE_LAYERS)]  # the same compute, next to no bytes
    streamed = [_ProbeLayer(nbytes, weight) for _ in range(PROBE_LAYERS)]

    def seconds(layers) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            h = x
            for layer in layers:
                h = layer(h)
        return time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="edgecore-stream-") as folder:  # where the executor spills by default
        stream = LayerStream(streamed, list(range(PROBE_LAYERS)), folder)
        try:
            seconds(resident), seconds(streamed)  # warm-up: thread pool, allocator, page cache
            least, most = PROBE_PAIRS
            added, started = [], time.perf_counter()
            while len(added) < least or (len(added) < most and time.perf_counter() - started < PROBE_SECONDS):
                added.append(seconds(streamed) - seconds(resident))
        finally:
            stream.close()
    return max(statistics.median(added), 0.0) / PROBE_LAYERS


def measure_read_cost() -> tuple[float, float]:
    """(seconds per read, seconds per byte) that streaming a layer adds to a run, measured on this machine.

    A synthetic read of one large tensor priced only the bytes (16 MB at page-cache speed), and a
    plan predicted at 1.26 s ran 9.73 s (40 streamed reads; LUC's own 2.04 s): a read also opens
    the file, parses its header, copies every tensor out one by one, places them in the modules,
    and its background thread contends with the compute on few cores. So the probe streams
    layer-sized groups of tensors through `LayerStream` itself, next to a compute, and takes what
    that adds to a run at two sizes: the line through them gives a fixed cost per read and a cost
    per byte. Takes a fraction of a second (a second on a loaded 2-core machine).
    """
    small, large = PROBE_BYTES
    added_small, added_large = (_seconds_added_per_read(n) for n in PROBE_BYTES)
    per_byte = max(added_large - added_small, 0.0) / (large - small)
    return max(added_small - per_byte * small, 0.0), per_byte
