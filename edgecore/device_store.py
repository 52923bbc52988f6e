"""The device's disk store of compressed bases: built once, trusted only when whole.

In deployment every Flower message runs in a fresh process, so what a device built in one
round must be on its disk for the next. A base lives in `$EDGECORE_CACHE/devices/<key>/`, the
key a hash of everything it depends on (the model and its files, the profile, the policy
inputs, the calibration data, the tuning step the budget leaves room for, and the code that
compresses). A folder is built under a temporary name and renamed into place only when its
manifest (every file's size and sha256) is written, so a crash leaves no folder that looks
whole; a folder whose files disagree with its manifest is removed and built again.

The execution plan needs no copy here: it is derived again from the cost table, which
edgecore.schedule keeps on disk per profile and machine with every timing, and so is the
verdict of the plan's first real steps (edgecore.schedule.guard).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgecore import models

log = logging.getLogger(__name__)

MANIFEST, BUILD = "manifest.json", "build.json"
FORMAT = 1  # bump when the folder's layout changes
_CODE = Path(__file__).resolve().parent


def code_version() -> str:
    """A hash of the code that shapes a compressed base (LUC and the store itself)."""
    digest = hashlib.sha256()
    for path in sorted([*(_CODE / "luc").glob("*.py"), _CODE / "device_store.py"]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class StoredBase:
    """A whole compressed base on disk."""

    folder: Path
    key: str
    build: dict  # how it was built (seconds, peak_mb, streamed, ...), from build.json


class DeviceStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    @classmethod
    def default(cls) -> DeviceStore:
        return cls(models.cache_root() / "devices")

    def base(self, inputs: dict, build: Callable[[Path], dict]) -> tuple[StoredBase, bool]:
        """(the stored base for `inputs`, whether it came from disk); `build(folder)` writes a new one
        into `folder` and returns how it went."""
        key = fingerprint({**inputs, "code": code_version(), "format": FORMAT})
        folder = self.root / key
        problem = check(folder, key)
        if problem is None:
            return StoredBase(folder, key, _read_json(folder / BUILD)), True
        if folder.exists():
            log.warning("device store: %s is not whole (%s); building it again", folder, problem)
            shutil.rmtree(folder, ignore_errors=True)
        tmp = self.root / f".{key}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            started = time.perf_counter()
            report = {**build(tmp), "built_s": time.perf_counter() - started, "inputs": inputs}
            if problem != "missing":
                report["rebuilt_because"] = problem
            (tmp / BUILD).write_text(json.dumps(report, indent=1, default=str))
            write_manifest(tmp, key)
            try:
                tmp.replace(folder)
            except OSError:  # another process on this device finished the same base first
                if check(folder, key) is not None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return StoredBase(folder, key, _read_json(folder / BUILD)), False


def write_manifest(folder: Path, key: str) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": file_digest(p)} for p in sorted(folder.iterdir())
             if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"key": key, "format": FORMAT, "files": files}, indent=1))


def check(folder: Path, key: str) -> str | None:
    """None when `folder` is whole (its manifest names this key and every file matches); else what is wrong."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "missing" if not folder.exists() else "no manifest (a build that did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err})"
    if manifest.get("key") != key:
        return f"manifest key {manifest.get('key')!r} is not {key!r}"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected.get("size"):
            return f"{name} has {path.stat().st_size} bytes, not {expected.get('size')}"
        if file_digest(path) != expected.get("sha256"):
            return f"{name} does not match its sha256"
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
