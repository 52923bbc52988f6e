import tomllib
from pathlib import Path

import pytest

from edgecore import EdgecoreError
from edgecore.experiment import Experiment

ROOT = Path(__file__).resolve().parent.parent


def test_the_app_config_in_pyproject_is_a_valid_experiment():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    experiment = Experiment.from_mapping(config, "pyproject.toml")
    assert experiment.as_run_config() == {**experiment.as_run_config(), **config}
    assert "federations" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]


def test_round_seeds_differ_and_ints_pass_as_floats():
    experiment = Experiment.from_mapping({"lr": 1, "local-steps": 3})
    assert experiment.lr == 1.0 and isinstance(experiment.lr, float)
    assert experiment.train_settings(1).seed != experiment.train_settings(2).seed


@pytest.mark.parametrize("values, message", [
    ({"learning-rate": 0.1}, "unknown key 'learning-rate'"),
    ({"num-rounds": "3"}, "num-rounds = '3' should be an integer"),
    ({"save-client-updates": 1}, "should be true or false"),
    ({"num-rounds": 0}, "num-rounds = 0"),
    ({"lora-r": 0}, "rank"),
    ({"partition": "zipf"}, "zipf"),
    ({"fraction-train": 1.5}, "fraction-train"),
])
def test_bad_values_name_their_key(values, message):
    with pytest.raises(EdgecoreError, match=message):
        Experiment.from_mapping(values)


def test_experiment_files_name_themselves_in_errors(tmp_path):
    bad = tmp_path / "x.toml"
    bad.write_text("num-rounds = [")
    with pytest.raises(EdgecoreError, match="x.toml is not valid TOML"):
        Experiment.from_toml(bad)
    with pytest.raises(EdgecoreError, match="does not exist"):
        Experiment.from_toml(tmp_path / "missing.toml")
    for path in (ROOT / "configs" / "experiments").glob("*.toml"):
        Experiment.from_toml(path)


def test_the_experiment_defaults_are_the_app_config():
    """One set of defaults: pyproject's app config (what `flwr run .` uses) spells out Experiment's own."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert Experiment().as_run_config() == config
