"""edgecore: the device-side fine-tuning pipeline (torch, transformers and peft; never flwr)."""

from edgecore.errors import EdgecoreError

__all__ = ["EdgecoreError"]
