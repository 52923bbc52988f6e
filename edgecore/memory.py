"""Peak memory of one LoRA training step: an estimate from the model's shape, and a measurement.

The estimate counts what a step really holds at its peak, term by term (`MemoryEstimate`):

- weights: the base weights as stored (dense fp32 by default; compression passes its size),
  all layers, even those above the window that never run (an upper bound where the weights
  are memory-mapped, as untouched pages stay out of the RSS);
- overhead: what loading a model adds besides its weights (tokenizer, module objects);
- adapters, grads, optimizer: LoRA parameters (fp32), their gradients and AdamW's two states;
- activations: every tensor autograd saves for the backward pass (see `saved_bytes_per_token`);
- weight_copies: under bf16 autocast, the bf16 cast of every frozen weight a trained layer
  uses is saved for the backward pass too (batch-independent, half the dense weights);
- logits: the log-probabilities of the answer tokens only (the LM head runs on those rows);
- transient: short-lived buffers at the peak (MLP gradients, the logits' gradient);
- allocator: glibc's heap keeps freed activation memory and fragments it; with the default
  (dynamic) mmap threshold a process's peak RSS holds about one more copy of the saved
  activations. `edgecore.allocator.limit_heap_fragmentation()` switches that off.

All figures are MiB (2**20 bytes), as `edgecore.measure` reports them.

The measurement that calibrates it runs a few real steps in a fresh process and reports the
peak RSS above the runtime floor (`simulations.step_peak`). SmolLM2's weights are
memory-mapped from the safetensors cache, so `weights` is simply the stored size.

Calibration (2-core x86 CPU, torch 2.13, sdpa attention, LoRA r=8 on q,k,v,o): the saved
bytes per token are exact (checked tensor by tensor against autograd's saved tensors in
tests/test_memory.py, for fp32 and bf16, windows, MLP targets, no dropout, eager attention).
`OVERHEAD_*` and `TRANSIENT_PER_TOKEN_I` were fitted to peaks measured with the heap limited
(tiny-5m and SmolLM2-135M at batch 4, 8, 16): there the total is within 1% of the measured
peak, and within 4% on runs not used for fitting (SmolLM2 with 508 answer tokens, tiny-micro,
bf16). `GLIBC_FRAGMENTATION` is a mean: under glibc's default heap the same step measured
five times on tiny-5m spread from 284 to 327 MiB, so expect +-10% there.

A later planner asks "which window fits budget B" by varying `StepPlan.window` and calling
`estimate_step` again: the estimate is a pure function of (shape, plan), cheap to call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from edgecore.errors import EdgecoreError

MIB = 1 << 20
FP32 = 4
BF16 = 2
PRECISIONS = ("fp32", "bf16")
ATTENTIONS = ("sdpa", "eager")
ALLOCATORS = ("glibc", "returning")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

# Fitted to measured peaks (see the module docstring); everything else is counted exactly.
OVERHEAD_BASE_MB = 26.0  # module objects, autograd engine, oneDNN and thread pools beyond the floor
OVERHEAD_PER_VOCAB_MB = 0.00053  # the tokenizer grows with its vocabulary (~550 B per entry)
TRANSIENT_PER_TOKEN_I = 3  # MLP backward: three (tokens x intermediate) gradients alive at once
GLIBC_FRAGMENTATION = 0.9  # extra RSS per MiB of saved tensors under glibc's default heap policy

# Modules that read the input layernorm's output: in the first trained layer their input has
# no gradient, so neither the norm nor their dropout mask nor their weight cast is saved.
_NORM_FED = ("q_proj", "k_proj", "v_proj")
# Which tensor each linear reads, where several read the same one.
_INPUT_OF = {"q_proj": "norm1", "k_proj": "norm1", "v_proj": "norm1", "gate_proj": "norm2", "up_proj": "norm2"}


# ---------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From a transformers config (or a model, whose .config is used)."""
        config = getattr(config, "config", config)
        try:
            heads = config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            return cls(
                hidden=config.hidden_size,
                intermediate=config.intermediate_size,
                layers=config.num_hidden_layers,
                heads=heads,
                kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                head_dim=head_dim,
                vocab=config.vocab_size,
                tied=bool(getattr(config, "tie_word_embeddings", True)),
            )
        except AttributeError as err:
            raise EdgecoreError(
                f"model config {type(config).__name__} lacks a field the memory estimate needs ({err}); "
                "use a Llama-style causal LM config (hidden_size, intermediate_size, num_hidden_layers, ...)"
            ) from None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear in one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden  # + two norms

    @property
    def num_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embeddings + self.hidden  # + the final norm

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        """LoRA parameters of one layer: A is (r x in), B is (out x r)."""
        dims = self.linears()
        return sum(r * (dims[t][0] + dims[t][1]) for t in targets)


