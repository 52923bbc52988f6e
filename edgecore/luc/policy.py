"""A LUC policy: what every decoder layer and the token table are stored as, what that costs, and
how it is chosen.

A `Policy` gives every decoder layer one Candidate (sparsity or N:M pattern, and bits) and the
token-embedding table a bit-width (FP32_BITS keeps it fp32). Its `weight_bytes` is what the
model's stored state will take, computed from the layouts alone before anything is compressed
(`stored_nbytes` of the compressed model must agree; the tests and `simulations.bench luc` check it).

Embeddings and the tied LM head: SmolLM2's 49152 x 576 table is 113 MB in fp32, a fifth of
the model and more than half of the smallest shipped budget, so it is compressed too. It is
never pruned (a pruned row would erase a token), only group-quantized, and the tied head reads
the same packed table (edgecore.luc.table), so it is stored once. Its bit-width is one more
item of the knapsack, with its own score (for LUC, the measured KL of quantizing the table
alone, which affects the input and the head at once).

`choose_policy` takes any score matrix (layers x candidates): the measured KL, Edge-LLM's output
MSE, random scores; the least total score within the budget wins (edgecore.luc.knapsack).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

from edgecore.errors import EdgecoreError
from edgecore.luc import knapsack
from edgecore.luc.config import DEFAULT_GROUP_SIZE, FP32_BITS, UNSTRUCTURED, Candidate
from edgecore.luc.layer import expected_nbytes
from edgecore.luc.sensitivity import Sensitivity
from edgecore.luc.table import table_nbytes
from edgecore.memory import FP32, MIB, ModelShape

# ---------------------------------------------------------------- prices


def layer_nbytes(shape: ModelShape, candidate: Candidate, group_size: int) -> int:
    """Stored bytes of one decoder layer: its linears as the candidate stores them, plus two fp32 norms."""
    linear_bytes = sum(
        expected_nbytes(out_f, in_f, candidate.bits, candidate.spec, group_size)
        for in_f, out_f in shape.linears().values()
    )
    return linear_bytes + 2 * FP32 * shape.hidden


def embedding_nbytes(shape: ModelShape, bits: int, group_size: int) -> int:
    """Stored bytes of the token table (and of the head: nothing more when tied, a second table when not)."""
    one = FP32 * shape.vocab * shape.hidden if bits == FP32_BITS else table_nbytes(shape.vocab, shape.hidden, bits, group_size)
    return one if shape.tied else 2 * one


def fixed_nbytes(shape: ModelShape) -> int:
    """Stored bytes no choice changes: the final norm."""
    return FP32 * shape.hidden


def policy_nbytes(shape: ModelShape, layers: Sequence[Candidate], embedding_bits: int, group_size: int) -> int:
    return (
        sum(layer_nbytes(shape, c, group_size) for c in layers)
        + embedding_nbytes(shape, embedding_bits, group_size)
        + fixed_nbytes(shape)
    )


def dense_nbytes(shape: ModelShape, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Stored bytes of the dense fp32 model (every layer `Candidate()`, the table kept fp32)."""
    return policy_nbytes(shape, [Candidate()] * shape.layers, FP32_BITS, group_size)


# ---------------------------------------------------------------- the policy


@dataclass(frozen=True)
class Policy:
    """Per-layer storage of one model, and what it costs."""

    model: str
    group_size: int
    layers: tuple[Candidate, ...]
    embedding_bits: int  # FP32_BITS = fp32 table kept
    weight_bytes: int  # every stored tensor of the compressed model
    budget_bytes: int | None = None  # the weight budget it was chosen for (None: uniform, no budget)
    kind: str = "luc"  # "luc" (searched) or "uniform"
    sensitivity: tuple[float, ...] = ()  # per layer, the score of its choice (LUC: KL, nats/token)
    embedding_sensitivity: float = 0.0
    profile: str = ""
    notes: dict = field(default_factory=dict)

    @property
    def total_sensitivity(self) -> float:
        return float(sum(self.sensitivity)) + self.embedding_sensitivity

    def to_dict(self) -> dict:
        """policy.json's content (edgecore.luc.saved writes it)."""
        raw = asdict(self)
        raw["layers"] = [c.to_dict() for c in self.layers]
        return raw

    @classmethod
    def from_dict(cls, raw: dict, source: str = "policy") -> Policy:
        """From `to_dict`'s content (Candidate.from_dict also reads older candidate spellings)."""
        try:
            layers = tuple(Candidate.from_dict(c) for c in raw["layers"])
            return cls(**{**raw, "layers": layers, "sensitivity": tuple(raw.get("sensitivity", ()))})
        except (KeyError, TypeError, EdgecoreError) as err:
            raise EdgecoreError(f"{source} is not an edgecore LUC policy ({err}); recompress with `python -m edgecore compress`") from None

    def table(self, shape: ModelShape) -> list[dict]:
        """One row per layer (and the embedding): what `compress` prints."""
        rows = [
            {"layer": str(i), "sensitivity": s, "sparsity": c.pattern if c.pattern != UNSTRUCTURED else c.sparsity,
             "bits": c.bits, "mb": layer_nbytes(shape, c, self.group_size) / MIB}
            for i, (c, s) in enumerate(zip(self.layers, self.sensitivity or [math.nan] * len(self.layers)))
        ]
        rows.append({"layer": "embed+head", "sensitivity": self.embedding_sensitivity, "sparsity": 0.0,
                     "bits": self.embedding_bits, "mb": embedding_nbytes(shape, self.embedding_bits, self.group_size) / MIB})
        return rows


