"""Adaptive-depth tuning on tiny models: runner, windows, exits, voting, early exits, save/load."""

import math

import pytest
import torch

from edgecore import lm, models
from edgecore.data import Dataset, Sample
from edgecore.encoding import Encoder, collate
from edgecore.errors import EdgecoreError
from edgecore.finetune import LoraSettings, TrainSettings, add_lora
from edgecore.memory import ModelShape, StepPlan, estimate_step
from edgecore.tuning import adaptive
from edgecore.tuning.exits import Exits, default_exits, parse_exits
from edgecore.tuning.runner import DecoderRun
from edgecore.tuning.voting import exit_votes, delta_distance, layer_importance, lora_factors, predict_early
from edgecore.tuning.window import ExitChooser, normalise, window_depth, window_loss

WORDS = ["alpha", "beta", "gamma"]
LORA = LoraSettings(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj"))


def _dataset():
    samples = [Sample(f"text number {i} about {WORDS[i % 3]} things", WORDS[i % 3], "") for i in range(48)]
    return Dataset("toy", samples[:36], samples[36:42], samples[42:], WORDS, "Pick the topic.")


def _setup(seed=0):
    model, tokenizer = models.load("tiny-5m", seed=seed)
    dataset = _dataset()
    encoder = Encoder(tokenizer, dataset, max_len=48)
    batch = collate([encoder.encode(s) for s in dataset.train[:4]], tokenizer.pad_token_id)
    return model, tokenizer, dataset, encoder, batch


def test_exit_placement():
    assert default_exits(30) == (7, 14, 22, 29)
    assert default_exits(6) == (1, 2, 4, 5)
    assert parse_exits("7,15,29", 30) == (7, 15, 29) and parse_exits("2", 6) == (2, 5)
    with pytest.raises(EdgecoreError, match="must be in 0..5"):
        parse_exits("3,6", 6)
    with pytest.raises(EdgecoreError, match="quarters"):
        parse_exits("deep", 6)


def test_runner_reproduces_the_decoder():
    model, _tok, _ds, _enc, batch = _setup()
    with torch.no_grad():
        expected = lm.hidden_states(model, batch)
        run = DecoderRun(model, batch)
        got = run.final_norm(run.run_to(2, grad=False))
        got = run.final_norm(run.run_to(5, grad=False))
    assert torch.allclose(got, expected, atol=1e-5)


def test_window_gradients_reach_only_its_adapters_and_layers_above_never_run():
    model, _tok, _ds, _enc, batch = _setup()
    peft_model = add_lora(model, LORA)
    exits = Exits(default_exits(6), 256, rank=4)
    ran = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append((i, torch.is_grad_enabled())))
             for i, layer in enumerate(lm.causal_lm(peft_model).model.layers)]
    loss = window_loss(peft_model, exits, batch, exit_layer=4, depth=2)  # window = layers 3..4
    loss.backward()
    for h in hooks:
        h.remove()
    assert ran == [(0, False), (1, False), (2, False), (3, True), (4, True)]  # layer 5 never runs
    for name, p in peft_model.named_parameters():
        if "lora_A" in name:  # A gets a gradient whenever its layer is in the graph
            layer = int(name.split("layers.")[1].split(".")[0])
            assert (p.grad is not None) == (layer in (3, 4)), name
    assert exits.adapter(4).up.weight.grad is not None
    assert all(exits.adapter(e).up.weight.grad is None for e in (1, 2, 5))


def test_no_autograd_graph_below_the_window():
    model, _tok, _ds, _enc, batch = _setup()
    run = DecoderRun(add_lora(model, LORA), batch)
    below = run.run_to(2, grad=False)
    assert below.grad_fn is None and not below.requires_grad
    assert run.run_to(3).grad_fn is not None


