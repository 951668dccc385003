"""The models packaged with localmoe: small MoEs trained on Shakespeare (models/train).

FILENAME is the default for `run`, `chat` and `serve`: qwen3moe (8 experts, top-2, 256-token
context). SHIPPED lists every packaged file; the second is the fine-grained deepseek2 model (32
experts, top-6 + 2 shared, 2048-token context), whose held-out perplexity at 256 tokens is higher
(README, "The shipped models")."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from localmoe.errors import LocalMoEError

FILENAME = "shakespeare-moe-Q8_0.gguf"
SHIPPED = (FILENAME, "shakespeare-ds-Q8_0.gguf")
ENV = "LOCALMOE_MODEL"


def shipped_path(name: str = FILENAME) -> Path:
    """The packaged file NAME (one of SHIPPED)."""
    return Path(str(resources.files("localmoe.shipped_model") / name))


def default_model_path() -> Path:
    """$LOCALMOE_MODEL if set, else the packaged default model file."""
    if os.environ.get(ENV):
        path, where = Path(os.environ[ENV]).expanduser(), f"${ENV}"
    else:
        path, where = shipped_path(), "the packaged default"
    if not path.is_file():
        raise LocalMoEError(f"no model at {path} ({where}); pass a MODEL file"
                            + ("" if os.environ.get(ENV) else f" or set {ENV}"))
    return path
