"""localmoe: a runner and quantizer for Mixture-of-Experts GGUF models."""
from .errors import GGUFFormatError, LocalMoEError, UnsupportedError

__version__ = "0.1.0"
__all__ = ["GGUFFormatError", "LocalMoEError", "UnsupportedError", "__version__", "load", "load_tokenizer", "quantize"]

# imported on first use so that `import localmoe` stays cheap (no numba)
_LAZY = {"load": "localmoe.model", "load_tokenizer": "localmoe.tokenizer",
         "quantize": "localmoe.quantizer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'localmoe' has no attribute {name!r}")
