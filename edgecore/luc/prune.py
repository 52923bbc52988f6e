"""Wanda pruning masks: score |W_ij| * ||X_j||_2 and keep the best weights of every output row.

Wanda ("Pruning LLMs by Weights and Activations", Sun et al. 2023) needs no weight update and
no Hessian: one pass of calibration inputs gives the L2 norm of every input feature, and each
output row then drops its lowest-scoring weights. Masks here are boolean KEEP masks shaped
like the weight `[out, in]`.

Two placements are supported, both keeping the same number of weights in every row (so the
stored size of a compressed layer follows from its shape and configuration alone):
- unstructured: a fraction `sparsity` of each row, anywhere in it;
- N:M: in every block of M consecutive inputs of a row, N are kept (e.g. 2:4).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from edgecore.errors import EdgecoreError
from edgecore.luc.config import NMPattern, Sparsity


def normalize_sparsity(sparsity: Sparsity) -> float | NMPattern:
    """A float in [0, 1) for unstructured pruning, or the NMPattern given (N:M text is parsed by
    edgecore.luc.config.parse_n_m, once, before it gets here)."""
    if isinstance(sparsity, NMPattern):
        return sparsity
    if isinstance(sparsity, str):
        raise EdgecoreError(f"sparsity {sparsity!r} is text: give a number in [0, 1) or an NMPattern "
                            "(parse_n_m reads '2:4'; 'unstructured' needs an amount)")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise EdgecoreError(
            f"sparsity {sparsity!r} must be a number in [0, 1) or an NMPattern (parse_n_m('2:4') reads one from text)"
        )
    return float(sparsity)


def kept_per_row(in_features: int, sparsity: Sparsity) -> int:
    """How many weights each row keeps; round-half-up of the pruned count for unstructured."""
    spec = normalize_sparsity(sparsity)
    if isinstance(spec, NMPattern):
        if in_features % spec.m:
            raise EdgecoreError(f"N:M pattern {spec} needs in_features ({in_features}) to be a multiple of {spec.m}")
        return in_features // spec.m * spec.n
    # floor(x + 0.5) rather than round(): Python's round() sends halves to even numbers.
    pruned = math.floor(spec * in_features + 0.5)
    if pruned >= in_features:
        raise EdgecoreError(
            f"sparsity {spec} prunes all {in_features} weights of a row; use a sparsity below "
            f"{(in_features - 0.5) / in_features:.4f}"
        )
    return in_features - pruned


class ActivationStats:
    """Running sum of squares of every input feature, fed batch by batch (e.g. by a forward hook)."""

    def __init__(self) -> None:
        self.sum_squares: torch.Tensor | None = None  # float64 [in]: many tokens, no precision loss
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if self.sum_squares is None:
            self.sum_squares = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
        elif rows.shape[1] != self.sum_squares.numel():
            raise EdgecoreError(
                f"activation width {rows.shape[1]} differs from the {self.sum_squares.numel()} features seen before"
            )
        self.sum_squares += rows.square().sum(dim=0)
        self.tokens += rows.shape[0]

    def norms(self) -> torch.Tensor:
        """||X_j||_2 over every token seen, as float32 [in]."""
        if self.sum_squares is None:
            raise EdgecoreError("no calibration activations were recorded: run calibration batches first")
        return self.sum_squares.sqrt().to(torch.float32)

    def attach(self, module: nn.Module) -> RemovableHandle:
        """Record the input of every forward call of `module`; remove the returned handle when done."""
        return module.register_forward_pre_hook(lambda _module, args: self.update(args[0]))


def activation_norms(inputs: torch.Tensor) -> torch.Tensor:
    """||X_j||_2 over all tokens of a single tensor [..., in]."""
    stats = ActivationStats()
    stats.update(inputs)
    return stats.norms()


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||_2, the norm of input feature j broadcast over the output rows."""
    if weight.dim() != 2 or norms.shape != (weight.shape[1],):
        raise EdgecoreError(
            f"Wanda needs a weight [out, in] and norms [in]; got {tuple(weight.shape)} and {tuple(norms.shape)}"
        )
    return weight.detach().abs().float() * norms.float()[None, :]


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise EdgecoreError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}")


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask dropping exactly round(sparsity * in) lowest scores of every row; sparsity in [0, 1)."""
    _check_scores(scores)
    spec = normalize_sparsity(sparsity)
    if isinstance(spec, NMPattern):
        raise EdgecoreError(f"unstructured_mask takes a number in [0, 1); use n_m_mask for pattern {spec}")
    pruned = scores.shape[1] - kept_per_row(scores.shape[1], spec)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if pruned:
        # A stable sort makes ties deterministic: the earlier input is pruned first.
        order = torch.sort(scores, dim=1, stable=True).indices
        keep.scatter_(1, order[:, :pruned], False)
    return keep


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the n highest scores of every block of m consecutive inputs of a row."""
    _check_scores(scores)
    pattern = NMPattern(n, m)
    out, inp = scores.shape
    kept_per_row(inp, pattern)  # checks in % m == 0
    blocks = scores.reshape(out, inp // m, m)
    order = torch.sort(blocks, dim=2, descending=True, stable=True).indices
    keep = torch.zeros_like(blocks, dtype=torch.bool)
    keep.scatter_(2, order[..., :n], True)
    return keep.reshape(out, inp)


def keep_mask(scores: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """Unstructured or N:M keep-mask, whichever `sparsity` names."""
    spec = normalize_sparsity(sparsity)
    if isinstance(spec, NMPattern):
        return n_m_mask(scores, spec.n, spec.m)
    return unstructured_mask(scores, spec)
