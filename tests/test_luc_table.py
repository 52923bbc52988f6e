"""Compressed embedding table and LM head: storage, row/block reads, whole models, reload, LoRA."""

import pytest
import torch
from transformers import LlamaForCausalLM

from edgecore import lm, models
from edgecore.encoding import IGNORE, Encoded, collate
from edgecore.errors import EdgecoreError
from edgecore.finetune import LoraSettings, add_lora
from edgecore.luc import table as table_module
from edgecore.luc.storage import STORAGE_BITS
from edgecore.luc.table import (
    QuantizedEmbedding,
    QuantizedHead,
    QuantizedTable,
    TableLayout,
    compress_embeddings,
    empty_embeddings,
    table_nbytes,
)

ROWS, DIM, GROUP = 37, 64, 16  # 37 rows: prime, so no chunk size but 1 and 37 divides it
MICRO_GROUP = 16  # tiny-micro's hidden size is 48, which 64 does not divide


def _weight(rows=ROWS, dim=DIM, seed=0):
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)) * 0.05


def _model_nbytes(model) -> int:
    # parameters() and buffers() skip repeats, so a tied weight counts once.
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture
def unpack_sizes(monkeypatch):
    """The sizes (codes) the table module unpacks: proof that no read rebuilds the full table."""
    sizes = []
    real = table_module.unpack

    def spy(packed, bits, numel):
        sizes.append(numel)
        return real(packed, bits, numel)

    monkeypatch.setattr(table_module, "unpack", spy)
    return sizes


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("bits", STORAGE_BITS)
def test_layout_prices_exactly_what_the_table_holds(bits):
    table = QuantizedTable.from_weight(_weight(), bits, GROUP)
    layout = TableLayout(ROWS, DIM, bits, GROUP)
    numel = ROWS * DIM
    expected = {32: numel * 4, 16: numel * 2}.get(bits) or numel * bits // 8 + 2 * 2 * numel // GROUP
    assert table.nbytes() == layout.nbytes == table_nbytes(ROWS, DIM, bits, GROUP) == expected
    assert QuantizedTable(layout).nbytes() == expected
    for name, spec in layout.buffers().items():
        buffer = getattr(table, name)
        assert (buffer is None) if spec is None else (tuple(buffer.shape), buffer.dtype) == spec


def test_layout_rejects_bad_arguments():
    with pytest.raises(EdgecoreError, match=r"group_size=64 does not divide the table's dim=48.*group_size=48"):
        TableLayout(10, 48, 4, 64)
    with pytest.raises(EdgecoreError, match=r"group_size=24"):
        TableLayout(10, 48, 3, 30)  # 3-bit rows need multiples of 8 codes: 24, not 30
    with pytest.raises(EdgecoreError, match=r"dim=50.*use bits \[4, 8\]"):
        TableLayout(10, 50, 3, 25)
    with pytest.raises(EdgecoreError, match="bits=5 is not supported"):
        TableLayout(10, 64, 5)
    with pytest.raises(EdgecoreError, match="group_size=0"):
        TableLayout(10, 64, 8, 0)
    with pytest.raises(EdgecoreError, match="rows=0"):
        table_nbytes(0, 64, 8)
    TableLayout(10, 48, 16, 64)  # float storage has no groups: any group_size is fine
    with pytest.raises(EdgecoreError, match="2-D float weight"):
        QuantizedTable.from_weight(torch.zeros(64), 8)
    with pytest.raises(EdgecoreError, match="fp16 range"):
        QuantizedTable.from_weight(torch.full((2, 64), 1e5), 16)
    with pytest.raises(EdgecoreError, match="integer"):
        QuantizedTable.from_weight(_weight(), 8, GROUP).rows(torch.zeros(3))


# ---------------------------------------------------------------- reading rows and blocks


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_rows_are_exact_slices_of_the_dense_table(bits, unpack_sizes):
    table = QuantizedTable.from_weight(_weight(), bits, GROUP)
    ids = torch.tensor([[0, 36, 5], [5, 17, 1]])
    got = table.rows(ids)
    assert got.shape == (2, 3, DIM) and got.dtype == torch.float32
    assert max(unpack_sizes) == ids.numel() * DIM  # only the six rows asked for were unpacked
    assert torch.equal(got, table.dense()[ids])  # dense() is quant.dequantize of the whole stream
    assert torch.equal(table.rows(ids, torch.float16), table.dense()[ids].half())


