"""Local voting and early-exit inference.

Votes: every exit is scored on the client's validation split (accuracy above chance for
classification, so an exit that only guesses gets no say; exp(-loss) for language modelling)
and the scores, normalised to sum to 1, are the client's exit vote. Layer importance is how far each layer's LoRA weights moved this round (the
Frobenius norm of the change of B @ A, summed over the layer's targets), also normalised.
The server aggregates both (the fleet issue).

Inference: exits are read in order of depth; after each, the answer distributions seen so far
are combined with the exit weights (global when known, else local votes), and a sample stops
once the combined probability of its best answer reaches `threshold`. Layers above the exit
where every sample of the batch has stopped never run.
"""

from __future__ import annotations

import math
import re
import time
from typing import Sequence

import torch

from edgecore import lm
from edgecore.data import Sample
from edgecore.encoding import Encoder, collate
from edgecore.errors import EdgecoreError
from edgecore.tuning.exits import Exits
from edgecore.tuning.runner import DecoderRun
from edgecore.tuning.window import normalise

_LORA = re.compile(r"layers\.(\d+)\..*\.lora_([AB])\.[^.]*\.weight$")


@torch.no_grad()
def exit_scores(model, exits: Exits, encoder: Encoder, samples: Sequence[Sample], batch_size: int = 16) -> dict[int, dict]:
    """Per exit layer: {"loss", and "accuracy" for classification} on `samples`, all exits in one pass."""
    if not samples:
        raise EdgecoreError("there are no validation samples to vote on: the split or partition is empty")
    head = lambda h: lm.head(model, h)  # noqa: E731
    totals = {e: {"loss": 0.0, "correct": 0} for e in exits.layers}
    tokens = 0
    chance = guess_rate(samples, len(encoder.choice_token_ids)) if encoder.choice_token_ids else 0.0
    for start in range(0, len(samples), batch_size):
        batch = collate([encoder.encode(s) for s in samples[start : start + batch_size]], encoder.tokenizer.pad_token_id)
        run = DecoderRun(model, batch)
        rows_at = torch.arange(batch.input_ids.shape[0])
        for e in exits.layers:
            hidden = run.run_to(e, grad=False)
            rows, targets = lm.answer_rows(hidden, batch)
            logits = exits.read(run, e, rows, head).float()
            totals[e]["loss"] += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            if encoder.choice_token_ids:
                choice = exits.read(run, e, hidden[rows_at, batch.answer_at], head)[:, encoder.choice_token_ids]
                totals[e]["correct"] += int((choice.argmax(dim=-1) == batch.choices).sum())
        tokens += batch.num_target_tokens
    scores = {}
    for e, total in totals.items():
        scores[e] = {"loss": total["loss"] / max(tokens, 1)}
        if encoder.choice_token_ids:
            scores[e]["accuracy"] = total["correct"] / len(samples)
            scores[e]["chance"] = chance
            scores[e]["n"] = len(samples)
    return scores


def guess_rate(samples: Sequence[Sample], classes: int) -> float:
    """The accuracy of a guesser that knows the label shares: always answering the most common
    label. On a non-IID client that is far above 1/classes (the demo fleet's Dirichlet(0.5) shares
    of BBC validation: 44%, 44% and 31% against 20%), so it is the bar an exit must beat."""
    labels = [s.response.strip() for s in samples]
    most_common = max(labels.count(label) for label in set(labels)) if labels else 0
    return max(1 / classes, most_common / max(len(labels), 1))


def exit_quality(score: dict) -> float:
    """Accuracy above chance, as a fraction of the room above chance (an exit that guesses gets 0);
    exp(-loss) without classes.

    With the sample count `n`, the margin over chance must also exceed one standard error of a
    guesser's accuracy, sqrt(c(1-c)/n): on 16 validation articles a guessing exit scores 31%
    against 20% chance now and then, and would otherwise win a fifth of the vote.

    A share of one label (chance 1, normal for a device's few validation samples) cannot tell an
    exit that reads the task from one that always answers that label: every exit gets 0, and the
    vote is uniform, as when no exit beats chance.
    """
    if "accuracy" not in score:
        return math.exp(-min(score["loss"], 50.0))
    chance = score.get("chance", 0.0)
    if chance >= 1:
        return 0.0
    noise = math.sqrt(chance * (1 - chance) / score["n"]) if score.get("n") else 0.0
    return max(0.0, score["accuracy"] - chance - noise) / (1 - chance)


