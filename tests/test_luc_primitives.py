"""LUC primitives: packed quantization, Wanda masks, CompressedLinear (also under PEFT LoRA)."""

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from torch import nn

from edgecore import models
from edgecore.errors import EdgecoreError
from edgecore.finetune import LoraSettings, add_lora
from edgecore.luc import (
    ActivationStats,
    CompressedLinear,
    NMPattern,
    activation_norms,
    expected_nbytes,
    keep_mask,
    kept_per_row,
    n_m_mask,
    pack,
    packed_nbytes,
    parse_n_m,
    parse_pattern,
    quantize,
    register_peft,
    unpack,
    unstructured_mask,
    wanda_scores,
)
from edgecore.luc.quant import quantized_nbytes

# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("numel", [0, 1, 5, 8, 9, 23, 1001])
def test_pack_round_trips_exactly(bits, numel):
    gen = torch.Generator().manual_seed(numel * 10 + bits)
    codes = torch.randint(0, 2**bits, (numel,), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(numel, bits) == math.ceil(numel * bits / 8 / (3 if bits == 3 else 1)) * (
        3 if bits == 3 else 1
    )
    assert torch.equal(unpack(packed, bits, numel), codes)


def test_pack_keeps_shape_agnostic_row_major_order():
    codes = torch.randint(0, 8, (7, 13), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, 3), 3, codes.numel()), codes.reshape(-1))


def test_pack_is_really_dense():
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack(torch.tensor([0, 1, 2, 3], dtype=torch.uint8), 2).tolist() == [0b11100100]
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b10000001]
    # eight 3-bit codes of 7 fill exactly three bytes
    assert pack(torch.full((8,), 7, dtype=torch.uint8), 3).tolist() == [255, 255, 255]
    assert packed_nbytes(600_000, 3) == 225_000 and packed_nbytes(600_000, 2) == 150_000


