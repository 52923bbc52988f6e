"""The plain round: dense LoRA at full depth, the global adapter in, a federation.protocol.TrainReply out.

What a client of `pipeline = "plain"` runs (client.edge_round is the edge pipeline's round).
It also holds what both rounds share: where a client's data comes from (`ClientData`, its
partition cached per process) and the metrics every round reports (`round_metrics`). The base
model is cached per process too: Flower's simulation keeps its actor processes across rounds,
so only the first round pays for loading. No Flower types here: the reply's conversion to
records is the protocol's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from edgecore import data, measure, models, wire
from edgecore.data import Sample
from edgecore.encoding import Encoder
from edgecore.experiment import Experiment
from edgecore.finetune import LoraSettings, add_lora, train
from edgecore.allocator import HEAP_THRESHOLD_BYTES, limit_heap_fragmentation
from edgecore.memory import MIB
from edgecore.tuning.adaptive import stored_weight_bytes
from federation.privacy import DpSettings, privatize
from federation.protocol import BYTES_DOWN, BYTES_UP, JOB_PEAK_MB, PARTITION_ID, PLAIN_DEVICE, TrainReply

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientData:
    """Where a client's training data comes from."""

    spec: str  # dataset name or path (see edgecore.data.load)
    partition_id: int = 0
    num_partitions: int = 1
    scheme: str = "iid"


@lru_cache(maxsize=4)
def partition_of(client: ClientData, seed: int) -> tuple[data.Dataset, tuple[Sample, ...]]:
    dataset = data.load(client.spec, seed=seed)
    return dataset, tuple(data.share(dataset.train, client.num_partitions, client.partition_id, client.scheme, seed=seed))



@lru_cache(maxsize=2)
def _model(name: str, lora: LoraSettings, seed: int):
    """The base model wrapped with LoRA, loaded once per process; its adapter is overwritten every round."""
    limit_heap_fragmentation(HEAP_THRESHOLD_BYTES)
    model, tokenizer = models.load(name, seed=seed)
    return add_lora(model, lora), tokenizer


def round_metrics(report, started: float, weights_mb: float, rss_before: float,
                  arrays: dict, global_arrays: dict, client: ClientData) -> dict:
    """What every client round reports, plain or edge (the TrainReply's report)."""
    return {
        "train-loss": report.final_loss,
        "first-loss": report.steps[0].loss,
        "step-s": report.mean_step_s,
        "train-s": report.train_s,
        "round-s": time.perf_counter() - started,
        "peak-rss-mb": report.peak_rss_mb,
        # The job: the stored base plus what training added on top of the process as it was.
        JOB_PEAK_MB: weights_mb + max(0.0, report.peak_rss_mb - rss_before),
        "weights-mb": weights_mb,
        BYTES_UP: wire.nbytes(arrays),
        BYTES_DOWN: wire.nbytes(global_arrays),
        PARTITION_ID: client.partition_id,
        "torch-threads": torch.get_num_threads(),
    }


def local_round(
    experiment: Experiment, client: ClientData, global_arrays: dict[str, np.ndarray], server_round: int,
    dp: DpSettings | None = None,
) -> TrainReply:
    """Train the global adapter on this client's partition; the reply holds the new adapter and the metrics,
    the adapter clipped (and in local mode noised) when `dp` (the instruction's) says so."""
    started = time.perf_counter()
    dataset, samples = partition_of(client, experiment.seed)
    model, tokenizer = _model(experiment.model, experiment.lora(), experiment.seed)
    wire.load_adapter_arrays(model, global_arrays)
    encoder = Encoder(tokenizer, dataset, max_len=experiment.seq_len)
    settings = experiment.train_settings(server_round)
    measure.make_resident(model)
    rss_before = measure.rss_mb()
    report = train(model, encoder, list(samples), settings, progress=False)
    weights_mb = stored_weight_bytes(model) / MIB
    arrays = privatize(wire.adapter_arrays(model), global_arrays, dp)
    metrics = round_metrics(report, started, weights_mb, rss_before, arrays, global_arrays, client)
    log.info("round %d partition %d: loss %.3f -> %.3f in %.1f s", server_round, client.partition_id,
             metrics["first-loss"], metrics["train-loss"], metrics["round-s"])
    return TrainReply(arrays=arrays, num_examples=len(samples), device=PLAIN_DEVICE, report=metrics)
