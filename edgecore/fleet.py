"""Fleets: which device (profile) and LoRA rank each client of a federation has.

A fleet file (shipped ones live in configs/fleets/) lists client slots; in a simulation,
partition p takes slot p mod len(slots), so a fleet of 3 slots run with 6 clients has two
of each device:

```toml
description = "a 512 MB board, a 1 GB board and a phone"   # optional
[[clients]]
device = "pi-zero-2w"      # required: a shipped profile name or a path to a profile .toml
lora-rank = 4              # optional: the client's LoRA rank (default: the experiment's lora-r)
```

A real device names its profile itself (`python -m client --device-profile FILE`), so
fleets describe simulations and benchmarks; the server needs no fleet file to run a
heterogeneous federation.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from edgecore.errors import EdgecoreError
from edgecore.profiles import DeviceProfile, resolve_profile

_SLOT_KEYS = ("device", "lora-rank")


def fleets_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "configs" / "fleets"


def shipped_fleets() -> dict[str, Path]:
    folder = fleets_dir()
    return {p.stem: p for p in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


@dataclass(frozen=True)
class FleetClient:
    device: DeviceProfile
    lora_rank: int | None = None  # None: the experiment's lora-r


@dataclass(frozen=True)
class Fleet:
    name: str
    slots: tuple[FleetClient, ...]
    description: str = ""

    def client(self, partition_id: int) -> FleetClient:
        return self.slots[partition_id % len(self.slots)]

    def ranks(self, default: int) -> list[int]:
        return [slot.lora_rank or default for slot in self.slots]


def resolve_fleet(name_or_path: str) -> Fleet:
    """A shipped fleet's name (configs/fleets/NAME.toml) or a path to a fleet file."""
    shipped = shipped_fleets()
    path = shipped.get(name_or_path) or Path(name_or_path).expanduser()
    if not path.is_file():
        raise EdgecoreError(
            f"fleet {name_or_path!r} not found; use one of {', '.join(shipped) or '(none shipped)'} or a path to a fleet .toml"
        )
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise EdgecoreError(f"fleet file {path} is not valid TOML: {err}") from None
    unknown = set(table) - {"description", "clients"}
    if unknown:
        raise EdgecoreError(f"fleet file {path}: unknown keys {sorted(unknown)}; a fleet has 'description' and [[clients]]")
    slots = table.get("clients")
    if not isinstance(slots, list) or not slots:
        raise EdgecoreError(f"fleet file {path} lists no clients: add [[clients]] tables with device = \"PROFILE\"")
    return Fleet(path.stem, tuple(_slot(path, i, slot) for i, slot in enumerate(slots)), str(table.get("description", "")))


def _slot(path: Path, index: int, slot: dict) -> FleetClient:
    where = f"fleet file {path}, clients[{index}]"
    unknown = set(slot) - set(_SLOT_KEYS)
    if unknown:
        raise EdgecoreError(f"{where}: unknown keys {sorted(unknown)}; known: {', '.join(_SLOT_KEYS)}")
    if not isinstance(slot.get("device"), str):
        raise EdgecoreError(f"{where}: device must name a profile, e.g. device = \"pi4-1gb\"")
    rank = slot.get("lora-rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise EdgecoreError(f"{where}: lora-rank = {rank!r} must be a positive integer")
    try:
        device = resolve_profile(slot["device"])
    except EdgecoreError as err:
        raise EdgecoreError(f"{where}: {err}") from None
    return FleetClient(device, rank)
