"""User data in JSON Lines: one object per line, {"text": ...} or {"prompt": ..., "response": ...}.

An optional "group" (string) names the natural unit used by natural and Dirichlet
partitioning. A single .jsonl file is split 80/10/10 with the seeded stratified split; a
directory holding train.jsonl (and optionally validation.jsonl, test.jsonl) is used as given.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edgecore.data.splits import Dataset, Sample, make_dataset
from edgecore.errors import EdgecoreError

log = logging.getLogger(__name__)

EXPECTED_SHAPE = (
    'each line must be a JSON object like {"text": "..."} or {"prompt": "...", "response": "..."}, '
    'optionally with "group": "..."'
)
SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}


def _bad(path: Path, line_no: int, problem: str) -> EdgecoreError:
    return EdgecoreError(f"{path}, line {line_no}: {problem}; {EXPECTED_SHAPE}")


def _text_field(obj: dict, key: str, path: Path, line_no: int) -> str:
    """A required, non-empty string field."""
    if key not in obj:
        raise _bad(path, line_no, f'missing field "{key}"')
    value = obj[key]
    if not isinstance(value, str):
        raise _bad(path, line_no, f'field "{key}" must be a string, got {type(value).__name__}')
    if not value.strip():
        raise _bad(path, line_no, f'field "{key}" is empty')
    return value


def parse_record(obj: object, path: Path, line_no: int) -> Sample:
    """One decoded line as a Sample, or an error naming the file, line and field."""
    if not isinstance(obj, dict):
        raise _bad(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
    group = obj.get("group", "")
    if not isinstance(group, str):
        raise _bad(path, line_no, f'field "group" must be a string, got {type(group).__name__}')
    has_text = "text" in obj
    has_pair = "prompt" in obj or "response" in obj
    if has_text and has_pair:
        raise _bad(path, line_no, 'use either "text" or "prompt"/"response", not both')
    if has_text:
        return Sample(prompt="", response=_text_field(obj, "text", path, line_no), group=group)
    if not has_pair:
        raise _bad(path, line_no, f'missing field "text" (or "prompt" and "response"); found keys {sorted(obj)}')
    prompt = _text_field(obj, "prompt", path, line_no)
    response = _text_field(obj, "response", path, line_no)
    return Sample(prompt=prompt, response=response, group=group)


def read_jsonl(path: str | Path) -> list[Sample]:
    """Every non-blank line of `path` as a Sample; errors name the file and 1-based line."""
    path = Path(path)
    if not path.is_file():
        raise EdgecoreError(f"{path}: no such file; give a .jsonl file or a directory holding train.jsonl")
    samples: list[Sample] = []
    # Bytes first: a bad encoding is then reported with its line number too.
    for line_no, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            problem = f"not valid UTF-8 ({exc.reason} at byte {exc.start}); save the file as UTF-8"
            raise _bad(path, line_no, problem) from None
        if not line.strip():
            continue  # blank lines are allowed anywhere
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(path, line_no, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        samples.append(parse_record(obj, path, line_no))
    if not samples:
        raise EdgecoreError(f"{path}: the file holds no records; {EXPECTED_SHAPE}")
    return samples


def load_jsonl(path: str | Path, seed: int = 0) -> Dataset:
    """A .jsonl file (seeded 80/10/10 split) or a directory with train/validation/test files."""
    path = Path(path)
    if path.is_dir():
        return _load_dir(path)
    if path.suffix != ".jsonl" and not path.is_file():
        raise EdgecoreError(f"{path}: no such file or directory; give a .jsonl file or a directory holding train.jsonl")
    return make_dataset(path.stem, read_jsonl(path), seed=seed)


def _load_dir(path: Path) -> Dataset:
    """The splits exactly as the user made them; a missing validation or test file is an empty split."""
    train_file = path / SPLIT_FILES["train"]
    if not train_file.is_file():
        raise EdgecoreError(
            f"{path}: directory has no {SPLIT_FILES['train']}; add train.jsonl "
            "(and optionally validation.jsonl, test.jsonl), or pass a single .jsonl file to split it 80/10/10"
        )
    splits: dict[str, list[Sample]] = {}
    for split, file_name in SPLIT_FILES.items():
        file = path / file_name
        if file.is_file():
            splits[split] = read_jsonl(file)
        else:
            log.warning("%s: no %s, the %s split is empty", path, file_name, split)
            splits[split] = []
    ds = Dataset(name=path.resolve().name, choices=None, **splits)
    log.info("dataset %s: %s", ds.name, ds.summary()["splits"])
    return ds
