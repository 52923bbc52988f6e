"""Held-out evaluation: answer accuracy for classification, answer-token loss and perplexity."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from edgecore import lm
from edgecore.data import Sample
from edgecore.encoding import Encoder, collate
from edgecore.errors import EdgecoreError
from edgecore.finetune import autocast


@torch.no_grad()
def evaluate(
    model,
    encoder: Encoder,
    samples: Sequence[Sample],
    *,
    batch_size: int = 16,
    precision: str = "auto",
    progress: bool = True,
) -> dict:
    """Metrics over `samples`: loss and perplexity always, accuracy when there are choices.

    Accuracy is the argmax over the answer words' first-token logits at the answer position:
    one forward pass per sample, no sampling, so it is deterministic.
    """
    if not samples:
        raise EdgecoreError("there are no evaluation samples: the split or partition is empty")
    was_training = model.training
    model.eval()
    loss_sum, tokens, correct = 0.0, 0, 0
    pad = encoder.tokenizer.pad_token_id
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="eval", disable=not progress, leave=False):
        batch = collate([encoder.encode(s) for s in samples[start : start + batch_size]], pad)
        with autocast(precision):
            hidden = lm.hidden_states(model, batch)
            loss_sum += lm.token_loss(model, hidden, batch, reduction="sum").item()
            if encoder.choice_token_ids:
                logits = lm.answer_logits(model, hidden, batch, encoder.choice_token_ids)
                correct += int((logits.argmax(dim=-1) == batch.choices).sum())
        tokens += batch.num_target_tokens
    model.train(was_training)
    loss = loss_sum / max(tokens, 1)
    metrics = {"n": len(samples), "loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if encoder.choice_token_ids:
        metrics["accuracy"] = correct / len(samples)
    return metrics
