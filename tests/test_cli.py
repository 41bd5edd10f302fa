"""The xconv command line through Typer's CliRunner, its patch-file library, and the console script once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_files import TINY_SHAPE, snapshot, tiny_net, write
from typer.testing import CliRunner
from xconv_patch.cli import app
from xconv_patch.cli.patching import OutputExistsError, plan_patch, write_patch

import xconv_patch
from xconv_patch import convert
from xconv_patch.conversion import load_recipe
from xconv_patch.models import parse_input_shape, resolve_model

PROFILE_KEYS = {"model", "device", "batch_size", "input_shape", "probes", "recipe", "exact", "xconv", "layers"}
FIGURE_KEYS = {"peak_bytes", "activation_bytes", "step_seconds"}
LAYER_KEYS = {"name", "probes", "action", "activation_bytes_before", "activation_bytes_after", "grad_rel_error",
              "grad_cosine"}
SHAPE = parse_input_shape(TINY_SHAPE)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.fixture
def model_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tiny_net(tmp_path)


def test_console_script_version() -> None:
    script = Path(sys.executable).with_name("xconv")
    done = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert done.stdout == f"xconv-patch {xconv_patch.__version__}\n"


def test_profile_json_measures_both_models(model_file) -> None:
    before = snapshot(model_file)
    result = invoke("profile", model_file, "--batch-size", 4, "--input-shape", TINY_SHAPE, "--probes", 4,
                    "--steps", 2, "--threads", 1, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert PROFILE_KEYS <= set(document)
    assert (document["batch_size"], document["input_shape"], document["probes"], document["threads"]) == (
        4, [3, 16, 16], 4, 1
    )
    for variant in ("exact", "xconv"):
        assert FIGURE_KEYS <= set(document[variant])
        assert document[variant]["peak_bytes"] == sum(document[variant]["breakdown"].values())
        assert len(document[variant]["step_times"]) == 2
    assert document["xconv"]["activation_bytes"] < document["exact"]["activation_bytes"]
    layers = {layer["name"]: layer for layer in document["layers"]}
    assert all(LAYER_KEYS <= set(layer) for layer in layers.values())
    assert layers["stem"]["grad_rel_error"] == pytest.approx(0, abs=1e-5)
    assert 0 < layers["blocks.0.conv"]["grad_rel_error"] and -1 <= layers["blocks.0.conv"]["grad_cosine"] <= 1
    fidelity = document["gradient_fidelity"]
    assert fidelity["all"]["layers"] == len(layers) and fidelity["probed"]["layers"] == sum(
        layer["storage"] == "probed" for layer in layers.values()
    )
    assert fidelity["all"]["rel_error_median"] <= fidelity["probed"]["rel_error_median"]
    assert snapshot(model_file) == before
    assert sorted(path.name for path in model_file.parent.iterdir()) == ["tiny.py"]


def test_profile_predict_table(model_file) -> None:
    result = invoke("profile", model_file, "--batch-size", 4, "--input-shape", TINY_SHAPE, "--predict",
                    "--max-memory", "64MiB", "--per-layer")
    assert result.exit_code == 0, result.stderr
    for text in ("peak step memory", "saved activations", "largest batch under 64.0 MiB", "blocks.1.conv",
                 "recalibrate_bn", "predicted"):
        assert text in result.stdout
    assert "step time" not in result.stdout


def test_profile_without_recompute_probes_what_it_would_recompute(model_file) -> None:
    arguments = ("profile", model_file, "--batch-size", 4, "--input-shape", TINY_SHAPE, "--predict", "--json")
    documents = [json.loads(invoke(*arguments, *extra).stdout) for extra in ((), ("--no-recompute",))]
    storages = [[layer["storage"] for layer in document["layers"]] for document in documents]
    assert storages == [["kept", "probed", "recomputed"], ["kept", "probed", "probed"]]
    assert [document["recompute"] for document in documents] == [True, False]
    assert documents[0]["xconv"]["activation_bytes"] < documents[1]["xconv"]["activation_bytes"]


def test_profile_a_timm_model_by_name() -> None:
    pytest.importorskip("timm")
    result = invoke("profile", "timm:resnet18", "--batch-size", 2, "--input-shape", "3x64x64", "--predict", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["model"] == "timm:resnet18" and document["ratios"]["activation_bytes"] > 1.5


def test_patch_prints_the_plan_and_writes_a_recipe(model_file) -> None:
    before = snapshot(model_file)
    result = invoke("patch", model_file, "--probes", 8, "--input-shape", TINY_SHAPE, "--batch-size", 2)
    assert result.exit_code == 0, result.stderr
    for text in ("blocks.0.conv", "patched", "exact", "wrote tiny.xconv.toml", "convert(model, recipe=",
                 "recalibrate_bn"):
        assert text in result.stdout
    recipe = load_recipe(model_file.with_name("tiny.xconv.toml"))
    assert {rule.match["name"]: rule.settings["probes"] for rule in recipe.rules} == {
        "stem": 0, "blocks.0.conv": 8, "blocks.1.conv": 0,  # recomputed from blocks.0.bn's kept input
    }
    assert snapshot(model_file) == before


def test_json_stdout_holds_only_the_document(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tiny_net(tmp_path, extra="print('hello from the model file')\n")
    result = invoke("patch", "tiny.py", "--input-shape", TINY_SHAPE, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "tiny.py"
    assert "hello from the model file" in result.stderr


def test_patch_json_and_outputs_never_overwritten_without_force(model_file) -> None:
    recipe_path, model_path = model_file.with_name("out.toml"), model_file.with_name("out.pt")
    args = ("patch", model_file, "--input-shape", TINY_SHAPE, "--output-recipe", recipe_path, "--json")
    result = invoke(*args, "--save-model", model_path)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert {"name", "type", "probes", "action"} <= set(document["layers"][0])
    assert document["outputs"] == {"recipe": str(recipe_path), "model": str(model_path)}
    assert document["totals"]["bytes_freed"] > 0
    recipe_path.write_text("# mine\n")
    kept = snapshot(recipe_path), snapshot(model_path)
    refused = invoke(*args, "--save-model", model_path)
    _error(refused, 2, f"{recipe_path}: exists; pass --force to overwrite it")
    assert (snapshot(recipe_path), snapshot(model_path)) == kept
    assert invoke(*args, "--force").exit_code == 0
    assert recipe_path.read_text() != "# mine\n"


def _error(result, code: int, message: str) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith("xconv: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("source", "code", "message"),
    [
        ("import torch\ndef broken(:\n", 1, "bad.py:2: syntax error"),
        ("import torch\nimport not_a_module_xyz\n", 1, "bad.py:2: import failed: No module named 'not_a_module_xyz'"),
        ("import torch\nvalue = 1\n", 1, "bad.py: no model found"),
    ],
)
def test_broken_model_files(tmp_path, monkeypatch, source, code, message) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "bad.py", source)
    before = snapshot(path)
    for command in ("patch", "profile"):
        _error(invoke(command, "bad.py"), code, message)
    assert snapshot(path) == before
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["bad.py"]


def test_usage_errors(model_file) -> None:
    write(model_file.parent, "bad.toml", "[defaults]\nprobes = -3\n")
    _error(invoke("patch", "missing.py"), 2, "missing.py: no such file")
    _error(invoke("profile", "resnet5O"), 2, "did you mean resnet50")
    _error(invoke("patch", model_file, "--recipe", "bad.toml"), 2, "bad.toml: [defaults]: probes: must be 0")
    _error(invoke("patch", model_file, "--recipe", "nosuch"), 2, "nosuch: no such recipe file")
    _error(invoke("patch", model_file, "--probes", -1), 2, "--probes must be 0 (exact) or more, got -1")
    _error(invoke("profile", model_file, "--probes", -1), 2, "--probes must be 0 (exact) or more, got -1")
    _error(invoke("profile", model_file, "--input-shape", "3xx"), 2, "--input-shape '3xx'")
    _error(invoke("profile", model_file, "--max-memory", "lots"), 2, "'lots' is not a size")
    _error(invoke("patch", model_file, "--attr", "TinyNett"), 2, "did you mean TinyNet")
    assert sorted(path.name for path in model_file.parent.iterdir()) == ["bad.toml", "tiny.py"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda(model_file) -> None:
    _error(invoke("profile", model_file, "--device", "cuda"), 2, "--device cuda: CUDA is not available")


def test_out_of_memory(model_file) -> None:
    huge = ("profile", model_file, "--input-shape", TINY_SHAPE, "--batch-size", 2**40)
    _error(invoke(*huge), 1, f"out of memory at batch size {2**40}")
    debug = invoke(*huge, "--debug")
    assert debug.exit_code == 1 and "Traceback" in debug.stderr



def test_patch_writes_a_recipe_convert_reproduces(tmp_path) -> None:
    model_file = tiny_net(tmp_path)
    plan = plan_patch(str(model_file), probes=4, input_shape=SHAPE, batch_size=2)
    recipe_path, model_path = tmp_path / "tiny.xconv.toml", tmp_path / "tiny.pt"
    write_patch(plan, recipe_path, model_path)
    recipe = load_recipe(recipe_path)
    assert [rule.match["name"] for rule in recipe.rules] == ["stem", "blocks.0.conv", "blocks.1.conv"]
    again = convert(resolve_model(str(model_file)).model, recipe=recipe_path, input_shape=(2, *SHAPE))
    assert [(r.name, r.action, r.probes) for r in again.xconv_report.layers] == [
        (r.name, r.action, r.probes) for r in plan.report.layers
    ]
    assert plan.usage(recipe_path).endswith(f"recipe={str(recipe_path)!r}, input_shape=(2, 3, 16, 16))")
    with pytest.raises(OutputExistsError, match=r"tiny\.xconv\.toml: exists; pass --force"):
        write_patch(plan, recipe_path)
    write_patch(plan, recipe_path, force=True)


def test_saved_patched_model_loads_and_trains_in_a_fresh_process(tmp_path) -> None:
    model_file = tiny_net(tmp_path)
    plan = plan_patch(str(model_file), probes=4, input_shape=SHAPE, batch_size=2)
    write_patch(plan, tmp_path / "tiny.xconv.toml", tmp_path / "tiny.pt")
    script = (
        "import torch, xconv_patch\n"
        "model = torch.load('tiny.pt', weights_only=False)\n"
        "assert isinstance(model.blocks[0].conv, xconv_patch.XConv2d), type(model.blocks[0].conv)\n"
        "model(torch.randn(2, 3, 16, 16)).sum().backward()\n"
        "print(type(model).__name__, model.blocks[0].conv.weight.grad.shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["TinyNet", "torch.Size([8,", "8,", "3,", "3])"]
