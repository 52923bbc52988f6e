"""LUC end to end: price every choice, pick the policy, compress the model, save and reload it.

A `Policy` gives every decoder layer one Candidate (sparsity or N:M pattern, and bits) and the
token-embedding table a bit-width. Its `weight_bytes` is what the model's stored state will
take, computed from the layouts alone before anything is compressed (`stored_nbytes` of the
compressed model must agree; the tests and `simulations.bench luc` check it).

Embeddings and the tied LM head: SmolLM2's 49152 x 576 table is 113 MB in fp32, a fifth of
the model and more than half of the smallest shipped budget, so it is compressed too. It is
never pruned (a pruned row would erase a token), only group-quantized, and the tied head reads
the same packed table (edgecore.luc.table), so it is stored once. Its bit-width is one more
item of the knapsack, with its own measured sensitivity (the KL of quantizing the table alone,
which affects the input and the head at once).

A compressed model is a folder: config.json, tokenizer files, policy.json and
model.safetensors (packed buffers). `load_compressed` rebuilds the module tree on the meta
device from config + policy and fills it from the file, so reloading never materialises the
dense model or recompresses anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from edgecore.errors import EdgecoreError
from edgecore.luc import policy as knapsack
from edgecore.luc.layer import CompressedLinear, expected_nbytes
from edgecore.luc.quant import dequantize_like
from edgecore.luc.sensitivity import Calibration, Candidate, Sensitivity, compress_linear, linears
from edgecore.luc.table import compress_embeddings, empty_embeddings, table_nbytes
from edgecore.memory import FP32, MIB, ModelShape, StepPlan, estimate_step
from edgecore.profiles import DeviceProfile

EMBEDDING_DENSE = 32  # embedding_bits meaning "keep the fp32 table"
POLICY_FILE, WEIGHTS_FILE = "policy.json", "model.safetensors"


# ---------------------------------------------------------------- prices


def layer_nbytes(shape: ModelShape, candidate: Candidate, group_size: int) -> int:
    """Stored bytes of one decoder layer: its linears as the candidate stores them, plus two fp32 norms."""
    linear_bytes = sum(
        expected_nbytes(out_f, in_f, candidate.storage_bits, candidate.spec, group_size)
        for in_f, out_f in shape.linears().values()
    )
    return linear_bytes + 2 * FP32 * shape.hidden


def embedding_nbytes(shape: ModelShape, bits: int, group_size: int) -> int:
    """Stored bytes of the token table (and of the head: nothing more when tied, a second table when not)."""
    one = FP32 * shape.vocab * shape.hidden if bits == EMBEDDING_DENSE else table_nbytes(shape.vocab, shape.hidden, bits, group_size)
    return one if shape.tied else 2 * one


def embedding_options(profile_bits: Sequence[int]) -> list[int]:
    """Bit-widths the table may take: the profile's, highest first."""
    return sorted(set(profile_bits), reverse=True)


# ---------------------------------------------------------------- the policy


@dataclass(frozen=True)
class Policy:
    """Per-layer storage of one model, and what it costs."""

    model: str
    group_size: int
    layers: tuple[Candidate, ...]
    embedding_bits: int  # 32 = fp32 table kept
    weight_bytes: int  # every stored tensor of the compressed model
    budget_bytes: int | None = None  # the weight budget it was chosen for (None: uniform, no budget)
    kind: str = "luc"  # "luc" (searched) or "uniform"
    sensitivity: tuple[float, ...] = ()  # per layer, KL of its choice (nats/token)
    embedding_sensitivity: float = 0.0
    profile: str = ""
    notes: dict = field(default_factory=dict)

    @property
    def total_sensitivity(self) -> float:
        return float(sum(self.sensitivity)) + self.embedding_sensitivity

    def to_dict(self) -> dict:
        raw = asdict(self)
        raw["layers"] = [asdict(c) for c in self.layers]
        return raw

    @classmethod
    def from_dict(cls, raw: dict, source: str = "policy") -> Policy:
        try:
            layers = tuple(Candidate(**c) for c in raw["layers"])
            return cls(**{**raw, "layers": layers, "sensitivity": tuple(raw.get("sensitivity", ()))})
        except (KeyError, TypeError) as err:
            raise EdgecoreError(f"{source} is not an edgecore LUC policy ({err}); recompress with `python -m edgecore compress`") from None

    def table(self, shape: ModelShape) -> list[dict]:
        """One row per layer (and the embedding): what `compress` prints."""
        rows = [
            {"layer": str(i), "sensitivity": s, "sparsity": c.pattern if c.pattern != "unstructured" else c.sparsity,
             "bits": c.bits, "mb": layer_nbytes(shape, c, self.group_size) / MIB}
            for i, (c, s) in enumerate(zip(self.layers, self.sensitivity or [math.nan] * len(self.layers)))
        ]
        rows.append({"layer": "embed+head", "sensitivity": self.embedding_sensitivity, "sparsity": 0.0,
                     "bits": self.embedding_bits, "mb": embedding_nbytes(shape, self.embedding_bits, self.group_size) / MIB})
        return rows


