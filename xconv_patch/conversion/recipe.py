"""Recipes: which convolutions convert() patches, and with which estimator settings.

A recipe is a TOML file::

    description = "what the recipe is for"

    [defaults]              # every convolution not selected by a rule
    probes = 16             # 0 = exact (torch's own layer)
    probe = "rademacher"    # or "gaussian", "orthogonal"
    per_sample = true
    deflate = true
    recompute = true        # false: never recompute the input (probed if probes > 0, else kept)
    norm_storage = "exact"  # or "bfloat16", "int8": how the norm input it is recomputed from is kept

    [[rules]]
    match = { depthwise = true }
    probes = 0
    why = "shown in the report"

A rule's `match` selects layers by exact qualified name (`name`), glob or regex on the name
(`glob`, `regex`), layer type (`type`, `transposed`) and shape (`in_channels`, `out_channels`,
`kernel_size`, `stride`, `groups`, `depthwise`, `spatial_rank`, `first`, `last`); all its
conditions must hold. Numbers match exactly or by an inclusive `{ min = .., max = .. }` range.

Precedence, per setting: defaults < type rules < shape rules < pattern rules < name rules, where a
rule's rank is that of its most specific condition; among rules of one rank the later one wins.
`probes=` given to convert() replaces the default budget only, never a rule's explicit value.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from ..probes import ProbeSpec
from ..recompute.compressed import check_norm_storage


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, the rule and the key."""


@dataclass(frozen=True)
class Storage:
    """How a layer's input is stored, besides probes: whether it may be `recompute`d from a norm's
    input (false: probed when it has probes, else kept), and how that norm input is kept
    (`norm_storage`, one of NORM_STORAGES: compressed with stochastic rounding, or "exact")."""

    recompute: bool = True
    norm_storage: str = "exact"

    def __post_init__(self) -> None:
        check_norm_storage(self.norm_storage)


STORAGE_TYPES: dict[str, type] = {f.name: type(f.default) for f in fields(Storage)}
SETTING_TYPES: dict[str, type] = {**{f.name: type(f.default) for f in fields(ProbeSpec)}, **STORAGE_TYPES}
"""A layer's settings: its ProbeSpec and its Storage."""


@dataclass(frozen=True)
class ConvFacts:
    """What a rule can select a convolution by."""

    name: str
    classes: tuple[str, ...]
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    transposed: bool
    first: bool = False
    last: bool = False

    @property
    def spatial_rank(self) -> int:
        return len(self.kernel_size)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels


TYPE_RANK, SHAPE_RANK, PATTERN_RANK, NAME_RANK = 1, 2, 3, 4
CONDITION_RANKS = {
    "type": TYPE_RANK,
    "transposed": TYPE_RANK,
    "in_channels": SHAPE_RANK,
    "out_channels": SHAPE_RANK,
    "kernel_size": SHAPE_RANK,
    "stride": SHAPE_RANK,
    "groups": SHAPE_RANK,
    "depthwise": SHAPE_RANK,
    "spatial_rank": SHAPE_RANK,
    "first": SHAPE_RANK,
    "last": SHAPE_RANK,
    "glob": PATTERN_RANK,
    "regex": PATTERN_RANK,
    "name": NAME_RANK,
}
_SIZE_CONDITIONS = ("kernel_size", "stride")
_FLAG_CONDITIONS = ("transposed", "depthwise", "first", "last")
_TEXT_CONDITIONS = ("type", "glob", "name")


@dataclass(frozen=True)
class Rule:
    """Settings for the layers its `match` conditions select."""

    index: int
    match: Mapping[str, Any]
    settings: Mapping[str, Any]
    why: str = ""

    @property
    def label(self) -> str:
        return f"rule {self.index + 1}"

    @property
    def rank(self) -> int:
        return max(CONDITION_RANKS[key] for key in self.match)

    def matches(self, facts: ConvFacts) -> bool:
        return all(_condition_holds(key, expected, facts) for key, expected in self.match.items())


def _condition_holds(key: str, expected: Any, facts: ConvFacts) -> bool:
    if key == "name":
        return facts.name in _as_list(expected)
    if key == "glob":
        return any(fnmatch.fnmatchcase(facts.name, pattern) for pattern in _as_list(expected))
    if key == "regex":
        return re.fullmatch(expected, facts.name) is not None
    if key == "type":
        return any(name in facts.classes for name in _as_list(expected))
    actual = getattr(facts, key)
    if key in _FLAG_CONDITIONS:
        return actual == expected
    if key in _SIZE_CONDITIONS:
        if isinstance(expected, list):
            return list(actual) == expected
        return all(_number_holds(size, expected) for size in actual)
    return _number_holds(actual, expected)


