"""One round of the edgecore pipeline on a device: a federation.protocol.TrainInstruction in, a TrainReply out.

    1. the device model (client.device): the base compressed by LUC when the budget needs it,
       LoRA at the device's rank, exits, and the deepest tuning window that fits;
    2. the global adapter and exit adapters, cut to the device's rank, are loaded;
    3. window tuning trains the exit the server assigned (or, with no assignment, exits drawn
       by the adaptive rule from the global exit weights and the local losses);
    4. every exit is scored on the local validation split: the exit votes and the per-layer
       importance (how far each layer's LoRA update moved);
    5. only the tensors that trained go back (the window's LoRA tensors and the exit adapters
       used), clipped (and in local mode noised) when the instruction asks for differential
       privacy (federation.privacy.privatize), with the votes, the window and the measured
       memory of the job.

No Flower types here: the instruction and the reply are the protocol's dataclasses, and their
conversion to records is the protocol's. `edge_evaluate` scores the global adapter on the
device's own base for the server's evaluation round (an EvaluateReply).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from client.device import device_model, device_spec
from client.plain_round import ClientData, partition_of, round_metrics
from edgecore import data, measure, wire
from edgecore.device import plan_check
from edgecore.encoding import Encoder
from edgecore.evaluate import evaluate
from edgecore.experiment import Experiment
from edgecore.profiles import DeviceProfile
from edgecore.tuning import adaptive
from federation.privacy import privatize
from federation.protocol import BUDGET_MB, COMPRESSED, JOB_PEAK_MB, EvaluateReply, TrainInstruction, TrainReply

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    """What a client says about its hardware: its profile and LoRA rank (None: the experiment's)."""

    profile: DeviceProfile
    lora_rank: int | None = None
    model: str | None = None  # a base compressed elsewhere for this device (None: the experiment's model)


@lru_cache(maxsize=4)
def _validation(client: ClientData, seed: int) -> tuple[data.Sample, ...]:
    dataset, _ = partition_of(client, seed)  # the dataset already loaded for training
    return tuple(data.share(dataset.validation, client.num_partitions, client.partition_id, client.scheme, seed=seed))


def edge_round(experiment: Experiment, client: ClientData, device: Device, instruction: TrainInstruction) -> TrainReply:
    """Run the round the server asked for (see the module docstring): the assigned exit's window, or
    with no assignment the exits the adaptive rule draws from the global exit weights."""
    started = time.perf_counter()
    global_arrays, server_round = instruction.arrays, instruction.server_round
    dataset, samples = partition_of(client, experiment.seed)
    validation = list(_validation(client, experiment.seed)[: experiment.vote_samples]) or dataset.validation[: experiment.vote_samples]
    prepare_started = time.perf_counter()
    dev = _device_model(experiment, client, device)
    prepare_s = time.perf_counter() - prepare_started  # ~0 when this process prepared it in an earlier round
    reused, dev.uses = dev.uses > 0, dev.uses + 1
    _load_global(dev, global_arrays)
    encoder = Encoder(dev.tokenizer, dataset, max_len=experiment.seq_len)
    measure.make_resident(dev.model)
    rss_before, weights_mb = measure.rss_mb(), dev.weights_mb  # the job's peak is measured from here
    check = plan_check(dev, experiment.local_steps)  # the plan's first real steps against its prediction
    result = adaptive.tune(
        dev.model, dev.exits, dev.depth, encoder, list(samples), validation,
        replace(experiment.train_settings(server_round), precision=dev.compute_precision),
        replace(dev.tuning, exit_weights=instruction.exit_weights, assigned_exit=instruction.assigned_exit),
        progress=False, on_step=check,
    )
    verdict = check.finish() if check else None
    trained_layers = {layer for layer, steps in enumerate(result.layer_steps) if steps}
    trained_exits = {record["exit"] for record in result.history}
    arrays = {k: v for k, v in wire.adapter_arrays(dev.model).items() if wire.layer_of(k) in trained_layers}
    arrays.update({k: v for k, v in wire.exit_arrays(dev.exits).items() if wire.layer_of(k) in trained_exits})
    arrays = privatize(arrays, global_arrays, instruction.dp)  # its delta from what it received, at its rank
    metrics = {
        **round_metrics(result.report, started, weights_mb, rss_before, arrays, global_arrays, client),
        "estimate-mb": dev.depth.estimate_mb,
        BUDGET_MB: device.profile.memory_budget_mb,
        "scheduled": int(dev.executor is not None and dev.executor.installed),  # edgecore.schedule's kernels run it
        "plan-checked": int(verdict is not None),
        "plan-measured-s": verdict.plan_s if verdict else 0.0,
        "predicted-step-s": (dev.schedule or {}).get("predicted_s", 0.0),
        "prepare-s": prepare_s,
        # Where this round's device model came from: this process's memory (a simulation worker's
        # earlier round), the device's disk, or built now (compressed, `build-peak-mb` its measured peak).
        "in-process": int(reused),
        "from-disk": int(dev.from_disk and not reused),
        "built": int(dev.built and not reused),
        "build-peak-mb": dev.build["peak_mb"] if dev.built and not reused else 0.0,
        "bf16": int(dev.precision == "bf16"),
        "compute-bf16": int(dev.compute_precision == "bf16"),
        "exit-steps": [sum(1 for h in result.history if h["exit"] == e) for e in dev.exits.layers],
        "exits": list(dev.exits.layers),
    }
    log.info("round %d partition %d on %s: window %d at exits %s, loss %.3f -> %.3f, job %.0f of %.0f MB",
             server_round, client.partition_id, device.profile.name, dev.depth.layers, sorted(trained_exits),
             metrics["first-loss"], metrics["train-loss"], metrics[JOB_PEAK_MB], metrics[BUDGET_MB])
    return TrainReply(
        arrays=arrays, num_examples=len(samples), device=device.profile.name, lora_rank=dev.lora.r,
        window=dev.depth.layers, compressed=bool(dev.compressed), votes=tuple(result.votes),
        importance=tuple(result.importance), layer_steps=tuple(result.layer_steps), report=metrics,
    )


def edge_evaluate(experiment: Experiment, client: ClientData, device: Device, global_arrays: wire.Arrays) -> EvaluateReply:
    """Accuracy of the global adapter on this device's own base (compressed or dense), full depth."""
    dataset, _ = partition_of(client, experiment.seed)
    dev = _device_model(experiment, client, device)
    _load_global(dev, global_arrays)
    encoder = Encoder(dev.tokenizer, dataset, max_len=experiment.seq_len)
    test = dataset.test[: experiment.device_eval_samples]
    metrics = evaluate(dev.model, encoder, test, batch_size=experiment.eval_batch_size,
                       precision=dev.compute_precision, progress=False)
    accuracy = metrics.pop("accuracy", None)
    report = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return EvaluateReply(num_examples=len(test), device=device.profile.name, accuracy=accuracy,
                         report={**report, COMPRESSED: int(dev.compressed), "weights-mb": dev.weights_mb})


def _device_model(experiment: Experiment, client: ClientData, device: Device):
    return device_model(device_spec(experiment, device.profile, device.lora_rank, model=device.model, data=client.spec))


def _load_global(dev, global_arrays: wire.Arrays) -> None:
    """The global LoRA and exit adapters, cut to this device's rank, into its model."""
    ranked = wire.truncate_rank(global_arrays, dev.lora.r)
    lora, exits = wire.split_exits(ranked)
    wire.load_adapter_arrays(dev.model, lora)
    dev.exits.load({k: torch.from_numpy(np.asarray(v)) for k, v in exits.items()})
