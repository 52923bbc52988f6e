"""edgecore.device: one verb prepares a model for a device; the profile, not the host, decides; the result lives on disk."""

import json
from dataclasses import replace

import pytest
import torch

from conftest import needs_bbc
from edgecore import measure
from edgecore.allocator import HEAP_THRESHOLD_BYTES, SMALL_HEAP_THRESHOLD_BYTES, job_heap_threshold
from edgecore.device import DeviceSpec, check_compressed_base, plan_precision, prepare, step_plan
from edgecore.device_store import MANIFEST, DeviceStore
from edgecore.errors import EdgecoreError
from edgecore.finetune import LoraSettings
from edgecore.profiles import profile_from_dict, resolve_profile

LORA = LoraSettings(r=2, alpha=4, targets=("q_proj", "v_proj"))


def board(budget=50, precision="fp32", bits=(4, 8), name="tiny-board"):
    return profile_from_dict({"name": name, "memory_budget_mb": budget, "weight_bits": list(bits), "precision": precision,
                              "sparsity": {"unstructured": [0.0, 0.5]}})


def spec(profile, **changes):
    base = DeviceSpec("tiny-5m", profile, LORA, batch_size=2, seq_len=64, data="bbc", calib_samples=2, schedule=False)
    return replace(base, **changes)


def host(monkeypatch, bf16: bool):
    monkeypatch.setattr(measure, "cpu_supports_bf16", lambda: bf16)


def test_the_profile_not_the_host_sets_the_plans_precision(monkeypatch):
    for bf16_host in (False, True):
        host(monkeypatch, bf16_host)
        assert plan_precision(resolve_profile("pi-zero-2w")) == "fp32"
        assert plan_precision(resolve_profile("phone-8gb")) == "bf16"
        assert plan_precision(resolve_profile("phone-8gb"), "fp32") == "fp32"  # forced
    with pytest.raises(EdgecoreError, match="precision 'fp16'"):
        plan_precision(resolve_profile("phone-8gb"), "fp16")


@needs_bbc
def test_a_fleet_is_planned_identically_on_a_bf16_host_and_on_an_fp32_host(monkeypatch, tmp_path):
    """The demo's failure: a 200 MB-class board planned for bf16 because the simulating host had AMX."""
    profiles = [board(), board(120, "bf16", (4, 8, 16, 32), "tiny-phone")]
    plans = {}
    for bf16_host in (False, True):
        host(monkeypatch, bf16_host)
        store = DeviceStore(tmp_path / f"store-{bf16_host}")
        plans[bf16_host] = []
        for profile in profiles:
            dev = prepare(spec(profile), store)
            plans[bf16_host].append((dev.precision, dev.compressed, dev.depth.layers, round(dev.depth.estimate_mb, 6),
                                     json.dumps(dev.policy, sort_keys=True)))
            # The board computes in fp32 on either host; the bf16 profile computes in bf16 only where the host can.
            assert dev.compute_precision == ("bf16" if profile.precision == "bf16" and bf16_host else "fp32")
    assert plans[False] == plans[True]
    assert [p[0] for p in plans[False]] == ["fp32", "bf16"]
    assert plans[False][0][1] is True  # the board needs compression, whatever the host


@needs_bbc
def test_the_compressed_base_is_stored_and_the_next_prepare_loads_it_from_disk(tmp_path):
    store = DeviceStore(tmp_path)
    first = prepare(spec(board()), store)
    assert first.compressed and not first.from_disk and first.build["seconds"] > 0
    again = prepare(spec(board()), store)
    assert again.from_disk and again.store.folder == first.store.folder and again.policy == first.policy
    batch = torch.randint(0, 200, (1, 16))
    with torch.no_grad():
        assert torch.equal(first.model(batch).logits, again.model(batch).logits)
    changed = prepare(spec(board(), calib_samples=3), store)  # another calibration: another base
    assert not changed.from_disk and changed.store.folder != first.store.folder


@needs_bbc
@pytest.mark.parametrize("damage", ["flip", "truncate", "unfinished"])
def test_a_corrupt_or_partial_stored_base_is_rebuilt_never_trusted(tmp_path, damage):
    store = DeviceStore(tmp_path)
    first = prepare(spec(board()), store)
    weights = first.store.folder / "model.safetensors"
    if damage == "flip":
        raw = bytearray(weights.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        weights.write_bytes(bytes(raw))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (first.store.folder / MANIFEST).unlink()  # as a build killed before it finished would leave it
    rebuilt = prepare(spec(board()), store)
    assert not rebuilt.from_disk and rebuilt.build.get("rebuilt_because")
    assert rebuilt.policy == first.policy
    assert prepare(spec(board()), store).from_disk  # and it is whole again


@needs_bbc
def test_a_base_compressed_elsewhere_is_checked_against_the_device(tmp_path):
    made = prepare(spec(board()), DeviceStore(tmp_path))
    folder = made.store.folder
    step = step_plan(spec(board()), "fp32")
    policy = check_compressed_base(folder, board(), plan=step)
    assert policy.model == "tiny-5m"
    with pytest.raises(EdgecoreError, match="does not run"):
        check_compressed_base(folder, board(bits=(2, 3)), plan=step)
    with pytest.raises(EdgecoreError, match="over device tiny-board's planning budget"):
        check_compressed_base(folder, board(budget=30), plan=step)
    brought = prepare(spec(board(), model=str(folder)), DeviceStore(tmp_path / "other"))
    assert brought.compressed and brought.from_disk and brought.policy == made.policy


def test_a_folder_that_is_not_a_compressed_base_is_refused_with_the_fix(tmp_path):
    with pytest.raises(EdgecoreError, match="policy.json not found"):
        check_compressed_base(tmp_path, board())


def test_a_job_returns_freed_activations_to_the_os_whatever_their_size():
    """The estimator's "returning" allocator holds only where the mmap threshold sits below the step's activations."""
    assert job_heap_threshold(4 * 128, 576) == HEAP_THRESHOLD_BYTES  # SmolLM2 at the demo's batch: 1.18 MB
    assert job_heap_threshold(2 * 160, 256) == SMALL_HEAP_THRESHOLD_BYTES  # tiny-5m: 320 KiB activations
    assert SMALL_HEAP_THRESHOLD_BYTES < 4 * 2 * 160 * 256 < HEAP_THRESHOLD_BYTES
