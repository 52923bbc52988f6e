"""`luc`: LUC's per-layer policy against the uniform policy at equal weight memory, plus dense.

All in one run, on one calibration set (8 Shakespeare training passages):
- sensitivity of every (layer, candidate), timed (never from the cache here);
- uniform: the reference candidate (50% unstructured at 4 bits by default) in every layer;
  LUC: the knapsack policy for exactly the uniform policy's weight bytes, over the candidate
  grid. Both keep the tied embedding at 8 bits, so they differ only in how layers are stored;
- held-out Shakespeare perplexity and BBC validation accuracy (no tuning) of dense, uniform
  and LUC, each compressed for real (packed storage);
- memory: the policy's promised bytes, the stored tensors, and the RSS a fresh process gains
  loading the saved folder;
- the measure itself: policies at the same budget chosen from KL and from Edge-LLM's per-layer
  output MSE, and random policies at that budget, each scored end to end (KL to the dense
  model on the calibration tokens); Spearman correlation of the summed per-layer KL and of
  the summed output MSE with the end-to-end KL.
"""

from __future__ import annotations

import copy
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgecore import data, models
from edgecore.encoding import Encoder
from edgecore.evaluate import evaluate
from edgecore import luc
from edgecore.luc import Calibration, Candidate, measure, policy_kl
from edgecore.luc.pipeline import calibration_batches
from edgecore.memory import MIB
from simulations.bench import benchmark, in_fresh_process, target

WORKER = "simulations.bench.luc_worker"
REFERENCE = Candidate(0.5, "unstructured", 4)
GRID = [Candidate(s, "unstructured", b) for s in (0.0, 0.25, 0.5, 0.75) for b in (2, 3, 4, 8)]
EMBEDDING_BITS = 8
RANDOM_POLICIES = 8


