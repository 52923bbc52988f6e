import numpy as np
import torch

from edgecore import models
from edgecore.data import Dataset, Sample
from edgecore.encoding import Encoder, collate
from edgecore.luc import Calibration, Candidate, SensitivityCache, measure
from edgecore.luc.sensitivity import measure_cached

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun " * 3


def _batches(tokenizer, n=2):
    data = Dataset("lm", [], [], [], None)
    encoder = Encoder(tokenizer, data, max_len=48)
    # Samples of different lengths, so batches carry padding.
    samples = [Sample("", TEXT[i * 7 : 40 + i * 11], "") for i in range(4 * n)]
    return [collate([encoder.encode(s) for s in samples[i * 4 : (i + 1) * 4]], tokenizer.pad_token_id) for i in range(n)]


CANDIDATES = [Candidate(), Candidate(bits=8), Candidate(bits=2), Candidate(0.75, bits=32), Candidate(0.5, "2:4", 4)]


def test_sensitivity_is_zero_for_dense_and_grows_with_compression():
    model, tokenizer = models.load("tiny-5m", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = Calibration(model, _batches(tokenizer))
    table = measure(calib, CANDIDATES, group_size=32, progress=False)
    assert table.kl.shape == (6, 5) and table.output_mse.shape == (6, 5) and table.seconds > 0
    assert np.all(table.kl[:, 0] == 0) and np.all(table.kl >= -1e-7) and np.all(table.output_mse[:, 0] == 0)
    assert np.all(table.kl[:, 2] > table.kl[:, 1])  # 2 bits hurts more than 8 bits, in every layer
    assert np.all(table.output_mse[:, 2] > table.output_mse[:, 1])
    assert table.kl[:, 3].mean() > table.kl[:, 1].mean()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # measuring leaves the model as it was
    assert calib.act_norm(0, "self_attn.q_proj").shape == (256,)


def test_activation_stats_skip_padding_and_kl_positions_are_real_tokens():
    model, tokenizer = models.load("tiny-micro", seed=0)
    batches = _batches(tokenizer)
    assert any(bool((b.attention_mask == 0).any()) for b in batches)
    calib = Calibration(model, batches, kl_tokens=10)
    real = sum(int(b.attention_mask.sum()) for b in batches)
    assert calib.stats[(0, "self_attn.q_proj")].tokens == real == calib.tokens
    assert 10 <= sum(len(p) for p in calib.positions) <= 12
    for batch, positions in zip(batches, calib.positions):
        assert bool(batch.attention_mask.reshape(-1)[positions].all())
    assert calib.kl_full() < 1e-9 and calib.kl_from(0)[0] < 1e-9  # the dense model against itself


def test_cache_returns_the_same_table_and_misses_on_other_data(tmp_path):
    model, tokenizer = models.load("tiny-micro", seed=0)
    batches = _batches(tokenizer)
    cache = SensitivityCache(tmp_path)
    first, hit = measure_cached(Calibration(model, batches), CANDIDATES, model_id="tiny-micro", cache=cache,
                                group_size=16, progress=False)
    assert not hit and len(list(tmp_path.glob("*.json"))) == 1
    again, hit = measure_cached(Calibration(model, batches), CANDIDATES[::-1], model_id="tiny-micro", cache=cache,
                                group_size=16, progress=False)
    assert hit and np.array_equal(again.kl, first.kl[:, ::-1])
    _, hit = measure_cached(Calibration(model, batches[:1]), CANDIDATES, model_id="tiny-micro", cache=cache,
                            group_size=16, progress=False)
    assert not hit
