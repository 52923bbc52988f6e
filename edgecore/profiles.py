"""Device profiles: what one class of device offers a fine-tuning job.

A profile is a TOML file (shipped ones live in configs/devices/). All memory is in MiB
(2**20 bytes), as `edgecore.measure` reports it:

```toml
name = "pi-zero-2w"                  # required; letters, digits, "-", "_", "."
description = "Raspberry Pi Zero 2 W class board, 512 MB RAM"     # optional
memory_budget_mb = 200               # required, > 0: weights as stored, adapters, optimizer
                                     # state and activations of the job (the Python/torch
                                     # runtime, ~350 MiB, is extra)
weight_bits = [2, 3, 4, 8]           # required: storage bit-widths its kernels run, from
                                     # 2, 3, 4, 8, 16 (fp16/bf16) and 32 (dense fp32)
precision = "fp32"                   # required: compute, "fp32" or "bf16"

[sparsity]                           # optional; dense (sparsity 0) is always allowed
unstructured = [0.0, 0.25, 0.5, 0.75]   # allowed fractions of pruned weights, each in [0, 1)
n_m = ["2:4"]                        # N:M patterns: keep N of every M consecutive weights
```

Unknown keys are refused (a typo must not fall back to a default silently), and every error
names the file, the field and the value, and says how to fix it. `runtime_floor_mb` and
`[throughput]`, which nothing read, are no longer fields: a profile with them is refused.

`DeviceProfile.candidates()` gives the LUC choices the device runs as edgecore.luc Candidates
(N:M text parsed by edgecore.luc.config.parse_n_m).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecore import measure
from edgecore.errors import EdgecoreError
from edgecore.luc.config import FP32_BITS, Candidate, parse_n_m

ALL_BITS = (2, 3, 4, 8, 16, FP32_BITS)
PRECISIONS = ("fp32", "bf16")
LOCAL = "local"
# What an auto-detected profile allows: the machine runs every kernel edgecore has.
LOCAL_UNSTRUCTURED = (0.0, 0.25, 0.5, 0.75)
LOCAL_N_M = ("2:4", "4:8")

_REQUIRED = ("name", "memory_budget_mb", "weight_bits", "precision")
_OPTIONAL = ("description", "sparsity")
_REMOVED = ("runtime_floor_mb", "throughput")  # fields of older profiles that nothing read
_SPARSITY_KEYS = ("unstructured", "n_m")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class DeviceProfile:
    """One class of device: its memory for the job, its kernels and its compute precision."""

    name: str
    memory_budget_mb: float
    weight_bits: tuple[int, ...]
    precision: str
    description: str = ""
    unstructured: tuple[float, ...] = (0.0,)  # allowed unstructured sparsities, 0.0 included
    n_m: tuple[str, ...] = ()  # allowed N:M patterns, "N:M" (keep N of every M)
    source: str = field(default="", compare=False)  # the file it came from, for messages

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def candidates(self) -> list[Candidate]:
        """Every LUC Candidate the device runs: unpruned first, then each unstructured sparsity, then
        each N:M pattern, each at every bit-width. Dense fp32 (`Candidate()`) is included when 32
        is among the bits."""
        pruning = [Candidate(s) for s in self.unstructured] + [Candidate.n_m(p, FP32_BITS) for p in self.n_m]
        return [Candidate(c.sparsity, c.pattern, bits) for c in pruning for bits in self.weight_bits]

    def summary(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "memory_budget_mb": self.memory_budget_mb,
            "weight_bits": list(self.weight_bits),
            "precision": self.precision,
            "sparsity": {"unstructured": list(self.unstructured), "n_m": list(self.n_m)},
        }


# ---------------------------------------------------------------- loading and checking


def load_profile(path: str | Path) -> DeviceProfile:
    """Read and check one profile file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise EdgecoreError(f"device profile {path} does not exist; shipped profiles: {', '.join(shipped_profiles())}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise EdgecoreError(f"cannot read device profile {path}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise EdgecoreError(f"{path} is not valid TOML ({err}); fix the syntax") from None
    return profile_from_dict(raw, source=str(path))


def profile_from_dict(raw: dict[str, Any], source: str = "<profile>") -> DeviceProfile:
    """Check a parsed profile table; errors name `source`, the field and the value."""
    _check_keys(raw, _REQUIRED + _OPTIONAL, source, "")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise EdgecoreError(f"{source}: missing field {missing[0]!r}; add it (see edgecore/profiles.py for the layout)")
    name = _string(raw["name"], source, "name")
    if not _NAME.match(name):
        raise EdgecoreError(f"{source}: field 'name' = {name!r} must be letters, digits, '-', '_' or '.' (e.g. \"pi-zero-2w\")")
    sparsity = raw.get("sparsity", {})
    if not isinstance(sparsity, dict):
        raise EdgecoreError(f"{source}: field 'sparsity' = {sparsity!r} must be a table: [sparsity] with unstructured = [...] and/or n_m = [...]")
    _check_keys(sparsity, _SPARSITY_KEYS, source, "sparsity.")
    return DeviceProfile(
        name=name,
        description=_string(raw.get("description", ""), source, "description", empty_ok=True),
        memory_budget_mb=_positive(raw["memory_budget_mb"], source, "memory_budget_mb"),
        weight_bits=_bits(raw["weight_bits"], source),
        precision=_precision(raw["precision"], source),
        unstructured=_unstructured(sparsity.get("unstructured", [0.0]), source),
        n_m=_patterns(sparsity.get("n_m", []), source),
        source=source,
    )


def _check_keys(table: dict, known: tuple[str, ...], source: str, prefix: str) -> None:
    unknown = sorted(set(table) - set(known))
    removed = [k for k in unknown if not prefix and k in _REMOVED]
    if removed:
        raise EdgecoreError(f"{source}: unknown field {removed[0]!r}: profiles no longer have it (nothing used it); delete it")
    if unknown:
        raise EdgecoreError(
            f"{source}: unknown field {prefix + unknown[0]!r}; known fields{' in [' + prefix[:-1] + ']' if prefix else ''}: "
            f"{', '.join(known)} (check the spelling)"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _string(value: Any, source: str, key: str, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or not (value.strip() or empty_ok):
        raise EdgecoreError(f"{source}: field {key!r} = {value!r} must be a non-empty string in quotes")
    return value


def _positive(value: Any, source: str, key: str) -> float:
    if not _is_number(value):
        raise EdgecoreError(f"{source}: field {key!r} = {value!r} must be a number of MiB (e.g. {key} = 450)")
    if value <= 0:
        raise EdgecoreError(f"{source}: field {key!r} = {value!r} must be positive (MiB)")
    return float(value)


def _list(value: Any, source: str, key: str, example: str) -> list:
    if not isinstance(value, list):
        raise EdgecoreError(f"{source}: field {key!r} = {value!r} must be a list, e.g. {key.split('.')[-1]} = {example}")
    return value


def _bits(value: Any, source: str) -> tuple[int, ...]:
    items = _list(value, source, "weight_bits", "[4, 8, 16, 32]")
    if not items:
        raise EdgecoreError(f"{source}: field 'weight_bits' is empty; list at least one of {list(ALL_BITS)}")
    for bits in items:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALL_BITS:
            raise EdgecoreError(f"{source}: field 'weight_bits' has {bits!r}; each entry must be one of {list(ALL_BITS)}")
    return tuple(sorted(set(items)))


def _precision(value: Any, source: str) -> str:
    if value not in PRECISIONS:
        raise EdgecoreError(f"{source}: field 'precision' = {value!r} must be one of {', '.join(repr(p) for p in PRECISIONS)}")
    return value


def _unstructured(value: Any, source: str) -> tuple[float, ...]:
    items = _list(value, source, "sparsity.unstructured", "[0.0, 0.25, 0.5]")
    for s in items:
        if not _is_number(s) or not 0 <= s < 1:
            raise EdgecoreError(
                f"{source}: field 'sparsity.unstructured' has {s!r}; each sparsity (the pruned fraction) must be a number in [0, 1)"
            )
    return tuple(sorted({0.0, *(float(s) for s in items)}))  # dense is always possible


def _patterns(value: Any, source: str) -> tuple[str, ...]:
    items = _list(value, source, "sparsity.n_m", '["2:4"]')
    patterns = []
    for p in items:
        try:
            patterns.append(parse_n_m(p))
        except EdgecoreError as err:
            raise EdgecoreError(f"{source}: field 'sparsity.n_m' has {p!r}: {err}, e.g. \"2:4\" keeps 2 of every 4") from None
    return tuple(str(p) for p in sorted(set(patterns), key=lambda p: (p.sparsity, p.m)))


# ---------------------------------------------------------------- finding profiles


def devices_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "configs" / "devices"


def shipped_profiles() -> dict[str, Path]:
    """Shipped profiles by name (the file's stem), sorted."""
    folder = devices_dir()
    return {p.stem: p for p in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


def resolve_profile(name_or_path: str | Path) -> DeviceProfile:
    """"local" (this machine), a shipped profile's name, or a path to a profile file."""
    text = str(name_or_path)
    if text == LOCAL:
        return detect_local()
    shipped = shipped_profiles()
    if text in shipped:
        return load_profile(shipped[text])
    path = Path(text).expanduser()
    if path.is_file() or path.suffix == ".toml":
        return load_profile(path)
    raise EdgecoreError(
        f"unknown device profile {text!r}; use {LOCAL!r}, one of {', '.join(shipped) or '(none shipped)'}, "
        "or a path to a .toml profile"
    )


# ---------------------------------------------------------------- this machine


def total_memory_mb() -> float:
    """Physical memory of this machine in MiB (/proc/meminfo, else sysconf)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 20)
    except (ValueError, OSError, AttributeError) as err:
        raise EdgecoreError(f"cannot read this machine's memory size ({err}); pass a profile file instead of 'local'") from None


def detect_local(budget_fraction: float = 0.5) -> DeviceProfile:
    """A profile of this machine: `budget_fraction` of its RAM for the job, every kernel allowed."""
    if not _is_number(budget_fraction) or not 0 < budget_fraction <= 1:
        raise EdgecoreError(f"budget_fraction = {budget_fraction!r} must be in (0, 1], the share of RAM for the job")
    total = total_memory_mb()
    precision = "bf16" if measure.cpu_supports_bf16() else "fp32"
    return DeviceProfile(
        name=LOCAL,
        description=f"this machine: {total:.0f} MiB RAM, {os.cpu_count()} cores, {precision} compute",
        memory_budget_mb=round(total * budget_fraction, 1),
        weight_bits=ALL_BITS,
        precision=precision,
        unstructured=LOCAL_UNSTRUCTURED,
        n_m=LOCAL_N_M,
        source=LOCAL,
    )