def exit_votes(scores: dict[int, dict]) -> list[float]:
    """Normalised per-exit quality, in exit order (uniform when no exit beats chance)."""
    return normalise([exit_quality(s) for _, s in sorted(scores.items())])


def lora_factors(model) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per decoder layer, a copy of (B, A) of every LoRA target, in a stable order.

    Kept as factors: B @ A of every target of SmolLM2 would be 106 MB, more than a small
    device's whole tuning budget.
    """
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, param in model.named_parameters():
        match = _LORA.search(name)
        if match:
            key = (int(match.group(1)), name[: match.start(2) - len("lora_")])
            parts.setdefault(key, {})[match.group(2)] = param.detach().float().clone()
    factors: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for (layer, _), ab in sorted(parts.items()):
        factors.setdefault(layer, []).append((ab["B"], ab["A"]))
    return factors


def delta_distance(before: list[tuple[torch.Tensor, torch.Tensor]], after: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """||B'A' - BA||_F summed in squares over the targets, without forming any out x in matrix.

    B'A' - BA = U V with U = [B', -B] and V = [A'; A], so its squared norm is the trace of
    (U^T U)(V V^T): two 2r x 2r products.
    """
    total = 0.0
    for (b, a), (b2, a2) in zip(before, after):
        u, v = torch.cat([b2, -b], dim=1), torch.cat([a2, a], dim=0)
        total += float(torch.trace((u.T @ u) @ (v @ v.T)).clamp(min=0))
    return total**0.5


def layer_importance(before: dict, after: dict, layers: int) -> list[float]:
    """Normalised movement ||delta W_after - delta W_before|| per layer (0 for a layer that did not move)."""
    moved = [delta_distance(before[l], after[l]) if l in after and l in before else 0.0 for l in range(layers)]
    return normalise(moved)


@torch.no_grad()
def predict_early(
    model,
    exits: Exits,
    encoder: Encoder,
    samples: Sequence[Sample],
    weights: Sequence[float] | None,
    threshold: float = 0.9,
    batch_size: int = 1,
) -> dict:
    """Classify with weighted exits and early stopping: accuracy, mean layers run, latency per sample."""
    if not encoder.choice_token_ids:
        raise EdgecoreError("early-exit inference classifies: the dataset needs answer choices (e.g. bbc)")
    if not 0 <= threshold <= 1:
        raise EdgecoreError(f"threshold {threshold} must be in [0, 1] (1: always run every exit)")
    weights = normalise(weights) if weights is not None else [1 / len(exits.layers)] * len(exits.layers)
    if len(weights) != len(exits.layers):
        raise EdgecoreError(f"{len(weights)} exit weights for {len(exits.layers)} exits")
    head = lambda h: lm.head(model, h)  # noqa: E731
    correct, layers_run, started = 0, 0, time.perf_counter()
    for start in range(0, len(samples), batch_size):
        batch = collate([encoder.encode(s) for s in samples[start : start + batch_size]], encoder.tokenizer.pad_token_id)
        n = batch.input_ids.shape[0]
        run, rows_at = DecoderRun(model, batch), torch.arange(n)
        mixed = torch.zeros(n, len(encoder.choice_token_ids))
        seen = 0.0
        decided = torch.zeros(n, dtype=torch.bool)
        prediction = torch.zeros(n, dtype=torch.long)
        stopped_at = torch.zeros(n, dtype=torch.long)
        for e, w in zip(exits.layers, weights):
            hidden = run.run_to(e, grad=False)
            logits = exits.read(run, e, hidden[rows_at, batch.answer_at], head)[:, encoder.choice_token_ids].float()
            mixed += w * logits.softmax(dim=-1)
            seen += w
            if seen == 0:
                continue  # only zero-weight exits so far: nothing to decide on
            confidence, best = (mixed / seen).max(dim=-1)
            now = ~decided & ((confidence >= threshold) | (e == exits.layers[-1]))
            prediction[now] = best[now]
            stopped_at[now] = e + 1
            decided |= now
            if bool(decided.all()):
                break
        correct += int((prediction == batch.choices).sum())
        layers_run += int(stopped_at.sum())
    seconds = time.perf_counter() - started
    return {"accuracy": correct / len(samples), "mean_layers": layers_run / len(samples),
            "latency_ms": 1000 * seconds / len(samples), "n": len(samples), "threshold": threshold}
