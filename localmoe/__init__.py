"""localmoe: a runner and quantizer for Mixture-of-Experts GGUF models."""
from .errors import GGUFFormatError, LocalMoEError, UnsupportedError

__version__ = "0.1.0"
__all__ = ["GGUFFormatError", "LocalMoEError", "UnsupportedError", "__version__"]
