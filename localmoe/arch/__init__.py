"""Architecture registry: general.architecture -> module in this package.

Each module defines `ModelArgs` (frozen, `from_gguf`) and `Block` (its quirks).
"""
from __future__ import annotations

import importlib

from localmoe.errors import UnsupportedError

ARCHES = {
    "llama": "llama",
    "qwen2moe": "qwen2moe",
    "qwen3moe": "qwen3moe",
    "deepseek": "deepseek",
    "deepseek2": "deepseek2",
    "olmoe": "olmoe",
}


def arch_module(arch: str):
    if arch not in ARCHES:
        raise UnsupportedError(f"architecture {arch!r} is not supported (have: {', '.join(sorted(ARCHES))})")
    try:
        return importlib.import_module(f"{__name__}.{ARCHES[arch]}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{ARCHES[arch]}":
            raise
        raise UnsupportedError(f"architecture {arch!r} is not implemented yet") from None
