"""A compressed model on disk: save it, read its policy, load it back without recompressing.

A compressed model is a folder: config.json, tokenizer files, policy.json and
model.safetensors (packed buffers). `load_compressed` rebuilds the module tree on the meta
device from config + policy and fills it from the file, so reloading never materialises the
dense model or recompresses anything.

policy.json is `Policy.to_dict()`: every layer's candidate as {"sparsity", "pattern", "bits"}
(bits 32 for fp32), the same spelling as before LucConfig; reading also accepts the older
spellings Candidate.from_dict knows (pattern "dense", bits null).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from edgecore.errors import EdgecoreError
from edgecore.luc.config import FP32_BITS
from edgecore.luc.layer import CompressedLinear, set_module
from edgecore.luc.policy import Policy
from edgecore.luc.sensitivity import linears
from edgecore.luc.table import empty_embeddings

POLICY_FILE, WEIGHTS_FILE = "policy.json", "model.safetensors"


def save_compressed(folder: Path | str, model, tokenizer, policy: Policy) -> Path:
    """Write the compressed model folder; returns it. A tied dense head is stored once."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if policy.embedding_bits == FP32_BITS and getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / WEIGHTS_FILE))
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / POLICY_FILE).write_text(json.dumps(policy.to_dict(), indent=2))
    return folder


def read_policy(folder: Path | str) -> Policy:
    path = Path(folder) / POLICY_FILE
    if not path.is_file():
        raise EdgecoreError(f"{path} not found: {folder} is not a compressed model folder (made by `python -m edgecore compress`)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise EdgecoreError(f"{path} is not valid JSON ({err}); recompress the model") from None
    return Policy.from_dict(raw, str(path))


def is_compressed_folder(path: Path | str) -> bool:
    return (Path(path) / POLICY_FILE).is_file()


def load_compressed(folder: Path | str, owned: bool = False):
    """(model, tokenizer, policy) from a folder written by `save_compressed`, without recompressing.

    The weights are mapped from the file (pages are read as they are touched). With owned=True
    they are copied into memory of their own instead: freeing one of them (a layer the scheduler
    streams or parks on disk) then gives its memory back, which one shared mapping would not.
    """
    folder = Path(folder)
    policy = read_policy(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for layer, candidate in zip(model.model.layers, policy.layers):
        if candidate.is_dense:
            continue
        for name, linear in linears(layer).items():
            empty = CompressedLinear.empty_like(linear, bits=candidate.bits, sparsity=candidate.spec,
                                                group_size=policy.group_size)
            set_module(layer, name, empty)
    if policy.embedding_bits != FP32_BITS:
        empty_embeddings(model, policy.embedding_bits, policy.group_size, tied=bool(config.tie_word_embeddings))
    if owned:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as file:
            state = {key: file.get_tensor(key).clone() for key in file.keys()}
    else:
        state = load_file(str(folder / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied_head = policy.embedding_bits == FP32_BITS and config.tie_word_embeddings
    if tied_head:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [k for k in missing if not (tied_head and k == "lm_head.weight")]
    if missing or unexpected:
        raise EdgecoreError(
            f"{folder / WEIGHTS_FILE} does not match its policy: missing {missing[:4]}, unexpected {unexpected[:4]}; "
            "recompress the model"
        )
    _rebuild_unsaved_buffers(model, config)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, policy


def rebuild_meta_buffers(model: nn.Module, config) -> None:
    """Build again, for real, from the config, every module whose own buffers are on the meta device:
    buffers a checkpoint never holds (RoPE's inverse frequencies) of a model built on meta."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            set_module(model, name, type(module)(config=config))


def _rebuild_unsaved_buffers(model: nn.Module, config) -> None:
    """`rebuild_meta_buffers` after loading a checkpoint, which must leave nothing else on meta."""
    rebuild_meta_buffers(model, config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise EdgecoreError(f"the compressed checkpoint leaves {left[:4]} unset; recompress the model")


__all__ = ["POLICY_FILE", "WEIGHTS_FILE", "is_compressed_folder", "load_compressed", "read_policy",
           "rebuild_meta_buffers", "save_compressed"]
