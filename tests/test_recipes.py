"""Recipes: the TOML format, precedence, validation, shipped recipes and round trips through convert()."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models

from xconv_patch import ConversionReport, Recipe, RecipeError, convert, load_recipe, plan, shipped_recipes
from xconv_patch.conversion.recipe import ConvFacts
from xconv_patch.probes import ProbeSpec


def _facts(name: str = "layer1.0.conv1", **overrides: object) -> ConvFacts:
    values = dict(
        name=name,
        classes=("Conv2d",),
        in_channels=64,
        out_channels=64,
        kernel_size=(3, 3),
        stride=(1, 1),
        groups=1,
        transposed=False,
    )
    return ConvFacts(**{**values, **overrides})


def _recipe(text: str) -> Recipe:
    return Recipe.from_toml(text, source="test.toml")


PRECEDENCE = """
[defaults]
probes = 8

[[rules]]
match = { name = "layer1.0.conv1" }
probes = 32

[[rules]]
match = { glob = "layer1.*" }
probes = 16
probe = "gaussian"

[[rules]]
match = { kernel_size = 3 }
probes = 4
deflate = false

[[rules]]
match = { type = "Conv2d" }
probes = 2
per_sample = false
deflate = true
"""


def test_precedence_name_over_pattern_over_shape_over_type() -> None:
    recipe = _recipe(PRECEDENCE)
    settings, rules = recipe.settings_for(_facts())
    assert settings == ProbeSpec(probes=32, probe="gaussian", per_sample=False, deflate=False)
    assert [rule.label for rule in rules] == ["rule 4", "rule 3", "rule 2", "rule 1"]
    assert recipe.settings_for(_facts("layer1.1.conv2"))[0].probes == 16
    assert recipe.settings_for(_facts("layer2.0.conv1"))[0].probes == 4
    assert recipe.settings_for(_facts("layer2.0.downsample.0", kernel_size=(1, 1)))[0].probes == 2
    assert recipe.settings_for(_facts("head", classes=("Conv1d",), kernel_size=(1,)))[0].probes == 8


def test_later_rule_of_the_same_rank_wins() -> None:
    recipe = _recipe("""
