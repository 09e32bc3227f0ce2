"""Dictionaries of units: one protocol, a registry by architecture name, SAELens-layout files."""

from . import sae  # noqa: F401  (registers the SAE architectures)
from .base import ARCHITECTURES, Dictionary, load_dictionary, register

__all__ = ["ARCHITECTURES", "Dictionary", "load_dictionary", "register"]
