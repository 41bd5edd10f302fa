"""Conversion of a model: analysis (what its forward keeps), plan (a decision per kept tensor, with
its reason), apply (module swaps), driven by a recipe, and the report of what was decided."""

from .api import convert, plan
from .apply import revert
from .budget import LADDER, BudgetChoice, MemoryBudget, MemoryBudgetError
from .planner import ActivationDecision, ConvDecision, NormDecision, Plan
from .recipe import Recipe, RecipeError, Storage, load_recipe, shipped_recipes
from .report import ActivationRecord, ConversionReport, LayerRecord, NormRecord

__all__ = [
    "LADDER",
    "ActivationDecision",
    "ActivationRecord",
    "BudgetChoice",
    "ConvDecision",
    "ConversionReport",
    "LayerRecord",
    "MemoryBudget",
    "MemoryBudgetError",
    "NormDecision",
    "NormRecord",
    "Plan",
    "Recipe",
    "RecipeError",
    "Storage",
    "convert",
    "load_recipe",
    "plan",
    "revert",
    "shipped_recipes",
]
