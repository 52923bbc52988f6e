import numpy as np
import torch

from edgecore import models
from edgecore.data import Dataset, Sample
from edgecore.encoding import Encoder, collate
from edgecore.luc.sensitivity import Candidate, measure

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun " * 3


def _batches(tokenizer, n=2):
    data = Dataset("lm", [], [], [], None)
    encoder = Encoder(tokenizer, data, max_len=48)
    samples = [Sample("", TEXT[i * 7 :], "") for i in range(4 * n)]
    return [collate([encoder.encode(s) for s in samples[i * 4 : (i + 1) * 4]], tokenizer.pad_token_id) for i in range(n)]


def test_sensitivity_is_zero_for_dense_and_grows_with_compression():
    model, tokenizer = models.load("tiny-5m", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    candidates = [Candidate(), Candidate(bits=8), Candidate(bits=2), Candidate(0.75, bits=32), Candidate(0.5, "2:4", 4)]
    table, calib, seconds = measure(model, _batches(tokenizer), candidates, group_size=32, progress=False)
    assert table.shape == (6, 5) and seconds > 0
    assert np.all(table[:, 0] == 0) and np.all(table >= -1e-7)
    assert np.all(table[:, 2] > table[:, 1])  # 2 bits hurts more than 8 bits, in every layer
    assert table[:, 3].mean() > table[:, 1].mean()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # measuring leaves the model as it was
    assert calib.act_norm(0, "self_attn.q_proj").shape == (256,)
