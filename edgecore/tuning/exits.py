"""Early exits that share the model's frozen final norm and LM head.

An exit after layer e reads that layer's hidden state through a small trainable exit adapter,
h + B(A(h)) with rank r (B starts at zero, so an untrained exit reads h as it is), then the
model's own final norm and head. Nothing of the head is cloned: on SmolLM2 an exit adapter
of rank 8 is 2 x 576 x 8 = 9,216 parameters against the head's 28.3M.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from edgecore.errors import EdgecoreError


def default_exits(layers: int, count: int = 4) -> tuple[int, ...]:
    """Exit after every 1/count of the depth, the last layer included (0-based layer indices)."""
    if layers < 1 or count < 1:
        raise EdgecoreError(f"need at least one layer and one exit, got {layers} layers and {count} exits")
    return tuple(sorted({max(0, math.ceil(layers * k / count) - 1) for k in range(1, count + 1)}))


def parse_exits(spec: str | Sequence[int] | None, layers: int) -> tuple[int, ...]:
    """Exit layers from "quarters" / None (default), "N" exits evenly, or a list like "7,15,22,29"."""
    if spec is None or spec == "quarters":
        return default_exits(layers)
    if isinstance(spec, str):
        text = spec.strip()
        try:
            if "," not in text:
                return default_exits(layers, int(text))
            exits = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise EdgecoreError(f"exits {spec!r}: use 'quarters', a count like '4', or layer indices like '7,15,22,29'") from None
    else:
        exits = [int(x) for x in spec]
    bad = [e for e in exits if not 0 <= e < layers]
    if bad or not exits:
        raise EdgecoreError(f"exit layers {exits} must be in 0..{layers - 1} (the model has {layers} layers)")
    return tuple(sorted(set(exits)))


class ExitAdapter(nn.Module):
    """h + up(down(h)): a low-rank residual correction that lets the shared head read layer e."""

    def __init__(self, hidden: int, rank: int = 8):
        super().__init__()
        if rank < 1:
            raise EdgecoreError(f"exit adapter rank {rank} must be at least 1")
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.down(hidden))


class Exits(nn.Module):
    """The exit adapters of one model, by exit layer."""

    def __init__(self, exits: Sequence[int], hidden: int, rank: int = 8):
        super().__init__()
        self.layers = tuple(sorted(exits))
        self.rank = rank
        self.adapters = nn.ModuleDict({str(e): ExitAdapter(hidden, rank) for e in self.layers})

    def adapter(self, exit_layer: int) -> ExitAdapter:
        if str(exit_layer) not in self.adapters:
            raise EdgecoreError(f"layer {exit_layer} has no exit; exits are at {list(self.layers)}")
        return self.adapters[str(exit_layer)]

    def read(self, run, exit_layer: int, rows: torch.Tensor, head) -> torch.Tensor:
        """Logits of hidden-state `rows` taken after layer `exit_layer`: adapter, final norm, shared head."""
        return head(run.final_norm(self.adapter(exit_layer)(rows)))

    def state(self) -> dict[str, torch.Tensor]:
        """Named tensors of the exit adapters, for saving and for the wire: `exit.<layer>.<down|up>`."""
        return {f"exit.{e}.{part}": getattr(self.adapter(e), part).weight.detach() for e in self.layers for part in ("down", "up")}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in tensors.items():
                _, e, part = name.split(".")
                getattr(self.adapter(int(e)), part).weight.copy_(value)
