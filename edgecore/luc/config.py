"""What LUC is asked to do: the one spelling of a compression choice, and the config of a run.

- `Candidate`: one way to store one decoder layer, pruning (none, an unstructured fraction or
  an N:M pattern) and a bit-width. Keeping a layer dense is `Candidate()`: sparsity 0 and
  `FP32_BITS`. Bit-widths are spelled the same everywhere in LUC, profiles and policy.json:
  2/3/4/8 packed integer codes, 16 fp16 values, 32 (`FP32_BITS`) fp32 values.
- N:M patterns are parsed from their text ("2:4") here, once (`parse_n_m`); everything else
  takes the parsed `NMPattern`.
- `LucConfig`: candidates, group size, weight budget and calibration settings of one
  compression, the argument of `edgecore.luc.compress_` (as torchao's `quantize_(model, config)`).

This module imports nothing but edgecore.errors, so edgecore.profiles builds Candidates from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence, Union

from edgecore.errors import EdgecoreError

FP32_BITS = 32  # bits of a weight kept in fp32: the dense choice (weights and the embedding table)
FP16_BITS = 16
UNSTRUCTURED = "unstructured"  # Candidate.pattern of a candidate without an N:M pattern
DEFAULT_GROUP_SIZE = 64
DEFAULT_KL_TOKENS = 128
_N_M = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """Keep `n` of every `m` consecutive input weights of a row."""

    n: int
    m: int

    def __post_init__(self):
        if not (isinstance(self.m, int) and isinstance(self.n, int) and 1 <= self.n < self.m):
            raise EdgecoreError(f"N:M pattern {self.n}:{self.m} needs 0 < N < M, integers 1 <= n < m (e.g. 2:4 keeps 2 of every 4)")

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


# How a layer is pruned: a float is an unstructured sparsity in [0, 1); an NMPattern is N:M.
Sparsity = Union[float, NMPattern]


def parse_n_m(text: str) -> NMPattern:
    """ "2:4" -> NMPattern(2, 4): the one parser of N:M text (EdgecoreError unless N:M with 0 < N < M)."""
    match = _N_M.match(text) if isinstance(text, str) else None
    if not match:
        raise EdgecoreError(f"{text!r} is not of the form N:M (e.g. '2:4', '4:8')")
    return NMPattern(int(match[1]), int(match[2]))


def parse_pattern(text: str) -> NMPattern | None:
    """ "unstructured" -> None; "2:4", "4:8", ... -> NMPattern (whose sparsity is 1 - n/m)."""
    if isinstance(text, str) and text.strip().lower() == UNSTRUCTURED:
        return None
    if not (isinstance(text, str) and _N_M.match(text)):
        raise EdgecoreError(f"sparsity pattern {text!r} is not 'unstructured' or 'n:m' (of the form N:M, e.g. '2:4', '4:8')")
    return parse_n_m(text)


@dataclass(frozen=True, order=True)
class Candidate:
    """One way to store a layer: pruning (unstructured sparsity or N:M) and a weight bit-width.

    `pattern` is "unstructured" or an N:M pattern's text (then `sparsity` is 1 - N/M, filled in
    when left at 0). The text is parsed once, here: `spec` is the parsed sparsity.
    """

    sparsity: float = 0.0  # fraction pruned; for N:M it is 1 - n/m
    pattern: str = UNSTRUCTURED  # or an N:M pattern, e.g. "2:4"
    bits: int = FP32_BITS  # 32 = fp32 values, 16 = fp16 values, else packed integer codes
    spec: Sparsity = field(default=0.0, init=False, repr=False, compare=False)

    def __post_init__(self):
        pattern = parse_pattern(self.pattern)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise EdgecoreError(f"candidate bits={self.bits!r} must be an integer (2, 3, 4, 8, 16 or {FP32_BITS})")
        if pattern is None:
            sparsity = self.sparsity
            if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
                raise EdgecoreError(f"candidate sparsity {sparsity!r} must be a number in [0, 1)")
            spec: Sparsity = float(sparsity)
            text = UNSTRUCTURED
        else:
            if self.sparsity not in (0, pattern.sparsity):
                raise EdgecoreError(f"candidate sparsity {self.sparsity} does not match N:M pattern {pattern} "
                                    f"({pattern.sparsity}); leave it out")
            sparsity, spec, text = pattern.sparsity, pattern, str(pattern)
        object.__setattr__(self, "sparsity", float(sparsity))
        object.__setattr__(self, "pattern", text)
        object.__setattr__(self, "spec", spec)

    @classmethod
    def n_m(cls, pattern: str | NMPattern, bits: int) -> Candidate:
        return cls(0.0, str(pattern), bits)

    @property
    def label(self) -> str:
        prune = self.pattern if self.pattern != UNSTRUCTURED else f"{self.sparsity:.0%}"
        return f"{prune} / {self.bits}b"

    @property
    def is_dense(self) -> bool:
        return self.spec == 0 and self.bits == FP32_BITS

    @property
    def prunes(self) -> bool:
        return self.spec != 0

    def to_dict(self) -> dict:
        """policy.json's and the sensitivity cache's spelling: {"sparsity", "pattern", "bits"}."""
        return {"sparsity": self.sparsity, "pattern": self.pattern, "bits": self.bits}

    @classmethod
    def from_dict(cls, raw: dict) -> Candidate:
        """From `to_dict`'s spelling; also reads the older ones: pattern "dense" and bits null for fp32."""
        pattern = raw.get("pattern", UNSTRUCTURED)
        bits = raw.get("bits", FP32_BITS)
        unknown = set(raw) - {"sparsity", "pattern", "bits"}
        if unknown:
            raise TypeError(f"unknown candidate fields {sorted(unknown)}")
        return cls(raw.get("sparsity", 0.0), UNSTRUCTURED if pattern == "dense" else pattern,
                   FP32_BITS if bits is None else bits)


