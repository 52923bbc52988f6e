"""Compressed token-embedding table and (tied) LM head.

A small model spends much of its memory on the vocabulary table: SmolLM2-135M's tied
49152 x 576 embedding is 113 MB in fp32. `QuantizedTable` stores it as one row-major stream,
like CompressedLinear: packed group-quantized codes with fp16 scale and zero per group (bits
2/3/4/8), or plain fp16 (bits 16) / fp32 (bits 32) values. Groups lie inside one row and
every row starts on a whole byte, so any set of rows can be sliced out of the packed stream:

- the embedding (`QuantizedEmbedding`) dequantizes only the rows of the tokens it is given;
- the head (`QuantizedHead`) computes x @ W^T a block of `chunk_rows` rows at a time, forward
  and backward, so the full table is never rebuilt.

A tied head reads the embedding's table without registering it, so `state_dict()` holds the
table once (`model.embed_tokens.table.*`) and the head adds no keys. `empty_embeddings`
installs zero-filled modules of the same layouts (on the meta device too) for
`load_state_dict` to refill. Choose the model's dtype before compressing: `model.to(dtype)`
casts floating buffers (scales, fp16/fp32 values) too, as for CompressedLinear.

Transformers' `model.tie_weights()` (called by `resize_token_embeddings`, `from_pretrained`)
looks for `embed_tokens.weight` and fails on a compressed model: the table is already shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgecore.errors import EdgecoreError
from edgecore.luc.config import FP16_BITS
from edgecore.luc.storage import FLOAT_DTYPES, STORAGE_BITS, PackedStorage, bits_label
from edgecore.luc.quant import (
    FP16_MAX,
    QUANT_BITS,
    chunk,
    dequantize,
    packed_nbytes,
    quantize,
    unpack,
)

DEFAULT_CHUNK_ROWS = 4096  # head rows dequantized at once: 4096 x 576 fp32 is 9 MB for SmolLM2


@dataclass(frozen=True)
class TableLayout:
    """What a QuantizedTable stores; every buffer's shape and dtype follows from it."""

    rows: int
    dim: int
    bits: int
    group_size: int = 64

    def __post_init__(self):
        for name in ("rows", "dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EdgecoreError(f"{name}={value!r} must be a positive integer")
        if self.bits not in STORAGE_BITS:
            raise EdgecoreError(f"bits={self.bits!r} is not supported: use one of {STORAGE_BITS}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise EdgecoreError(f"group_size={self.group_size!r} must be a positive integer (e.g. 64)")
        if not self.quantized:
            return
        # Row slicing needs each row to be whole groups and whole bytes of the packed stream.
        per = chunk(self.bits)[0]
        if self.dim % per:
            fits = [b for b in QUANT_BITS if self.dim % chunk(b)[0] == 0]
            raise EdgecoreError(
                f"a {self.bits}-bit table packs {per} codes per chunk, which does not divide its dim={self.dim}, "
                f"so rows would not start on a whole byte: use bits {fits} or 16 instead"
            )
        if self.dim % self.group_size:
            divisors = [g for g in range(per, self.dim + 1, per) if self.dim % g == 0]
            suggest = max([g for g in divisors if g <= self.group_size], default=divisors[0])
            raise EdgecoreError(
                f"group_size={self.group_size} does not divide the table's dim={self.dim}, so groups would span "
                f"rows: use group_size={suggest} (any divisor of {self.dim} that is a multiple of {per})"
            )

    @property
    def quantized(self) -> bool:
        return self.bits not in FLOAT_DTYPES

    @property
    def row_width(self) -> int:
        """Elements of one row in the `qweight` stream: bytes when quantized, else values."""
        return packed_nbytes(self.dim, self.bits) if self.quantized else self.dim

    @property
    def groups_per_row(self) -> int:
        return self.dim // self.group_size if self.quantized else 0

    def buffers(self) -> dict[str, tuple[tuple[int, ...], torch.dtype] | None]:
        """name -> (shape, dtype) of every buffer; None for a buffer this layout does not hold."""
        if not self.quantized:
            return {"qweight": ((self.rows * self.dim,), FLOAT_DTYPES[self.bits]), "scale": None, "zero": None}
        groups = ((self.rows * self.groups_per_row,), torch.float16)
        return {"qweight": ((self.rows * self.row_width,), torch.uint8), "scale": groups, "zero": groups}

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in filter(None, self.buffers().values()))


def table_nbytes(rows: int, dim: int, bits: int, group_size: int = 64) -> int:
    """Bytes a QuantizedTable of this configuration holds: the memory cost of a choice."""
    return TableLayout(rows, dim, bits, group_size).nbytes


class QuantizedTable(PackedStorage):
    """A [rows, dim] table in packed storage; rows and row blocks are dequantized on demand."""

    def __init__(self, layout: TableLayout, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.layout = layout
        for name, spec in layout.buffers().items():
            self.register_buffer(name, None if spec is None else torch.zeros(spec[0], dtype=spec[1], device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int, group_size: int = 64) -> QuantizedTable:
        """Compress a materialised [rows, dim] float weight."""
        if weight.dim() != 2 or not weight.is_floating_point() or weight.device.type == "meta":
            raise EdgecoreError(
                f"from_weight needs a materialised 2-D float weight, got {tuple(weight.shape)} {weight.dtype} "
                f"on {weight.device}"
            )
        table = cls(TableLayout(*weight.shape, bits, group_size), device=weight.device)
        table.store_rows(0, weight.detach())
        return table

    def store_rows(self, start: int, values: torch.Tensor) -> None:
        """Compress a float [n, dim] block into rows start..start+n-1. Groups lie inside rows and rows
        start on whole bytes, so a table filled block by block (edgecore.luc.streamed, which never
        holds the fp32 table whole) is identical to one made from the whole weight."""
        layout = self.layout
        if values.dim() != 2 or values.shape[1] != layout.dim or not 0 <= start <= start + values.shape[0] <= layout.rows:
            raise EdgecoreError(
                f"rows {start}..{start + values.shape[0] - 1} of width {tuple(values.shape)[1:]} do not fit a "
                f"{layout.rows} x {layout.dim} table"
            )
        stop = start + values.shape[0]
        stream, scale, zero = self._views()
        if not layout.quantized:
            if layout.bits == FP16_BITS and float(values.abs().max()) > FP16_MAX:
                raise EdgecoreError(f"weights exceed the fp16 range (|w| <= {FP16_MAX}); store them with bits=32")
            stream[start:stop].copy_(values)
            return
        # dim % group_size == 0, so quantize's row-major groups never cross a row.
        q = quantize(values, layout.bits, layout.group_size)
        stream[start:stop].copy_(q.packed.view(-1, layout.row_width))
        scale[start:stop].copy_(q.scale.view(-1, layout.groups_per_row))
        zero[start:stop].copy_(q.zero.view(-1, layout.groups_per_row))

    # -- reading -----------------------------------------------------------------------------

    def _views(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """qweight as [rows, row_width] and scale/zero as [rows, groups_per_row]: row-sliceable."""
        layout = self.layout
        stream = self.qweight.view(layout.rows, layout.row_width)
        if not layout.quantized:
            return stream, None, None
        return stream, self.scale.view(layout.rows, -1), self.zero.view(layout.rows, -1)

    def _decode(self, stream, scale, zero, dtype: torch.dtype) -> torch.Tensor:
        """Rows sliced out of `_views` as [n, dim] values; the same fp32 arithmetic as quant.dequantize."""
        layout = self.layout
        if not layout.quantized:
            return stream.to(dtype)
        n = stream.shape[0]
        codes = unpack(stream.reshape(-1), layout.bits, n * layout.dim).view(n, layout.groups_per_row, -1)
        values = codes.to(torch.float32) * scale.float()[..., None] + zero.float()[..., None]
        return values.view(n, layout.dim).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The rows `ids` (any shape) as [..., dim]; only those rows are dequantized."""
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise EdgecoreError(f"row ids must be an integer tensor, got {ids.dtype}")
        flat = ids.reshape(-1)
        stream, scale, zero = self._views()
        picked = (stream[flat], None, None) if scale is None else (stream[flat], scale[flat], zero[flat])
        return self._decode(*picked, dtype).view(*ids.shape, self.layout.dim)

    def block(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows start..stop-1 as [stop - start, dim]."""
        stream, scale, zero = self._views()
        if scale is None:
            return self._decode(stream[start:stop], None, None, dtype)
        return self._decode(stream[start:stop], scale[start:stop], zero[start:stop], dtype)

    def matmul_t(
        self, x: torch.Tensor, dtype: torch.dtype | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
    ) -> torch.Tensor:
        """x @ W^T as [..., rows], computed in `dtype` (default x's) from blocks of `chunk_rows` rows."""
        if x.shape[-1] != self.layout.dim:
            raise EdgecoreError(f"input of width {x.shape[-1]} does not match the table's dim={self.layout.dim}")
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise EdgecoreError(f"chunk_rows={chunk_rows!r} must be a positive integer")
        return _ChunkedMatmulT.apply(x, self, dtype or x.dtype, chunk_rows)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full [rows, dim] table, through quant.dequantize: the reference for tests."""
        layout = self.layout
        if not layout.quantized:
            return self.qweight.view(layout.rows, layout.dim).to(dtype)
        shape = (layout.rows, layout.dim)
        return dequantize(self.qweight, self.scale, self.zero, shape, layout.bits, layout.group_size, dtype)


    def extra_repr(self) -> str:
        bits = bits_label(self.layout.bits)
        return (
            f"rows={self.layout.rows}, dim={self.layout.dim}, {bits}, group_size={self.layout.group_size}, "
            f"nbytes={self.nbytes()}"
        )



class _ChunkedMatmulT(torch.autograd.Function):
    """x @ W^T block by block. Plain autograd would keep every dequantized block for the backward
    pass (the whole table again); here the backward dequantizes the blocks anew."""

    @staticmethod
    def forward(ctx, x, table: QuantizedTable, dtype: torch.dtype, chunk_rows: int):
        ctx.table, ctx.dtype, ctx.chunk_rows, ctx.x_dtype = table, dtype, chunk_rows, x.dtype
        x = x.to(dtype)
        rows = table.layout.rows
        out = None
        for start in range(0, rows, chunk_rows):
            part = F.linear(x, table.block(start, min(start + chunk_rows, rows), dtype))  # autocast applies here
            if out is None:  # one output buffer: concatenating would hold the logits twice
                out = part.new_empty(*x.shape[:-1], rows)
            out[..., start : start + part.shape[-1]] = part
        return out

    @staticmethod
    def backward(ctx, grad):
        table, rows = ctx.table, ctx.table.layout.rows
        grad_x = None
        for start in range(0, rows, ctx.chunk_rows):
            stop = min(start + ctx.chunk_rows, rows)
            part = grad[..., start:stop].to(ctx.dtype) @ table.block(start, stop, ctx.dtype)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x.to(ctx.x_dtype), None, None, None


class QuantizedEmbedding(nn.Module):
    """nn.Embedding over a QuantizedTable: looks up (and dequantizes) only the given tokens."""

    def __init__(self, table: QuantizedTable, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.table = table
        self.compute_dtype = dtype
        self.num_embeddings, self.embedding_dim = table.layout.rows, table.layout.dim
        self.padding_idx = None  # only shapes gradients of a trainable table; this one is frozen

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(input_ids, self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.compute_dtype}"


class QuantizedHead(nn.Module):
    """A bias-free LM head x @ W^T over a QuantizedTable, tied (borrowed) or owned."""

    def __init__(self, table: QuantizedTable, dtype: torch.dtype = torch.float32, tied: bool = False) -> None:
        super().__init__()
        if tied:
            # A plain attribute, not a submodule: state_dict, .to() and PEFT reach the table
            # through the embedding only, so it is stored and moved once.
            object.__setattr__(self, "table", table)
        else:
            self.table = table
        self.tied = tied
        self.compute_dtype = dtype
        self.in_features, self.out_features = table.layout.dim, table.layout.rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.table.matmul_t(hidden, self.compute_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied={self.tied}"


# -- whole models ------------------------------------------------------------------------------


def _embeddings(model) -> tuple[nn.Module, nn.Module | None]:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(emb, QuantizedEmbedding) or isinstance(head, QuantizedHead):
        raise EdgecoreError("the model's embeddings are compressed already: compress a dense model")
    if not isinstance(emb, nn.Embedding):
        raise EdgecoreError(f"the input embeddings are a {type(emb).__name__}, not an nn.Embedding: cannot compress")
    if head is not None and (not isinstance(head, nn.Linear) or head.bias is not None):
        raise EdgecoreError(f"the LM head must be a bias-free nn.Linear to compress, got {head}")
    return emb, head


def _install(model, table: QuantizedTable, head_table: QuantizedTable | None, emb_dtype, head_dtype, has_head):
    """Put the modules in; head_table None means the head borrows the embedding's table."""
    model.set_input_embeddings(QuantizedEmbedding(table, emb_dtype))
    if has_head:
        tied = head_table is None
        model.set_output_embeddings(QuantizedHead(table if tied else head_table, head_dtype, tied=tied))


def compress_embeddings(model, bits: int, group_size: int = 64) -> None:
    """Replace a causal LM's input embeddings and LM head by compressed ones, in place.

    A tied head (the same weight tensor as the embedding) shares the embedding's table; an
    untied one gets its own. Compute dtypes stay those of the original weights. bits=32
    also converts (to fp32 storage), so saved state dicts have the same keys for every choice.
    """
    emb, head = _embeddings(model)
    table = QuantizedTable.from_weight(emb.weight, bits, group_size)
    tied = head is not None and head.weight is emb.weight
    head_table = None if head is None or tied else QuantizedTable.from_weight(head.weight, bits, group_size)
    head_dtype = None if head is None else head.weight.dtype
    _install(model, table, head_table, emb.weight.dtype, head_dtype, head is not None)


def empty_embeddings(model, bits: int, group_size: int = 64, *, tied: bool) -> None:
    """Install zero-filled compressed embeddings of the layouts `compress_embeddings` makes.

    The model may live on the meta device; `model.load_state_dict(saved, assign=True)` then
    fills in real tensors (assign=False copies into materialised ones). Non-persistent buffers
    (e.g. rotary `inv_freq`) are not in a state dict and stay on meta: rebuild those.
    """
    emb, head = _embeddings(model)
    table = QuantizedTable(TableLayout(*emb.weight.shape, bits, group_size), emb.weight.device)
    head_table = None
    if head is not None and not tied:
        head_table = QuantizedTable(TableLayout(*head.weight.shape, bits, group_size), head.weight.device)
    head_dtype = None if head is None else head.weight.dtype
    _install(model, table, head_table, emb.weight.dtype, head_dtype, head is not None)
