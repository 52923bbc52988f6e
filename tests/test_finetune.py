import random

import pytest
import torch
from peft import PeftModel

from edgecore import EdgecoreError, models
from edgecore.data import Dataset, Sample
from edgecore.encoding import Encoder, collate
from edgecore.evaluate import evaluate
from edgecore.finetune import LoraSettings, TrainSettings, add_lora, train

TOPICS = ("business", "sport", "tech")
WORDS = {"business": "shares market profit bank", "sport": "match goal team coach", "tech": "phone software chip web"}


def topic_dataset(n=120, seed=0) -> Dataset:
    """Short texts whose words give their topic away: learnable in a few steps."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        topic = TOPICS[i % 3]
        words = WORDS[topic].split()
        samples.append(Sample(" ".join(rng.choice(words) for _ in range(12)), topic, topic))
    return Dataset("topics", samples[:90], samples[90:105], samples[105:], TOPICS, "Topic?")


def test_training_lowers_held_out_loss_and_lifts_accuracy():
    data = topic_dataset()
    model, tokenizer = models.load("tiny-5m", seed=0)
    encoder = Encoder(tokenizer, data, max_len=64)
    before = evaluate(model, encoder, data.test, progress=False)
    model = add_lora(model, LoraSettings(r=8, targets=("q_proj", "v_proj", "o_proj")))
    report = train(model, encoder, data.train, TrainSettings(steps=40, batch_size=8, seq_len=64, lr=3e-3, precision="fp32"), progress=False)
    after = evaluate(model, encoder, data.test, progress=False)
    assert after["loss"] < before["loss"] - 1.0
    assert report.final_loss < report.steps[0].loss
    assert after["accuracy"] >= 0.8  # chance is 1/3
    assert len(report.steps) == 40 and report.peak_rss_mb > 0


def test_only_adapters_train():
    model, tokenizer = models.load("tiny-micro")
    model = add_lora(model, LoraSettings())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    data = topic_dataset(30)
    train(model, Encoder(tokenizer, data, max_len=48), data.train, TrainSettings(steps=3, batch_size=4, seq_len=48), progress=False)
    params = dict(model.named_parameters())
    assert all("lora_" in n for n, p in params.items() if p.requires_grad)
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in lora_before.items())


def test_saved_adapter_loads_with_stock_peft(tmp_path):
    data = topic_dataset(30)
    model, tokenizer = models.load("tiny-micro", seed=3)
    encoder = Encoder(tokenizer, data, max_len=48)
    model = add_lora(model, LoraSettings())
    train(model, encoder, data.train, TrainSettings(steps=5, batch_size=4, seq_len=48, lr=1e-2), progress=False)
    model.save_pretrained(tmp_path)
    base, _ = models.load("tiny-micro", seed=3)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    batch = collate([encoder.encode(s) for s in data.train[:4]], tokenizer.pad_token_id)
    with torch.no_grad():
        mine = model.eval()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        theirs = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(mine, theirs, atol=1e-6)
    bare, _ = models.load("tiny-micro", seed=3)
    with torch.no_grad():
        untuned = bare(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not torch.allclose(mine, untuned, atol=1e-4)  # the adapter really changed something


def test_bf16_autocast_tracks_fp32():
    data = topic_dataset(40)
    losses = {}
    for precision in ("fp32", "bf16"):
        model, tokenizer = models.load("tiny-micro", seed=0)
        model = add_lora(model, LoraSettings())
        report = train(model, Encoder(tokenizer, data, max_len=48), data.train,
                       TrainSettings(steps=4, batch_size=4, seq_len=48, precision=precision), progress=False)
        losses[precision] = [s.loss for s in report.steps]
    assert losses["fp32"] == pytest.approx(losses["bf16"], rel=0.05)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps=0"), ({"lr": 0.0}, "learning rate"), ({"precision": "fp8"}, "precision 'fp8'"),
])
def test_bad_train_settings_are_refused(kwargs, message):
    with pytest.raises(EdgecoreError, match=message):
        TrainSettings(**kwargs)


def test_bad_lora_settings_are_refused():
    with pytest.raises(EdgecoreError, match="rank"):
        LoraSettings(r=0)
    model, _ = models.load("tiny-micro")
    with pytest.raises(EdgecoreError, match="not in this model"):
        add_lora(model, LoraSettings(targets=("query_key_value",)))


def test_empty_training_set_is_refused():
    model, tokenizer = models.load("tiny-micro")
    model = add_lora(model, LoraSettings())
    data = topic_dataset(9)
    with pytest.raises(EdgecoreError, match="no training samples"):
        train(model, Encoder(tokenizer, data), [], TrainSettings(steps=1), progress=False)
