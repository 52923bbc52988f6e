"""Layer sensitivity: how much compressing one decoder layer alone changes the model's output.

The measure is the KL divergence from the dense model's next-token distribution to the
distribution with only layer l compressed, averaged over calibration tokens. It is end-to-end
(what the loss sees) and scale-free. Edge-LLM ranks layers by the raw MSE of the layer's own
output, which grows with depth because hidden states do; that error is recorded too
(`output_mse`), so the two can be compared against the end-to-end effect of whole policies
(`python -m simulations.bench luc` does).

Cost is kept down three ways: the dense model runs once and every layer's input and the dense
log-probabilities are cached, so each (layer, candidate) re-runs only layers l..L-1; the
full-vocabulary head, which costs more than a layer, runs at a fixed subset of at most
`kl_tokens` calibration positions; and results are cached on disk per model, calibration
tokens, candidates and group size (`SensitivityCache`).

Wanda pruning needs the input activation norms of every linear: the same dense pass collects
them, over real tokens only (padding left out).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from edgecore import lm
from edgecore.encoding import Batch
from edgecore.errors import EdgecoreError
from edgecore.luc.config import DEFAULT_KL_TOKENS, Candidate
from edgecore.luc.layer import CompressedLinear
from edgecore.luc.prune import ActivationStats, keep_mask, wanda_scores

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when what is measured changes


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The linear projections of a decoder layer, by their name inside the layer."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def wanda_keep(linear: nn.Linear, act_norm: torch.Tensor, candidate: Candidate) -> torch.Tensor | None:
    """The candidate's Wanda keep-mask for `linear`, or None when it prunes nothing."""
    if not candidate.prunes:
        return None
    return keep_mask(wanda_scores(linear.weight.data, act_norm), candidate.spec)


def compress_linear(
    linear: nn.Linear, act_norm: torch.Tensor, candidate: Candidate, group_size: int, masks: dict | None = None
) -> CompressedLinear:
    """`linear` stored as `candidate` says; `masks` (keyed by module and sparsity) reuses keep-masks
    across bit-widths, since Wanda's mask does not depend on the bits."""
    key = (id(linear), candidate.spec)
    if masks is None or key not in masks:
        keep = wanda_keep(linear, act_norm, candidate)
        if masks is not None:
            masks[key] = keep
    else:
        keep = masks[key]
    return CompressedLinear.from_linear(linear, bits=candidate.bits, keep=keep, group_size=group_size)


@contextmanager
def compressed_weights(
    layer: nn.Module, act_norm: Callable[[str], torch.Tensor], candidate: Candidate, group_size: int,
    masks: dict | None = None,
) -> Iterator[nn.Module]:
    """`layer` computing with `candidate`'s compressed weights (dense copies swapped in, restored on
    exit): how a layer's sensitivity is measured. `act_norm(name)` gives a linear's Wanda norms."""
    originals = {}
    try:
        for name, linear in linears(layer).items():
            compressed = compress_linear(linear, act_norm(name), candidate, group_size, masks)
            originals[name] = linear.weight.data
            linear.weight.data = compressed.dense_weight(linear.weight.dtype)
        yield layer
    finally:
        for name, linear in linears(layer).items():
            if name in originals:
                linear.weight.data = originals[name]


