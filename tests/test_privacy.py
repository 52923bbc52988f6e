"""Client-level differential privacy: the whole-update clip, the noise per element, the ledger, the settings."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from hypothesis import given, settings, strategies as st
from safetensors.numpy import load_file

from client.plain_round import ClientData, local_round
from edgecore import models, wire
from edgecore.errors import EdgecoreError
from edgecore.experiment import Experiment
from edgecore.finetune import add_lora
from edgecore.wire import rank_axis, rank_slice, truncate_rank
from federation.privacy import DpSettings, clip_delta, clipped_update, noisy_norm_limit, privatize, update_delta
from federation.protocol import DP_CLIP_NORM, DP_MODE, CONFIG, ProtocolError, TrainInstruction
from federation.validation import update_distance, update_problems
from server.aggregation import holder_counts, partial_average
from server.privacy import PrivacyLedger, private_average
from conftest import needs_bbc
from test_aggregation import adapter

ROOT = Path(__file__).resolve().parent.parent

FAST = settings(max_examples=40, deadline=None)
GLOBAL_RANK = 4


def trained(received: dict, rank: int, layers=range(4), exit_layer: int | None = 1, scale: float = 1.0, seed: int = 0) -> dict:
    """A rank-`rank` client's update: its window's tensors cut to its rank, moved by N(0, scale^2)."""
    rng = np.random.default_rng(seed)
    cut = truncate_rank(received, rank)
    names = [n for n in cut if any(f".layers.{layer}." in n for layer in layers)]
    if exit_layer is not None:
        names += [f"exit.{exit_layer}.down", f"exit.{exit_layer}.up"]
    return {n: (cut[n] + scale * rng.standard_normal(cut[n].shape)).astype(np.float32) for n in names}


def distance(update: dict, received: dict) -> float:
    rank = next(v.shape[rank_axis(k)] for k, v in update.items())
    return update_distance(update, received, rank)[0]


# --- The clip ---------------------------------------------------------------------------


@FAST
@given(rank=st.integers(1, GLOBAL_RANK), scale=st.floats(1e-4, 1e3), clip=st.floats(1e-3, 1e2), seed=st.integers(0, 99))
def test_the_clip_bounds_the_delta_over_every_tensor_jointly_at_any_rank(rank, scale, clip, seed):
    received = adapter(GLOBAL_RANK, seed)
    update = trained(received, rank, scale=scale, seed=seed)
    before = distance(update, received)
    delta = update_delta(clipped_update(update, received, clip), received)
    after = math.sqrt(sum(float(np.square(d).sum()) for d in delta.values()))
    assert after <= clip * (1 + 1e-9)
    if before <= clip:  # below the bound nothing changes
        assert after == pytest.approx(before, rel=1e-9)
    else:  # above it, the whole delta scales by one factor, to exactly C
        assert after == pytest.approx(clip, rel=1e-9)
        raw = update_delta(update, received)
        ratios = {name: float(np.linalg.norm(delta[name]) / np.linalg.norm(raw[name])) for name in raw if raw[name].any()}
        assert max(ratios.values()) == pytest.approx(min(ratios.values()), rel=1e-6)


def test_each_tensor_within_the_bound_does_not_make_the_whole_update_so():
    """Every tensor below C on its own, the update above it: the clip is of the whole update."""
    received = adapter(GLOBAL_RANK)
    update = trained(received, 2, scale=0.05)
    raw = update_delta(update, received)
    clip = 1.1 * max(float(np.linalg.norm(d)) for d in raw.values())
    assert distance(update, received) > clip
    delta = update_delta(clipped_update(update, received, clip), received)
    assert math.sqrt(sum(float(np.square(d).sum()) for d in delta.values())) == pytest.approx(clip, rel=1e-9)


def test_a_zero_update_is_left_as_it_is():
    received = adapter(GLOBAL_RANK)
    delta = update_delta(truncate_rank(received, 2), received)
    assert clip_delta(delta, 1.0) == 0.0 and not any(d.any() for d in delta.values())


def test_the_clip_reads_each_tensors_rank_and_refuses_a_tensor_it_was_not_sent():
    received = adapter(GLOBAL_RANK)
    update = trained(received, 3)
    cut = {n: v[rank_slice(rank_axis(n), 3)] for n, v in received.items() if n in update}
    assert all(np.array_equal(update_delta(update, received)[n], update[n].astype(np.float64) - cut[n]) for n in update)
    with pytest.raises(EdgecoreError, match="not in the adapter the client received"):
        update_delta({"exit.9.down": np.zeros((3, 6), np.float32)}, received)


# --- The noise, per element, by how many clients hold it ----------------------------------


def test_central_noise_has_std_zc_over_the_holders_of_each_element():
    """Three clients of ranks 4, 2, 1 on windows that overlap: an element is held by 1, 2 or 3 clients, and
    the measured std of the noise on its mean matches z*C/n within 3% (the seed makes it deterministic)."""
    wide = {name: (rows * 1024, cols) if rank_axis(name) == 1 else (rows, cols * 1024)  # many elements per holder count
            for name, (rows, cols) in ((n, v.shape) for n, v in adapter(GLOBAL_RANK).items())}
    received = {name: np.zeros(shape, np.float32) for name, shape in wide.items()}
    updates = [trained(received, 4, range(3), 1, 1e-4, 1), trained(received, 2, range(2), 1, 1e-4, 2),
               trained(received, 1, range(1, 3), 3, 1e-4, 3)]
    dp = DpSettings("central", clip_norm=0.5, noise_multiplier=1.2)
    clean, contributors = partial_average(received, [(u, 1.0) for u in updates])
    noisy, noisy_contributors = private_average(received, updates, dp, np.random.default_rng(7))
    assert noisy_contributors == contributors
    counts = holder_counts(received, updates)
    for holders in (1, 2, 3):
        noise = np.concatenate([(noisy[n].astype(np.float64) - clean[n])[counts[n] == holders] for n in counts])
        expected = dp.noise_multiplier * dp.clip_norm / holders
        assert noise.size > 20000
        assert np.std(noise) == pytest.approx(expected, rel=0.03)
        assert abs(np.mean(noise)) < 4 * expected / math.sqrt(noise.size)
    untouched = [n for n in received if n not in counts]
    assert untouched and all(noisy[n] is received[n] for n in untouched)  # nobody holds them: no noise
    for name in counts:  # nor on the rank slices no client holds
        assert np.array_equal(noisy[name][counts[name] == 0], received[name][counts[name] == 0])


def test_the_server_averages_with_equal_weights_after_re_clipping():
    """With no noise left to hide it, the private average is the plain mean of the re-clipped updates."""
    received = adapter(GLOBAL_RANK)
    far, near = trained(received, 4, scale=10.0, seed=1), trained(received, 4, scale=0.001, seed=2)
    dp = DpSettings("central", clip_norm=0.5, noise_multiplier=1e-12)
    averaged, _ = private_average(received, [far, near], dp, np.random.default_rng(0))
    expected, _ = partial_average(received, [(clipped_update(u, received, 0.5), 1.0) for u in (far, near)])
    for name in far:
        np.testing.assert_allclose(averaged[name], expected[name], atol=1e-6)
    assert distance({n: averaged[n] for n in far}, received) <= 0.5  # each counted with weight 1, each <= C
    with pytest.raises(EdgecoreError, match="central DP's aggregate"):
        private_average(received, [far], DpSettings("local", 0.5, 1.0), np.random.default_rng(0))


def test_local_noise_has_std_zc_on_every_element_sent_and_passes_the_servers_checks():
    received = adapter(GLOBAL_RANK)
    update = trained(received, 2, scale=0.0)  # no change: what arrives is the noise alone
    dp = DpSettings("local", clip_norm=0.3, noise_multiplier=0.8)
    sent = privatize(update, received, dp, np.random.default_rng(3))
    noise = np.concatenate([(sent[n].astype(np.float64) - update[n]).ravel() for n in update])
    assert set(sent) == set(update) and all(v.dtype == np.float32 for v in sent.values())
    assert np.std(noise) == pytest.approx(0.24, rel=0.1)  # z*C, on 216 elements
    assert update_problems(sent, received, allowed=None, rank=2, max_delta_norm=noisy_norm_limit(dp, noise.size)) == []
    central = privatize(update, received, DpSettings("central", 0.3, 0.8))
    assert all(np.array_equal(central[n], update[n]) for n in update)  # central: the client only clips


# --- The ledger ---------------------------------------------------------------------------


def accountant(relation, sampling, rounds, noise, sampled, population, delta=1e-5):
    reference = RdpAccountant(PrivacyConfig(delta, population, relation, sampling))
    for _ in range(rounds):
        reference.compose(GaussianPrivacyEvent(noise, sampled, population))
    return reference.get_epsilon(delta)


@pytest.mark.parametrize("mode, relation, sampling", [
    ("central", NeighboringRelation.REPLACE_ONE, SamplingMethod.WITHOUT_REPLACEMENT),
    ("local", NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION),
])
def test_the_ledger_reports_the_accountants_own_epsilon_at_z_over_two(mode, relation, sampling):
    ledger = PrivacyLedger(mode, noise_multiplier=1.5, population=20, delta=1e-5)
    assert ledger.epsilon == 0.0
    epsilons = [ledger.record_round(5) for _ in range(4)]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    assert epsilons[-1] == accountant(relation, sampling, 4, 0.75, 5, 20)  # replace-one: sensitivity 2C
    assert ledger.spent().num_releases == 4 and ledger.spent().epsilon == epsilons[-1]


def test_sampling_amplifies_central_privacy_but_not_local():
    central, local = PrivacyLedger("central", 1.0, 100), PrivacyLedger("local", 1.0, 100)
    for _ in range(3):
        central.record_round(10)
        local.record_round(10)
    assert central.epsilon < local.epsilon
    assert local.epsilon == accountant(NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION, 3, 0.5, 100, 100)


def test_a_round_from_more_clients_is_accounted_at_the_rate_rounded_up_and_from_fewer_refused():
    ledger = PrivacyLedger("central", 1.0, population=10)
    assert ledger.event(3, available=25).sample_size == 2  # ceil(10 * 3 / 25): rate 0.2 >= 0.12
    with pytest.raises(EdgecoreError, match="overstate the amplification"):
        ledger.record_round(3, available=9)
    with pytest.raises(EdgecoreError, match="sampled = 11 exceeds"):
        ledger.record_round(11)


def test_the_budget_stops_exactly_before_the_round_that_would_pass_it():
    epsilons = [accountant(NeighboringRelation.REPLACE_ONE, SamplingMethod.WITHOUT_REPLACEMENT, k, 0.5, 4, 10)
                for k in range(1, 7)]
    budget = (epsilons[2] + epsilons[3]) / 2  # rounds 1-3 fit, the 4th passes it
    ledger = PrivacyLedger("central", 1.0, population=10, max_epsilon=budget)
    stops = []
    for _ in range(6):
        stops.append(ledger.would_exceed(4))
        if stops[-1]:
            break
        ledger.record_round(4)
    assert stops == [False, False, False, True] and ledger.epsilon == epsilons[2] <= budget
    assert not PrivacyLedger("central", 1.0, population=10).would_exceed(10)  # 0: no budget


def test_the_ledger_state_round_trips_and_refuses_another_runs():
    ledger = PrivacyLedger("central", 1.0, population=10, max_epsilon=5.0)
    ledger.record_round(3)
    ledger.record_round(4)
    resumed = PrivacyLedger("central", 1.0, population=10, max_epsilon=5.0)
    resumed.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert resumed.epsilon == ledger.epsilon and resumed.record_round(3) == ledger.record_round(3)
    with pytest.raises(EdgecoreError, match="same dp-\\* keys and population"):
        PrivacyLedger("central", 1.0, population=11, max_epsilon=5.0).load_state_dict(ledger.state_dict())


def test_the_ledger_follows_the_experiment_and_refuses_bad_settings():
    assert PrivacyLedger.for_experiment(Experiment(fleet=""), 5) is None
    experiment = Experiment(fleet="", dp_mode="local", dp_noise_multiplier=2.0, dp_delta=1e-6, dp_max_epsilon=8.0)
    ledger = PrivacyLedger.for_experiment(experiment, 5)
    assert (ledger.mode, ledger.accounted_noise_multiplier, ledger.config.target_delta, ledger.config.max_epsilon) == \
        ("local", 1.0, 1e-6, 8.0)
    for kwargs, message in [(dict(mode="off"), "has no privacy ledger"), (dict(population=0), "population 0"),
                            (dict(noise_multiplier=0.0), "must be > 0"), (dict(delta=1.5), "dp-delta = 1.5")]:
        with pytest.raises(EdgecoreError, match=message):
            PrivacyLedger(**{"mode": "central", "noise_multiplier": 1.0, "population": 5, **kwargs})


# --- Settings and the instruction ---------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(dp_mode="global"), "dp-mode = 'global'; use one of 'off', 'central', 'local'"),
    (dict(dp_clip_norm=0.0), "dp-clip-norm = 0.0 must be > 0"),
    (dict(dp_noise_multiplier=-1.0), "dp-noise-multiplier = -1.0 must be >= 0"),
    (dict(dp_delta=1.0), "dp-delta = 1.0 must be in \\(0, 1\\)"),
    (dict(dp_max_epsilon=-2.0), "dp-max-epsilon = -2.0 must be >= 0"),
    (dict(dp_mode="local"), "dp-mode = 'local' needs dp-noise-multiplier > 0"),
    (dict(dp_mode="central", dp_noise_multiplier=1.0, average="median"),
     "set average = \"weighted-mean\""),
    (dict(dp_mode="central", dp_noise_multiplier=1.0, dp_clip_norm=200.0),
     "dp-clip-norm = 200 exceeds max-update-norm = 100"),
])
def test_experiment_refuses_bad_privacy_settings_naming_the_key(kwargs, message):
    with pytest.raises(EdgecoreError, match=message):
        Experiment(fleet="", **kwargs)


def test_privacy_keys_round_trip_through_the_run_config():
    experiment = Experiment(fleet="", dp_mode="central", dp_noise_multiplier=1.1)
    config = experiment.as_run_config()
    assert (config["dp-mode"], config["dp-noise-multiplier"], config["dp-max-epsilon"]) == ("central", 1.1, 0.0)
    assert Experiment.from_mapping(config) == experiment
    assert DpSettings.of(experiment) == DpSettings("central", 1.0, 1.1) and DpSettings.of(Experiment(fleet="")) is None


def test_the_instruction_carries_the_privacy_settings_and_refuses_bad_ones():
    arrays = adapter(GLOBAL_RANK)
    dp = DpSettings("local", 0.5, 1.0)
    assert TrainInstruction.from_records(TrainInstruction(arrays, 2, dp=dp).to_records()).dp == dp
    assert TrainInstruction.from_records(TrainInstruction(arrays, 2).to_records()).dp is None

    def parse(**config):
        records = TrainInstruction(arrays, 2, dp=dp).to_records()
        for key, value in config.items():
            records[CONFIG][key] = value
        return TrainInstruction.from_records(records)

    assert parse(**{DP_MODE: "off"}).dp is None
    with pytest.raises(ProtocolError, match="'dp-mode' = 'loud': expected one of off, central, local"):
        parse(**{DP_MODE: "loud"})
    with pytest.raises(ProtocolError, match="'dp-clip-norm' = -1.0"):
        parse(**{DP_CLIP_NORM: -1.0})
    with pytest.raises(ProtocolError, match="dp-noise-multiplier = 0.0 \\(dp-mode 'local'\\)"):
        parse(**{"dp-noise-multiplier": 0.0})
    records = TrainInstruction(arrays, 2, dp=dp).to_records()
    del records[CONFIG][DP_CLIP_NORM]
    with pytest.raises(ProtocolError, match="lacks 'dp-clip-norm'"):
        TrainInstruction.from_records(records)


def test_a_real_plain_round_sends_its_update_clipped_and_noised(tmp_path):
    """tiny-micro, one step: the instruction's settings, through its records, make the round's reply noisy."""
    lines = [{"prompt": f"Topic of item {i}?", "response": ("sport", "politics")[i % 2]} for i in range(40)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    experiment = Experiment(model="tiny-micro", data=str(tmp_path / "data.jsonl"), pipeline="plain", fleet="",
                            local_steps=1, batch_size=2, seq_len=32, lora_r=2, warmup_steps=0)
    client = ClientData(spec=experiment.data)
    plain = local_round(experiment, client, _initial_adapter(experiment), 1)
    received = {n: v + 0.01 for n, v in plain.arrays.items()}  # a global adapter the round's update is near

    dp = DpSettings("local", clip_norm=0.05, noise_multiplier=2.0)
    instruction = TrainInstruction.from_records(TrainInstruction(received, 1, dp=dp).to_records())
    reply = local_round(experiment, client, instruction.arrays, 1, dp=instruction.dp)
    noise = np.concatenate([(reply.arrays[n].astype(np.float64) - received[n]).ravel() for n in received])
    assert set(reply.arrays) == set(received) and noise.size > 1000
    assert np.std(noise) == pytest.approx(0.1, rel=0.1)  # z*C; the clipped delta (<= 0.05 in all) is negligible
    assert update_problems(reply.arrays, received, allowed=None, rank=2, max_delta_norm=noisy_norm_limit(dp, noise.size)) == []


def _initial_adapter(experiment: Experiment) -> dict:
    model, _ = models.load(experiment.model, seed=experiment.seed)
    return wire.adapter_arrays(add_lora(model, experiment.lora()))



# --- A private run, end to end ---------------------------------------------------------------


def _accountant_epsilons(z: float, sampled: int, population: int, rounds: int, delta: float) -> list[float]:
    """Flower's RdpAccountant on the same events, by hand: round r's epsilon so far at delta."""
    accountant = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                             neighboring_relation=NeighboringRelation.REPLACE_ONE,
                                             sampling_method=SamplingMethod.WITHOUT_REPLACEMENT))
    epsilons = []
    for _ in range(rounds):
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=z / 2, sample_size=sampled, population_size=population))
        epsilons.append(accountant.get_epsilon(delta))
    return epsilons


@needs_bbc
def test_a_central_dp_simulation_reports_the_accountants_epsilon_and_stops_before_passing_its_budget(tmp_path):
    z, clip, delta = 4.0, 0.05, 1e-5
    expected = _accountant_epsilons(z, 2, 2, 3, delta)
    budget = (expected[1] + expected[2]) / 2  # room for two rounds, not three
    config = {"model": "tiny-micro", "num-rounds": 3, "local-steps": 2, "batch-size": 4, "seq-len": 160, "min-clients": 2,
              "eval-samples": 16, "lora-r": 4, "partition": "iid", "pipeline": "plain", "fleet": "", "save-client-updates": True,
              "run-dir": str(tmp_path / "runs"), "dp-mode": "central", "dp-clip-norm": clip, "dp-noise-multiplier": z,
              "dp-delta": delta, "dp-max-epsilon": budget}
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    done = subprocess.run([sys.executable, "-m", "simulations.simulate", "--num-clients", "2", "-c", overrides],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "finished:completed"  # a budget stop is a clean end, not a failure
    run = Path(outcome["run_folder"])
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["privacy"]["epsilon"] for r in rounds[1:]] == pytest.approx(expected[:2], rel=1e-9)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped-privacy-budget" and "before round 3" in summary["stopped"]
    assert summary["rounds_run"] == 2 and summary["privacy"]["epsilon"] == pytest.approx(expected[1], rel=1e-9)
    assert (run / "adapter" / "adapter_model.safetensors").exists()

    # Round 1: every client's update is clipped to C; the global adapter is their equal-weight mean plus N(0, (zC/2)^2).
    start = load_file(run / "checkpoints" / "round-0" / "adapter" / "adapter_model.safetensors")
    saved = load_file(run / "checkpoints" / "round-1" / "adapter" / "adapter_model.safetensors")
    updates = [load_file(path) for path in sorted((run / "checkpoints" / "round-1" / "clients").glob("*.safetensors"))]
    assert len(updates) == 2 and all(c["weight"] == 1.0 for c in rounds[1]["clients"])
    for update in updates:
        norm = math.sqrt(sum(float(np.square(update[k].astype(np.float64) - start[k]).sum()) for k in start))
        assert norm <= clip * (1 + 1e-5)
    residual = np.concatenate([(saved[k].astype(np.float64) - (updates[0][k] + updates[1][k]) / 2).ravel() for k in saved])
    assert residual.size > 5000 and np.std(residual) == pytest.approx(z * clip / 2, rel=0.05)
