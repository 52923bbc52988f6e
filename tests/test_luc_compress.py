"""LUC end to end on tiny models: policy, real compression, memory as promised, save and reload."""

import json

import numpy as np
import pytest
import torch

from edgecore import models
from edgecore.cli import main as cli
from edgecore.data import Dataset, Sample
from edgecore.encoding import Encoder, collate
from edgecore.errors import EdgecoreError
from edgecore.finetune import LoraSettings, add_lora
from edgecore import lm
from edgecore import luc
from edgecore.luc.layer import CompressedLinear
from edgecore.luc import Calibration, Candidate, measure, policy_kl
from edgecore.luc.pipeline import weight_budget_bytes
from edgecore.memory import MIB, ModelShape
from edgecore.profiles import resolve_profile

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun " * 3
GRID = [Candidate(s, "unstructured", b) for s in (0.0, 0.5) for b in (2, 4, 8)] + [Candidate(0.5, "2:4", 4)]
G = 32


def _batches(tokenizer):
    encoder = Encoder(tokenizer, Dataset("lm", [], [], [], None), max_len=48)
    samples = [Sample("", TEXT[i * 5 : 60 + i * 9], "") for i in range(8)]
    return [collate([encoder.encode(s) for s in samples[:4]], tokenizer.pad_token_id),
            collate([encoder.encode(s) for s in samples[4:]], tokenizer.pad_token_id)]


@pytest.fixture(scope="module")
def measured():
    model, tokenizer = models.load("tiny-5m", seed=0)
    calib = Calibration(model, _batches(tokenizer))
    table = measure(calib, GRID, group_size=G, progress=False)
    embedding_kl = luc.embedding_sensitivity(calib, [32, 8, 4], G)
    return model, tokenizer, calib, table, embedding_kl


def test_policy_fits_the_budget_and_beats_uniform_on_predicted_sensitivity(measured):
    model, _tok, _calib, table, embedding_kl = measured
    shape = ModelShape.from_config(model.config)
    uniform = luc.uniform_policy("tiny-5m", shape, Candidate(0.5, "unstructured", 4), 8, G, table, embedding_kl)
    chosen = luc.choose_policy(shape, table.candidates, table.kl, embedding_kl, uniform.weight_bytes, group_size=G, model="tiny-5m")
    assert chosen.weight_bytes <= uniform.weight_bytes
    assert chosen.total_sensitivity <= uniform.total_sensitivity + 1e-12
    assert embedding_kl[32] == 0 and embedding_kl[4] > embedding_kl[8] > 0
    assert chosen.to_dict() == luc.Policy.from_dict(json.loads(json.dumps(chosen.to_dict()))).to_dict()


def test_infeasible_budget_names_the_smallest_budget(measured):
    model, _tok, _calib, table, embedding_kl = measured
    shape = ModelShape.from_config(model.config)
    smallest = luc.policy_nbytes(shape, [Candidate(0.5, "unstructured", 2)] * shape.layers, 4, G)
    with pytest.raises(EdgecoreError, match=f"smallest budget that fits is {smallest / MIB:.1f} MB"):
        luc.choose_policy(shape, table.candidates, table.kl, embedding_kl, smallest - 1, group_size=G, model="tiny-5m")
    chosen = luc.choose_policy(shape, table.candidates, table.kl, embedding_kl, smallest, group_size=G, model="tiny-5m")
    assert chosen.weight_bytes == smallest


def test_compressed_model_holds_exactly_the_promised_bytes_and_reloads(measured, tmp_path):
    model, tokenizer, calib, table, embedding_kl = measured
    shape = ModelShape.from_config(model.config)
    budget = int(0.3 * luc.stored_nbytes(model))
    policy = luc.choose_policy(shape, table.candidates, table.kl, embedding_kl, budget, group_size=G, model="tiny-5m")
    compressed = _copy(model)
    luc.apply_policy(compressed, policy, calib)
    assert luc.stored_nbytes(compressed) == policy.weight_bytes <= budget  # the issue asks for 5%; it is exact
    assert any(isinstance(m, CompressedLinear) for m in compressed.modules())
    folder = luc.save_compressed(tmp_path / "c", compressed, tokenizer, policy)
    reloaded, tok2, policy2 = luc.load_compressed(folder)
    assert policy2 == policy and luc.stored_nbytes(reloaded) == policy.weight_bytes
    batch = _batches(tokenizer)[0]
    with torch.no_grad():
        a = lm.head(compressed, lm.hidden_states(compressed, batch))
        b = lm.head(reloaded, lm.hidden_states(reloaded, batch))
    assert torch.equal(a, b)
    assert tok2("hello")["input_ids"] == tokenizer("hello")["input_ids"]


