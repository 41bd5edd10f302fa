"""Conversion of a model: analysis (what its forward keeps), plan (a decision per kept tensor, with
its reason), apply (module swaps), driven by a recipe, and the report of what was decided."""

from .api import convert, plan
from .apply import revert
from .planner import ActivationDecision, ConvDecision, Plan
from .recipe import Recipe, RecipeError, load_recipe, shipped_recipes
from .report import ActivationRecord, ConversionReport, LayerRecord

__all__ = [
    "ActivationDecision",
    "ActivationRecord",
    "ConvDecision",
    "ConversionReport",
    "LayerRecord",
    "Plan",
    "Recipe",
    "RecipeError",
    "convert",
    "load_recipe",
    "plan",
    "revert",
    "shipped_recipes",
]
