import pytest

from edgecore import EdgecoreError, measure, profiles
from edgecore.luc import Candidate, NMPattern, parse_n_m

SMOLLM2_FP32_MIB = 134_515_008 * 4 / 2**20  # SmolLM2-135M's dense fp32 weights (538 MB)

GOOD = """
name = "test-board"
description = "a board for tests"
memory_budget_mb = 300
weight_bits = [4, 8, 32]
precision = "fp32"

[sparsity]
unstructured = [0.5, 0.0, 0.25]
n_m = ["2:4"]
"""


def write(tmp_path, text, name="profile.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_profile_loads_and_is_named_after_its_file():
    shipped = profiles.shipped_profiles()
    assert len(shipped) >= 4
    for name, path in shipped.items():
        profile = profiles.load_profile(path)
        assert profile.name == name == path.stem
        assert profile.memory_budget_mb > 0 and profile.description
        assert profile.candidates()
        assert (Candidate() in profile.candidates()) == (32 in profile.weight_bits)


def test_smallest_profile_forces_compression_and_budgets_span_the_fleet():
    loaded = [profiles.load_profile(p) for p in profiles.shipped_profiles().values()]
    budgets = sorted(p.memory_budget_mb for p in loaded)
    assert budgets[0] < SMOLLM2_FP32_MIB  # not even the dense weights fit
    smallest = min(loaded, key=lambda p: p.memory_budget_mb)
    assert 32 not in smallest.weight_bits and 16 not in smallest.weight_bits
    assert budgets[-1] > 4 * SMOLLM2_FP32_MIB  # the largest tunes the dense model
    assert {p.precision for p in loaded} == {"fp32", "bf16"}


def test_load_profile_reads_every_field(tmp_path):
    profile = profiles.load_profile(write(tmp_path, GOOD))
    assert profile.name == "test-board"
    assert profile.memory_budget_mb == 300.0
    assert profile.weight_bits == (4, 8, 32)
    assert profile.unstructured == (0.0, 0.25, 0.5)
    assert profile.n_m == ("2:4",)
    assert not profile.bf16
    assert profile.source.endswith("profile.toml")


def test_candidates_cover_every_sparsity_pattern_and_bit_width(tmp_path):
    profile = profiles.load_profile(write(tmp_path, GOOD))
    candidates = profile.candidates()
    shapes = [(0.0, "unstructured"), (0.25, "unstructured"), (0.5, "unstructured"), (0.5, "2:4")]
    assert candidates == [Candidate(s, p, b) for s, p in shapes for b in (4, 8, 32)]
    assert all(isinstance(c, Candidate) for c in candidates) and candidates[-1].spec == NMPattern(2, 4)
    assert len(set(candidates)) == len(candidates)


def test_dense_is_allowed_even_when_not_listed(tmp_path):
    text = GOOD.replace("unstructured = [0.5, 0.0, 0.25]", "unstructured = [0.5]")
    profile = profiles.load_profile(write(tmp_path, text))
    assert profile.unstructured == (0.0, 0.5)
    assert Candidate() in profile.candidates()


def test_sparsity_table_is_optional(tmp_path):
    text = 'name = "x"\nmemory_budget_mb = 100\nweight_bits = [8]\nprecision = "bf16"\n'
    profile = profiles.load_profile(write(tmp_path, text))
    assert profile.candidates() == [Candidate(bits=8)]
    assert profile.bf16 and profile.description == ""


def test_n_m_patterns():
    # One parser of N:M text, edgecore.luc's, which profiles use.
    pattern = parse_n_m("2:4")
    assert (pattern.n, pattern.m) == (2, 4) and pattern == NMPattern(2, 4)
    assert parse_n_m("1:4").sparsity == 0.75
    for bad in ("4:2", "4:4", "0:4", "2-4", "2:", ""):
        with pytest.raises(EdgecoreError):
            parse_n_m(bad)


def test_detect_local_describes_this_machine():
    local = profiles.detect_local(budget_fraction=0.25)
    assert local.name == "local"
    assert local.memory_budget_mb == pytest.approx(profiles.total_memory_mb() * 0.25, abs=0.1)
    assert profiles.total_memory_mb() > 256
    assert local.weight_bits == profiles.ALL_BITS
    assert local.precision == ("bf16" if measure.cpu_supports_bf16() else "fp32")
    assert Candidate() in local.candidates() and Candidate(0.5, "2:4", 4) in local.candidates()
    for bad in (0, 1.5, -0.1, "half"):
        with pytest.raises(EdgecoreError, match="budget_fraction"):
            profiles.detect_local(budget_fraction=bad)


def test_resolve_profile_by_local_name_and_path(tmp_path):
    assert profiles.resolve_profile("local").name == "local"
    name, path = next(iter(profiles.shipped_profiles().items()))
    assert profiles.resolve_profile(name) == profiles.load_profile(path)
    assert profiles.resolve_profile(str(write(tmp_path, GOOD))).name == "test-board"
    with pytest.raises(EdgecoreError, match="unknown device profile 'no-such-device'.*pi-zero-2w"):
        profiles.resolve_profile("no-such-device")
    with pytest.raises(EdgecoreError, match="does not exist"):
        profiles.resolve_profile(str(tmp_path / "missing.toml"))


# Each bad profile: what to change in GOOD, and what the error must name.
BAD = {
    "missing budget": (("memory_budget_mb = 300\n", ""), ["'memory_budget_mb'", "missing"]),
    "zero budget": (("memory_budget_mb = 300", "memory_budget_mb = 0"), ["'memory_budget_mb'", "0", "positive"]),
    "negative budget": (("memory_budget_mb = 300", "memory_budget_mb = -5"), ["'memory_budget_mb'", "-5"]),
    "budget as text": (("memory_budget_mb = 300", 'memory_budget_mb = "300"'), ["'memory_budget_mb'", "'300'", "number"]),
    "budget as bool": (("memory_budget_mb = 300", "memory_budget_mb = true"), ["'memory_budget_mb'", "True"]),
    "removed floor": (("precision", "runtime_floor_mb = 350\nprecision"), ["'runtime_floor_mb'", "no longer"]),
    "unknown bits": (("[4, 8, 32]", "[4, 5, 32]"), ["'weight_bits'", "5", "[2, 3, 4, 8, 16, 32]"]),
    "bits as text": (("[4, 8, 32]", '[4, "8"]'), ["'weight_bits'", "'8'"]),
    "bits not a list": (("[4, 8, 32]", "8"), ["'weight_bits'", "8", "list"]),
    "no bits": (("[4, 8, 32]", "[]"), ["'weight_bits'", "empty"]),
    "bad precision": (('precision = "fp32"', 'precision = "fp16"'), ["'precision'", "'fp16'", "'bf16'"]),
    "sparsity one": (("[0.5, 0.0, 0.25]", "[0.5, 1.0]"), ["'sparsity.unstructured'", "1.0", "[0, 1)"]),
    "sparsity negative": (("[0.5, 0.0, 0.25]", "[-0.25]"), ["'sparsity.unstructured'", "-0.25"]),
    "sparsity text": (("[0.5, 0.0, 0.25]", '["half"]'), ["'sparsity.unstructured'", "'half'"]),
    "n_m reversed": (('["2:4"]', '["4:2"]'), ["'sparsity.n_m'", "'4:2'", "0 < N < M"]),
    "n_m dense": (('["2:4"]', '["4:4"]'), ["'sparsity.n_m'", "'4:4'"]),
    "n_m malformed": (('["2:4"]', '["2-4"]'), ["'sparsity.n_m'", "'2-4'", "N:M"]),
    "n_m zero": (('["2:4"]', '["0:4"]'), ["'sparsity.n_m'", "'0:4'"]),
    "n_m number": (('["2:4"]', "[2]"), ["'sparsity.n_m'", "2"]),
    "typo at top": (("memory_budget_mb = 300", "memory_budget_mb = 300\nmemory_budjet_mb = 200"), ["'memory_budjet_mb'", "unknown"]),
    "typo in sparsity": (("n_m = ", "nm = "), ["'sparsity.nm'", "unknown"]),
    "sparsity not a table": (('[sparsity]\nunstructured = [0.5, 0.0, 0.25]\nn_m = ["2:4"]\n', "sparsity = 0.5\n"), ["'sparsity'", "0.5", "table"]),
    "removed throughput": (('n_m = ["2:4"]\n', 'n_m = ["2:4"]\n\n[throughput]\ngflops = 12.5\n'), ["'throughput'", "no longer"]),
    "empty name": (('name = "test-board"', 'name = ""'), ["'name'", "''"]),
    "name with spaces": (('name = "test-board"', 'name = "test board"'), ["'name'", "'test board'"]),
    "name a number": (('name = "test-board"', "name = 5"), ["'name'", "5"]),
    "bad toml": (("memory_budget_mb = 300", "memory_budget_mb = = 300"), ["not valid TOML"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_profile_errors_name_file_and_field(tmp_path, case):
    (old, new), expected = BAD[case]
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(EdgecoreError) as caught:
        profiles.load_profile(path)
    message = str(caught.value)
    assert str(path) in message
    for text in expected:
        assert text in message, f"{case}: {text!r} not in {message!r}"
