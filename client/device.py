"""A client's device model: the experiment's settings for this device, handed to edgecore.device.prepare.

Every choice about the model (planning share, precision, dense or compressed, window, plan,
persistence on the device's disk) is edgecore.device's; this module only says what the
experiment asks of this device. The result is also cached per process: Flower's simulation
keeps its worker processes across rounds, so there even loading from disk happens once; in
deployment each message is a fresh process, and the device store is what survives.

LoRA scaling across ranks: the global adapter has the fleet's largest rank R and alpha A.
A client of rank r uses alpha A * r / R, so every client applies the same scale A / R to
B @ A and the first r rank slices of the global adapter mean the same update on every device.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from edgecore.device import DeviceModel, DeviceSpec, prepare
from edgecore.errors import EdgecoreError
from edgecore.experiment import Experiment
from edgecore.finetune import LoraSettings
from edgecore.luc.saved import read_policy
from edgecore.profiles import DeviceProfile


def client_lora(experiment: Experiment, rank: int | None) -> LoraSettings:
    """The experiment's LoRA at `rank`, with alpha scaled so that alpha / rank stays the global one."""
    base = experiment.lora()
    rank = rank or base.r
    alpha = base.alpha * rank / base.r
    return replace(base, r=rank, alpha=int(alpha) if float(alpha).is_integer() else alpha)


def device_spec(experiment: Experiment, profile: DeviceProfile, rank: int | None, *, model: str | None = None,
                data: str | None = None) -> DeviceSpec:
    """What the experiment asks of this device; `model` is a base the device brought (compressed elsewhere),
    `data` the device's own data (LUC calibrates on it)."""
    if model is not None and (base := read_policy(model).model) != experiment.model:
        raise EdgecoreError(f"the base {model} was compressed from {base}, but this run tunes {experiment.model}: "
                            f"compress {experiment.model} for this device")
    return DeviceSpec(
        model=model or experiment.model, profile=profile, lora=client_lora(experiment, rank),
        batch_size=experiment.batch_size, seq_len=experiment.seq_len, exits=experiment.exits, data=data or experiment.data,
        luc_grid=experiment.luc_grid, calib_samples=experiment.calib_samples, seed=experiment.seed,
        precision=experiment.precision,
    )


@lru_cache(maxsize=3)
def device_model(spec: DeviceSpec) -> DeviceModel:
    """The device model for `spec`, prepared once per process."""
    return prepare(spec)
