"""LUC compression that never holds the dense model: decoder layers stream one at a time from safetensors.

`edgecore.luc.pipeline.compress` loads the whole dense fp32 model (SmolLM2-135M: 513 MiB), more
than a 512 MB board can hold. `compress_streamed` computes the same numbers from the dense
folder's safetensors file(s) while holding at most one dense decoder layer:

- the module tree is built on the meta device from config.json; a layer's weights are read as
  copies this process owns, used, and released back to meta. Every read opens the file anew, as
  edgecore.schedule.streaming does: a mapping kept open would leave every page it touched counted
  in the resident memory;
- the token table is read `TABLE_BLOCK_ROWS` rows at a time: the blocks holding calibration tokens
  for the input embeddings, and every block in turn for the LM head, which runs at the KL
  positions only; the compressed table is filled block by block too;
- sweeps run "streams" (one hidden-state tensor per calibration batch) through the layers in order:
  1. calibration: the dense pass, recording the Wanda activation norms and, at the end, the dense
     log-probabilities at the KL positions;
  2. the table's sensitivity: one stream per bit-width, from its quantized rows through the dense
     layers to its quantized head;
  3. the layers' sensitivity: at layer l every candidate starts a stream from l's dense input
     through l compressed, and streams run on through the dense layers after it, so one read of a
     layer serves every candidate. Start layers are taken in groups whose open streams fit in
     `stream_mb`; each group is one sweep;
  4. compression: each layer is read once more and compressed in place, the table block by block.

The functions behind `pipeline.compress` do the arithmetic (`compressed_weights`, `compress_linear`,
`compress_layer`, `dequantize_like`, `QuantizedTable.store_rows`, `choose_policy`), the sensitivity
goes through the same disk cache under the same key, and the folder is `save_compressed`'s, so
`load_compressed` reads it. The one difference: the head's logits are computed block by block, and
a stream's KL over blocks of at most `KL_BLOCK_BYTES` of log-probabilities; both are exactly the
in-memory figures when the vocabulary fits one block (tiny models), and agree to float rounding
otherwise.

Besides one dense layer (two while a candidate's compressed copy is swapped in), memory holds the
packed weights (they fit the weight budget), the calibration batches' layer-0 inputs, the open
streams (at most `stream_mb`), the dense log-probabilities at the KL positions (positions x
vocabulary in fp32: 24 MiB for SmolLM2 at 128 positions), one stream's logits as large, and the
tokenizer (44 MiB for SmolLM2's). Measured for SmolLM2-135M on pi-zero-2w (quick grid, 2 bbc
samples, 2-core x86 shared with other work): peak RSS growth 129 MiB in 86 s, against 1138 MiB in
50 s in memory; the same policy, bit-identical compressed tensors, layer KLs within 2e-6 relative.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from edgecore import data as datasets
from edgecore import models
from edgecore.encoding import Batch
from edgecore.errors import EdgecoreError
from edgecore.luc.compress import compress_layer
from edgecore.luc.config import DEFAULT_KL_TOKENS, FP32_BITS, Candidate
from edgecore.luc.pipeline import calibration_batches, profile_config
from edgecore.luc.policy import Policy, choose_policy
from edgecore.luc.prune import ActivationStats
from edgecore.luc.quant import dequantize_like
from edgecore.luc.saved import POLICY_FILE, is_compressed_folder, rebuild_meta_buffers, save_compressed
from edgecore.luc.sensitivity import (
    Sensitivity,
    SensitivityCache,
    cached_table,
    compressed_weights,
    kl_positions,
    kl_sum,
    layer_kwargs,
    linears,
    run_layer,
    squared_error,
)
from edgecore.luc.table import empty_embeddings
from edgecore.measure import peak_rss_mb, reset_peak, rss_mb
from edgecore.allocator import SMALL_HEAP_THRESHOLD_BYTES, limit_heap_fragmentation
from edgecore.memory import MIB, ModelShape
from edgecore.profiles import DeviceProfile

DEFAULT_STREAM_MB = 16.0  # open sensitivity streams per sweep (SmolLM2, 2 samples of 128 tokens: 9 start layers of 3 candidates)
KL_BLOCK_BYTES = 2 * MIB  # log-probabilities computed at once when a stream is compared with the dense ones
TABLE_BLOCK_ROWS = 1024  # token-table rows read at once: 2.25 MiB for SmolLM2
# glibc keeps freed blocks under its (rising) mmap threshold in its heap, where the tensors of every layer
# read, compressed and freed in turn fragment it. Peak RSS growth of one run (a 144 MiB, 24-layer model,
# layers of 6 MiB in tensors of 0.2 to 1.5 MiB; tests/test_luc_streamed.py): glibc's default 174-183 MiB,
# more than the dense model; a 1 MiB threshold 76-102 MiB; 64 KiB 54 MiB. SmolLM2 (as in the module
# docstring): glibc's default 371 MiB in 45 s, 64 KiB 129 MiB in 86 s (page faults on fresh mappings).
# So compression runs with allocator.SMALL_HEAP_THRESHOLD_BYTES (64 KiB).

Transform = Callable[[torch.Tensor], torch.Tensor]  # rows of the fp32 table -> the values a compressed copy holds


@dataclass
class StreamedResult:
    policy: Policy
    folder: Path  # the compressed model folder (`load_compressed` reads it)
    sensitivity: Sensitivity
    embedding_kl: dict[int, float]
    from_cache: bool  # the sensitivity came from the disk cache
    seconds: dict[str, float] = field(default_factory=dict)
    peak_mb: float = 0.0  # this process's peak RSS growth during the call (MiB)


# ---------------------------------------------------------------- reading the dense folder


class WeightFile:
    """The tensors of a folder's *.safetensors files, each read (whole or a block of rows) as an fp32
    copy this process owns. The file is opened for that one read: no mapping outlives it."""

    def __init__(self, folder: Path):
        self.folder = folder
        paths = sorted(folder.glob("*.safetensors"))
        if not paths:
            raise EdgecoreError(
                f"{folder} holds no *.safetensors file with the dense weights: save the model there with "
                "model.save_pretrained(folder, safe_serialization=True) (edgecore.models.smollm2_cache() is one such folder)"
            )
        self.paths: dict[str, Path] = {}
        for path in paths:
            with _open(path) as file:
                for key in file.keys():
                    self.paths.setdefault(key, path)

    def check(self, keys: Sequence[str]) -> None:
        """Fail now, naming the file and the fix, when any of `keys` is not stored."""
        missing = [k for k in keys if k not in self.paths]
        if missing:
            files = ", ".join(sorted({p.name for p in self.paths.values()}))
            raise EdgecoreError(
                f"{self.folder}/{files} lacks {len(missing)} tensor(s) the model's config.json needs, e.g. {missing[:3]}: "
                "the weights do not belong to this config (or were saved partially); save the dense model again with "
                "model.save_pretrained(folder, safe_serialization=True)"
            )

    def rows(self, key: str) -> int:
        with _open(self.paths[key]) as file:
            return file.get_slice(key).get_shape()[0]

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor `key` (rows start..stop-1 if given) as an fp32 copy."""
        with _open(self.paths[key]) as file:
            mapped = file.get_tensor(key) if start is None else file.get_slice(key)[start:stop]
            return mapped.to(torch.float32, copy=True)


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (OSError, SafetensorError) as err:
        raise EdgecoreError(f"{path} is not a readable safetensors file ({err}); save the dense model again") from None