@pytest.mark.parametrize("bits", [8, 4])
def test_rows_are_within_half_a_step_of_the_original(bits):
    weight = _weight()
    table = QuantizedTable.from_weight(weight, bits, GROUP)
    ids = torch.arange(ROWS).flip(0)
    err = (table.rows(ids) - weight[ids]).abs().view(ROWS, -1, GROUP).amax(dim=2)
    scale = table.scale.float().view(ROWS, -1)[ids]
    zero = table.zero.float().view(ROWS, -1)[ids]
    # Half a step, plus the fp16 rounding (2**-11 relative) of the stored zero and of the top
    # level qmax * scale, which can push a value at a group's edge out by that much.
    slack = 2**-11 * (zero.abs() + (2**bits - 1) * scale) + 1e-7
    assert torch.all(err <= scale / 2 + slack)
    assert torch.all(err.amax(dim=1) > 0)  # really quantized


@pytest.mark.parametrize("bits", STORAGE_BITS)
def test_matmul_t_matches_the_dense_product_in_any_chunking(bits, unpack_sizes):
    table = QuantizedTable.from_weight(_weight(), bits, GROUP)
    dense = table.dense()
    x = torch.randn(2, 3, DIM, generator=torch.Generator().manual_seed(1))
    reference = x @ dense.T
    whole = table.matmul_t(x)
    assert whole.shape == (2, 3, ROWS)
    torch.testing.assert_close(whole, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    unpack_sizes.clear()
    chunked = table.matmul_t(x, torch.float32, chunk_rows=5)  # 5 does not divide 37: a short last block
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6 * float(reference.abs().max()))
    if table.layout.quantized:
        assert max(unpack_sizes) == 5 * DIM  # never more than one block of rows at a time


