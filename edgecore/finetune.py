"""Plain LoRA fine-tuning: dense base, every layer, backprop through the full depth.

This is the baseline that every later speed, memory and accuracy claim is measured against,
so it takes the cheap wins a careful engineer would: bf16 autocast where the CPU has native
bf16, the LM head applied only to answer tokens, encodings computed once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm

from edgecore import lm, measure
from edgecore.data import Sample
from edgecore.encoding import Batch, Encoder, collate
from edgecore.errors import EdgecoreError
from edgecore.luc.layer import register_peft

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self):
        if self.r < 1:
            raise EdgecoreError(f"LoRA rank r={self.r} must be at least 1")
        if not 0 <= self.dropout < 1:
            raise EdgecoreError(f"LoRA dropout {self.dropout} must be in [0, 1)")
        if not self.targets:
            raise EdgecoreError("LoRA needs at least one target module (e.g. q_proj,v_proj)")


@dataclass
class TrainSettings:
    steps: int = 30
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    warmup_steps: int = 3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto: bf16 autocast where the CPU runs bf16 natively, else fp32
    seed: int = 0
    # FedProx: mu/2 * ||w - w_start||^2 keeps a client's adapter near the global one it started from.
    proximal_mu: float = 0.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise EdgecoreError(f"{name}={getattr(self, name)} must be at least 1")
        if not self.lr > 0:
            raise EdgecoreError(f"learning rate {self.lr} must be positive")
        if self.precision not in PRECISIONS:
            raise EdgecoreError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not self.proximal_mu >= 0:
            raise EdgecoreError(f"proximal mu {self.proximal_mu} must be zero or positive")


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if measure.cpu_supports_bf16() else "fp32"
    return precision


def autocast(precision: str):
    """bf16 autocast on the model's device type, or nothing for fp32."""
    if resolve_precision(precision) == "bf16":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def add_lora(model, lora: LoraSettings) -> PeftModel:
    """Wrap a base model with trainable LoRA adapters; the base weights are frozen."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora.targets if t not in names]
    if missing:
        raise EdgecoreError(
            f"LoRA target modules {missing} are not in this model; it has e.g. "
            f"{sorted(n for n in names if n.endswith('proj'))[:8]}"
        )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        task_type="CAUSAL_LM",
    )
    # Registering LUC's compressed layer lets LoRA wrap it; dense models are unaffected.
    return get_peft_model(model, register_peft(config))


def batches(encoder: Encoder, samples: Sequence[Sample], batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless seeded shuffled batches; each sample is encoded once."""
    if not samples:
        raise EdgecoreError("there are no training samples: check the data spec and partition")
    encoded = [encoder.encode(s) for s in samples]
    pad = encoder.tokenizer.pad_token_id
    order = list(range(len(encoded)))
    rng = random.Random(seed)
    while True:
        rng.shuffle(order)
        for start in range(0, max(len(order) - batch_size, 0) + 1, batch_size):  # full batches
            yield collate([encoded[i] for i in order[start : start + batch_size]], pad)


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    step_s: float


@dataclass
class TrainReport:
    precision: str
    steps: list[StepRecord] = field(default_factory=list)
    train_s: float = 0.0
    peak_rss_mb: float = 0.0  # process peak during training (weights + runtime included)
    num_examples: int = 0

    @property
    def final_loss(self) -> float:
        tail = [s.loss for s in self.steps[-5:]]
        return sum(tail) / len(tail) if tail else float("nan")

    @property
    def mean_step_s(self) -> float:
        # The first step pays one-off costs (allocator warm-up, lazy inits): leave it out.
        timed = [s.step_s for s in self.steps[1:]] or [s.step_s for s in self.steps]
        return sum(timed) / len(timed) if timed else float("nan")

    def summary(self) -> dict:
        return {
            "precision": self.precision,
            "steps": len(self.steps),
            "num_examples": self.num_examples,
            "first_loss": self.steps[0].loss if self.steps else None,
            "final_loss": self.final_loss,
            "mean_step_s": self.mean_step_s,
            "train_s": self.train_s,
            "peak_rss_mb": self.peak_rss_mb,
        }


def _lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(settings.steps - settings.warmup_steps, 1)
    progress = (step - settings.warmup_steps) / span
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: PeftModel,
    encoder: Encoder,
    samples: Sequence[Sample],
    settings: TrainSettings,
    *,
    progress: bool = True,
    on_step: Callable[[StepRecord], None] | None = None,
    step_loss: Callable[[Batch, int], torch.Tensor] | None = None,
    extra_params: Sequence[torch.nn.Parameter] = (),
    extra_lr_scale: float = 1.0,
) -> TrainReport:
    """Train the model's trainable parameters (its adapters) for settings.steps steps.

    `step_loss(batch, step)` replaces the default full-depth answer-token loss (adaptive-depth
    tuning passes its window loss); `extra_params` (e.g. exit adapters) train alongside at
    `extra_lr_scale` times the learning rate.
    Parameters that get no gradient in a step are skipped by AdamW and get no optimizer state.
    With settings.proximal_mu > 0 the FedProx term's gradient, mu * (w - w_start), is added to
    every parameter that got a gradient (the reported loss leaves the term out).
    """
    adapters = [p for p in model.parameters() if p.requires_grad]
    trainable = adapters + list(extra_params)
    step_loss = step_loss or (lambda batch, _step: lm.token_loss(model, lm.hidden_states(model, batch), batch))
    if not trainable:
        raise EdgecoreError("the model has no trainable parameters: wrap it with add_lora first")
    groups = [{"params": adapters, "scale": 1.0}]
    if extra_params:
        groups.append({"params": list(extra_params), "scale": extra_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    report = TrainReport(precision=resolve_precision(settings.precision), num_examples=len(samples))
    anchors = [p.detach().clone() for p in trainable] if settings.proximal_mu > 0 else None
    stream = batches(encoder, samples, settings.batch_size, settings.seed)
    torch.manual_seed(settings.seed)  # LoRA dropout
    model.train()
    measure.reset_peak()
    started = time.perf_counter()
    bar = tqdm(range(settings.steps), desc="train", disable=not progress, leave=False)
    for step in bar:
        t0 = time.perf_counter()
        lr = _lr_at(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        batch = next(stream)
        with autocast(settings.precision):
            loss = step_loss(batch, step)
        if not torch.isfinite(loss):
            raise EdgecoreError(f"training diverged at step {step}: loss {loss.item()}; lower --lr")
        loss.backward()
        if anchors is not None:
            _add_proximal_gradient(trainable, anchors, settings.proximal_mu)
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = StepRecord(step=step + 1, loss=loss.item(), lr=lr, step_s=time.perf_counter() - t0)
        report.steps.append(record)
        bar.set_postfix(loss=f"{record.loss:.3f}")
        if on_step:
            on_step(record)
    report.train_s = time.perf_counter() - started
    report.peak_rss_mb = measure.peak_rss_mb()
    model.eval()
    return report


def _add_proximal_gradient(params, anchors, mu: float) -> None:
    with torch.no_grad():
        for param, anchor in zip(params, anchors):
            if param.grad is not None:
                param.grad.add_(param - anchor, alpha=mu)