def fixed_nbytes(shape: ModelShape) -> int:
    """Stored bytes no choice changes: the final norm."""
    return FP32 * shape.hidden


def policy_nbytes(shape: ModelShape, layers: Sequence[Candidate], embedding_bits: int, group_size: int) -> int:
    return (
        sum(layer_nbytes(shape, c, group_size) for c in layers)
        + embedding_nbytes(shape, embedding_bits, group_size)
        + fixed_nbytes(shape)
    )


def uniform_policy(model: str, shape: ModelShape, candidate: Candidate, embedding_bits: int, group_size: int = 64,
                   sensitivity: Sensitivity | None = None, embedding_kl: dict[int, float] | None = None) -> Policy:
    """The same candidate in every layer (the baseline LUC is measured against)."""
    layers = (candidate,) * shape.layers
    per_layer = ()
    if sensitivity is not None:
        per_layer = tuple(float(v) for v in sensitivity.kl[:, sensitivity.candidates.index(candidate)])
    return Policy(model, group_size, layers, embedding_bits, policy_nbytes(shape, layers, embedding_bits, group_size),
                  kind="uniform", sensitivity=per_layer,
                  embedding_sensitivity=(embedding_kl or {}).get(embedding_bits, 0.0))


def choose_policy(
    model: str,
    shape: ModelShape,
    sensitivity: Sensitivity,
    embedding_kl: dict[int, float],
    budget_bytes: int,
    profile: str = "",
) -> Policy:
    """The least-sensitive policy whose stored weights fit `budget_bytes` (multiple-choice knapsack).

    `embedding_kl` maps each allowed embedding bit-width to its measured KL; the table is one
    more knapsack item. The fixed bytes (final norm) are taken off the budget first.
    """
    g = sensitivity.group_size
    items = [
        [knapsack.Option(c.label, layer_nbytes(shape, c, g), float(sensitivity.kl[l, j]))
         for j, c in enumerate(sensitivity.candidates)]
        for l in range(shape.layers)
    ]
    bits_list = sorted(embedding_kl, reverse=True)
    items.append([knapsack.Option(f"{b}b", embedding_nbytes(shape, b, g), float(embedding_kl[b])) for b in bits_list])
    fixed = fixed_nbytes(shape)
    try:
        chosen = knapsack.solve(items, budget_bytes - fixed)
    except EdgecoreError:
        smallest = knapsack.min_budget(items) + fixed
        raise EdgecoreError(
            f"the weight budget of {budget_bytes / MIB:.1f} MB cannot hold {model} even at its most compressed: "
            f"the smallest budget that fits is {smallest / MIB:.1f} MB; raise the device's memory_budget_mb "
            "(or --weight-budget-mb), reserve less for tuning (smaller --batch / --tuning-window), "
            "or allow more compression in the profile (fewer weight_bits, more sparsity)"
        ) from None
    layers = tuple(sensitivity.candidates[j] for j in chosen[:-1])
    embedding_bits = bits_list[chosen[-1]]
    return Policy(
        model, g, layers, embedding_bits, policy_nbytes(shape, layers, embedding_bits, g), budget_bytes, "luc",
        tuple(float(sensitivity.kl[l, j]) for l, j in enumerate(chosen[:-1])), float(embedding_kl[embedding_bits]),
        profile,
    )


