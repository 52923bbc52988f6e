"""Server-side evaluation of the global adapter on the held-out test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from safetensors.numpy import save_file

from edgecore import data, lm, models, wire
from edgecore.encoding import Encoder
from edgecore.evaluate import evaluate
from edgecore.experiment import Experiment
from edgecore.finetune import add_lora, resolve_precision
from edgecore.tuning.adaptive import EXITS_FILE
from edgecore.tuning.exits import Exits, parse_exits


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
        """The global LoRA adapter and, for the edge pipeline, the exit adapters (seeded like LoRA)."""
        arrays = wire.adapter_arrays(self.model)
        if self.experiment.pipeline == "edge":
            arrays.update(wire.exit_arrays(self.initial_exits()))
        return arrays

    def initial_exits(self) -> Exits:
        config = lm.causal_lm(self.model).config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.experiment.seed)
            return Exits(parse_exits(self.experiment.exits, config.num_hidden_layers), config.hidden_size, self.experiment.lora_r)

    def evaluate(self, arrays: dict[str, np.ndarray]) -> dict:
        """Full-depth metrics of the global LoRA adapter on the dense base (exit adapters play no part)."""
        wire.load_adapter_arrays(self.model, wire.split_exits(arrays)[0])
        return evaluate(
            self.model, self.encoder, self.test, batch_size=self.experiment.eval_batch_size,
            precision=resolve_precision(self.experiment.precision), progress=False,
        )

    def save(self, arrays: dict[str, np.ndarray], folder: Path) -> None:
        """Write the adapter in PEFT format (adapter_config.json + adapter_model.safetensors), plus
        exits.safetensors when there are exit adapters."""
        lora, exits = wire.split_exits(arrays)
        wire.load_adapter_arrays(self.model, lora)
        self.model.save_pretrained(folder)
        if exits:
            save_file({k: np.ascontiguousarray(v) for k, v in exits.items()}, str(Path(folder) / EXITS_FILE))