def _say(message: str) -> None:
    print(f"[luc {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _spearman(a, b) -> float:
    ranks = [np.argsort(np.argsort(x)) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def _policy_for(shape, scores: np.ndarray, budget: int, group_size: int) -> tuple[Candidate, ...]:
    """The knapsack policy minimising `scores` (layers x GRID) within `budget` stored bytes, the table at EMBEDDING_BITS."""
    return luc.choose_policy(shape, GRID, scores, {EMBEDDING_BITS: 0.0}, budget, group_size=group_size).layers


def _evaluate(model, tokenizer, shakespeare, bbc, n_lm: int, n_cls: int) -> dict:
    started = time.perf_counter()
    lm = evaluate(model, Encoder(tokenizer, shakespeare, 128), shakespeare.test[:n_lm], batch_size=8, precision="fp32", progress=False)
    cls = evaluate(model, Encoder(tokenizer, bbc, 128), bbc.validation[:n_cls], batch_size=8, precision="fp32", progress=False)
    return {"shakespeare_ppl": lm["perplexity"], "bbc_val_accuracy": cls["accuracy"],
            "eval_s": time.perf_counter() - started}


@benchmark("luc")
def run(options: dict) -> dict:
    model_name = options["model"]
    n_lm = options.get("eval_samples") or 64
    n_cls = options.get("eval_samples") or 100
    group_size = 64
    shape = models.shape(model_name)
    shakespeare, bbc = data.load("shakespeare"), data.load("bbc")
    dense, tokenizer = models.load(model_name)

    started = time.perf_counter()
    calib = Calibration(dense, calibration_batches(tokenizer, shakespeare, samples=8, seq_len=128))
    calibration_s = time.perf_counter() - started
    _say(f"sensitivity: {shape.layers} layers x {len(GRID)} candidates")
    table = measure(calib, GRID, group_size=group_size, progress=False)
    _say(f"sensitivity took {table.seconds:.0f} s; evaluating dense, uniform and LUC")
    embedding_kl = luc.embedding_sensitivity(calib, [EMBEDDING_BITS], group_size)

    uniform = luc.uniform_policy(model_name, shape, REFERENCE, EMBEDDING_BITS, group_size, table, embedding_kl)
    chosen = luc.choose_policy(shape, table.candidates, table.kl, embedding_kl, uniform.weight_bytes,
                               group_size=group_size, model=model_name)
    results = [{"config": "dense", "weights_mb": luc.stored_nbytes(dense) / MIB,
                **_evaluate(dense, tokenizer, shakespeare, bbc, n_lm, n_cls)}]
    with tempfile.TemporaryDirectory() as tmp:
        for policy in (uniform, chosen):
            model = copy.deepcopy(dense)
            luc.apply_policy(model, policy, calib)
            folder = luc.save_compressed(Path(tmp) / policy.kind, model, tokenizer, policy)
            fresh = in_fresh_process(WORKER, {"folder": str(folder)})
            results.append({
                "config": policy.kind, "promised_mb": policy.weight_bytes / MIB, "weights_mb": luc.stored_nbytes(model) / MIB,
                "fresh_process": fresh, "predicted_kl": policy.total_sensitivity,
                "calibration_kl": calib.kl_full(model),
                "layers": [c.label for c in policy.layers],
                **_evaluate(model, tokenizer, shakespeare, bbc, n_lm, n_cls),
            })
            del model

    _say("scoring policies end to end (KL against output-MSE check)")
    # Which per-layer measure predicts the end-to-end effect: policies at the same budget.
    rng = random.Random(0)
    budget = uniform.weight_bytes
    policies = {"by_kl": chosen.layers, "by_output_mse": _policy_for(shape, table.output_mse, budget, group_size)}
    for i in range(RANDOM_POLICIES):
        noise = np.array([[rng.random() for _ in GRID] for _ in range(shape.layers)])
        policies[f"random_{i}"] = _policy_for(shape, noise, budget, group_size)
    measure_rows = []
    for name, layers in policies.items():
        cols = [GRID.index(c) for c in layers]
        measure_rows.append({
            "policy": name,
            "end_to_end_kl": policy_kl(calib, layers, group_size),
            "sum_kl": float(sum(table.kl[l, j] for l, j in enumerate(cols))),
            "sum_output_mse": float(sum(table.output_mse[l, j] for l, j in enumerate(cols))),
        })
    actual = [r["end_to_end_kl"] for r in measure_rows]
    depth = np.arange(shape.layers)
    ref = GRID.index(REFERENCE)
    by = {r["config"]: r for r in results}
    ratios = {
        "luc_ppl_over_uniform": by["luc"]["shakespeare_ppl"] / by["uniform"]["shakespeare_ppl"],
        "luc_weights_over_uniform": by["luc"]["weights_mb"] / by["uniform"]["weights_mb"],
        "uniform_ppl_over_dense": by["uniform"]["shakespeare_ppl"] / by["dense"]["shakespeare_ppl"],
        "luc_ppl_over_dense": by["luc"]["shakespeare_ppl"] / by["dense"]["shakespeare_ppl"],
        "dense_weights_over_luc": by["dense"]["weights_mb"] / by["luc"]["weights_mb"],
    }
    memory_gap = max(abs(by[k]["weights_mb"] / by[k]["promised_mb"] - 1) for k in ("uniform", "luc"))
    kl_corr, mse_corr = _spearman([r["sum_kl"] for r in measure_rows], actual), _spearman(
        [r["sum_output_mse"] for r in measure_rows], actual)
    targets = [
        target("luc_ppl_reduction_vs_uniform", 1 - ratios["luc_ppl_over_uniform"], 0.10),
        target("weights_measured_vs_promised_gap", memory_gap, 0.05, higher_is_better=False),
        target("spearman_sum_kl_minus_sum_mse", kl_corr - mse_corr, 0.0),
    ]
    return {
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "sensitivity": {
            "seconds": table.seconds, "calibration_s": calibration_s, "candidates": [c.label for c in GRID],
            "layers": shape.layers, "calibration_tokens": table.tokens, "kl_tokens": table.kl_tokens,
            "kl": table.kl.tolist(), "output_mse": table.output_mse.tolist(),
            "embedding_kl": embedding_kl,
        },
        "measure_check": {
            "policies": measure_rows,
            "spearman_sum_kl_vs_end_to_end": kl_corr,
            "spearman_sum_output_mse_vs_end_to_end": mse_corr,
            "spearman_depth_vs_output_mse_at_reference": _spearman(depth, table.output_mse[:, ref]),
            "spearman_depth_vs_kl_at_reference": _spearman(depth, table.kl[:, ref]),
        },
    }
