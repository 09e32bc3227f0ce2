"""Causal tests of units: interventions (serialisable edits applied through `Subject.intervene`) and steering."""

from . import interventions
from .interventions import Intervention, Positions, UnitEdit, intervention_from_json, unit_direction

__all__ = ["Intervention", "Positions", "UnitEdit", "intervention_from_json", "interventions", "unit_direction"]