def _number_holds(actual: int, expected: int | Mapping[str, int]) -> bool:
    if isinstance(expected, int):
        return actual == expected
    return expected.get("min", actual) <= actual <= expected.get("max", actual)


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


@dataclass(frozen=True)
class Recipe:
    """Default settings plus rules; see the module docstring for the format and precedence."""

    defaults: ProbeSpec = field(default_factory=ProbeSpec)
    rules: tuple[Rule, ...] = ()
    description: str = ""
    source: str = "<recipe>"
    storage: Storage = field(default_factory=Storage)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<recipe>") -> Recipe:
        """A recipe from parsed TOML, validated; errors name the source, the rule and the key."""
        _check_keys(data, {"description", "defaults", "rules"}, source)
        description = _typed(data.get("description", ""), str, source, "description")
        defaults_table = _typed(data.get("defaults", {}), dict, source, "defaults")
        _check_keys(defaults_table, set(SETTING_TYPES), source, "[defaults]")
        defaults_settings = _settings(defaults_table, source, "[defaults]")
        storage = _storage(_storage_settings(defaults_settings), source, "[defaults]")
        defaults = _spec(_probe_settings(defaults_settings), source, "[defaults]")
        rules = []
        for index, table in enumerate(_typed(data.get("rules", []), list, source, "rules")):
            where = f"rule {index + 1}"
            table = _typed(table, dict, source, where)
            _check_keys(table, {"match", "why", *SETTING_TYPES}, source, where)
            match = _match(_typed(table.get("match", {}), dict, source, f"{where}: match"), source, where)
            settings = _settings(table, source, where)
            if not settings:
                raise RecipeError(f"{source}: {where}: sets nothing; give at least one of {', '.join(SETTING_TYPES)}")
            _spec({**vars(defaults), **_probe_settings(settings)}, source, where)
            _storage({**vars(storage), **_storage_settings(settings)}, source, where)
            why = _typed(table.get("why", ""), str, source, f"{where}: why")
            rules.append(Rule(index, match, settings, why))
        return cls(defaults, tuple(rules), description, source, storage)

    @classmethod
    def from_toml(cls, text: str, source: str = "<recipe>") -> Recipe:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise RecipeError(f"{source}: not valid TOML: {error}") from None
        return cls.from_dict(data, source)

    def budget(self, probes: int | None = None) -> ProbeSpec:
        """The default settings, with `probes` (when given) as the default budget."""
        return self.defaults if probes is None else replace(self.defaults, probes=probes)

    def settings_for(self, facts: ConvFacts, probes: int | None = None) -> tuple[ProbeSpec, list[Rule]]:
        """The layer's settings and the rules that decided them, lowest precedence first.

        `probes` replaces the default budget; rules that set probes keep their value.
        """
        chosen = vars(self.budget(probes)).copy()
        deciding = []
        for rule in self._matching(facts):
            chosen.update(_probe_settings(rule.settings))
            deciding.append(rule)
        return ProbeSpec(**chosen), deciding

    def storage_for(self, facts: ConvFacts, norm_storage: str | None = None) -> Storage:
        """The layer's Storage, by the same precedence; `norm_storage` replaces the default's."""
        chosen = vars(self.storage).copy()
        if norm_storage is not None:
            chosen["norm_storage"] = norm_storage
        for rule in self._matching(facts):
            chosen.update(_storage_settings(rule.settings))
        return Storage(**chosen)

    def _matching(self, facts: ConvFacts) -> list[Rule]:
        return sorted((rule for rule in self.rules if rule.matches(facts)), key=lambda rule: rule.rank)

    def to_toml(self) -> str:
        """The recipe as TOML text that from_toml (and load_recipe) reads back."""
        lines = []
        if self.description:
            lines += [f"description = {_toml_value(self.description)}", ""]
        lines.append("[defaults]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in vars(self.defaults).items()]
        lines += [f"{key} = {_toml_value(value)}" for key, value in vars(self.storage).items()
                  if value != getattr(Storage(), key)]
        for rule in self.rules:
            lines += ["", "[[rules]]", f"match = {_toml_value(dict(rule.match))}"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in rule.settings.items()]
            if rule.why:
                lines.append(f"why = {_toml_value(rule.why)}")
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return "{ " + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + " }"


def _check_keys(table: Mapping[str, Any], allowed: Iterable[str], source: str, where: str = "") -> None:
    allowed = set(allowed)
    for key in table:
        if key not in allowed:
            place = f"{where}: " if where else ""
            raise RecipeError(f"{source}: {place}unknown key {key!r} (expected one of {', '.join(sorted(allowed))})")


def _typed(value: Any, expected: type, source: str, where: str) -> Any:
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        got = f"{_type_name(type(value))} {value!r}"
        raise RecipeError(f"{source}: {where}: expected {_type_name(expected)}, got {got}")
    return value


def _type_name(kind: type) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "true or false", int: "an integer"}.get(
        kind, kind.__name__
    )