def uniform_policy(model: str, shape: ModelShape, candidate: Candidate, embedding_bits: int, group_size: int = 64,
                   sensitivity: Sensitivity | None = None, embedding_kl: Mapping[int, float] | None = None) -> Policy:
    """The same candidate in every layer (the baseline LUC is measured against)."""
    layers = (candidate,) * shape.layers
    per_layer = ()
    if sensitivity is not None:
        per_layer = tuple(float(v) for v in sensitivity.kl[:, sensitivity.candidates.index(candidate)])
    return Policy(model, group_size, layers, embedding_bits, policy_nbytes(shape, layers, embedding_bits, group_size),
                  kind="uniform", sensitivity=per_layer,
                  embedding_sensitivity=(embedding_kl or {}).get(embedding_bits, 0.0))


def choose_policy(
    shape: ModelShape,
    candidates: Sequence[Candidate],
    scores: np.ndarray,
    embedding_scores: Mapping[int, float],
    budget_bytes: int,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    model: str = "",
    profile: str = "",
) -> Policy:
    """The least-scored policy whose stored weights fit `budget_bytes` (multiple-choice knapsack).

    `scores[l, j]`: the score of storing layer l as `candidates[j]` (any measure: LUC's KL, an
    output MSE, random numbers). `embedding_scores` maps each allowed embedding bit-width to its
    score; the table is one more knapsack item. The fixed bytes (final norm) are taken off the
    budget first.
    """
    scores = np.asarray(scores, dtype=float)
    if scores.shape != (shape.layers, len(candidates)):
        raise EdgecoreError(f"scores are {scores.shape}, not (layers, candidates) = {(shape.layers, len(candidates))}")
    g = group_size
    items = [
        [knapsack.Option(c.label, layer_nbytes(shape, c, g), float(scores[l, j])) for j, c in enumerate(candidates)]
        for l in range(shape.layers)
    ]
    bits_list = sorted(embedding_scores, reverse=True)
    items.append([knapsack.Option(f"{b}b", embedding_nbytes(shape, b, g), float(embedding_scores[b])) for b in bits_list])
    fixed = fixed_nbytes(shape)
    try:
        chosen = knapsack.solve(items, budget_bytes - fixed)
    except EdgecoreError:
        smallest = knapsack.min_budget(items) + fixed
        raise EdgecoreError(
            f"the weight budget of {budget_bytes / MIB:.1f} MB cannot hold {model or 'the model'} even at its most "
            f"compressed: the smallest budget that fits is {smallest / MIB:.1f} MB; raise the device's memory_budget_mb "
            "(or --weight-budget-mb), reserve less for tuning (smaller --batch / --tuning-window), "
            "or allow more compression in the profile (fewer weight_bits, more sparsity)"
        ) from None
    layers = tuple(candidates[j] for j in chosen[:-1])
    embedding_bits = bits_list[chosen[-1]]
    return Policy(
        model, g, layers, embedding_bits, policy_nbytes(shape, layers, embedding_bits, g), budget_bytes, "luc",
        tuple(float(scores[l, j]) for l, j in enumerate(chosen[:-1])), float(embedding_scores[embedding_bits]),
        profile,
    )


__all__ = ["Policy", "choose_policy", "dense_nbytes", "embedding_nbytes", "fixed_nbytes", "layer_nbytes",
           "policy_nbytes", "uniform_policy"]
