"""LLM-written unit labels, scored by detection and fuzzing on held-out windows (`unitscope label`)."""

from .client import Answer, EndpointError, HFChat, OpenAIEndpoint
from .run import LabelSettings, label_units
from .scoring import auc, balanced_accuracy, f1

__all__ = ["Answer", "EndpointError", "HFChat", "LabelSettings", "OpenAIEndpoint", "auc", "balanced_accuracy", "f1",
           "label_units"]