def test_exit_chooser_rule():
    chooser = ExitChooser((1, 3, 5), weights=[0.0, 1.0, 3.0], seed=1)
    probs = chooser.probabilities()
    assert math.isclose(sum(probs), 1) and probs[0] > 0  # the floor keeps every exit alive
    assert probs[2] > probs[1] > probs[0]
    chooser.observe(5, 0.1)
    chooser.observe(3, 2.0)
    chooser.observe(1, 2.0)
    p = chooser.probabilities()
    assert p[1] / p[2] == pytest.approx(chooser.weights[1] * 2.0 / (chooser.weights[2] * 0.1))  # w_e * loss_e
    with pytest.raises(EdgecoreError, match="2 exit weights given for 3 exits"):
        ExitChooser((1, 3, 5), weights=[1, 1])


def test_votes_and_importance_are_normalised():
    assert normalise([0, 0]) == [0.5, 0.5]
    votes = exit_votes({1: {"loss": 2.0, "accuracy": 0.2}, 3: {"loss": 1.0, "accuracy": 0.6}})
    assert votes == pytest.approx([0.25, 0.75])
    # With 4 classes, 0.25 is a guess: it gets no vote; 0.625 is half the room above chance.
    chance = exit_votes({1: {"loss": 2.0, "accuracy": 0.25, "chance": 0.25}, 3: {"loss": 1.0, "accuracy": 0.625, "chance": 0.25}})
    assert chance == pytest.approx([0.0, 1.0])
    # On 16 samples, 31% against 25% chance is within a guesser's noise (one standard error, 10.8%).
    noisy = exit_votes({1: {"loss": 2.0, "accuracy": 5 / 16, "chance": 0.25, "n": 16},
                        3: {"loss": 1.0, "accuracy": 0.625, "chance": 0.25, "n": 16}})
    assert noisy == pytest.approx([0.0, 1.0])
    lm_votes = exit_votes({1: {"loss": 2.0}, 3: {"loss": 1.0}})
    assert lm_votes[1] / lm_votes[0] == pytest.approx(math.e)
    zero = [(torch.zeros(3, 2), torch.zeros(2, 4))]
    moved = [(torch.tensor([[1.0, 0], [0, 2], [0, 0]]), torch.tensor([[3.0, 0, 0, 0], [0, 0, 2, 0]]))]
    assert layer_importance({0: zero, 1: zero}, {0: moved, 1: zero}, 3) == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("share", [1, 2, 3])
def test_a_validation_share_of_one_label_votes_uniformly_instead_of_dividing_by_zero(share):
    from edgecore.tuning.voting import exit_scores

    model, _tok, dataset, encoder, _batch = _setup()
    one_label = [s for s in dataset.validation if s.response == WORDS[0]][:share]
    exits = Exits(default_exits(6), 256, rank=4)
    scores = exit_scores(add_lora(model, LORA), exits, encoder, one_label)
    assert all(s["chance"] == 1.0 and s["n"] == len(one_label) for s in scores.values())
    assert exit_votes(scores) == pytest.approx([0.25] * 4)


def test_the_bar_is_the_majority_label_when_it_beats_uniform_guessing():
    from edgecore.data import Sample
    from edgecore.tuning.voting import guess_rate

    skewed = [Sample("p", "sport", "g")] * 3 + [Sample("p", "tech", "g")]
    assert guess_rate(skewed, 5) == 0.75
    assert guess_rate([Sample("p", c, "g") for c in "abcde"], 5) == 0.2


def test_delta_distance_equals_the_dense_norm():
    g = torch.Generator().manual_seed(0)
    before = [(torch.randn(5, 2, generator=g), torch.randn(2, 7, generator=g)) for _ in range(2)]
    after = [(torch.randn(5, 2, generator=g), torch.randn(2, 7, generator=g)) for _ in range(2)]
    dense = sum(float(((b2 @ a2 - b @ a) ** 2).sum()) for (b, a), (b2, a2) in zip(before, after)) ** 0.5
    assert delta_distance(before, after) == pytest.approx(dense, rel=1e-5)