[[rules]]
match = { in_channels = { min = 32 } }
probes = 4
[[rules]]
match = { depthwise = false }
probes = 12
""")
    assert recipe.settings_for(_facts())[0].probes == 12


def test_probes_argument_replaces_only_the_default_budget() -> None:
    recipe = _recipe(PRECEDENCE)
    assert recipe.settings_for(_facts("head", classes=("Conv1d",), kernel_size=(1,)), probes=24)[0].probes == 24
    assert recipe.settings_for(_facts(), probes=24)[0].probes == 32


@pytest.mark.parametrize(
    ("facts", "match", "expected"),
    [
        (_facts(), {"regex": r"layer\d\.0\..*"}, True),
        (_facts(), {"regex": "layer1"}, False),
        (_facts(), {"glob": ["stem", "layer1.*"]}, True),
        (_facts(), {"out_channels": {"min": 65}}, False),
        (_facts(kernel_size=(3, 1)), {"kernel_size": [3, 1]}, True),
        (_facts(kernel_size=(3, 1)), {"kernel_size": 3}, False),
        (_facts(stride=(2, 2)), {"stride": 2}, True),
        (_facts(groups=64), {"depthwise": True, "groups": 64}, True),
        (_facts(groups=2), {"depthwise": True}, False),
        (
            _facts(classes=("ConvTranspose3d",), kernel_size=(2, 2, 2), transposed=True),
            {"spatial_rank": 3, "transposed": True},
            True,
        ),
        (_facts(first=True), {"first": True}, True),
        (_facts(), {"last": True}, False),
        (_facts(classes=("Conv3DSimple", "Conv3d")), {"type": ["Conv3d"]}, True),
    ],
)
def test_conditions(facts: ConvFacts, match: dict, expected: bool) -> None:
    recipe = Recipe.from_dict({"rules": [{"match": match, "probes": 0}]}, "test.toml")
    assert recipe.rules[0].matches(facts) is expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[defaults]\nprobes = -1", "test.toml: [defaults]: probes: must be 0 (exact) or more, got -1"),
        ("[defaults]\nprobs = 8", "test.toml: [defaults]: unknown key 'probs'"),
        ("[defaults]\nprobes = '8'", "test.toml: [defaults]: probes: expected an integer, got a string '8'"),
        ("[defaults]\nprobes = true", "test.toml: [defaults]: probes: expected an integer"),
        ("[defaults]\nprobe = 'sobol'", "test.toml: [defaults]: probe must be one of"),
        ("[[rules]]\nmatch = { regex = '(' }\nprobes = 0", "test.toml: rule 1: match.regex: bad regular expression"),
        (
            "[[rules]]\nmatch = { name = 'a' }\nprobes = 0\n[[rules]]\nmatch = { colour = 'red' }\nprobes = 0",
            "test.toml: rule 2: match: unknown key 'colour'",
        ),
        ("[[rules]]\nmatch = { kernel_size = -3 }\nprobes = 0", "test.toml: rule 1: match.kernel_size: must not be"),
        ("[[rules]]\nmatch = { first = 1 }\nprobes = 0", "test.toml: rule 1: match.first: expected true or false"),
        ("[[rules]]\nmatch = { in_channels = { least = 3 } }\nprobes = 0", "rule 1: match.in_channels: unknown key"),
        ("[[rules]]\nprobes = 0", "test.toml: rule 1: match: needs at least one condition"),
        ("[[rules]]\nmatch = { first = true }", "test.toml: rule 1: sets nothing"),
        ("[[rules]]\nmatch = { first = true }\nprobes = 1", "test.toml: rule 1: probes must be at least 2"),
        ("[[rules]]\nmatch = { first = true }\nprobes = 0\nspeed = 'fast'", "test.toml: rule 1: unknown key 'speed'"),
        ("[[rules]]\nmatch = { first = true }\nrecompute = 0", "test.toml: rule 1: recompute: expected true or false"),
        ("colour = 'red'", "test.toml: unknown key 'colour'"),
        ("[defaults\nprobes = 8", "test.toml: not valid TOML"),
    ],
)
def test_validation_errors_name_file_rule_and_key(text: str, message: str) -> None:
    with pytest.raises(RecipeError) as error:
        _recipe(text)
    assert message in str(error.value)
    assert isinstance(error.value, ValueError)


def test_rules_matching_no_layer_warn_or_fail_under_strict() -> None:
    recipe = _recipe(
        "[[rules]]\nmatch = { glob = 'encoder.*' }\nprobes = 0\n[[rules]]\nmatch = { depthwise = true }\nprobes = 0"
    )
    model = models.resnet18()
    with pytest.warns(UserWarning, match=r"test.toml: rule 1 \(match = \{'glob': 'encoder.\*'\}\) matches no conv"):
        report = plan(model, recipe=recipe)
    assert len(report.warnings) == 1
    with pytest.raises(RecipeError, match=r"test\.toml: rule 1"):
        plan(model, recipe=recipe, strict=True)


def test_load_recipe_by_name_path_or_object(tmp_path: Path) -> None:
    assert {"default", "resnet", "vgg", "densenet", "mobilenet", "unet"} <= set(shipped_recipes())
    for name in shipped_recipes():
        recipe = load_recipe(name)
        assert recipe.source == f"{name}.toml" and recipe.description
    path = tmp_path / "mine.toml"
    path.write_text(PRECEDENCE)
    assert load_recipe(path).source == str(path) and load_recipe(str(path)).rules == load_recipe(path).rules
    recipe = load_recipe(path)
    assert load_recipe(recipe) is recipe
    with pytest.raises(RecipeError, match="no such recipe file; shipped recipes: "):
        load_recipe(tmp_path / "missing.toml")


def test_to_toml_round_trip() -> None:
    extra = '[[rules]]\nmatch = { out_channels = { min = 1, max = 9 } }\nprobes = 0\nwhy = "a \\"b\\""'
    recipe = _recipe(f"{PRECEDENCE}\n{extra}")
    again = Recipe.from_toml(recipe.to_toml(), source="test.toml")
    assert again == recipe


def test_report_to_recipe_reproduces_the_conversion() -> None:
    model = models.resnet18()
    report = plan(model, probes=12, recipe="resnet", input_shape=(1, 3, 64, 64))
    pinned = Recipe.from_toml(report.to_recipe().to_toml(), source="pinned.toml")
    replay = plan(model, recipe=pinned, input_shape=(1, 3, 64, 64))

    def decisions(report: ConversionReport) -> list[tuple[str, str, int]]:
        return [(layer.name, layer.action, layer.probes if layer.action == "patched" else 0) for layer in report.layers]

    assert decisions(replay) == decisions(report)


def test_shipped_recipes_on_their_families() -> None:
    cases = {
        "resnet": models.resnet18(),
        "vgg": models.vgg11(),
        "densenet": models.densenet121(),
        "mobilenet": models.mobilenet_v3_small(),
        "unet": _UNet(),
    }
    for name, model in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            converted = convert(model, recipe=name, strict=True)
        assert converted.xconv_report.count("patched") > 0, name
        assert converted.xconv_report.recipe == f"{name}.toml"


class _UNet(nn.Module):
    """A two-level encoder-decoder with a transposed conv and a concatenated skip."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.decode = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.encode(x)
        return self.head(self.decode(torch.cat([self.up(self.down(skip)), skip], 1)))


def test_shipped_recipes_load_from_a_regular_install(tmp_path: Path) -> None:
    """A non-editable install: the recipes come from the installed package data."""
    root = Path(__file__).resolve().parents[1]
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(root),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import xconv_patch; "
        "assert xconv_patch.__file__.startswith(sys.argv[1]), xconv_patch.__file__; "
        "print(sorted(xconv_patch.shipped_recipes()), xconv_patch.load_recipe('default').defaults.probes)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(target)], check=True, capture_output=True, text=True, cwd=tmp_path
    )
    assert "'default'" in result.stdout and "'unet'" in result.stdout
    source = {path.parent.relative_to(root).as_posix() for path in (root / "xconv_patch").rglob("__init__.py")}
    installed = {path.parent.relative_to(target).as_posix() for path in (target / "xconv_patch").rglob("__init__.py")}
    assert installed == source | {"xconv_patch/cli", "xconv_patch/recipes"}, "pyproject.toml misses a package"
