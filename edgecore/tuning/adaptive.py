"""Adaptive-depth LoRA tuning in one call, and saving/loading its adapters with the exit adapters.

    exits, depth = prepare(peft_model, AdaptiveSettings(budget_mb=200), train_settings, lora)
    result = tune(peft_model, exits, depth, encoder, train, validation, train_settings)

`prepare` places the exits and picks the window depth from the budget (memory estimator, with
the base weights as they are stored, so a LUC-compressed base leaves room for deeper windows).
`tune` runs edgecore.finetune.train with the window loss, then votes on the validation split.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file

from edgecore import lm
from edgecore.allocator import allocator_in_effect
from edgecore.data import Sample
from edgecore.encoding import Encoder
from edgecore.errors import EdgecoreError
from edgecore.finetune import LoraSettings, TrainReport, TrainSettings, resolve_precision, train
from edgecore.luc.compress import stored_nbytes
from edgecore.luc.layer import CompressedLinear, register_peft
from edgecore.memory import ModelShape, StepPlan
from edgecore.tuning.exits import Exits, parse_exits
from edgecore.tuning.voting import exit_scores, exit_votes, layer_importance, lora_factors
from edgecore.tuning.window import AssignedExit, Depth, ExitChooser, WindowTrainer, window_depth

EXITS_FILE, META_FILE = "exits.safetensors", "adaptive.json"


@dataclass(frozen=True)
class AdaptiveSettings:
    exits: str = "quarters"  # "quarters", a count ("4"), or layer indices ("7,15,22,29")
    exit_rank: int = 8
    window: int | None = None  # fixed window depth; None: the deepest that fits budget_mb
    budget_mb: float | None = None  # the tuning job's memory above the runtime floor; None: no limit
    exit_weights: tuple[float, ...] | None = None  # global exit weights (from the server); None: uniform
    assigned_exit: int | None = None  # train every step at this exit (the server's assignment); None: draw by the weights
    # Exit adapters' learning rate over the LoRA rate. 10x lowered one early exit's loss in a
    # probe (SmolLM2, exit 14, 12 steps: 10.5 -> 2.6) but cut the benchmark's last-exit test
    # accuracy (64% -> 34%), so the default stays 1.
    exit_lr_scale: float = 1.0


def stored_weight_bytes(model) -> int:
    """Bytes of the base model's stored tensors (LoRA and exit adapters are counted by the estimator)."""
    base = lm.causal_lm(model)
    return stored_nbytes(base) - sum(p.numel() * p.element_size() for n, p in base.named_parameters() if "lora_" in n)


def prepare(model, settings: AdaptiveSettings, train_settings: TrainSettings, lora: LoraSettings) -> tuple[Exits, Depth]:
    """Exit adapters for the (PEFT-wrapped) model and the window depth for the budget."""
    base = lm.causal_lm(model)
    shape = ModelShape.from_config(base.config)
    layers = parse_exits(settings.exits, shape.layers)
    exits = Exits(layers, shape.hidden, settings.exit_rank)
    plan = StepPlan.from_settings(
        train_settings, lora, precision=resolve_precision(train_settings.precision), weight_bytes=stored_weight_bytes(model),
        allocator=allocator_in_effect(), packed_weights=_has_packed_layers(base),
    )
    if settings.window is not None:
        depth = window_depth(shape, plan, None, settings.window)
        if settings.budget_mb is not None and depth.estimate_mb > settings.budget_mb:
            raise EdgecoreError(
                f"a window of {settings.window} layers needs {depth.estimate_mb:.0f} MB, over the budget of "
                f"{settings.budget_mb:.0f} MB: leave --window out to pick the deepest that fits"
            )
        return exits, Depth(depth.layers, depth.estimate_mb, settings.budget_mb)
    return exits, window_depth(shape, plan, settings.budget_mb)


def _has_packed_layers(model) -> bool:
    return any(isinstance(m, CompressedLinear) for m in model.modules())


