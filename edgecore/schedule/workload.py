"""The work a plan is made for: a window training step, a batched forward, or greedy decoding.

A workload says, for every decoder layer and the head, how many rows each linear multiplies
and in which role: `infer` (input without gradient: layers below the window, evaluation,
decoding) or `train` (a gradient flows back through the layer: the window and the head of a
training step). It can also run itself on a model, which is how the cost model measures the
rest of the model and how the benchmark times a plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from edgecore import lm
from edgecore.encoding import IGNORE, Batch
from edgecore.errors import EdgecoreError
from edgecore.tuning.exits import Exits, default_exits
from edgecore.tuning.runner import DecoderRun
from edgecore.tuning.window import window_loss

INFER, TRAIN = "infer", "train"
KINDS = ("train", "forward", "decode")


@dataclass(frozen=True)
class Calls:
    """How one weight is used in one run of a workload: `count` calls of `rows` rows in `role`."""

    role: str
    rows: int
    count: int = 1


@dataclass(frozen=True)
class Workload:
    kind: str  # train | forward | decode
    batch: int = 1
    seq_len: int = 128  # train / forward: tokens per sequence; decode: prompt tokens
    depth: int = 1  # train: layers in the window
    exits: tuple[int, ...] = ()  # train: the layers a window may end at (empty: the model's last layer);
    #                              times are predicted for the deepest, kernels serve every one
    new_tokens: int = 64  # decode

    def __post_init__(self):
        if self.kind not in KINDS:
            raise EdgecoreError(f"workload kind {self.kind!r} is not one of {KINDS}")
        for name in ("batch", "seq_len", "depth", "new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise EdgecoreError(f"workload {name}={getattr(self, name)!r} must be a positive integer")

    @classmethod
    def train(cls, batch: int, seq_len: int, depth: int, exits: tuple[int, ...] = ()) -> Workload:
        return cls("train", batch, seq_len, depth, tuple(exits))

    @classmethod
    def forward(cls, batch: int, seq_len: int) -> Workload:
        return cls("forward", batch, seq_len)

    @classmethod
    def decode(cls, prompt_len: int = 16, new_tokens: int = 64) -> Workload:
        return cls("decode", 1, prompt_len, new_tokens=new_tokens)

    @property
    def label(self) -> str:
        if self.kind == "train":
            return f"training step {self.batch} x {self.seq_len}, window {self.depth} layers"
        if self.kind == "forward":
            return f"forward {self.batch} x {self.seq_len}"
        return f"decoding {self.new_tokens} tokens after a {self.seq_len}-token prompt, batch 1"

    @property
    def key(self) -> str:
        return f"{self.kind}-b{self.batch}-s{self.seq_len}-d{self.depth}-e{'.'.join(map(str, self.exits))}-n{self.new_tokens}"

    def window(self, layers: int, exit_layer: int | None = None) -> tuple[int, int]:
        """(first, last) trained layers of the window ending at `exit_layer` (default: the deepest exit)."""
        last = exit_layer if exit_layer is not None else max(self.exits, default=layers - 1)
        if not 0 <= last < layers:
            raise EdgecoreError(f"exit layer {last} is outside the model's {layers} layers")
        return max(0, last - self.depth + 1), last

    def layer_roles(self, index: int, layers: int) -> set[str]:
        """Every role decoder layer `index` can take, over all the exits a window may end at."""
        if self.kind != "train":
            return {INFER}
        roles = set()
        for exit_layer in self.exits or (layers - 1,):
            first, last = self.window(layers, exit_layer)
            if index <= last:
                roles.add(TRAIN if index >= first else INFER)
        return roles

    def layer_calls(self, index: int, layers: int) -> list[Calls]:
        """How each linear of decoder layer `index` is used (empty: the layer does not run)."""
        tokens = self.batch * self.seq_len
        if self.kind == "decode":
            return [Calls(INFER, self.seq_len), Calls(INFER, 1, self.new_tokens - 1)]
        if self.kind == "forward":
            return [Calls(INFER, tokens)]
        first, last = self.window(layers)
        if index > last:
            return []
        return [Calls(TRAIN if index >= first else INFER, tokens)]

    def head_calls(self) -> list[Calls]:
        """The head reads one row per sequence: the answer row, or the last token while decoding."""
        if self.kind == "decode":
            return [Calls(INFER, 1, self.new_tokens)]
        return [Calls(TRAIN if self.kind == "train" else INFER, self.batch)]

    def roles(self, layers: int) -> set[str]:
        return {c.role for i in range(layers) for c in self.layer_calls(i, layers)} | {c.role for c in self.head_calls()}

    # -- running it ------------------------------------------------------------------------------

    def synthetic_batch(self, vocab: int, seed: int = 0) -> Batch:
        """Random tokens; the loss reads the last position of every sequence."""
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (self.batch, self.seq_len), generator=generator)
        labels = torch.full_like(ids, IGNORE)
        labels[:, -1] = ids[:, -1]
        return Batch(ids, torch.ones_like(ids), labels, torch.full((self.batch,), self.seq_len - 2), None)

    def run(self, model, exits=None) -> torch.Tensor:
        """One unit of this workload on `model` (a PEFT or plain causal LM): a step, a forward, a decode.

        Returns what it computed (the loss, the head rows' logits, or the generated tokens).
        """
        base = lm.causal_lm(model)
        batch = self.synthetic_batch(base.config.vocab_size)
        if self.kind == "train":
            return self._train(model, exits, batch)
        if self.kind == "forward":
            with torch.no_grad():
                run = DecoderRun(model, batch)
                hidden = run.run_to(len(run.layers) - 1, grad=False)
                return lm.head(model, run.final_norm(hidden[:, -1]))
        return greedy_decode(base, batch.input_ids, self.new_tokens)

    def _train(self, model, exits, batch: Batch) -> torch.Tensor:
        base = lm.causal_lm(model)
        layers = base.config.num_hidden_layers
        first, last = self.window(layers)
        if exits is None or last not in exits.layers:  # timing only: fresh exit adapters do
            dtype = base.get_input_embeddings()(batch.input_ids[:1, :1]).dtype  # the model's compute dtype
            exits = Exits(sorted({*default_exits(layers), last}), base.config.hidden_size).to(dtype)
        loss = window_loss(model, exits, batch, last, last - first + 1)
        loss.backward()
        for parameter in model.parameters():  # a benchmark step, not training: nothing accumulates
            parameter.grad = None
        return loss.detach()


def greedy_decode(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`new_tokens` greedy tokens after `prompt` ([1, n] ids) with a KV cache; the head reads one row a step."""
    cache = DynamicCache()
    tokens, out = prompt, []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            tokens = logits[:, -1].argmax(dim=-1, keepdim=True)
            out.append(tokens)
    return torch.cat(out, dim=1)
