"""Process memory and CPU facts, read from the kernel rather than estimated.

Peak memory is the resident-set high-water mark (VmHWM). On Linux it can be reset
(/proc/self/clear_refs), so one process can measure the peak of each phase; elsewhere the
lifetime peak from getrusage is reported.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (since the last reset_peak), in MiB."""
    kb = _status_kb("VmHWM")
    if kb is None:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kb = maxrss // 1024 if sys.platform == "darwin" else maxrss  # macOS reports bytes
    return kb / 1024


@torch.no_grad()
def make_resident(model) -> None:
    """Read every parameter and buffer once, so weights loaded lazily (memory-mapped
    safetensors) are in RSS before a measurement starts: otherwise the first step pages them
    in and a phase's peak counts the weights as if training had allocated them."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.numel() and tensor.device.type != "meta":
            tensor.detach().reshape(-1)[:: max(1, 4096 // tensor.element_size())].sum()


def reset_peak() -> bool:
    """Reset the peak to the current RSS; False where the OS cannot (the peak stays lifetime)."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def cpu_supports_bf16() -> bool:
    """True when bf16 matmuls run natively (avx512_bf16 / AMX on x86, or a CUDA device)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def machine() -> dict:
    """What a benchmark result needs to say about where it ran."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bf16_native": cpu_supports_bf16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
