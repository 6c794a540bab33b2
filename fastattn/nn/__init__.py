"""Drop-in modules built on fastattn ops."""

from .softmax import Softmax

__all__ = ["Softmax"]