def kl_positions(batches: Sequence[Batch], kl_tokens: int) -> list[torch.Tensor]:
    """Per batch, the flat (row * length + col) indices of the real tokens the KL is taken at:
    evenly spaced over all real tokens of the calibration set, at most `kl_tokens` in all."""
    if kl_tokens < 1:
        raise EdgecoreError(f"kl_tokens={kl_tokens} must be at least 1")
    real = [torch.nonzero(b.attention_mask.reshape(-1), as_tuple=True)[0] for b in batches]
    total = sum(len(r) for r in real)
    step = max(1, total // kl_tokens)
    return [r[::step] for r in real]


def layer_kwargs(kwargs: dict) -> dict:
    """What a decoder passes every layer, less the hidden states and the KV cache (layers are re-run
    without one: it would grow on every re-run)."""
    return {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer's output hidden states (layers return a tuple or a tensor, by model)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def kl_sum(logprobs: torch.Tensor, dense: torch.Tensor) -> float:
    """Summed KL(dense || logprobs) over the rows (positions) given."""
    return float(F.kl_div(logprobs, dense, log_target=True, reduction="sum"))


def squared_error(output: torch.Tensor, reference: torch.Tensor, real: torch.Tensor) -> tuple[float, int]:
    """(sum of squared differences over the real tokens, how many values): a layer output's MSE terms."""
    error = (output - reference)[real]
    return float(error.double().square().sum()), error.numel()


class Calibration:
    """One dense pass over calibration batches: layer inputs and kwargs, dense log-probs, activation norms."""

    def __init__(self, model, batches: Sequence[Batch], kl_tokens: int = DEFAULT_KL_TOKENS):
        if not batches:
            raise EdgecoreError("calibration needs at least one batch of the client's data")
        self.model = lm.causal_lm(model)
        self.layers = list(self.model.model.layers)
        self.batches = list(batches)
        # inputs[l][b]: the dense input of layer l; inputs[L][b]: the last layer's output.
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(len(self.layers) + 1)]
        self.kwargs: list[dict] = []  # per batch: what the decoder passes every layer
        self.stats: dict[tuple[int, str], ActivationStats] = {}
        self.positions = self._pick_positions(kl_tokens)
        self.dense_logprobs: list[torch.Tensor] = []
        self._real: torch.Tensor | None = None  # the current batch's real-token mask, for the stats
        self._run()

    def _pick_positions(self, kl_tokens: int) -> list[torch.Tensor]:
        return kl_positions(self.batches, kl_tokens)

    def _run(self) -> None:
        hooks = [self.model.model.norm.register_forward_pre_hook(self._input_hook(len(self.layers)))]
        for index, layer in enumerate(self.layers):
            hooks.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
            for name, linear in linears(layer).items():
                stats = self.stats.setdefault((index, name), ActivationStats())
                hooks.append(linear.register_forward_pre_hook(lambda _m, args, s=stats: s.update(args[0][self._real])))
        try:
            with torch.no_grad():
                for batch in self.batches:
                    self._real = batch.attention_mask.bool()
                    hidden = lm.hidden_states(self.model, batch)
                    self.dense_logprobs.append(self._logprobs(hidden, len(self.dense_logprobs)))
        finally:
            self._real = None
            for hook in hooks:
                hook.remove()

    def _input_hook(self, index: int):
        def hook(_module, args):
            self.inputs[index].append(args[0])

        return hook

    def _layer_hook(self, index: int):
        def hook(_module, args, kwargs):
            self.inputs[index].append(args[0] if args else kwargs["hidden_states"])
            if index == 0:
                self.kwargs.append(layer_kwargs(kwargs))

        return hook

    def _logprobs(self, normed: torch.Tensor, b: int, model=None) -> torch.Tensor:
        rows = normed.reshape(-1, normed.shape[-1])[self.positions[b]]
        return F.log_softmax(lm.head(model or self.model, rows).float(), dim=-1)

    @property
    def tokens(self) -> int:
        """Real calibration tokens (what the activation norms are over)."""
        return sum(int(b.attention_mask.sum()) for b in self.batches)

    def act_norm(self, layer: int, name: str) -> torch.Tensor:
        return self.stats[(layer, name)].norms()

    def run_from(self, start: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-run layers start..L-1 on batch b from its cached input: (layer start's output, final hidden)."""
        hidden, first = self.inputs[start][b], None
        for layer in self.layers[start:]:
            hidden = run_layer(layer, hidden, self.kwargs[b])
            first = hidden if first is None else first
        return first, hidden

    @torch.no_grad()
    def kl_from(self, start: int) -> tuple[float, float]:
        """(mean KL(dense || current model) per token, MSE of layer `start`'s output), re-running layers start..L-1."""
        kl, tokens, squared, count = 0.0, 0, 0.0, 0
        for b in range(len(self.batches)):
            first, hidden = self.run_from(start, b)
            batch_squared, batch_count = squared_error(first, self.inputs[start + 1][b], self.batches[b].attention_mask.bool())
            squared += batch_squared
            count += batch_count
            logprobs = self._logprobs(self.model.model.norm(hidden), b)
            dense = self.dense_logprobs[b]
            kl += kl_sum(logprobs, dense)
            tokens += dense.shape[0]
        return kl / max(tokens, 1), squared / max(count, 1)

    @torch.no_grad()
    def kl_full(self, model=None) -> float:
        """Mean KL(dense || `model`), from the token ids up (embeddings included): the end-to-end
        effect of a whole policy. `model` defaults to the calibrated model as it is now; a
        compressed copy of it is measured against the same dense log-probabilities."""
        model = lm.causal_lm(model) if model is not None else self.model
        kl, tokens = 0.0, 0
        for b, batch in enumerate(self.batches):
            logprobs = self._logprobs(lm.hidden_states(model, batch), b, model)
            kl += kl_sum(logprobs, self.dense_logprobs[b])
            tokens += logprobs.shape[0]
        return kl / max(tokens, 1)


@dataclass
class Sensitivity:
    """kl[l, c] and output_mse[l, c]: compressing layer l alone with candidate c."""

    candidates: list[Candidate]
    kl: np.ndarray
    output_mse: np.ndarray
    seconds: float  # how long measuring took (the figure from when it was measured, if cached)
    tokens: int  # calibration tokens
    kl_tokens: int  # positions the KL is averaged over
    group_size: int

    def to_dict(self) -> dict:
        return {
            "candidates": [c.to_dict() for c in self.candidates],
            "kl": self.kl.tolist(),
            "output_mse": self.output_mse.tolist(),
            "seconds": self.seconds,
            "tokens": self.tokens,
            "kl_tokens": self.kl_tokens,
            "group_size": self.group_size,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> Sensitivity:
        return cls(
            [Candidate.from_dict(c) for c in raw["candidates"]],
            np.asarray(raw["kl"], dtype=float),
            np.asarray(raw["output_mse"], dtype=float),
            float(raw["seconds"]),
            int(raw["tokens"]),
            int(raw["kl_tokens"]),
            int(raw["group_size"]),
        )


def measure(
    calib: Calibration, candidates: Sequence[Candidate], *, group_size: int = 64, progress: bool = True
) -> Sensitivity:
    """Sensitivity of every (decoder layer, candidate); the model is left exactly as it was."""
    started = time.perf_counter()
    layers = calib.layers
    kl = np.zeros((len(layers), len(candidates)))
    mse = np.zeros_like(kl)
    compressible = [c for c in range(len(candidates)) if not candidates[c].is_dense]
    bar = tqdm(total=len(layers) * len(compressible), desc="sensitivity", disable=not progress, leave=False)
    for l, layer in enumerate(layers):
        masks: dict = {}  # this layer's Wanda masks, shared by candidates that differ only in bits
        for c in compressible:
            with compressed_weights(layer, lambda name, l=l: calib.act_norm(l, name), candidates[c], group_size, masks):
                kl[l, c], mse[l, c] = calib.kl_from(l)
            bar.update()
    bar.close()
    seconds = time.perf_counter() - started
    kl_tokens = sum(len(p) for p in calib.positions)
    return Sensitivity(list(candidates), kl, mse, seconds, calib.tokens, kl_tokens, group_size)


@torch.no_grad()
def policy_kl(calib: Calibration, layers: Sequence[Candidate], group_size: int = 64) -> float:
    """End-to-end KL of compressing every layer as `layers` says (weights swapped in, then restored):
    the quantity per-layer sensitivities are meant to predict."""
    originals: dict[nn.Linear, torch.Tensor] = {}
    try:
        for index, (layer, candidate) in enumerate(zip(calib.layers, layers)):
            if candidate.is_dense:
                continue
            for name, linear in linears(layer).items():
                compressed = compress_linear(linear, calib.act_norm(index, name), candidate, group_size)
                originals[linear] = linear.weight.data
                linear.weight.data = compressed.dense_weight(linear.weight.dtype)
        return calib.kl_from(0)[0]
    finally:
        for linear, weight in originals.items():
            linear.weight.data = weight


class SensitivityCache:
    """Sensitivity tables on disk, keyed by model, calibration tokens, candidates and group size."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)

    @staticmethod
    def key(model_id: str, calib: Calibration, candidates: Sequence[Candidate], group_size: int) -> str:
        first = next(iter(linears(calib.layers[0]).values())).weight.detach()
        return SensitivityCache.key_for(model_id, first, calib.batches, calib.positions, candidates, group_size)

    @staticmethod
    def key_for(
        model_id: str,
        first_weight: torch.Tensor,
        batches: Sequence[Batch],
        positions: Sequence[torch.Tensor],
        candidates: Sequence[Candidate],
        group_size: int,
    ) -> str:
        """`key` from its parts, for callers that hold no Calibration (edgecore.luc.streamed):
        `first_weight` is the first linear weight of decoder layer 0."""
        digest = hashlib.sha256(f"v{CACHE_VERSION}|{model_id}|{group_size}|{sorted(candidates)}".encode())
        # The first layer's first weight stands in for the model's weights (a changed checkpoint
        # under the same name changes it); the token ids and KL positions pin the data.
        digest.update(first_weight.detach().float().contiguous().numpy().tobytes())
        for batch, positions in zip(batches, positions):
            digest.update(batch.input_ids.numpy().tobytes())
            digest.update(batch.attention_mask.numpy().tobytes())
            digest.update(positions.numpy().tobytes())
        return digest.hexdigest()[:24]

    def get(self, key: str, candidates: Sequence[Candidate]) -> Sensitivity | None:
        path = self.folder / f"{key}.json"
        try:
            found = Sensitivity.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring the unreadable sensitivity cache %s (%s); measuring again", path, err)
            return None
        if found.candidates != list(candidates):  # same set, other order: reorder the columns
            order = [found.candidates.index(c) for c in candidates]
            found = Sensitivity(list(candidates), found.kl[:, order], found.output_mse[:, order], found.seconds,
                                found.tokens, found.kl_tokens, found.group_size)
        return found

    def put(self, key: str, table: Sensitivity) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{key}.json"
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(table.to_dict()))
        partial.replace(path)  # never leave a half-written table under the real name
        return path


def measure_cached(
    calib: Calibration,
    candidates: Sequence[Candidate],
    *,
    model_id: str,
    cache: SensitivityCache | None,
    group_size: int = 64,
    progress: bool = True,
) -> tuple[Sensitivity, bool]:
    """(table, whether it came from the cache)."""
    return cached_table(
        cache,
        lambda: SensitivityCache.key(model_id, calib, candidates, group_size),
        candidates,
        lambda: measure(calib, candidates, group_size=group_size, progress=progress),
    )


def cached_table(
    cache: SensitivityCache | None,
    key: Callable[[], str],
    candidates: Sequence[Candidate],
    compute: Callable[[], Sensitivity],
) -> tuple[Sensitivity, bool]:
    """(the cached table under `key()`, True), else (`compute()`, stored under that key, False)."""
    if cache is None:
        return compute(), False
    name = key()
    found = cache.get(name, candidates)
    if found is not None:
        return found, True
    table = compute()
    cache.put(name, table)
    return table, False