# ---------------------------------------------------------------- budget


def tuning_reserve_bytes(shape: ModelShape, plan: StepPlan) -> int:
    """What one training step of `plan` needs besides the base weights, as the estimator predicts it."""
    estimate = estimate_step(shape, replace(plan, weight_bytes=0))
    return math.ceil(estimate.total_mb * MIB) + 1  # rounded up, so weights at the budget still leave the step room


def weight_budget_bytes(profile: DeviceProfile, shape: ModelShape, plan: StepPlan) -> int:
    """The profile's memory budget minus the tuning state of `plan`: what the stored weights may take."""
    budget = int(profile.memory_budget_mb * MIB) - tuning_reserve_bytes(shape, plan)
    if budget <= 0:
        raise EdgecoreError(
            f"device {profile.name} ({profile.source or 'profile'}): memory_budget_mb = {profile.memory_budget_mb:g} "
            f"leaves nothing for weights after the tuning step's {tuning_reserve_bytes(shape, plan) / MIB:.0f} MB "
            f"(batch {plan.batch} x {plan.seq_len}, window {plan.window}); use a smaller batch or window, or give "
            "--weight-budget-mb explicitly"
        )
    return budget


def default_tuning_plan(shape: ModelShape, batch: int = 4, seq_len: int = 128, window_layers: int = 1) -> StepPlan:
    """The step the budget must leave room for: LoRA on the top `window_layers` layers (adaptive-depth
    tuning then uses whatever room the compressed weights leave for deeper windows)."""
    if not 1 <= window_layers <= shape.layers:
        raise EdgecoreError(f"tuning window of {window_layers} layers must be in 1..{shape.layers}")
    # packed: the window's compressed linears dequantize in their forward, and autograd keeps that copy.
    return StepPlan(batch=batch, seq_len=seq_len, window=(shape.layers - window_layers, shape.layers - 1),
                    allocator="returning", packed_weights=True)


# ---------------------------------------------------------------- sensitivity of the table


@torch.no_grad()
def embedding_sensitivity(calib: Calibration, bits_options: Sequence[int], group_size: int) -> dict[int, float]:
    """KL of quantizing the token table alone (input embedding and tied head at once), per bit-width."""
    table = calib.model.get_input_embeddings().weight
    head = calib.model.get_output_embeddings().weight
    original, original_head = table.data, head.data
    result = {}
    for bits in bits_options:
        if bits == EMBEDDING_DENSE:
            result[bits] = 0.0
            continue
        try:
            table.data = dequantize_like(original, bits, group_size)
            if head is not table:
                head.data = dequantize_like(original_head, bits, group_size)
            result[bits] = calib.kl_full()
        finally:
            table.data, head.data = original, original_head
    return result


# ---------------------------------------------------------------- apply, measure, save, load


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@torch.no_grad()
def compress_layer(
    layer: nn.Module, candidate: Candidate, act_norm: Callable[[str], torch.Tensor], group_size: int
) -> None:
    """Replace every linear of one decoder layer by its packed CompressedLinear (`act_norm(name)`: its
    Wanda norms); a dense candidate leaves the layer as it is."""
    if candidate.is_dense:
        return
    for name, linear in linears(layer).items():
        _set_module(layer, name, compress_linear(linear, act_norm(name), candidate, group_size))


@torch.no_grad()
def apply_policy(model, policy: Policy, calib: Calibration) -> None:
    """Compress `model` in place: Wanda masks from `calib`'s activation norms, packed storage per layer."""
    layers = list(model.model.layers)
    if len(layers) != len(policy.layers):
        raise EdgecoreError(f"the policy has {len(policy.layers)} layers but the model has {len(layers)}")
    for index, (layer, candidate) in enumerate(zip(layers, policy.layers)):
        compress_layer(layer, candidate, lambda name, index=index: calib.act_norm(index, name), policy.group_size)
    if policy.embedding_bits != EMBEDDING_DENSE:
        compress_embeddings(model, policy.embedding_bits, policy.group_size)


