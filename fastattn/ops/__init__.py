"""Public functions, one op per module."""

from .softmax import softmax

__all__ = ["softmax"]