# ---------------------------------------------------------------- what one step does


@dataclass(frozen=True)
class StepPlan:
    """One LoRA training step: its batch, adapters, precision and trained window."""

    batch: int = 8
    seq_len: int = 128
    lora_r: int = 8
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_dropout: float = 0.05
    precision: str = "fp32"  # compute: "fp32", or "bf16" autocast over fp32-stored weights
    window: tuple[int, int] | None = None  # inclusive [first, last] trained layers; None = all
    answer_tokens: int | None = None  # answer tokens per batch (LM-head rows); None = batch
    weight_bytes: int | None = None  # base weights as stored; None = dense fp32
    packed_weights: bool = False  # LUC-packed base: each linear dequantizes in its forward pass
    attention: str = "sdpa"
    allocator: str = "glibc"  # "returning" once limit_heap_fragmentation() is in effect

    @classmethod
    def from_settings(cls, train: Any, lora: Any, *, precision: str, **fields_: Any) -> "StepPlan":
        """The step that training settings run with adapters `lora`.

        `train` has batch_size and seq_len (edgecore.finetune.TrainSettings, or a device spec),
        `lora` has r, targets and dropout (edgecore.finetune.LoraSettings). `precision` is the
        resolved compute precision ("fp32" or "bf16", never "auto"); `fields_` set the rest.
        """
        return cls(batch=train.batch_size, seq_len=train.seq_len, lora_r=lora.r, lora_targets=tuple(lora.targets),
                   lora_dropout=lora.dropout, precision=precision, **fields_)

    def check(self, shape: ModelShape) -> None:
        """Raise EdgecoreError naming the field when the plan does not fit the model."""
        for name in ("batch", "seq_len", "lora_r"):
            if getattr(self, name) < 1:
                raise EdgecoreError(f"step plan: {name} = {getattr(self, name)} must be at least 1")
        for name, allowed in (("precision", PRECISIONS), ("attention", ATTENTIONS), ("allocator", ALLOCATORS)):
            if getattr(self, name) not in allowed:
                raise EdgecoreError(f"step plan: {name} = {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        unknown = [t for t in self.lora_targets if t not in shape.linears()]
        if unknown or not self.lora_targets:
            raise EdgecoreError(
                f"step plan: lora_targets {list(self.lora_targets)} must be a non-empty subset of {list(shape.linears())}"
            )
        first, last = self.trained_layers(shape)
        if not 0 <= first <= last < shape.layers:
            raise EdgecoreError(
                f"step plan: window = {self.window} must satisfy 0 <= first <= last < {shape.layers} (the model's layers)"
            )
        if self.answer_tokens is not None and self.answer_tokens < 1:
            raise EdgecoreError(f"step plan: answer_tokens = {self.answer_tokens} must be at least 1")
        if self.weight_bytes is not None and self.weight_bytes < 0:
            raise EdgecoreError(f"step plan: weight_bytes = {self.weight_bytes} must not be negative")

    def trained_layers(self, shape: ModelShape) -> tuple[int, int]:
        return self.window if self.window is not None else (0, shape.layers - 1)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def head_rows(self) -> int:
        return self.answer_tokens if self.answer_tokens is not None else self.batch


# ---------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training step above the runtime floor, term by term, in MiB."""

    weights_mb: float
    overhead_mb: float
    adapters_mb: float
    grads_mb: float
    optimizer_mb: float
    activations_mb: float
    weight_copies_mb: float
    logits_mb: float
    transient_mb: float
    allocator_mb: float

    @property
    def total_mb(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def saved_mb(self) -> float:
        """What autograd holds for the backward pass."""
        return self.activations_mb + self.weight_copies_mb + self.logits_mb

    @property
    def workload_mb(self) -> float:
        """What the step holds besides the stored weights and their copies (the scheduler prices those itself)."""
        return self.total_mb - self.weights_mb - self.weight_copies_mb

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total_mb": self.total_mb}


def saved_bytes_per_token(shape: ModelShape, plan: StepPlan, *, first: bool = False) -> int:
    """Bytes autograd saves per token in one trained decoder layer.

    `first` is the lowest trained layer: its input carries no gradient, so what only the
    input's gradient would need is not saved. Counted op by op (transformers' Llama layer,
    peft's LoRA, CPU kernels): RMSNorm saves its fp32 input and the per-token rsqrt; SDPA
    saves q, k, v, its output and a per-head logsumexp; the SiLU-gated MLP saves gate, SiLU
    and up outputs; frozen linears save nothing per token (only the weight, which exists
    anyway); each LoRA target saves its dropout noise, lora_A's input and lora_B's input.
    """
    act = FP32 if plan.precision == "fp32" else BF16  # dtype of matmul outputs
    stream = FP32  # the residual stream and RMSNorm stay fp32 (fp32-stored model)
    h, i = shape.hidden, shape.intermediate
    norm = stream * h + FP32
    total = norm + (0 if first else norm)
    total += _attention_bytes(shape, plan, act)
    total += act * 3 * i
    dims = shape.linears()
    shared_inputs: set[str] = set()
    for target in plan.lora_targets:
        d_in = dims[target][0]
        needs_input_grad = not (first and target in _NORM_FED)
        if plan.lora_dropout > 0:
            # CPU dropout multiplies by a noise tensor saved for backward: 4 bytes per element
            # measured for fp32 inputs and for bf16 ones alike; none when no gradient flows.
            total += FP32 * d_in if needs_input_grad else 0
            total += act * d_in  # lora_A's input: this target's own dropout output
        else:
            # Without dropout lora_A saves the module's input itself. In fp32 that tensor is
            # shared: q/k/v read one norm output, gate/up another, and o_proj's input is a
            # view of the output SDPA already saved. Under autocast each lora_A keeps its own
            # bf16 cast.
            source = _INPUT_OF.get(target, target)
            shared = source in shared_inputs or (target == "o_proj" and plan.attention == "sdpa")
            total += act * d_in if act == BF16 or not shared else 0
            shared_inputs.add(source)
        total += act * plan.lora_r  # lora_B's input
    return total


def _attention_bytes(shape: ModelShape, plan: StepPlan, act: int) -> int:
    """Per token: SDPA keeps q, k, v, output and logsumexp; eager keeps the score matrix too."""
    if plan.attention == "sdpa":
        return act * (2 * shape.q_dim + 2 * shape.kv_dim) + FP32 * shape.heads
    # eager: q and the head-repeated k and v, the fp32 softmax output and (bf16) its cast
    scores = shape.heads * plan.seq_len
    return act * 3 * shape.q_dim + FP32 * scores + (act if act != FP32 else 0) * scores


def weight_copy_bytes(shape: ModelShape, plan: StepPlan) -> int:
    """Weight copies autograd keeps for the input gradient of every linear in the trained layers
    (none for q/k/v in the first, whose input has no gradient): bf16 casts under autocast (plus
    the LoRA matrices and the LM head), and the dequantized fp32 weight of a packed (LUC) layer,
    which is built in its forward pass. Zero for a dense fp32 model, whose stored weights are used."""
    first, last = plan.trained_layers(shape)
    dims = shape.linears()
    linears = sum(a * b for a, b in dims.values())
    norm_fed = sum(a * b for name, (a, b) in dims.items() if name in _NORM_FED)
    window = (last - first + 1) * linears - norm_fed
    copies = FP32 * window if plan.packed_weights else 0
    if plan.precision != "fp32":
        lora = (last - first + 1) * shape.lora_params(plan.lora_r, plan.lora_targets)
        copies = BF16 * (window + lora + shape.vocab * shape.hidden)
    return copies


def estimate_step(model: Any, plan: StepPlan | None = None, **changes: Any) -> MemoryEstimate:
    """Peak memory (MiB above the runtime floor) of one LoRA training step.

    `model` is a ModelShape or a transformers config or model (`edgecore.models.shape` gives
    the shape of a model by name); `changes` override fields of `plan` (e.g.
    ``estimate_step(shape, batch=4)``).
    """
    shape = _as_shape(model)
    plan = replace(plan or StepPlan(), **changes)
    plan.check(shape)
    first, last = plan.trained_layers(shape)
    trained = last - first + 1
    act = FP32 if plan.precision == "fp32" else BF16
    weight_bytes = plan.weight_bytes if plan.weight_bytes is not None else FP32 * shape.num_params
    lora_all = shape.layers * shape.lora_params(plan.lora_r, plan.lora_targets)
    lora_trained = trained * shape.lora_params(plan.lora_r, plan.lora_targets)
    per_token = saved_bytes_per_token(shape, plan, first=True)
    per_token += (trained - 1) * saved_bytes_per_token(shape, plan)
    per_token += FP32 * shape.hidden + FP32  # the final norm (before the head's row selection)
    # RoPE's cos and sin, shared by every layer (autocast keeps one bf16 cast instead).
    rope = (2 * FP32 if act == FP32 else BF16) * plan.seq_len * shape.head_dim
    activations = (plan.tokens * per_token + rope) / MIB
    logits = FP32 * plan.head_rows * shape.vocab / MIB  # log-softmax output, always fp32
    copies = weight_copy_bytes(shape, plan) / MIB
    # The MLP backward of the top layer holds its gradients while the whole forward is saved;
    # the logits' gradient (two tensors of the log-probs' size) is alive just before it.
    transient = max(TRANSIENT_PER_TOKEN_I * act * plan.tokens * shape.intermediate / MIB, 2 * logits)
    fragmentation = GLIBC_FRAGMENTATION * (activations + copies) if plan.allocator == "glibc" else 0.0
    return MemoryEstimate(
        weights_mb=weight_bytes / MIB,
        overhead_mb=overhead_mb(shape),
        adapters_mb=FP32 * lora_all / MIB,
        grads_mb=FP32 * lora_trained / MIB,
        optimizer_mb=2 * FP32 * lora_trained / MIB,  # AdamW: exp_avg and exp_avg_sq
        activations_mb=activations,
        weight_copies_mb=copies,
        logits_mb=logits,
        transient_mb=transient,
        allocator_mb=fragmentation,
    )


def overhead_mb(shape: ModelShape) -> float:
    """What loading a model adds above the runtime floor besides its weights (modules, thread pools, tokenizer)."""
    return OVERHEAD_BASE_MB + OVERHEAD_PER_VOCAB_MB * shape.vocab


def inference_bytes(shape: ModelShape, batch: int, seq_len: int, cached_tokens: int = 0) -> int:
    """What a no-grad forward of `batch` x `seq_len` tokens holds besides the weights.

    One layer's activations are alive at a time (the prompt's, when decoding), plus the fp32
    attention scores, a row of logits per sequence, the runtime's growth beyond the floor that
    the training estimate also counts (without it, decoding measured 45-50 MB above the
    prediction) and, when decoding, the KV cache of `cached_tokens` tokens in every layer.
    """
    tokens = batch * seq_len
    attention = FP32 * batch * shape.heads * seq_len ** 2
    logits = 2 * FP32 * shape.vocab  # one row of logits and its argmax / softmax
    activations = FP32 * tokens * (6 * shape.hidden + 3 * shape.intermediate) + attention + batch * logits
    kv_cache = 2 * shape.layers * shape.kv_dim * cached_tokens * FP32
    return activations + int(overhead_mb(shape) * MIB) + kv_cache


def _as_shape(model: Any) -> ModelShape:
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str):
        raise EdgecoreError(f"estimate_step takes a ModelShape or a config, not the name {model!r}: pass edgecore.models.shape({model!r})")
    return ModelShape.from_config(model)
