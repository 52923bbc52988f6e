"""Load a compressed model folder in a fresh process and measure what it really occupies.

Prints {"floor_mb", "loaded_mb", "resident_above_floor_mb", "stored_mb", "load_s"}: RSS after
the imports (floor), RSS after `load_compressed`, and the bytes of the model's tensors.
"""

from __future__ import annotations

import gc
import json
import sys
import time

import safetensors.torch  # noqa: F401  (imports belong to the floor, not to the model)
import transformers.models.llama.modeling_llama  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

from edgecore import measure
from edgecore.luc import load_compressed, stored_nbytes
from edgecore.memory import MIB


def main() -> None:
    config = json.loads(sys.stdin.read())
    gc.collect()
    floor = measure.rss_mb()
    started = time.perf_counter()
    model, _tokenizer, _policy = load_compressed(config["folder"])
    load_s = time.perf_counter() - started
    gc.collect()
    loaded = measure.rss_mb()
    print(json.dumps({
        "floor_mb": floor, "loaded_mb": loaded, "resident_above_floor_mb": loaded - floor,
        "stored_mb": stored_nbytes(model) / MIB, "load_s": load_s,
    }))


if __name__ == "__main__":
    main()
