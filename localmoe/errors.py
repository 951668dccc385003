"""Exceptions that reach the user as clear one-line messages."""


class LocalMoEError(Exception):
    """Base class: the CLI prints these without a traceback."""


class GGUFFormatError(LocalMoEError, ValueError):
    """The file is not a well-formed GGUF file (or not one we can read)."""


class UnsupportedError(LocalMoEError):
    """Well-formed input that localmoe does not support (yet)."""
