import numpy as np
import pytest

from edgecore import EdgecoreError, models, wire
from edgecore.finetune import LoraSettings, add_lora


@pytest.fixture
def adapter():
    model, _ = models.load("tiny-micro")
    return add_lora(model, LoraSettings(r=4, targets=("q_proj", "v_proj")))


def test_arrays_round_trip_through_a_fresh_model(adapter):
    arrays = wire.adapter_arrays(adapter)
    assert arrays and all(a.dtype == np.float32 for a in arrays.values())
    assert all("lora_A" in k or "lora_B" in k for k in arrays)
    changed = {k: v + 0.5 for k, v in arrays.items()}
    other, _ = models.load("tiny-micro")
    other = add_lora(other, LoraSettings(r=4, targets=("q_proj", "v_proj")))
    wire.load_adapter_arrays(other, changed)
    back = wire.adapter_arrays(other)
    assert all(np.array_equal(back[k], changed[k]) for k in changed)
    assert wire.nbytes(arrays) == sum(a.size * 4 for a in arrays.values())


def test_arrays_of_another_rank_do_not_load(adapter):
    model, _ = models.load("tiny-micro")
    other = add_lora(model, LoraSettings(r=2, targets=("q_proj",)))
    with pytest.raises(EdgecoreError, match="missing"):
        wire.load_adapter_arrays(other, wire.adapter_arrays(adapter))


def test_update_checks(adapter):
    ref = wire.adapter_arrays(adapter)
    name = sorted(ref)[0]
    good = {k: v + 0.01 for k, v in ref.items()}
    assert wire.update_problems(good, ref, max_delta_norm=10.0) == []

    def broken(**change):
        return {**good, **change}

    nan = good[name].copy()
    nan[0, 0] = np.nan
    assert "non-finite" in wire.update_problems(broken(**{name: nan}), ref, 10.0)[0]
    assert "shape" in wire.update_problems(broken(**{name: good[name][:, :1]}), ref, 10.0)[0]
    assert "dtype" in wire.update_problems(broken(**{name: good[name].astype(np.float64)}), ref, 10.0)[0]
    assert "missing" in wire.update_problems({k: v for k, v in good.items() if k != name}, ref, 10.0)[0]
    assert "unexpected" in wire.update_problems(broken(extra=np.zeros(2, np.float32)), ref, 10.0)[0]
    huge = {k: v * 1000 for k, v in ref.items()}
    assert "exceeds the limit" in wire.update_problems(huge, ref, 10.0)[0]
