"""Streamed LUC compression (edgecore.luc.streamed): the in-memory path's numbers, without the dense model in memory."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from edgecore import data, lm, models
from edgecore.errors import EdgecoreError
from edgecore import luc
from edgecore.luc.pipeline import calibration_batches, grid_candidates
from edgecore.luc import streamed
from edgecore.luc import Calibration, Candidate, SensitivityCache, measure
from edgecore.luc.saved import POLICY_FILE
from edgecore.luc.streamed import compress_streamed
from edgecore.luc.table import QuantizedTable, TableLayout
from edgecore.memory import MIB, ModelShape
from edgecore.profiles import resolve_profile

PROFILE = resolve_profile("pi-zero-2w")  # weight bits 2, 3, 4, 8: four table options
G = 64
SAMPLES, LENGTH = 10, 32  # two calibration batches (8 + 2), with padding
TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun " * 4


def _dataset(folder):
    path = folder / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": TEXT[i : i + 8 + 4 * i]}) for i in range(40)))
    return path


def _save(model, tokenizer, folder):
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    model, tokenizer = models.load("tiny-5m", seed=0)
    return root, _save(model, tokenizer, root / "dense"), data.load(str(_dataset(root)))


def test_streamed_gives_the_in_memory_policy_tables_and_model(tiny, monkeypatch):
    root, folder, dataset = tiny
    monkeypatch.setattr(streamed, "TABLE_BLOCK_ROWS", 64)  # the 310-row table in 5 blocks, as SmolLM2's is in 48
    candidates = grid_candidates(PROFILE, "quick")
    model, tokenizer = models.load("tiny-5m", seed=0)
    budget = int(0.2 * luc.stored_nbytes(model))  # a mix of 8 and 4 bits
    cache = SensitivityCache(root / "cache")
    # stream_mb=2 holds the streams of 2 start layers: three sensitivity sweeps over the 6 layers.
    run = dict(weight_budget=budget, calib_samples=SAMPLES, calib_len=LENGTH, group_size=G, cache=cache,
               candidates=candidates, model_id="tiny-5m", stream_mb=2, progress=False)
    result = compress_streamed(folder, PROFILE, dataset, root / "out", **run)

    calib = Calibration(model, calibration_batches(tokenizer, dataset, SAMPLES, LENGTH, 0))
    assert len(calib.batches) == 2 and any(bool((b.attention_mask == 0).any()) for b in calib.batches)  # padding
    table = measure(calib, candidates, group_size=G, progress=False)
    embedding_kl = luc.embedding_sensitivity(calib, sorted(PROFILE.weight_bits, reverse=True), G)
    policy = luc.choose_policy(ModelShape.from_config(model.config), table.candidates, table.kl, embedding_kl, budget,
                               group_size=G, model="tiny-5m", profile=PROFILE.name)
    assert not result.from_cache and len(set(policy.layers)) > 1
    # The head runs block by block, so the KLs agree to float rounding; everything else exactly.
    assert np.allclose(result.sensitivity.kl, table.kl, rtol=1e-5, atol=1e-12)
    assert np.array_equal(result.sensitivity.output_mse, table.output_mse)
    assert (result.sensitivity.tokens, result.sensitivity.kl_tokens) == (table.tokens, table.kl_tokens)
    assert result.embedding_kl.keys() == embedding_kl.keys()
    assert np.allclose([result.embedding_kl[b] for b in embedding_kl], list(embedding_kl.values()), rtol=1e-5)
    assert result.policy.to_dict() | {"sensitivity": None} == policy.to_dict() | {"sensitivity": None}
    assert np.allclose(result.policy.sensitivity, policy.sensitivity, rtol=1e-5)
    # The in-memory path finds the streamed table under its own key.
    assert [p.stem for p in cache.folder.glob("*.json")] == [SensitivityCache.key("tiny-5m", calib, candidates, G)]

    luc.apply_policy(model, policy, calib)
    loaded, _tok, saved_policy = luc.load_compressed(result.folder)
    assert saved_policy == result.policy and luc.stored_nbytes(loaded) == policy.weight_bytes <= budget
    state, reloaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == reloaded_state.keys() and all(torch.equal(state[k], reloaded_state[k]) for k in state)
    for batch in calib.batches:
        with torch.no_grad():
            expected = lm.head(model, lm.hidden_states(model, batch))
            got = lm.head(loaded, lm.hidden_states(loaded, batch))
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)

    again = compress_streamed(folder, PROFILE, dataset, root / "out", **run)
    assert again.from_cache and again.policy == result.policy and again.folder == result.folder
    assert sorted(p.name for p in root.iterdir()) == ["cache", "calib.jsonl", "dense", "out"]  # no staging left


@pytest.mark.parametrize("bits", [32, 16, 8, 4, 3, 2])
def test_a_table_filled_block_by_block_is_the_one_made_whole(bits):
    weight = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    whole = QuantizedTable.from_weight(weight, bits, group_size=32)
    blocks = QuantizedTable(TableLayout(300, 64, bits, 32))
    for start in range(0, 300, 128):  # the last block is short
        blocks.store_rows(start, weight[start : start + 128])
    assert all(torch.equal(a, b) for a, b in zip(whole.buffers(), blocks.buffers()))
    with pytest.raises(EdgecoreError, match="do not fit a 300 x 64 table"):
        blocks.store_rows(250, weight[:100])


# A fresh interpreter: imports first, then the call, whose own peak RSS growth is measured.
CHILD = textwrap.dedent("""
    import json, sys
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the measurement)
    from edgecore import data
    from edgecore.luc import streamed
    from edgecore.luc import Candidate
    from edgecore.profiles import resolve_profile

    folder, data_path, out, budget, hold_dense = sys.argv[1:6]
    held = []
    if hold_dense == "1":  # the control: what the in-memory path holds, inside the measured call
        from safetensors.torch import load_file
        calibrate = streamed.calibrate

        def holding(dense, *args, **kwargs):
            held.append({k: v.clone() for k, v in load_file(f"{folder}/model.safetensors").items()})
            return calibrate(dense, *args, **kwargs)

        streamed.calibrate = holding
    result = streamed.compress_streamed(
        folder, resolve_profile("pi-zero-2w"), data.load(data_path), out, weight_budget=int(budget), calib_samples=2,
        calib_len=32, candidates=[Candidate(0.0, "unstructured", 4), Candidate(0.5, "unstructured", 4)], progress=False)
    print(json.dumps({"peak_mb": result.peak_mb, "weight_bytes": result.policy.weight_bytes}))
