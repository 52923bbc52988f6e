"""Layer sensitivity: how much compressing one decoder layer alone changes the model's output.

The measure is the KL divergence from the dense model's next-token distribution to the
distribution with only layer l compressed, averaged over the calibration tokens. It is
end-to-end (what the loss sees), scale-free (unlike Edge-LLM's raw output MSE, which grows
with depth because hidden states do), and additive enough across layers to drive a knapsack.

Cost is kept down by running the dense model once, caching every layer's input and the
dense log-probabilities, and re-running only layers l..L-1 for each (layer, candidate).
Wanda pruning needs the input activation norms of every linear: the same dense pass
collects them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from edgecore import lm
from edgecore.encoding import Batch
from edgecore.luc.layer import CompressedLinear
from edgecore.luc.prune import ActivationStats, keep_mask, wanda_scores

log = logging.getLogger(__name__)

DENSE_BITS = 32


@dataclass(frozen=True, order=True)
class Candidate:
    """One way to store a layer: pruning (unstructured sparsity or N:M) and a weight bit-width."""

    sparsity: float = 0.0  # fraction pruned; for N:M it is 1 - n/m
    pattern: str = "unstructured"  # or "n:m", e.g. "2:4"
    bits: int = DENSE_BITS  # 32 = fp32 values, 16 = fp16 values, else packed integer codes

    @property
    def label(self) -> str:
        prune = self.pattern if self.pattern != "unstructured" else f"{self.sparsity:.0%}"
        return f"{prune} / {self.bits}b"

    @property
    def is_dense(self) -> bool:
        return self.sparsity == 0 and self.pattern == "unstructured" and self.bits == DENSE_BITS


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The linear projections of a decoder layer, by their name inside the layer."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def compress_linear(linear: nn.Linear, act_norm: torch.Tensor, candidate: Candidate, group_size: int) -> CompressedLinear:
    keep = None
    if not (candidate.pattern == "unstructured" and candidate.sparsity == 0):
        spec = candidate.sparsity if candidate.pattern == "unstructured" else candidate.pattern
        keep = keep_mask(wanda_scores(linear.weight.data, act_norm), spec)
    bits = None if candidate.bits == DENSE_BITS else candidate.bits
    return CompressedLinear.from_linear(linear, bits=bits, keep=keep, group_size=group_size)


class Calibration:
    """One dense pass over calibration batches: layer inputs, layer kwargs, dense log-probs, activation norms."""

    def __init__(self, model, batches: Sequence[Batch]):
        self.model = lm.causal_lm(model)
        self.layers = list(self.model.model.layers)
        self.batches = list(batches)
        self.inputs: list[list[torch.Tensor]] = [[] for _ in self.layers]  # [layer][batch]
        self.kwargs: list[dict] = []  # per batch: what the decoder passes every layer
        self.stats: dict[tuple[int, str], ActivationStats] = {}
        self.dense_logprobs: list[torch.Tensor] = []
        self._run()

    def _run(self) -> None:
        hooks = []
        for index, layer in enumerate(self.layers):
            hooks.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
            for name, linear in linears(layer).items():
                stats = self.stats.setdefault((index, name), ActivationStats())
                hooks.append(linear.register_forward_pre_hook(lambda _m, args, s=stats: s.update(args[0])))
        try:
            with torch.no_grad():
                for batch in self.batches:
                    hidden = lm.hidden_states(self.model, batch)
                    self.dense_logprobs.append(self._logprobs(hidden, batch))
        finally:
            for hook in hooks:
                hook.remove()

    def _layer_hook(self, index: int):
        def hook(_module, args, kwargs):
            self.inputs[index].append(args[0] if args else kwargs["hidden_states"])
            if index == 0:
                self.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})

        return hook

    def _logprobs(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Log-probabilities at the calibration tokens (real tokens, padding left out)."""
        keep = batch.attention_mask.bool()
        return F.log_softmax(lm.head(self.model, hidden[keep]).float(), dim=-1)

    def act_norm(self, layer: int, name: str) -> torch.Tensor:
        return self.stats[(layer, name)].norms()

    @torch.no_grad()
    def kl_from(self, start: int) -> float:
        """Mean KL(dense || current model), re-running layers start..L-1 from the cached inputs."""
        total, tokens = 0.0, 0
        for b, batch in enumerate(self.batches):
            hidden = self.inputs[start][b]
            for layer in self.layers[start:]:
                out = layer(hidden, **self.kwargs[b])
                hidden = out[0] if isinstance(out, tuple) else out
            logprobs = self._logprobs(self.model.model.norm(hidden), batch)
            dense = self.dense_logprobs[b]
            total += float(F.kl_div(logprobs, dense, log_target=True, reduction="sum"))
            tokens += dense.shape[0]
        return total / max(tokens, 1)


def measure(
    model, batches: Sequence[Batch], candidates: Sequence[Candidate], *, group_size: int = 64, progress: bool = True
) -> tuple[np.ndarray, Calibration, float]:
    """Sensitivity[layer, candidate] (KL in nats per token), the calibration, and seconds taken."""
    started = time.perf_counter()
    calib = Calibration(model, batches)
    result = np.zeros((len(calib.layers), len(candidates)))
    steps = [(l, c) for l in range(len(calib.layers)) for c in range(len(candidates)) if not candidates[c].is_dense]
    for l, c in tqdm(steps, desc="sensitivity", disable=not progress, leave=False):
        layer = calib.layers[l]
        originals = {}
        for name, linear in linears(layer).items():
            compressed = compress_linear(linear, calib.act_norm(l, name), candidates[c], group_size)
            originals[name] = linear.weight.data
            linear.weight.data = compressed.dense_weight(linear.weight.dtype)
        try:
            result[l, c] = calib.kl_from(l)
        finally:
            for name, linear in linears(layer).items():
                linear.weight.data = originals[name]
    return result, calib, time.perf_counter() - started