def test_pack_rejects_bad_arguments():
    with pytest.raises(EdgecoreError, match="5-bit"):
        pack(torch.zeros(4, dtype=torch.uint8), 5)
    with pytest.raises(EdgecoreError, match="code of 16 does not fit in 4 bits"):
        pack(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(EdgecoreError, match="uint8"):
        pack(torch.zeros(4, dtype=torch.int64), 4)
    with pytest.raises(EdgecoreError, match="expected a 1-D uint8 tensor of 2 bytes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 4)


# ---------------------------------------------------------------- quantization


def _group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row-major stream in groups, the tail padded with its own last value (no change to min/max)."""
    flat = x.reshape(-1)
    pad = -flat.numel() % group_size
    return torch.cat([flat, flat[-1].expand(pad)]).view(-1, group_size)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape, group_size", [((96, 256), 64), ((40, 96), 32), ((24, 128), 128), ((1000,), 64)])
def test_quantization_error_is_within_half_a_step(bits, shape, group_size):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(shape, generator=gen) * 0.05 + torch.randn(shape[-1], generator=gen) * 0.01
    q = quantize(x, bits, group_size)
    restored = q.dequantize()
    assert restored.shape == x.shape and restored.dtype == torch.float32
    err = _group_view((restored - x).abs(), group_size).amax(dim=1)
    scale = q.scale.float()
    # Beyond half a step only the fp16 rounding of the zero (the group minimum) and fp32
    # arithmetic noise are allowed: codes are computed from the stored fp16 scale and zero.
    groups = _group_view(x, group_size)
    fp16_term = (q.zero.float() - groups.amin(dim=1)).abs() + groups.abs().amax(dim=1) * 2**-20
    assert torch.all(err <= scale / 2 + fp16_term)
    # the scale is the group's range over 2**bits - 1 steps (up to fp16 rounding)
    exact = (groups.amax(dim=1) - groups.amin(dim=1)) / (2**bits - 1)
    assert torch.allclose(scale, exact, rtol=2e-3)
    assert q.scale.dtype == q.zero.dtype == torch.float16
    # at most 2**bits distinct values per group: it really is quantized
    assert all(len(torch.unique(g)) <= 2**bits for g in _group_view(restored, group_size)[:8])


def test_dequantize_rounds_the_same_values_in_every_dtype():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    q = quantize(x, 4, 32)
    assert torch.equal(q.dequantize(torch.float16), q.dequantize().half())
    assert torch.equal(q.dequantize(torch.bfloat16), q.dequantize().bfloat16())


def test_constant_groups_are_exact_and_finite():
    # 0.1 is not an fp16 number: its stored zero differs a little from the values themselves
    x = torch.cat([torch.zeros(64), torch.full((64,), 0.125), torch.full((64,), 0.1), torch.linspace(-1, 1, 64)])
    q = quantize(x, 2, 64)
    restored = q.dequantize()
    assert torch.isfinite(restored).all()
    assert torch.equal(restored[:128], x[:128])
    assert torch.equal(restored[128:192], torch.full((64,), 0.1).half().float())
    assert q.scale[:3].tolist() == [0, 0, 0]
    assert not unpack(q.packed, 2, x.numel())[:192].any()  # a constant group is all code 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantized_storage_really_shrinks(bits):
    w = torch.randn(576, 1536, generator=torch.Generator().manual_seed(0)) * 0.02
    q = quantize(w, bits, 64)
    groups = w.numel() // 64
    assert q.nbytes == w.numel() * bits // 8 + 2 * 2 * groups == quantized_nbytes(w.numel(), bits, 64)
    assert q.packed.numel() == w.numel() * bits // 8
    fp32 = w.numel() * 4
    if bits == 4:
        assert fp32 / 8 < q.nbytes < fp32 / 7  # 1/8 of fp32 plus 4 bytes of scale and zero per 64 weights


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 5}, "5 bits: bits must be one of"),
    ({"bits": 16}, "16 bits"),
    ({"group_size": 0}, "group_size=0"),
    ({"values": torch.zeros(2, 2, 2)}, "1-D or 2-D float"),
    ({"values": torch.zeros(4, dtype=torch.int32)}, "1-D or 2-D float"),
    ({"values": torch.tensor([1.0, float("nan")])}, "finite"),
    ({"values": torch.tensor([1.0, 1e6])}, "fp16 range"),
])
def test_quantize_rejects_bad_arguments(kwargs, message):
    args = {"values": torch.zeros(64), "bits": 4, "group_size": 64} | kwargs
    with pytest.raises(EdgecoreError, match=message):
        quantize(**args)


# ---------------------------------------------------------------- Wanda pruning


def test_activation_stats_accumulate_like_one_big_batch():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 16, generator=gen) for _ in range(3)]
    stats = ActivationStats()
    lin = nn.Linear(16, 4)
    handle = stats.attach(lin)
    for b in batches:
        lin(b)
    handle.remove()
    lin(batches[0])  # after removal nothing is recorded
    everything = torch.cat([b.reshape(-1, 16) for b in batches])
    assert stats.tokens == 30
    assert torch.allclose(stats.norms(), everything.norm(dim=0), rtol=1e-6)
    assert torch.allclose(activation_norms(everything), everything.norm(dim=0), rtol=1e-6)
    w = torch.randn(4, 16, generator=gen)
    assert torch.allclose(wanda_scores(w, stats.norms()), w.abs() * everything.norm(dim=0)[None, :], rtol=1e-6)
    with pytest.raises(EdgecoreError, match="no calibration activations"):
        ActivationStats().norms()


@pytest.mark.parametrize("in_features", [48, 37])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7])
def test_unstructured_mask_prunes_the_lowest_scores_of_every_row(in_features, sparsity):
    scores = torch.rand(12, in_features, generator=torch.Generator().manual_seed(2))
    keep = unstructured_mask(scores, sparsity)
    pruned = math.floor(sparsity * in_features + 0.5)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert torch.all(keep.sum(dim=1) == in_features - pruned)
    assert kept_per_row(in_features, sparsity) == in_features - pruned
    if pruned:
        lowest_kept = torch.where(keep, scores, torch.inf).amin(dim=1)
        highest_pruned = torch.where(keep, -torch.inf, scores).amax(dim=1)
        assert torch.all(lowest_kept > highest_pruned)


def test_wanda_compares_within_rows_using_activation_norms():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([10.0, 1.0, 1.0, 1.0])  # input 0 is loud: its small weights still matter
    keep = unstructured_mask(wanda_scores(w, norms), 0.5)
    assert keep.tolist() == [[True, False, False, True], [True, True, False, False]]


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_mask_keeps_the_n_best_of_every_block(n, m):
    scores = torch.rand(10, 64, generator=torch.Generator().manual_seed(n * m))
    keep = n_m_mask(scores, n, m)
    blocks = keep.view(10, 64 // m, m)
    assert torch.all(blocks.sum(dim=2) == n)
    s = scores.view(10, 64 // m, m)
    assert torch.all(torch.where(blocks, s, torch.inf).amin(dim=2) > torch.where(blocks, -torch.inf, s).amax(dim=2))
    assert torch.equal(keep_mask(scores, parse_n_m(f"{n}:{m}")), keep)
    assert parse_pattern(f"{n}:{m}").sparsity == pytest.approx(1 - n / m)


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern(" 2:4 ") == NMPattern(2, 4) and str(NMPattern(4, 8)) == "4:8"
    for bad, message in [("4:2", "1 <= n < m"), ("0:4", "1 <= n < m"), ("half", "'unstructured' or 'n:m'")]:
        with pytest.raises(EdgecoreError, match=message):
            parse_pattern(bad)


@pytest.mark.parametrize("call, message", [
    (lambda s: unstructured_mask(s, 1.0), r"sparsity 1.0 must be a number in \[0, 1\)"),
    (lambda s: unstructured_mask(s, -0.1), r"sparsity -0.1 must be"),
    (lambda s: unstructured_mask(s, 0.99), "prunes all 12 weights"),
    (lambda s: unstructured_mask(s[0], 0.5), "2-D"),
    (lambda s: n_m_mask(s, 2, 5), "multiple of 5"),
    (lambda s: keep_mask(s, "unstructured"), "needs an amount"),
])
def test_masks_reject_bad_arguments(call, message):
    with pytest.raises(EdgecoreError, match=message):
        call(torch.rand(3, 12))


# ---------------------------------------------------------------- CompressedLinear


def _linear(out_features=24, in_features=64, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
    return lin


def _mask(lin: nn.Linear, sparsity):
    if sparsity == 0.0:
        return None
    norms = torch.rand(lin.in_features, generator=torch.Generator().manual_seed(9))
    return keep_mask(wanda_scores(lin.weight, norms), sparsity)


CONFIGS = [(bits, sparsity) for bits in (32, 16, 8, 4, 3, 2) for sparsity in (0.0, 0.5, NMPattern(2, 4))]


@pytest.mark.parametrize("bits, sparsity", CONFIGS)
def test_compressed_linear_computes_the_masked_dequantized_linear(bits, sparsity):
    lin = _linear()
    keep = _mask(lin, sparsity)
    layer = CompressedLinear.from_linear(lin, bits=bits, keep=keep, group_size=32)
    w = lin.weight.detach()
    values = w[keep] if keep is not None else w.reshape(-1)
    if bits == 32:
        restored = values
    elif bits == 16:
        restored = values.half().float()
    else:
        restored = quantize(values, bits, 32).dequantize()
    reference = torch.zeros_like(w)
    reference[keep if keep is not None else torch.ones_like(w, dtype=torch.bool)] = restored
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(layer(x), F.linear(x, reference, lin.bias), atol=1e-5)
    assert torch.equal(layer.dense_weight(), reference)
    if keep is not None:
        assert torch.equal(layer.keep_mask(), keep)
        assert torch.all(layer.dense_weight()[~keep] == 0)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    # all storage is frozen buffers; nothing dense is cached by a forward call
    assert list(layer.parameters()) == [] and not any(b.requires_grad for b in layer.buffers())
    assert not [k for k, v in vars(layer).items() if isinstance(v, torch.Tensor)]
    assert layer.nbytes() == expected_nbytes(24, 64, bits, sparsity, 32, bias=True)


@pytest.mark.parametrize("bits, sparsity", [(4, 0.5), (3, NMPattern(2, 4)), (16, 0.0), (32, 0.25), (2, 0.0)])
def test_state_dict_round_trips_into_an_empty_module(bits, sparsity):
    lin = _linear(out_features=40, in_features=96)
    layer = CompressedLinear.from_linear(lin, bits=bits, keep=_mask(lin, sparsity))
    state = layer.state_dict()
    assert set(state) <= {"qweight", "scale", "zero", "mask", "bias"}
    rebuilt = CompressedLinear.empty(40, 96, bits=bits, sparsity=sparsity, bias=True)
    assert rebuilt.nbytes() == layer.nbytes()
    rebuilt.load_state_dict(state)
    like = CompressedLinear.empty_like(lin, bits=bits, sparsity=sparsity)
    like.load_state_dict(state)
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(2))
    assert torch.equal(rebuilt(x), layer(x)) and torch.equal(like(x), layer(x))


def test_state_dict_of_another_configuration_is_refused():
    lin = _linear()
    state = CompressedLinear.from_linear(lin, bits=16).state_dict()
    with pytest.raises(EdgecoreError, match="qweight is torch.float16 in the state dict but torch.float32"):
        CompressedLinear.empty(24, 64, bits=32, bias=True).load_state_dict(state)
    with pytest.raises(RuntimeError, match="size mismatch"):
        CompressedLinear.empty(24, 64, bits=8, bias=True).load_state_dict(
            CompressedLinear.from_linear(lin, bits=4).state_dict())


@pytest.mark.parametrize("out_features, in_features, bits, sparsity, group_size, bias", [
    (576, 1536, 4, 0.0, 64, False),
    (576, 1536, 3, 0.5, 64, False),
    (576, 1536, 2, NMPattern(2, 4), 128, False),
    (24, 48, 8, 0.3, 32, True),
    (13, 40, 3, NMPattern(4, 8), 64, True),
    (7, 11, 32, 0.45, 64, True),
    (7, 11, 16, 0.0, 64, False),
])
def test_expected_nbytes_matches_real_modules(out_features, in_features, bits, sparsity, group_size, bias):
    lin = _linear(out_features, in_features, bias)
    layer = CompressedLinear.from_linear(lin, bits=bits, keep=_mask(lin, sparsity), group_size=group_size)
    assert layer.nbytes() == expected_nbytes(out_features, in_features, bits, sparsity, group_size, bias)
    assert layer.nbytes() == sum(t.numel() * t.element_size() for t in layer.state_dict().values())


def test_sizes_of_a_576x1536_weight():
    fp32 = 576 * 1536 * 4
    dense4 = expected_nbytes(576, 1536, 4)
    assert dense4 == 576 * 1536 // 2 + 4 * 576 * 1536 // 64  # codes + fp16 scale and zero per group
    assert fp32 / 8 < dense4 < fp32 / 7
    mask = 576 * 1536 // 8  # the honest cost of sparsity: one bit per weight
    assert expected_nbytes(576, 1536, 4, 0.5) == dense4 // 2 + mask
    assert expected_nbytes(576, 1536, 4, NMPattern(2, 4)) == expected_nbytes(576, 1536, 4, 0.5)
    assert expected_nbytes(576, 1536, 32) == fp32 and expected_nbytes(576, 1536, 16) == fp32 // 2


@pytest.mark.parametrize("call, message", [
    (lambda lin: CompressedLinear.from_linear(lin, bits=5), "bits=5 is not supported"),
    (lambda lin: CompressedLinear.from_linear(lin, bits=4, group_size=0), "group_size=0"),
    (lambda lin: CompressedLinear.from_linear(lin, bits=4, keep=torch.ones(3, 3, dtype=torch.bool)), "keep-mask"),
    (lambda lin: CompressedLinear.from_linear(lin, bits=4, keep=torch.ones(24, 64)), "keep-mask"),
    (lambda lin: CompressedLinear.empty(24, 64, bits=4, sparsity=1.0), r"sparsity 1.0 must be a number in \[0, 1\)"),
    (lambda lin: CompressedLinear.empty(24, 0, bits=4), "in_features=0"),
    (lambda lin: expected_nbytes(24, 64, 4, NMPattern(3, 5)), "multiple of 5"),
])
def test_compressed_linear_rejects_bad_arguments(call, message):
    with pytest.raises(EdgecoreError, match=message):
        call(_linear())


# ---------------------------------------------------------------- LoRA over CompressedLinear


def _compressed_tiny(seed=0):
    """tiny-micro with q_proj 4-bit 2:4-sparse and v_proj fp16 50%-sparse CompressedLinear."""
    model, tokenizer = models.load("tiny-micro", seed=seed)
    for layer in model.model.layers:
        attention = layer.self_attn
        scores = wanda_scores(attention.q_proj.weight, torch.ones(attention.q_proj.in_features))
        keep = n_m_mask(scores, 2, 4)
        attention.q_proj = CompressedLinear.from_linear(attention.q_proj, bits=4, keep=keep, group_size=32)
        scores = wanda_scores(attention.v_proj.weight, torch.ones(attention.v_proj.in_features))
        attention.v_proj = CompressedLinear.from_linear(attention.v_proj, bits=16, keep=unstructured_mask(scores, 0.5))
    return model, tokenizer


@pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning")  # peft's note on any custom layer
def test_lora_trains_over_compressed_layers_and_loads_with_stock_peft(tmp_path):
    model, _ = _compressed_tiny()
    peft_model = add_lora(model, LoraSettings(r=4, dropout=0.0, targets=("q_proj", "v_proj")))
    base_before = {k: v.clone() for k, v in peft_model.state_dict().items() if ".base_layer." in k}
    assert base_before and any(k.endswith("qweight") for k in base_before)
    lora_b_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert len(lora_b_before) == 8  # 4 layers x (q_proj, v_proj)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    # adapters train in fp32 whatever the base stores (uint8 codes, fp16 values)
    assert all(p.dtype == torch.float32 for p in trainable.values())

    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    after = peft_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    assert all(not torch.equal(p, lora_b_before[n]) for n, p in peft_model.named_parameters() if "lora_B" in n)

    # The adapter is saved with dense-model names: stock PeftModel.from_pretrained loads it onto
    # the dense model, and with the registered config onto the compressed one.
    saved = get_peft_model_state_dict(peft_model)
    assert saved and not any("base_layer" in k for k in saved)
    peft_model.save_pretrained(tmp_path)
    dense, _ = models.load("tiny-micro", seed=0)
    on_dense = PeftModel.from_pretrained(dense, tmp_path)
    assert all(torch.equal(get_peft_model_state_dict(on_dense)[k], v) for k, v in saved.items())
    compressed, _ = _compressed_tiny()
    config = register_peft(LoraConfig.from_pretrained(tmp_path))
    on_compressed = PeftModel.from_pretrained(compressed, tmp_path, config=config).eval()
    with torch.no_grad():
        assert torch.equal(on_compressed(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits)

    with pytest.raises(EdgecoreError, match="cannot be merged"):
        peft_model.merge_and_unload()