def test_matmul_t_backward_gives_the_dense_gradient_block_by_block(unpack_sizes):
    table = QuantizedTable.from_weight(_weight(), 4, GROUP)
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(4, DIM, generator=gen), torch.randn(4, ROWS, generator=gen)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    unpack_sizes.clear()
    (table.matmul_t(x1, chunk_rows=8) * g).sum().backward()
    assert max(unpack_sizes) == 8 * DIM
    (x2 @ table.dense().T * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert not any(b.requires_grad for b in table.buffers())


# ---------------------------------------------------------------- whole models


def _ids(vocab, shape=(2, 12), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_compress_tied_model_shares_one_table_and_keeps_the_logits():
    model, _ = models.load("tiny-micro", seed=0)
    original, _ = models.load("tiny-micro", seed=0)
    vocab, dim = model.config.vocab_size, model.config.hidden_size
    ids = _ids(vocab)
    before = _model_nbytes(model)
    compress_embeddings(model, 8, MICRO_GROUP)

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, QuantizedEmbedding) and isinstance(head, QuantizedHead)
    assert head.table is emb.table and head.tied
    assert (emb.num_embeddings, emb.embedding_dim, emb.padding_idx) == (vocab, dim, None)
    assert (head.in_features, head.out_features) == (dim, vocab)
    keys = [k for k in model.state_dict() if "embed" in k or "lm_head" in k]
    assert keys == ["model.embed_tokens.table.qweight", "model.embed_tokens.table.scale", "model.embed_tokens.table.zero"]
    assert before - _model_nbytes(model) == vocab * dim * 4 - table_nbytes(vocab, dim, 8, MICRO_GROUP)

    logits = model(ids).logits
    # The compressed modules compute what a dense model holding the dequantized table computes.
    dequantized, _ = models.load("tiny-micro", seed=0)
    dequantized.get_input_embeddings().weight.copy_(emb.table.dense())  # tied: the head sees it too
    expected = dequantized(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    # Against the original: every weight moved by at most half an 8-bit step, range/510 or about
    # 0.7% of a 16-value Gaussian group's spread, so logits move by a similar fraction of their
    # spread (measured ~2% of their std after 4 layers). A tenth of the std leaves ~5x headroom,
    # while a wrong row, a lost tie (zero head) or 2-bit storage moves them by more.
    reference = original(ids).logits
    assert float((logits - reference).abs().max()) < 0.1 * float(reference.std())


@torch.no_grad()
def test_lm_helpers_run_on_compressed_embeddings_within_the_head_bound():
    model, tokenizer = models.load("tiny-micro", seed=0)
    weight = model.get_input_embeddings().weight.clone()
    compress_embeddings(model, 4, MICRO_GROUP)
    batch = _batch(tokenizer, model.config.vocab_size)
    hidden = lm.hidden_states(model, batch)
    logits = lm.head(model, hidden)
    assert logits.shape == (*hidden.shape[:2], model.config.vocab_size)
    # Exact bound for the head alone: |h . (w_q - w)| <= ||h||_1 * max|w_q - w| (+ fp32 noise).
    max_err = float((model.get_output_embeddings().table.dense() - weight).abs().max())
    bound = hidden.abs().sum(-1, keepdim=True) * max_err * (1 + 1e-4) + 1e-6
    assert torch.all((logits - hidden @ weight.T).abs() <= bound)
    assert torch.isfinite(lm.token_loss(model, hidden, batch))


def _batch(tokenizer, vocab):
    ids = _ids(vocab, (2, 10), seed=3).tolist()
    encoded = [Encoded(row, [IGNORE] * 4 + row[4:], answer_at=3, choice=None) for row in ids]
    return collate(encoded, tokenizer.pad_token_id)


def _fresh(config, device):
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.eval()


@pytest.mark.parametrize("bits", [32, 16, 3])
@torch.no_grad()
def test_state_dict_reloads_into_a_meta_model(bits):
    model, _ = models.load("tiny-micro", seed=0)
    compress_embeddings(model, bits, MICRO_GROUP)
    saved = model.state_dict()
    ids = _ids(model.config.vocab_size)

    fresh = _fresh(model.config, "meta")
    empty_embeddings(fresh, bits, MICRO_GROUP, tied=True)
    fresh.load_state_dict(saved, assign=True)  # strict: no missing or unexpected keys
    # Non-persistent buffers are not in a state dict: the rotary frequencies stay on meta.
    fresh.model.rotary_emb = type(fresh.model.rotary_emb)(fresh.config)
    assert not any(t.is_meta for t in [*fresh.parameters(), *fresh.buffers()])
    assert fresh.get_output_embeddings().table is fresh.get_input_embeddings().table
    assert torch.equal(fresh(ids).logits, model(ids).logits)

    # Into a materialised model of another seed: load_state_dict copies the table in.
    other, _ = models.load("tiny-micro", seed=1)
    empty_embeddings(other, bits, MICRO_GROUP, tied=True)
    other.load_state_dict(saved)
    assert torch.equal(other(ids).logits, model(ids).logits)


def test_state_dict_of_other_bits_is_refused():
    model, _ = models.load("tiny-micro", seed=0)
    compress_embeddings(model, 16, MICRO_GROUP)  # fp16 values: as long as the fp32 stream of bits=32
    other, _ = models.load("tiny-micro", seed=0)
    empty_embeddings(other, 32, MICRO_GROUP, tied=True)
    with pytest.raises(EdgecoreError, match="embed_tokens.table.qweight is torch.float16 in the state dict"):
        other.load_state_dict(model.state_dict())
    with pytest.raises(EdgecoreError, match="compressed already"):
        compress_embeddings(model, 8, MICRO_GROUP)


@torch.no_grad()
def test_untied_model_gets_two_tables_and_reloads():
    tiny, _ = models.load("tiny-micro", seed=0)
    config = tiny.config
    config.tie_word_embeddings = False
    model = _fresh(config, "cpu")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    ids = _ids(config.vocab_size)
    head_weight = model.lm_head.weight.detach().clone()
    compress_embeddings(model, 4, MICRO_GROUP)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.table is not emb.table and not head.tied
    assert torch.equal(head.table.dense(), QuantizedTable.from_weight(head_weight, 4, MICRO_GROUP).dense())
    saved = model.state_dict()
    assert "lm_head.table.qweight" in saved and "model.embed_tokens.table.qweight" in saved

    fresh = _fresh(config, "meta")
    empty_embeddings(fresh, 4, MICRO_GROUP, tied=False)
    fresh.load_state_dict(saved, assign=True)
    fresh.model.rotary_emb = type(fresh.model.rotary_emb)(fresh.config)
    assert torch.equal(fresh(ids).logits, model(ids).logits)


# ---------------------------------------------------------------- LoRA on top


def test_lora_trains_over_compressed_embeddings():
    model, tokenizer = models.load("tiny-micro", seed=0)
    compress_embeddings(model, 8, MICRO_GROUP)
    peft_model = add_lora(model, LoraSettings(r=4, dropout=0.0, targets=("q_proj", "v_proj")))
    table = peft_model.get_input_embeddings().table
    stored = {name: b.clone() for name, b in table.named_buffers()}
    assert sum(k.endswith("table.qweight") for k in peft_model.state_dict()) == 1
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora_b = {n: p.detach().clone() for n, p in trainable.items() if "lora_B" in n}

    batch = _batch(tokenizer, model.config.vocab_size)
    peft_model.train()
    loss = lm.token_loss(peft_model, lm.hidden_states(peft_model, batch), batch)
    loss.backward()
    # lora_B starts at zero, so only its gradient is non-zero; it needs the head's backward pass.
    assert all(p.grad is not None for p in trainable.values())
    assert all(float(trainable[n].grad.abs().sum()) > 0 for n in lora_b)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if n not in trainable)
    torch.optim.AdamW(trainable.values(), lr=1e-2).step()
    assert all(not torch.equal(trainable[n], before) for n, before in lora_b.items())
    assert all(torch.equal(b, stored[name]) for name, b in table.named_buffers())