""")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A seeded random Llama of 24 layers, 144 MiB in fp32: one layer (6 MiB) is small beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("wide")
    tokenizer = models.byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=384, num_hidden_layers=24, num_attention_heads=6,
                         num_key_value_heads=2, intermediate_size=1024, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    dense_bytes = luc.stored_nbytes(model)
    return _save(model, tokenizer, root / "dense"), _dataset(root), dense_bytes


@pytest.mark.parametrize("hold_dense", [False, True], ids=["streamed", "control-holding-the-dense-weights"])
def test_peak_memory_stays_below_the_dense_model_and_the_budget(wide, tmp_path, hold_dense):
    folder, data_path, dense_bytes = wide
    budget = int(0.6 * dense_bytes)
    args = [str(folder), str(data_path), str(tmp_path / "out"), str(budget), "1" if hold_dense else "0"]
    child = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})
    assert child.returncode == 0, child.stderr[-3000:]
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    peak = measured["peak_mb"] * MIB
    if hold_dense:  # the measurement sees a dense copy: the streamed assertions below would fail
        assert peak > dense_bytes
    else:
        assert measured["weight_bytes"] <= budget
        assert peak < budget < dense_bytes, f"peak {peak / MIB:.0f} MiB, budget {budget / MIB:.0f}, dense {dense_bytes / MIB:.0f}"


def _without(source, folder, key):
    """A copy of the dense folder whose weights lack `key`."""
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    with safe_open(str(source / "model.safetensors"), framework="pt") as file:
        save_file({k: file.get_tensor(k) for k in file.keys() if k != key}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("fault", ["no-config", "no-safetensors", "missing-tensor", "compressed"])
def test_a_bad_folder_is_named_with_the_fix(tiny, tmp_path, fault):
    root, source, dataset = tiny
    folder = tmp_path / "bad"
    if fault == "no-config":
        folder.mkdir()
        expected = r"bad/config\.json not found: give the folder of a dense Hugging Face model"
    elif fault == "no-safetensors":
        folder.mkdir()
        (folder / "config.json").write_bytes((source / "config.json").read_bytes())
        expected = r"bad holds no \*\.safetensors file .*save_pretrained\(folder, safe_serialization=True\)"
    elif fault == "missing-tensor":
        _without(source, folder, "model.layers.3.mlp.up_proj.weight")
        expected = r"bad/model\.safetensors lacks 1 tensor.*model\.layers\.3\.mlp\.up_proj\.weight.*save the dense model again"
    else:
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            (folder / name).write_bytes((source / name).read_bytes())
        (folder / POLICY_FILE).write_text("{}")
        expected = r"bad is a compressed model folder .* give the dense model's folder"
    with pytest.raises(EdgecoreError, match=expected):
        compress_streamed(folder, PROFILE, dataset, tmp_path / "out", weight_budget=10 * MIB, group_size=G,
                          calib_samples=2, calib_len=LENGTH, candidates=[Candidate(0.0, "unstructured", 8)], progress=False)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_holding_something_else_is_refused(tiny, tmp_path):
    _root, source, dataset = tiny
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("keep me")
    with pytest.raises(EdgecoreError, match="runs exists and is not a compressed model folder: choose a new output folder"):
        compress_streamed(source, PROFILE, dataset, tmp_path / "runs", weight_budget=10 * MIB)
    assert (tmp_path / "runs" / "notes.txt").read_text() == "keep me"