def _settings(table: Mapping[str, Any], source: str, where: str) -> dict[str, Any]:
    return {
        key: _typed(table[key], kind, source, f"{where}: {key}") for key, kind in SETTING_TYPES.items() if key in table
    }


def _probe_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in settings.items() if key not in STORAGE_TYPES}


def _storage_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in settings.items() if key in STORAGE_TYPES}


def _storage(settings: Mapping[str, Any], source: str, where: str) -> Storage:
    """The settings as a Storage; its validation errors name the source and the rule."""
    try:
        return Storage(**settings)
    except ValueError as error:
        raise RecipeError(f"{source}: {where}: {error}") from None


def _spec(settings: Mapping[str, Any], source: str, where: str) -> ProbeSpec:
    """The settings as a ProbeSpec; its validation errors name the source and the rule."""
    if settings.get("probes", 0) < 0:
        raise RecipeError(f"{source}: {where}: probes: must be 0 (exact) or more, got {settings['probes']}")
    try:
        return ProbeSpec(**settings)
    except ValueError as error:
        raise RecipeError(f"{source}: {where}: {error}") from None


def _match(table: Mapping[str, Any], source: str, where: str) -> dict[str, Any]:
    if not table:
        raise RecipeError(f"{source}: {where}: match: needs at least one condition (use [defaults] for every layer)")
    _check_keys(table, CONDITION_RANKS, source, f"{where}: match")
    for key, value in table.items():
        place = f"{where}: match.{key}"
        if key in _FLAG_CONDITIONS:
            _typed(value, bool, source, place)
        elif key == "regex":
            try:
                re.compile(_typed(value, str, source, place))
            except re.error as error:
                raise RecipeError(f"{source}: {place}: bad regular expression {value!r}: {error}") from None
        elif key in _TEXT_CONDITIONS:
            if not isinstance(value, str):
                for item in _typed(value, list, source, place):
                    _typed(item, str, source, place)
        elif key in _SIZE_CONDITIONS and isinstance(value, list):
            for item in value:
                _number(item, source, place)
        else:
            _number_or_range(value, source, place)
    return dict(table)


def _number(value: Any, source: str, where: str) -> int:
    if _typed(value, int, source, where) < 0:
        raise RecipeError(f"{source}: {where}: must not be negative, got {value}")
    return value


def _number_or_range(value: Any, source: str, where: str) -> None:
    if isinstance(value, dict):
        _check_keys(value, {"min", "max"}, source, where)
        for bound in value.values():
            _number(bound, source, where)
    else:
        _number(value, source, where)


def shipped_recipes() -> list[str]:
    """Names of the recipes installed with xconv-patch."""
    folder = resources.files("xconv_patch.recipes")
    return sorted(entry.name.removesuffix(".toml") for entry in folder.iterdir() if entry.name.endswith(".toml"))


def load_recipe(recipe: str | Path | Recipe) -> Recipe:
    """A Recipe from a shipped recipe's name ('default', 'resnet', ...) or a TOML file's path."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str) and recipe in shipped_recipes():
        text = resources.files("xconv_patch.recipes").joinpath(f"{recipe}.toml").read_text(encoding="utf-8")
        return Recipe.from_toml(text, source=f"{recipe}.toml")
    path = Path(recipe)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file; shipped recipes: {', '.join(shipped_recipes())}")
    return Recipe.from_toml(path.read_text(encoding="utf-8"), source=str(path))
