"""The run config a wrapper submits: base settings + overrides, validated before anything starts."""

from __future__ import annotations

import dataclasses
import json
import time
import tomllib
from pathlib import Path

from flwr.common.config import parse_config_args

from edgecore import data, models
from edgecore.errors import EdgecoreError
from edgecore.experiment import Experiment

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def resolve(config_file: Path | None, overrides: str = "") -> Experiment:
    """The experiment from a TOML file (default: pyproject's [tool.flwr.app.config]), then
    `k=v` overrides; every key is checked before anything starts."""
    if config_file:
        base = Experiment.from_toml(config_file).as_run_config()
    else:
        base = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    try:
        extra = parse_config_args([overrides]) if overrides.strip() else {}
    except Exception as err:  # flwr raises click errors for malformed strings
        raise EdgecoreError(f'run-config overrides {overrides!r} are malformed ({err}); write e.g. "num-rounds=5 model=\\"tiny-5m\\""') from None
    return Experiment.from_mapping({**base, **extra}, source="run config")


def as_flwr_overrides(experiment: Experiment) -> str:
    """Every key as `k=v` pairs for `flwr run --run-config` (strings JSON-quoted)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in experiment.as_run_config().items())


def pin_run_folder(experiment: Experiment, prefix: str) -> Experiment:
    """An absolute run-dir and a run-name, so the wrapper knows where the ServerApp writes."""
    return dataclasses.replace(
        experiment,
        run_dir=str(Path(experiment.run_dir).resolve()),
        run_name=experiment.run_name or time.strftime(f"{prefix}-%Y%m%d-%H%M%S"),
    )


def preflight(experiment: Experiment) -> None:
    """Check the server's own model and data before a SuperLink starts and devices join."""
    models.check_source(experiment.model)
    data.load(experiment.data, seed=experiment.seed)