@dataclass
class AdaptiveResult:
    report: TrainReport
    depth: Depth
    history: list[dict]
    layer_steps: list[int]
    scores: dict[int, dict] = field(default_factory=dict)  # validation score per exit
    votes: list[float] = field(default_factory=list)
    importance: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "train": self.report.summary(), "depth": asdict(self.depth), "layer_steps": self.layer_steps,
            "exit_steps": {str(e): sum(1 for h in self.history if h["exit"] == e) for e in sorted({h["exit"] for h in self.history})},
            "validation_by_exit": {str(e): s for e, s in self.scores.items()}, "votes": self.votes,
            "layer_importance": self.importance,
        }


def tune(
    model,
    exits: Exits,
    depth: Depth,
    encoder: Encoder,
    train_samples: Sequence[Sample],
    validation: Sequence[Sample],
    settings: TrainSettings,
    adaptive: AdaptiveSettings = AdaptiveSettings(),
    *,
    progress: bool = True,
    on_step=None,
) -> AdaptiveResult:
    """Train windows at adaptively chosen exits (or every step at `adaptive.assigned_exit`, when
    the server assigned one) for settings.steps steps, then vote on `validation`.

    `adaptive` is the same settings object `prepare` sized the exits and window with; here its
    exit weights, assigned exit and exit learning-rate scale apply.
    """
    before = lora_factors(model)
    exit_weights, assigned_exit = adaptive.exit_weights, adaptive.assigned_exit
    if assigned_exit is None and exit_weights is None and validation:
        # No global weights yet: this client's own votes, before training, stand in for them, so
        # steps go to exits that can already read the task rather than to exits at chance.
        exit_weights = exit_votes(exit_scores(model, exits, encoder, validation))
    if assigned_exit is None:
        chooser = ExitChooser(exits.layers, exit_weights, seed=settings.seed)
    else:
        chooser = AssignedExit(assigned_exit, exits.layers)
    trainer = WindowTrainer(model, exits, depth.layers, chooser)
    exits.train()
    report = train(model, encoder, train_samples, settings, progress=progress, on_step=on_step,
                   step_loss=trainer, extra_params=list(exits.parameters()), extra_lr_scale=adaptive.exit_lr_scale)
    exits.eval()
    layers = len(lm.causal_lm(model).model.layers)
    result = AdaptiveResult(report, depth, trainer.history, trainer.layer_steps(layers))
    result.importance = layer_importance(before, lora_factors(model), layers)
    if validation:
        result.scores = exit_scores(model, exits, encoder, validation)
        result.votes = exit_votes(result.scores)
    return result


def save(folder: Path | str, model, exits: Exits, meta: dict | None = None) -> Path:
    """PEFT adapter (adapter_model.safetensors, adapter_config.json) plus exits.safetensors and adaptive.json."""
    folder = Path(folder)
    model.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in exits.state().items()}, str(folder / EXITS_FILE))
    (folder / META_FILE).write_text(json.dumps({"exits": list(exits.layers), "exit_rank": exits.rank, **(meta or {})}, indent=2))
    return folder


def load(base_model, folder: Path | str):
    """(PEFT model, Exits, meta) from a folder written by `save`, on top of `base_model`."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise EdgecoreError(f"{folder / META_FILE} not found: {folder} is not an adaptive-depth adapter folder")
    meta = json.loads((folder / META_FILE).read_text())
    shape = ModelShape.from_config(base_model.config)
    exits = Exits(meta["exits"], shape.hidden, meta["exit_rank"])
    exits.load(load_file(str(folder / EXITS_FILE)))
    # Registering LUC's layer lets the adapter load onto a compressed base as well as a dense one.
    config = register_peft(LoraConfig.from_pretrained(folder))
    model = PeftModel.from_pretrained(base_model, folder, config=config)
    return model, exits.eval(), meta