@dataclass(frozen=True)
class LucConfig:
    """One LUC compression: the choices every layer may take, their pricing, the budget and the calibration.

    `embedding_bits`: bit-widths the token table (and tied head) may take, FP32_BITS keeping it.
    `weight_budget_bytes`: what the stored weights may take (edgecore.luc.pipeline.weight_budget_bytes
    derives it from a device profile less the tuning step of edgecore.luc.budget).
    `kl_tokens`: calibration positions the KL is taken at (when compress_ runs the calibration pass);
    `calib_samples`, `calib_len`, `seed`: how the name-based wrappers draw calibration batches from a dataset.
    """

    candidates: tuple[Candidate, ...]
    embedding_bits: tuple[int, ...]
    weight_budget_bytes: int
    group_size: int = DEFAULT_GROUP_SIZE
    calib_samples: int = 8
    calib_len: int = 128
    kl_tokens: int = DEFAULT_KL_TOKENS
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "candidates", tuple(self.candidates))
        object.__setattr__(self, "embedding_bits", tuple(sorted(set(self.embedding_bits), reverse=True)))
        if not self.candidates:
            raise EdgecoreError("a LUC config needs at least one candidate")
        if not self.embedding_bits:
            raise EdgecoreError("a LUC config needs at least one embedding bit-width")
        if isinstance(self.weight_budget_bytes, bool) or not isinstance(self.weight_budget_bytes, int) \
                or self.weight_budget_bytes <= 0:
            raise EdgecoreError(f"weight budget {self.weight_budget_bytes!r} bytes must be positive (an integer)")
        # group_size, the calibration sizes and kl_tokens are checked where they are used
        # (Layout, calibration_samples, kl_positions), with the same messages for every caller.

    def allowing(self, candidates: Sequence[Candidate] | None, by: str = "this config") -> LucConfig:
        """This config narrowed to `candidates` (a subset of its own, e.g. to measure faster); None: unchanged.
        `by` names who allows its candidates, for the error (e.g. "device pi-zero-2w")."""
        if candidates is None:
            return self
        wrong = sorted({c.label for c in candidates if c not in self.candidates})
        if wrong:
            raise EdgecoreError(f"candidates {wrong} are not allowed by {by}")
        return LucConfig(tuple(candidates), self.embedding_bits, self.weight_budget_bytes, self.group_size,
                         self.calib_samples, self.calib_len, self.kl_tokens, self.seed)


__all__ = ["DEFAULT_GROUP_SIZE", "DEFAULT_KL_TOKENS", "FP16_BITS", "FP32_BITS", "UNSTRUCTURED", "Candidate",
           "LucConfig", "NMPattern", "Sparsity", "parse_n_m", "parse_pattern"]
