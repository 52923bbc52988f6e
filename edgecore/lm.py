"""Forward passes that apply the LM head only where an output is needed.

The full-vocabulary logits of a batch of 8 x 128 tokens on a 49k vocabulary take 200 MB in
fp32 (plus as much again for their gradient). Training only needs them at the answer tokens
and classification only at the answer position, so the head runs on those rows alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgecore.encoding import IGNORE, Batch


def causal_lm(model):
    """The transformers causal LM under any PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model, batch: Batch) -> torch.Tensor:
    """Final-norm hidden states of the decoder, (batch, length, hidden)."""
    decoder = causal_lm(model).get_decoder()
    # No KV cache: one pass over whole sequences never reuses it, and it would hold every layer's k/v.
    return decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state


def head(model, hidden: torch.Tensor) -> torch.Tensor:
    return causal_lm(model).get_output_embeddings()(hidden)


def answer_rows(hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden rows that predict an answer token, those tokens): the only rows a loss needs."""
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep]


def token_loss(model, hidden: torch.Tensor, batch: Batch, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens only (IGNORE labels are skipped)."""
    rows, targets = answer_rows(hidden, batch)
    return F.cross_entropy(head(model, rows).float(), targets, reduction=reduction)


def answer_logits(model, hidden: torch.Tensor, batch: Batch, token_ids: list[int]) -> torch.Tensor:
    """Logits of the given tokens at each sample's answer position, (batch, len(token_ids))."""
    rows = torch.arange(hidden.shape[0])
    return head(model, hidden[rows, batch.answer_at])[:, token_ids].float()