def _block_rows(dim: int, group_size: int) -> int:
    """Rows per table block, about TABLE_BLOCK_ROWS: a multiple of the rows that hold whole
    quantization groups, so a block quantizes exactly as it does within the whole table."""
    step = group_size // math.gcd(dim, group_size)
    return max(1, TABLE_BLOCK_ROWS // step) * step


class DenseFolder:
    """A Hugging Face model folder read piece by piece: the module tree on meta, one layer for real at a time."""

    def __init__(self, folder: Path | str, group_size: int):
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise EdgecoreError(
                f"{folder / 'config.json'} not found: give the folder of a dense Hugging Face model (config.json, "
                "tokenizer files, *.safetensors), e.g. edgecore.models.smollm2_cache()"
            )
        if is_compressed_folder(folder):
            raise EdgecoreError(f"{folder} is a compressed model folder (it has {POLICY_FILE}): give the dense model's folder")
        self.folder = folder
        self.weights = WeightFile(folder)
        try:
            self.config = AutoConfig.from_pretrained(folder, local_files_only=True)
            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as err:
            raise EdgecoreError(f"cannot build the model of {folder / 'config.json'}: {err}") from None
        models.check_contract(self.model, str(folder))
        rebuild_meta_buffers(self.model, self.config)  # RoPE's frequencies, which no checkpoint holds
        self.decoder = self.model.get_decoder()
        self.layers = list(self.decoder.layers)
        names = {id(module): name for name, module in self.model.named_modules()}
        self.layer_prefix = names[id(self.decoder.layers)]
        embedding, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        self.tied = head.weight is embedding.weight
        self.embed_key = f"{names[id(embedding)]}.weight"
        self.own_head_key = f"{names[id(head)]}.weight"  # the head's parameter (the file's head tensor, if untied)
        self.head_key = self.embed_key if self.tied else self.own_head_key
        keys = list(self.model.state_dict())
        self.weights.check([k for k in keys if not (self.tied and k == self.own_head_key)])
        self.dim = embedding.weight.shape[1]
        self.chunk_rows = _block_rows(self.dim, group_size)
        self._load_rest(keys)

    def _load_rest(self, keys: list[str]) -> None:
        """The small tensors outside the layers and the table (the final norm), for good."""
        table = (self.embed_key, self.own_head_key)
        rest = [k for k in keys if not k.startswith(self.layer_prefix + ".") and k not in table]
        self.model.load_state_dict({k: self.weights.read(k) for k in rest}, strict=False, assign=True)

    @property
    def shape(self) -> ModelShape:
        return ModelShape.from_config(self.config)

    def first_weight(self) -> torch.Tensor:
        """Layer 0's first linear weight (what the sensitivity cache key hashes of the model)."""
        name = next(iter(linears(self.layers[0])))
        return self.weights.read(f"{self.layer_prefix}.0.{name}.weight")

    def materialize(self, index: int) -> nn.Module:
        """Decoder layer `index` with its dense weights read from the file."""
        layer = self.layers[index]
        prefix = f"{self.layer_prefix}.{index}."
        state = {key: self.weights.read(prefix + key) for key in layer.state_dict()}
        try:
            layer.load_state_dict(state, assign=True)
        except RuntimeError as err:
            raise EdgecoreError(f"layer {index} in {self.folder} does not match config.json: {err}") from None
        return layer

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """`materialize`, released back to the meta device on exit."""
        layer = self.materialize(index)
        try:
            yield layer
        finally:
            layer.to_empty(device="meta")

    def blocks(self, key: str) -> Iterator[tuple[int, int]]:
        rows = self.weights.rows(key)
        for start in range(0, rows, self.chunk_rows):
            yield start, min(start + self.chunk_rows, rows)

    def embed(self, batches: Sequence[Batch], transform: Transform | None = None) -> list[torch.Tensor]:
        """Each batch's input embeddings (`transform`: as a compressed table holds them), from the
        blocks of the table that hold a calibration token."""
        out = [torch.empty(*b.input_ids.shape, self.dim) for b in batches]
        for start, stop in self.blocks(self.embed_key):
            hits = [(b.input_ids >= start) & (b.input_ids < stop) for b in batches]
            if not any(bool(h.any()) for h in hits):
                continue
            block = self.weights.read(self.embed_key, start, stop)
            block = transform(block) if transform else block
            for batch, rows, hit in zip(batches, out, hits):
                rows[hit] = block[batch.input_ids[hit] - start]
        return out

    def head_logits(self, rows: list[torch.Tensor], transform: Transform | None = None) -> list[torch.Tensor]:
        """rows[i] @ W^T for the LM head W (`transform`: as a compressed table holds it), a block of W at a time."""
        vocab = self.weights.rows(self.head_key)
        out = [r.new_empty(r.shape[0], vocab) for r in rows]
        for start, stop in self.blocks(self.head_key):
            block = self.weights.read(self.head_key, start, stop)
            block = transform(block) if transform else block
            for r, logits in zip(rows, out):
                logits[:, start:stop] = F.linear(r, block)
        return out

    def install_table(self, bits: int, group_size: int) -> None:
        """The token table (and an untied head) as `compress_embeddings` stores it, filled block by block."""
        embedding, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if bits == FP32_BITS:
            embedding.weight = nn.Parameter(self.weights.read(self.embed_key))
            head.weight = embedding.weight if self.tied else nn.Parameter(self.weights.read(self.head_key))
            return
        empty_embeddings(self.model, bits, group_size, tied=self.tied)
        tables = [(self.model.get_input_embeddings().table, self.embed_key)]
        if not self.tied:
            tables.append((self.model.get_output_embeddings().table, self.head_key))
        for table, key in tables:
            table.to_empty(device="cpu")
            for start, stop in self.blocks(key):
                table.store_rows(start, self.weights.read(key, start, stop))


# ---------------------------------------------------------------- sweeps


class _Stop(Exception):
    """Raised by a hook on layer 0 once the decoder has prepared its input."""


def _layer0_input(dense: DenseFolder, embeds: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict]:
    """(layer 0's input, the kwargs every layer gets) for these input embeddings: the decoder's own
    preamble runs (positions, mask, rotary embedding, any scaling), layer 0 is stopped before it computes."""
    captured = {}

    def hook(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = layer_kwargs(kwargs)
        raise _Stop

    handle = dense.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        dense.decoder(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


def _advance(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    return [run_layer(layer, h, kw) for h, kw in zip(hidden, kwargs)]


@dataclass
class StreamedCalibration:
    """What `sensitivity.Calibration` keeps, less the layer inputs past layer 0 (sweeps recompute them)."""

    batches: list[Batch]
    positions: list[torch.Tensor]  # per batch, the flat indices the KL is taken at
    kwargs: list[dict]  # per batch, what the decoder passes every layer
    inputs: list[torch.Tensor]  # per batch, the dense input of layer 0
    stats: dict[tuple[int, str], ActivationStats]
    dense_logprobs: list[torch.Tensor] | None = None  # per batch, at the positions

    def act_norm(self, layer: int, name: str) -> torch.Tensor:
        return self.stats[(layer, name)].norms()

    @property
    def tokens(self) -> int:
        return sum(int(b.attention_mask.sum()) for b in self.batches)

    @property
    def kl_tokens(self) -> int:
        return sum(len(p) for p in self.positions)

    def final_rows(self, dense: DenseFolder, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """The last layer's outputs, through the final norm, at the KL positions: all the head needs."""
        return [dense.decoder.norm(h).reshape(-1, h.shape[-1])[p] for h, p in zip(hidden, self.positions)]

    def kl(self, dense: DenseFolder, rows: list[torch.Tensor], transform: Transform | None = None) -> float:
        """Mean KL(dense || the model whose final rows these are), `transform` applied to the head."""
        total = 0.0
        for logits, reference in zip(dense.head_logits(rows, transform), self.dense_logprobs):
            total += _block_kl(logits, reference)
        return total / max(self.kl_tokens, 1)


def _block_kl(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """kl_sum(log_softmax(logits), reference) over row blocks of at most KL_BLOCK_BYTES of log-probabilities."""
    step = max(1, KL_BLOCK_BYTES // (logits.shape[1] * logits.element_size()))
    return sum(kl_sum(F.log_softmax(logits[i : i + step].float(), dim=-1), reference[i : i + step])
               for i in range(0, logits.shape[0], step))


@torch.no_grad()
def calibrate(dense: DenseFolder, batches: Sequence[Batch], kl_tokens: int = DEFAULT_KL_TOKENS) -> StreamedCalibration:
    """The dense pass, one layer in memory at a time: activation norms over real tokens, dense log-probs."""
    if not batches:
        raise EdgecoreError("calibration needs at least one batch of the client's data")
    batches = list(batches)
    positions = kl_positions(batches, kl_tokens)
    starts = [_layer0_input(dense, e, b) for e, b in zip(dense.embed(batches), batches)]
    calib = StreamedCalibration(batches, positions, [kw for _, kw in starts], [h for h, _ in starts], {})
    hidden = calib.inputs
    for index in range(len(dense.layers)):
        with dense.layer(index) as layer:
            hidden = _recorded_pass(layer, index, hidden, calib)
    logits = dense.head_logits(calib.final_rows(dense, hidden))
    calib.dense_logprobs = []
    while logits:  # one batch's logits at a time besides the log-probs
        calib.dense_logprobs.append(F.log_softmax(logits.pop(0).float(), dim=-1))
    return calib


def _recorded_pass(layer: nn.Module, index: int, hidden: list[torch.Tensor], calib: StreamedCalibration) -> list[torch.Tensor]:
    """The dense batches through one layer, every linear's input (real tokens only) into its ActivationStats."""
    real: list[torch.Tensor] = []
    hooks = []
    for name, linear in linears(layer).items():
        stats = calib.stats.setdefault((index, name), ActivationStats())
        hooks.append(linear.register_forward_pre_hook(lambda _m, args, s=stats: s.update(args[0][real[0]])))
    try:
        out = []
        for b, h in enumerate(hidden):
            real[:] = [calib.batches[b].attention_mask.bool()]
            out.append(run_layer(layer, h, calib.kwargs[b]))
        return out
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def embedding_sensitivity(
    dense: DenseFolder, calib: StreamedCalibration, bits_options: Sequence[int], group_size: int
) -> dict[int, float]:
    """`compress.embedding_sensitivity`, streamed: per bit-width, the KL of quantizing the table alone
    (input rows and head at once), all bit-widths in one sweep over the layers."""
    transforms = {bits: partial(dequantize_like, bits=bits, group_size=group_size)
                  for bits in bits_options if bits != FP32_BITS}
    streams = {}
    for bits, transform in transforms.items():
        embeds = dense.embed(calib.batches, transform)
        streams[bits] = [_layer0_input(dense, e, b)[0] for e, b in zip(embeds, calib.batches)]
    for index in range(len(dense.layers) if streams else 0):
        with dense.layer(index) as layer:
            streams = {bits: _advance(layer, hidden, calib.kwargs) for bits, hidden in streams.items()}
    kl = {bits: calib.kl(dense, calib.final_rows(dense, streams.pop(bits)), transform) for bits, transform in transforms.items()}
    return {bits: kl.get(bits, 0.0) for bits in bits_options}


@torch.no_grad()
def measure(
    dense: DenseFolder,
    calib: StreamedCalibration,
    candidates: Sequence[Candidate],
    *,
    group_size: int = 64,
    stream_mb: float = DEFAULT_STREAM_MB,
    progress: bool = True,
) -> Sensitivity:
    """`sensitivity.measure`, streamed: KL and output MSE of compressing each layer alone with each candidate."""
    started = time.perf_counter()
    count = len(dense.layers)
    kl = np.zeros((count, len(candidates)))
    mse = np.zeros_like(kl)
    compressible = [c for c in range(len(candidates)) if not candidates[c].is_dense]
    hidden_bytes = sum(h.numel() * h.element_size() for h in calib.inputs)
    span = max(1, int(stream_mb * MIB) // max(1, hidden_bytes * len(compressible)))
    bar = tqdm(total=count * len(compressible), desc="sensitivity", disable=not progress, leave=False)
    for first in range(0, count if compressible else 0, span):
        streams = _sensitivity_sweep(dense, calib, candidates, compressible, range(first, min(first + span, count)),
                                     group_size, mse, bar)
        for (layer, c) in list(streams):
            kl[layer, c] = calib.kl(dense, streams.pop((layer, c)))
    bar.close()
    seconds = time.perf_counter() - started
    return Sensitivity(list(candidates), kl, mse, seconds, calib.tokens, calib.kl_tokens, group_size)


def _sensitivity_sweep(
    dense: DenseFolder,
    calib: StreamedCalibration,
    candidates: Sequence[Candidate],
    compressible: list[int],
    starts: range,
    group_size: int,
    mse: np.ndarray,
    bar,
) -> dict[tuple[int, int], list[torch.Tensor]]:
    """One pass over the layers for the streams of candidates compressing a layer in `starts`: fills
    their output MSE and returns each stream's final rows (key: (layer, candidate index))."""
    hidden = calib.inputs  # dense, as far as the last start layer needs it
    real = [b.attention_mask.bool() for b in calib.batches]
    streams: dict[tuple[int, int], list[torch.Tensor]] = {}
    for index in range(len(dense.layers)):
        with dense.layer(index) as layer:
            streams = {key: _advance(layer, h, calib.kwargs) for key, h in streams.items()}
            dense_out = _advance(layer, hidden, calib.kwargs) if hidden is not None else None
            if index in starts:
                masks: dict = {}  # Wanda masks shared by candidates that differ only in bits
                for c in compressible:
                    norms = partial(calib.act_norm, index)
                    with compressed_weights(layer, norms, candidates[c], group_size, masks):
                        out = _advance(layer, hidden, calib.kwargs)
                    terms = [squared_error(o, d, r) for o, d, r in zip(out, dense_out, real)]
                    mse[index, c] = sum(t[0] for t in terms) / max(sum(t[1] for t in terms), 1)
                    streams[(index, c)] = out
                    bar.update()
            hidden = dense_out if index + 1 < starts.stop else None  # no stream starts later
    return {key: calib.final_rows(dense, streams.pop(key)) for key in list(streams)}


@torch.no_grad()
def compress_model(dense: DenseFolder, policy: Policy, calib: StreamedCalibration) -> nn.Module:
    """`apply_policy` on the streamed model: each layer read once and compressed in place, the table
    block by block. The packed layers accumulate (they fit the budget); no dense layer outlives its turn."""
    if len(dense.layers) != len(policy.layers):
        raise EdgecoreError(f"the policy has {len(policy.layers)} layers but the model has {len(dense.layers)}")
    for index, candidate in enumerate(policy.layers):
        layer = dense.materialize(index)
        compress_layer(layer, candidate, partial(calib.act_norm, index), policy.group_size)
    dense.install_table(policy.embedding_bits, policy.group_size)
    left = [name for name, t in dense.model.state_dict().items() if t.is_meta]
    if left:
        raise EdgecoreError(f"streamed compression left {left[:4]} unread from {dense.folder}")
    return dense.model


# ---------------------------------------------------------------- the entry point


def compress_streamed(
    dense_folder: Path | str,
    profile: DeviceProfile,
    dataset: datasets.Dataset | str,
    out_folder: Path | str,
    *,
    weight_budget: int,
    calib_samples: int = 8,
    calib_len: int = 128,
    group_size: int = 64,
    cache: SensitivityCache | None = None,
    seed: int = 0,
    candidates: list[Candidate] | None = None,
    model_id: str | None = None,
    stream_mb: float = DEFAULT_STREAM_MB,
    limit_heap: bool = True,
    progress: bool = True,
) -> StreamedResult:
    """`pipeline.compress` + `save_compressed` for the model in `dense_folder`, holding one dense layer at a time.

    `dataset` is a Dataset or a spec for `edgecore.data.load`; `model_id` names the model in the
    policy and the sensitivity cache key (default: the folder as given; pass "smollm2-135m" for
    the SmolLM2 cache folder to share the in-memory path's cache entries). The folder is written
    beside `out_folder` and renamed into place at the end; an earlier compressed model there is
    replaced, anything else refused.

    `limit_heap` first makes glibc return every freed block over 64 KiB to the OS, for the rest of
    the process or until the threshold is set again (a device sets 1 MiB for tuning): otherwise the
    peak is not bounded by one layer (see SMALL_HEAP_THRESHOLD_BYTES above).
    """
    if limit_heap:
        limit_heap_fragmentation(SMALL_HEAP_THRESHOLD_BYTES)
    reset_peak()
    floor = rss_mb()
    started = time.perf_counter()
    config = profile_config(profile, weight_budget, candidates=candidates, calib_samples=calib_samples,
                            calib_len=calib_len, group_size=group_size, seed=seed)
    candidates = list(config.candidates)
    out = _checked_out(Path(out_folder), Path(dense_folder))
    if isinstance(dataset, str):
        dataset = datasets.load(dataset, seed=seed)
    dense = DenseFolder(dense_folder, group_size)
    tokenizer = _tokenizer(dense.folder)
    model_id = model_id or str(dense_folder)
    seconds = {"load": time.perf_counter() - started}

    phase = time.perf_counter()
    calib = calibrate(dense, calibration_batches(tokenizer, dataset, calib_samples, calib_len, seed))
    seconds["calibration"] = time.perf_counter() - phase
    table, from_cache = cached_table(
        cache,
        lambda: SensitivityCache.key_for(model_id, dense.first_weight(), calib.batches, calib.positions, candidates, group_size),
        candidates,
        lambda: measure(dense, calib, candidates, group_size=group_size, stream_mb=stream_mb, progress=progress),
    )
    seconds["sensitivity"] = table.seconds
    phase = time.perf_counter()
    embedding_kl = embedding_sensitivity(dense, calib, config.embedding_bits, group_size)
    seconds["embedding_sensitivity"] = time.perf_counter() - phase
    calib.dense_logprobs = None  # positions x vocabulary: not needed any more

    policy = choose_policy(dense.shape, table.candidates, table.kl, embedding_kl, weight_budget, group_size=group_size,
                           model=model_id, profile=profile.name)
    phase = time.perf_counter()
    model = compress_model(dense, policy, calib)
    seconds["apply"] = time.perf_counter() - phase
    phase = time.perf_counter()
    folder = _write_atomically(out, lambda staging: save_compressed(staging, model, tokenizer, policy))
    seconds["save"] = time.perf_counter() - phase
    peak = peak_rss_mb() - floor
    return StreamedResult(policy, folder, table, embedding_kl, from_cache, seconds, peak)


def _checked_out(out: Path, dense_folder: Path) -> Path:
    """`out`, unless writing there would replace something other than an earlier compressed model."""
    if out.resolve() == dense_folder.resolve():
        raise EdgecoreError(f"the output folder {out} is the dense folder: write the compressed model elsewhere")
    if out.exists() and not (out.is_dir() and (is_compressed_folder(out) or not any(out.iterdir()))):
        raise EdgecoreError(
            f"{out} exists and is not a compressed model folder: choose a new output folder (it would be replaced)"
        )
    return out


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise EdgecoreError(
            f"cannot load the tokenizer in {folder} ({err}): save it there with tokenizer.save_pretrained(folder)"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _write_atomically(out: Path, write: Callable[[Path], object]) -> Path:
    """Let `write` fill a temporary sibling of `out`, then rename it to `out` (replacing an older one):
    a crash never leaves a partial folder under the final name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(staging)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old)  # onto the empty directory just made
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


__all__ = ["DenseFolder", "StreamedCalibration", "StreamedResult", "calibrate", "compress_model", "compress_streamed",
           "embedding_sensitivity", "measure"]
