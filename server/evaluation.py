"""Server-side evaluation of the global adapter on the held-out test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgecore import data, models, wire
from edgecore.encoding import Encoder
from edgecore.evaluate import evaluate
from edgecore.experiment import Experiment
from edgecore.finetune import add_lora, resolve_precision


class GlobalModel:
    """The base model with the global adapter: the initial adapter, evaluation and saving."""

    def __init__(self, experiment: Experiment):
        self.experiment = experiment
        base, tokenizer = models.load(experiment.model, seed=experiment.seed)
        # Seeded so every run starts from the same adapter (LoRA B is zero, A is random).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(experiment.seed)
            self.model = add_lora(base, experiment.lora())
        self.model.eval()
        dataset = data.load(experiment.data, seed=experiment.seed)
        self.encoder = Encoder(tokenizer, dataset, max_len=experiment.seq_len)
        self.test = dataset.test[: experiment.eval_samples] if experiment.eval_samples else dataset.test

    def initial_arrays(self) -> dict[str, np.ndarray]:
        return wire.adapter_arrays(self.model)

    def evaluate(self, arrays: dict[str, np.ndarray]) -> dict:
        wire.load_adapter_arrays(self.model, arrays)
        return evaluate(
            self.model, self.encoder, self.test, batch_size=self.experiment.eval_batch_size,
            precision=resolve_precision(self.experiment.precision), progress=False,
        )

    def save(self, arrays: dict[str, np.ndarray], folder: Path) -> None:
        """Write the adapter in PEFT format (adapter_config.json + adapter_model.safetensors)."""
        wire.load_adapter_arrays(self.model, arrays)
        self.model.save_pretrained(folder)