def test_window_depth_follows_the_budget():
    shape = models.shape("tiny-5m")
    plan = StepPlan(batch=4, seq_len=48, weight_bytes=10_000_000)
    full = estimate_step(shape, plan, window=(0, 5)).total_mb
    assert window_depth(shape, plan, full + 0.01).layers == 6
    two = estimate_step(shape, plan, window=(4, 5)).total_mb
    three = estimate_step(shape, plan, window=(3, 5)).total_mb
    assert window_depth(shape, plan, (two + three) / 2).layers == 2
    with pytest.raises(EdgecoreError, match="even a one-layer window"):
        window_depth(shape, plan, 1.0)


def test_adaptive_tuning_learns_votes_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model, tokenizer, dataset, encoder, _batch = _setup()
    peft_model = add_lora(model, LORA)
    settings = TrainSettings(steps=12, batch_size=4, seq_len=48, lr=5e-3, warmup_steps=2, precision="fp32")
    exits, depth = adaptive.prepare(peft_model, adaptive.AdaptiveSettings(window=2), settings, LORA)
    assert depth.layers == 2
    result = adaptive.tune(peft_model, exits, depth, encoder, dataset.train, dataset.validation, settings, progress=False)
    assert len(result.history) == 12 and {h["exit"] for h in result.history} <= set(exits.layers)
    assert sum(result.layer_steps) == sum(h["window"][1] - h["window"][0] + 1 for h in result.history)
    assert sum(result.votes) == pytest.approx(1) and sum(result.importance) == pytest.approx(1)
    untouched = [l for l, n in enumerate(result.layer_steps) if n == 0]
    assert all(result.importance[l] == 0 for l in untouched)
    early = predict_early(peft_model, exits, encoder, dataset.test, [1.0] * len(exits.layers), threshold=0.0)
    assert early["mean_layers"] == exits.layers[0] + 1  # threshold 0: every sample stops at the first exit
    full = predict_early(peft_model, exits, encoder, dataset.test, result.votes, threshold=1.0)
    assert full["mean_layers"] == 6
    folder = adaptive.save(tmp_path / "a", peft_model, exits, {"depth": depth.layers})
    fresh, _ = models.load("tiny-5m", seed=0)
    loaded, loaded_exits, meta = adaptive.load(fresh, folder)
    assert meta["depth"] == 2 and loaded_exits.layers == exits.layers
    again = predict_early(loaded, loaded_exits, encoder, dataset.test, result.votes, threshold=1.0)
    assert again["accuracy"] == full["accuracy"]
    assert lora_factors(loaded).keys() == lora_factors(peft_model).keys()
    for layer, factors in lora_factors(loaded).items():
        assert delta_distance(factors, lora_factors(peft_model)[layer]) < 1e-6


def test_tune_reads_the_whole_adaptive_settings():
    """The assigned exit and the exit learning-rate scale reach training through AdaptiveSettings."""
    torch.manual_seed(0)
    model, _tokenizer, dataset, encoder, _batch = _setup()
    peft_model = add_lora(model, LORA)
    settings = TrainSettings(steps=3, batch_size=4, seq_len=48, lr=5e-3, warmup_steps=0, precision="fp32")
    exits, depth = adaptive.prepare(peft_model, adaptive.AdaptiveSettings(window=1), settings, LORA)
    assigned = exits.layers[1]
    before = {k: v.clone() for k, v in exits.state().items()}
    frozen_exits = adaptive.AdaptiveSettings(window=1, assigned_exit=assigned, exit_lr_scale=0.0)
    result = adaptive.tune(peft_model, exits, depth, encoder, dataset.train, [], settings, frozen_exits, progress=False)
    assert {h["exit"] for h in result.history} == {assigned}
    assert all(torch.equal(before[k], v) for k, v in exits.state().items())  # a zero rate: exit adapters stay
    moving = adaptive.tune(peft_model, exits, depth, encoder, dataset.train, [], settings,
                           adaptive.AdaptiveSettings(window=1, assigned_exit=assigned), progress=False)
    assert {h["exit"] for h in moving.history} == {assigned}
    assert any(not torch.equal(before[k], v) for k, v in exits.state().items())
