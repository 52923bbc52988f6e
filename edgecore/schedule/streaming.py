"""Frozen decoder layers kept on disk: read from a memory-mapped safetensors file just before they run.

When even the compressed weights exceed the budget, the layers a workload never trains are
written once to `frozen-layers.safetensors` and their packed buffers in memory are replaced by
empty placeholders. A forward pre-hook reads a layer's buffers back (safetensors maps the file
and copies the layer's bytes out) and a forward hook drops them again after it ran. While one
layer computes, a background thread reads the next streamed layer (in running order, wrapping
round to the first for the next step or token), so at most two streamed layers are resident.
Each read opens the file anew: a mapping kept open would leave every page it touched counted
in the process's resident memory. Only layers that run without gradient may stream: nothing is
kept for a backward pass.
"""

from __future__ import annotations

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


def read_seconds_per_byte(nbytes: int = 16 * 2**20) -> float:
    """Seconds per byte to read a tensor back the way `LayerStream` does (through the page cache here)."""
    with tempfile.TemporaryDirectory(prefix="edgecore-stream-") as folder:
        path = Path(folder) / FILE_NAME
        save_file({"probe": torch.zeros(nbytes, dtype=torch.uint8)}, str(path))
        times = []
        for _ in range(4):
            started = time.perf_counter()
            with safe_open(str(path), framework="pt") as file:
                file.get_tensor("probe")
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2] / nbytes
