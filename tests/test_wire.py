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


def test_a_truncated_adapter_loads_into_a_lower_rank_model(adapter):
    """The global adapter cut to rank 2 is exactly what a rank-2 client's PEFT model holds."""
    arrays = wire.adapter_arrays(adapter)
    rank = adapter.peft_config["default"].r
    model, _ = models.load("tiny-micro")
    low = add_lora(model, LoraSettings(r=2, targets=tuple(adapter.peft_config["default"].target_modules)))
    cut = wire.truncate_rank(arrays, 2)
    wire.load_adapter_arrays(low, cut)
    assert all(np.array_equal(wire.adapter_arrays(low)[k], cut[k]) for k in cut)
    padded = wire.pad_rank(cut, rank)
    for name, value in arrays.items():
        kept = wire.rank_slice(wire.rank_axis(name), 2)
        np.testing.assert_array_equal(cut[name], value[kept])
        assert padded[name].shape == value.shape and np.abs(padded[name]).sum() == np.abs(cut[name]).sum()