def test_lora_trains_on_a_reloaded_compressed_model(measured, tmp_path):
    model, tokenizer, calib, table, embedding_kl = measured
    shape = ModelShape.from_config(model.config)
    policy = luc.choose_policy(shape, table.candidates, table.kl, embedding_kl, int(0.3 * luc.stored_nbytes(model)), group_size=G,
                               model="tiny-5m")
    compressed = _copy(model)
    luc.apply_policy(compressed, policy, calib)
    reloaded, _tok, _ = luc.load_compressed(luc.save_compressed(tmp_path / "c", compressed, tokenizer, policy))
    peft_model = add_lora(reloaded, LoraSettings(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj")))
    batch = _batches(tokenizer)[0]
    loss = lm.token_loss(peft_model, lm.hidden_states(peft_model, batch), batch)
    loss.backward()
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for n, p in trainable.items() if "lora_B" in n)


def test_dense_embedding_policy_keeps_the_tie_through_save_and_load(measured, tmp_path):
    model, tokenizer, calib, _table, _kl = measured
    shape = ModelShape.from_config(model.config)
    policy = luc.uniform_policy("tiny-5m", shape, Candidate(0.0, "unstructured", 8), 32, G)
    compressed = _copy(model)
    luc.apply_policy(compressed, policy, calib)
    assert luc.stored_nbytes(compressed) == policy.weight_bytes
    reloaded, _tok, _ = luc.load_compressed(luc.save_compressed(tmp_path / "d", compressed, tokenizer, policy))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert luc.stored_nbytes(reloaded) == policy.weight_bytes


def test_weight_budget_is_the_profile_budget_minus_the_tuning_step():
    shape = models.shape("tiny-5m")
    profile = resolve_profile("pi-zero-2w")
    plan = luc.tuning_reserve_step(shape, batch=4, seq_len=128, window_layers=2)
    budget = weight_budget_bytes(profile, shape, plan)
    assert budget == int(profile.memory_budget_mb * MIB) - luc.tuning_reserve_bytes(shape, plan)
    deeper = luc.tuning_reserve_step(shape, batch=4, seq_len=128, window_layers=6)
    assert weight_budget_bytes(profile, shape, deeper) < budget
    with pytest.raises(EdgecoreError, match="tuning window of 7 layers must be in 1..6"):
        luc.tuning_reserve_step(shape, window_layers=7)


def test_cli_compress_writes_table_json_and_a_reloadable_folder(tmp_path, capsys):
    out, report = tmp_path / "model", tmp_path / "report.json"
    args = ["compress", "--model", "tiny-micro", "--device", "pi-zero-2w", "--data", "shakespeare",
            "--weight-budget-mb", "0.12", "--group-size", "16", "--calib-samples", "4", "--out", str(out),
            "--json", str(report), "--quiet", "--no-cache"]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "embed+head" in printed and "promised" in printed
    raw = json.loads(report.read_text())
    assert len(raw["layers"]) == 4 + 1 and raw["memory"]["measured_mb"] <= 0.12
    assert raw["memory"]["promised_mb"] == pytest.approx(raw["memory"]["measured_mb"])
    model, _tok, policy = luc.load_compressed(out)
    assert luc.stored_nbytes(model) == policy.weight_bytes
    # The same folder again is refused before any work; so is an infeasible budget, with the fix.
    assert cli(args) == 2 and "already holds a compressed model" in capsys.readouterr().err
    args[args.index("--out") + 1] = str(tmp_path / "other")
    args[args.index("--weight-budget-mb") + 1] = "0.01"
    assert cli(args) == 2 and "smallest budget that fits" in capsys.readouterr().err


def test_reload_refuses_a_folder_that_is_not_a_compressed_model(tmp_path):
    with pytest.raises(EdgecoreError, match="not a compressed model folder"):
        luc.load_compressed(tmp_path)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_measure_check_helpers_agree_with_packed_modules(measured):
    """policy_kl (weights swapped in) equals the KL of the really packed model when the table is dense."""
    model, _tok, calib, _table, _kl = measured
    shape = ModelShape.from_config(model.config)
    layers = tuple(GRID[(i * 3) % len(GRID)] for i in range(shape.layers))
    policy = luc.Policy("tiny-5m", G, layers, 32, luc.policy_nbytes(shape, layers, 32, G))
    compressed = _copy(model)
    luc.apply_policy(compressed, policy, calib)
    assert calib.kl_full(compressed) == pytest.approx(policy_kl(calib, layers, G), rel=1e-4, abs=1e-8)
    assert np.isfinite(calib.kl_full(compressed))


def test_compress_verb_on_a_held_model_is_search_then_apply(measured):
    """`luc.compress_(model, LucConfig, batches)`: in place, the policy choose_policy picks from the same scores."""
    model, tokenizer, _calib, table, embedding_kl = measured
    shape = ModelShape.from_config(model.config)
    budget = int(0.3 * luc.stored_nbytes(model))
    config = luc.LucConfig(tuple(GRID), (4, 8, 32), budget, group_size=G)
    assert config.embedding_bits == (32, 8, 4)
    expected = luc.choose_policy(shape, table.candidates, table.kl, embedding_kl, budget, group_size=G, model="tiny-5m")
    compressed = _copy(model)
    policy = luc.compress_(compressed, config, _batches(tokenizer), model_id="tiny-5m", profile="test")
    assert (policy.layers, policy.embedding_bits, policy.weight_bytes) == (expected.layers, expected.embedding_bits, expected.weight_bytes)
    assert policy.profile == "test" and np.allclose(policy.sensitivity, expected.sensitivity, rtol=1e-6)
    assert luc.stored_nbytes(compressed) == policy.weight_bytes <= budget
    with pytest.raises(EdgecoreError, match=r"candidates \['25% / 4b'\] are not allowed by this config"):
        config.allowing([Candidate(0.25, "unstructured", 4)])
    with pytest.raises(EdgecoreError, match="must be positive"):
        luc.LucConfig(tuple(GRID), (8,), 0)


def test_choose_policy_takes_any_scores(measured):
    model, _tok, _calib, table, _kl = measured
    shape = ModelShape.from_config(model.config)
    budget = int(0.3 * luc.stored_nbytes(model))
    scores = np.zeros((shape.layers, len(GRID)))
    scores[:, GRID.index(Candidate(0.0, "unstructured", 8))] = -1.0  # prefer 8 bits wherever it fits
    policy = luc.choose_policy(shape, GRID, scores, {8: 0.0}, budget, group_size=G)
    assert policy.embedding_bits == 8 and policy.weight_bytes <= budget
    assert policy.total_sensitivity == -sum(c == Candidate(0.0, "unstructured", 8) for c in policy.layers)
    with pytest.raises(EdgecoreError, match="scores are"):
        luc.choose_policy(shape, GRID, scores[:, :2], {8: 0.0}, budget, group_size=G)


def test_one_spelling_of_a_candidate_and_old_policy_files_still_read(tmp_path):
    assert Candidate().is_dense and Candidate().bits == luc.FP32_BITS == 32
    assert Candidate(0.5, "2:4", 4) == Candidate.n_m("2:4", 4) == Candidate(0.0, " 2:4 ", 4)
    assert Candidate.n_m("2:4", 4).spec == luc.NMPattern(2, 4) and Candidate(0.5, bits=4).spec == 0.5
    with pytest.raises(EdgecoreError, match="does not match"):
        Candidate(0.25, "2:4", 4)
    # policy.json keeps its spelling; the older "dense" pattern and null bits read as today's.
    assert Candidate(0.5, "2:4", 4).to_dict() == {"sparsity": 0.5, "pattern": "2:4", "bits": 4}
    assert Candidate.from_dict({"sparsity": 0.0, "pattern": "dense", "bits": None}) == Candidate()
    old = {"model": "tiny-5m", "group_size": 32, "embedding_bits": 32, "weight_bytes": 1, "budget_bytes": None,
           "kind": "uniform", "sensitivity": [], "embedding_sensitivity": 0.0, "profile": "", "notes": {},
           "layers": [{"sparsity": 0.0, "pattern": "unstructured", "bits": 32}, {"sparsity": 0.5, "pattern": "2:4", "bits": 4}]}
    (tmp_path / "policy.json").write_text(json.dumps(old))
    policy = luc.read_policy(tmp_path)
    assert policy.layers == (Candidate(), Candidate(0.5, "2:4", 4))
    assert json.loads(json.dumps(policy.to_dict())) == old  # written back the same
