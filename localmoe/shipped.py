"""The default model: a small MoE trained on Shakespeare (models/train), packaged with localmoe."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from localmoe.errors import LocalMoEError

FILENAME = "shakespeare-moe-Q8_0.gguf"
ENV = "LOCALMOE_MODEL"


def default_model_path() -> Path:
    """$LOCALMOE_MODEL if set, else the packaged model file."""
    if os.environ.get(ENV):
        path, where = Path(os.environ[ENV]).expanduser(), f"${ENV}"
    else:
        path, where = Path(str(resources.files("localmoe.shipped_model") / FILENAME)), "the packaged default"
    if not path.is_file():
        raise LocalMoEError(f"no model at {path} ({where}); pass a MODEL file"
                            + ("" if os.environ.get(ENV) else f" or set {ENV}"))
    return path
