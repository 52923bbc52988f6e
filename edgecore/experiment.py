"""An experiment's settings: one flat table of hyphenated keys, shared by server and clients.

The same keys live in pyproject.toml's [tool.flwr.app.config] (Flower's run config), in
configs/experiments/*.toml, and in `flwr run -c "key=value"` overrides. Unknown keys and
wrong types are refused with the key named, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from edgecore.data import parse_partition_spec
from edgecore.errors import EdgecoreError
from edgecore.fleet import resolve_fleet
from edgecore.finetune import LoraSettings, TrainSettings


AGGREGATIONS = ("fedavg", "fedprox", "fedadam")
AVERAGES = ("weighted-mean", "median", "trimmed-mean")  # how a round's updates merge (server.robust)
DP_MODES = ("off", "central", "local")  # client-level differential privacy (federation.privacy)


@dataclass(frozen=True)
class Experiment:
    model: str = "smollm2-135m"
    data: str = "bbc"
    partition: str = "dirichlet:0.5"  # how the training split is dealt to clients
    num_rounds: int = 3
    local_steps: int = 4
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 2e-3
    warmup_steps: int = 2
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    precision: str = "auto"
    seed: int = 0
    min_clients: int = 3  # a round waits for this many connected clients
    fraction_train: float = 1.0
    eval_samples: int = 100  # server-side test samples per evaluation; 0 = the whole test split
    eval_batch_size: int = 16
    max_update_norm: float = 100.0  # L2 distance from the global adapter beyond which an update is dropped
    # Defences against one hostile device (server.robust): an update whose RMS change is above this
    # multiple of the round's median is dropped; a claimed example count weighs at most this multiple
    # of the round's median claim; 0 turns either off.
    max_update_norm_ratio: float = 5.0
    max_weight_ratio: float = 3.0
    average: str = "weighted-mean"  # weighted-mean | median | trimmed-mean: how the round's updates merge
    trim_fraction: float = 0.2  # trimmed-mean: the share of each element's values cut from each end
    run_dir: str = "runs"
    run_name: str = ""  # the run folder's name under run-dir; "" = fl-TIMESTAMP-runID
    save_client_updates: bool = False  # keep every accepted client update in the checkpoints (audit, debugging)
    # Heterogeneous fleets (edgecore.fleet): "" = every client tunes the dense model at full depth.
    pipeline: str = "edge"  # "edge": each client runs edgecore for its device; "plain": dense LoRA at full depth everywhere
    fleet: str = "demo"  # a shipped fleet name (configs/fleets/) or a fleet file; "" = every client dense
    aggregation: str = "fedavg"  # fedavg | fedprox | fedadam
    proximal_mu: float = 0.01  # fedprox: the clients' proximal weight
    server_lr: float = 0.01  # fedadam: the server's learning rate
    exits: str = "quarters"  # early exits: "quarters", a count, or layer indices "7,14,22,29"
    vote_samples: int = 16  # validation samples each client votes on
    device_eval_samples: int = 16  # test samples each client evaluates the global adapter on, on its own base
    luc_grid: str = "quick"  # compression candidates: "quick" (8 or 4 bits, or 50% pruned at 4 bits) or "full" (the profile's)
    calib_samples: int = 2  # LUC calibration sequences per client (more: better policies, slower first round)
    # Client-level differential privacy of the updates (federation.privacy, server.privacy): "off",
    # "central" (clients clip, the server re-clips, averages with equal weights and adds the noise)
    # or "local" (each client clips and adds its own noise).
    dp_mode: str = "off"
    dp_clip_norm: float = 1.0  # C: the largest L2 norm of one client's update (all its tensors together)
    dp_noise_multiplier: float = 0.0  # z: the noise's std is z * C on every sum of updates
    dp_delta: float = 1e-5  # the delta the epsilon is reported at
    dp_max_epsilon: float = 0.0  # stop before a round that would pass this epsilon; 0 = no budget

    def __post_init__(self):
        self.lora()  # validates the LoRA fields
        self.train_settings(round_=1)
        for name in ("num_rounds", "min_clients", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise EdgecoreError(f"{_key(name)} = {getattr(self, name)} must be at least 1")
        if not 0 < self.fraction_train <= 1:
            raise EdgecoreError(f"fraction-train = {self.fraction_train} must be in (0, 1]")
        if self.eval_samples < 0 or not self.max_update_norm > 0:
            raise EdgecoreError("eval-samples must be >= 0 and max-update-norm > 0")
        for name in ("max_update_norm_ratio", "max_weight_ratio"):
            if getattr(self, name) < 0 or 0 < getattr(self, name) < 1:
                raise EdgecoreError(f"{_key(name)} = {getattr(self, name)} must be 0 (off) or at least 1: a multiple of "
                                    "the round's median")
        if self.average not in AVERAGES:
            raise EdgecoreError(f"average = {self.average!r}; use one of {', '.join(AVERAGES)}")
        if not 0 <= self.trim_fraction < 0.5:
            raise EdgecoreError(f"trim-fraction = {self.trim_fraction} must be in [0, 0.5): the share cut from each end")
        parse_partition_spec(self.partition)
        if self.aggregation not in AGGREGATIONS:
            raise EdgecoreError(f"aggregation = {self.aggregation!r}; use one of {', '.join(AGGREGATIONS)}")
        if self.pipeline not in ("edge", "plain"):
            raise EdgecoreError(f"pipeline = {self.pipeline!r}; use \"edge\" or \"plain\"")
        if self.luc_grid not in ("quick", "full"):
            raise EdgecoreError(f"luc-grid = {self.luc_grid!r}; use \"quick\" or \"full\"")
        if self.proximal_mu < 0 or not self.server_lr > 0:
            raise EdgecoreError("proximal-mu must be >= 0 and server-lr > 0")
        for name in ("vote_samples", "device_eval_samples", "calib_samples"):
            if getattr(self, name) < 1:
                raise EdgecoreError(f"{_key(name)} = {getattr(self, name)} must be at least 1")
        self._check_privacy()
        if self.fleet:
            self.load_fleet()

    def _check_privacy(self) -> None:
        """The dp-* keys, and the keys a private run's aggregation constrains."""
        if self.dp_mode not in DP_MODES:
            raise EdgecoreError(f"dp-mode = {self.dp_mode!r}; use one of {', '.join(repr(m) for m in DP_MODES)}")
        if not self.dp_clip_norm > 0:
            raise EdgecoreError(f"dp-clip-norm = {self.dp_clip_norm} must be > 0: the largest L2 norm of one update")
        if not self.dp_noise_multiplier >= 0:
            raise EdgecoreError(f"dp-noise-multiplier = {self.dp_noise_multiplier} must be >= 0")
        if not 0 < self.dp_delta < 1:
            raise EdgecoreError(f"dp-delta = {self.dp_delta} must be in (0, 1); choose well below 1 / the number of clients")
        if not self.dp_max_epsilon >= 0:
            raise EdgecoreError(f"dp-max-epsilon = {self.dp_max_epsilon} must be >= 0 (0 = no budget)")
        if self.dp_mode == "off":
            return
        if not self.dp_noise_multiplier > 0:
            raise EdgecoreError(f"dp-mode = {self.dp_mode!r} needs dp-noise-multiplier > 0 (it is "
                                f"{self.dp_noise_multiplier}); e.g. 1.0, or set dp-mode = \"off\"")
        if self.dp_mode == "central":
            self._check_central_privacy()

    def _check_central_privacy(self) -> None:
        """Central DP bounds each client's share of the equal-weight sum; a rule coupling clients breaks the bound.

        So the server applies neither max-update-norm-ratio nor max-weight-ratio in central mode (the
        clip bounds every update, and every weight is 1); an explicit robust average is refused."""
        if self.average != "weighted-mean":
            raise EdgecoreError(f"dp-mode = \"central\" averages with equal weights and noise (server.privacy); "
                                f"average = {self.average!r} has no bounded sensitivity: set average = \"weighted-mean\"")
        if self.dp_clip_norm > self.max_update_norm:
            raise EdgecoreError(f"dp-clip-norm = {self.dp_clip_norm:g} exceeds max-update-norm = {self.max_update_norm:g}: "
                                "clipped updates would be rejected; lower dp-clip-norm or raise max-update-norm")

    def load_fleet(self):
        """The fleet this experiment runs (None for a homogeneous dense federation)."""
        if not self.fleet:
            return None
        fleet = resolve_fleet(self.fleet)
        too_big = [r for r in fleet.ranks(self.lora_r) if r > self.lora_r]
        if too_big:
            raise EdgecoreError(f"fleet {self.fleet}: client LoRA ranks {too_big} exceed lora-r = {self.lora_r}, "
                                "the global adapter's rank; raise lora-r or lower the clients' ranks")
        return fleet

    def lora(self) -> LoraSettings:
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=targets)

    def train_settings(self, round_: int) -> TrainSettings:
        """Local training for one round; the seed moves with the round so batches differ."""
        return TrainSettings(
            steps=self.local_steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
            warmup_steps=min(self.warmup_steps, self.local_steps), precision=self.precision,
            seed=self.seed + 1000 * round_, proximal_mu=self.proximal_mu if self.aggregation == "fedprox" else 0.0,
        )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "run config") -> "Experiment":
        known = {_key(f.name): f for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise EdgecoreError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
            field = known[key]
            kwargs[field.name] = _coerce(value, field.type, key, source)
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: Path) -> "Experiment":
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise EdgecoreError(f"experiment file {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise EdgecoreError(f"experiment file {path} is not valid TOML: {err}") from None
        return cls.from_mapping(values, source=str(path))

    def as_run_config(self) -> dict[str, Any]:
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _coerce(value: Any, type_name: str, key: str, source: str):
    """Check a value's type; ints are accepted where floats are expected."""
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool}[type_name]
    if isinstance(value, bool) != (type_name == "bool") or not isinstance(value, expected):
        kind = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}[type_name]
        raise EdgecoreError(f"{source}: {key} = {value!r} should be {kind}")
    return float(value) if type_name == "float" else value
