"""Dictionaries of units: one protocol, a registry by architecture name, SAELens-layout files."""

from . import kmeans, linear, sae, snmf  # noqa: F401  (registers the architectures)
from .base import ARCHITECTURES, Dictionary, load_dictionary, register

__all__ = ["ARCHITECTURES", "Dictionary", "load_dictionary", "register"]
