"""The model `localmoe run` and `localmoe chat` use when no MODEL is given (see localmoe/shipped.py)."""