def stored_nbytes(model: nn.Module) -> int:
    """Bytes of every tensor in the model's state, each storage counted once (tied weights once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def save_compressed(folder: Path | str, model, tokenizer, policy: Policy) -> Path:
    """Write the compressed model folder; returns it. A tied dense head is stored once."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if policy.embedding_bits == EMBEDDING_DENSE and getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / WEIGHTS_FILE))
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / POLICY_FILE).write_text(json.dumps(policy.to_dict(), indent=2))
    return folder


def read_policy(folder: Path | str) -> Policy:
    path = Path(folder) / POLICY_FILE
    if not path.is_file():
        raise EdgecoreError(f"{path} not found: {folder} is not a compressed model folder (made by `python -m edgecore compress`)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise EdgecoreError(f"{path} is not valid JSON ({err}); recompress the model") from None
    return Policy.from_dict(raw, str(path))


def is_compressed_folder(path: Path | str) -> bool:
    return (Path(path) / POLICY_FILE).is_file()


def load_compressed(folder: Path | str, owned: bool = False):
    """(model, tokenizer, policy) from a folder written by `save_compressed`, without recompressing.

    The weights are mapped from the file (pages are read as they are touched). With owned=True
    they are copied into memory of their own instead: freeing one of them (a layer the scheduler
    streams or parks on disk) then gives its memory back, which one shared mapping would not.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    policy = read_policy(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for layer, candidate in zip(model.model.layers, policy.layers):
        if candidate.is_dense:
            continue
        for name, linear in linears(layer).items():
            empty = CompressedLinear.empty_like(linear, bits=candidate.storage_bits, sparsity=candidate.spec,
                                                group_size=policy.group_size)
            _set_module(layer, name, empty)
    if policy.embedding_bits != EMBEDDING_DENSE:
        empty_embeddings(model, policy.embedding_bits, policy.group_size, tied=bool(config.tie_word_embeddings))
    if owned:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as file:
            state = {key: file.get_tensor(key).clone() for key in file.keys()}
    else:
        state = load_file(str(folder / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied_head = policy.embedding_bits == EMBEDDING_DENSE and config.tie_word_embeddings
    if tied_head:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [k for k in missing if not (tied_head and k == "lm_head.weight")]
    if missing or unexpected:
        raise EdgecoreError(
            f"{folder / WEIGHTS_FILE} does not match its policy: missing {missing[:4]}, unexpected {unexpected[:4]}; "
            "recompress the model"
        )
    _rebuild_unsaved_buffers(model, config)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, policy


def rebuild_meta_buffers(model: nn.Module, config) -> None:
    """Build again, for real, from the config, every module whose own buffers are on the meta device:
    buffers a checkpoint never holds (RoPE's inverse frequencies) of a model built on meta."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            _set_module(model, name, type(module)(config=config))


def _rebuild_unsaved_buffers(model: nn.Module, config) -> None:
    """`rebuild_meta_buffers` after loading a checkpoint, which must leave nothing else on meta."""
    rebuild_meta_buffers(model, config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise EdgecoreError(f"the compressed checkpoint leaves {left[:4]} unset; recompress the model")


def summarize_memory(policy: Policy, model: nn.Module) -> dict:
    """Promised (policy) against measured (stored tensors) bytes."""
    measured = stored_nbytes(model)
    return {"promised_mb": policy.weight_bytes / MIB, "measured_mb": measured / MIB,
            "ratio": measured / policy.weight_bytes}


__all__ = [
    "EMBEDDING_DENSE", "Policy", "apply_policy", "choose_policy", "default_tuning_plan", "embedding_nbytes",
    "embedding_options", "embedding_sensitivity", "is_compressed_folder", "layer_nbytes", "load_compressed",
    "policy_nbytes", "read_policy", "save_compressed", "stored_nbytes", "summarize_memory", "tuning_reserve_bytes",
    "uniform_policy", "weight_budget_bytes",
]
