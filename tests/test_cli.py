"""The xconv command line through Typer's CliRunner, its patch-file library, and the console script once."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from model_files import DEPTHWISE_NET, NET3D, TINY_SHAPE, snapshot, tiny_net, write
from typer.testing import CliRunner
from xconv_patch.cli import app
from xconv_patch.cli.patching import OutputExistsError, plan_patch, write_patch
from xconv_patch.cli.plot import plot_data
from xconv_patch.cli.render import fidelity_meaning

import xconv_patch
from xconv_patch import convert
from xconv_patch.conversion import load_recipe
from xconv_patch.measure import ProfileSpec
from xconv_patch.measure import profile as run_profile
from xconv_patch.models import parse_input_shape, resolve_model

PROFILE_KEYS = {"model", "device", "batch_size", "input_shape", "probes", "recipe", "exact", "xconv", "layers"}
FIGURE_KEYS = {"peak_bytes", "activation_bytes", "step_seconds"}
LAYER_KEYS = {"name", "probes", "action", "activation_bytes_before", "activation_bytes_after", "grad_rel_error",
              "grad_cosine"}
SHAPE = parse_input_shape(TINY_SHAPE)
PROGRESS_LINE = re.compile(r"xconv: \[ *\d+\.\d s\] (.*)")


def stages(stderr: str) -> list[str]:
    """The progress stages a run printed on a non-terminal stderr, in order."""
    return [match.group(1) for line in stderr.splitlines() if (match := PROGRESS_LINE.match(line))]


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
    noise = {name: layer["grad_sgd_noise"] for name, layer in layers.items()}
    assert all(0 < value < math.inf for value in noise.values()), noise  # a second, different batch
    assert fidelity["probed"]["noise_ratio_median"] == pytest.approx(
        layers["blocks.0.conv"]["grad_rel_error"] / noise["blocks.0.conv"]
    )
    assert stages(result.stderr) == [
        "building the model",
        "planning the patch",
        "exact: starting a fresh process",
        "exact: building the model (fresh process)",
        "exact: warm-up step (fresh process)",
        "exact: measured step (fresh process)",
        "xconv: starting a fresh process",
        "xconv: building the model (fresh process)",
        "xconv: converting (fresh process)",
        "xconv: warm-up step (fresh process)",
        "xconv: measured step (fresh process)",
        "exact vs xconv: starting a fresh process (gradient fidelity, timing)",
        "exact vs xconv: building the model (fresh process)",
        "exact vs xconv: converting (fresh process)",
        "exact vs xconv: gradients of a second batch (minibatch noise) (fresh process)",
        "exact vs xconv: gradients (exact) (fresh process)",
        "exact vs xconv: gradients (xconv) (fresh process)",
        *(f"exact vs xconv: timed step {i}/2 ({name}) (fresh process)" for i in (1, 2) for name in ("exact", "xconv")),
    ]
    assert snapshot(model_file) == before


def test_piped_profile_prints_stages_on_stderr_and_only_json_on_stdout(model_file) -> None:
    """Through a real pipe (not a terminal): one line per stage on stderr as it starts, the document on stdout."""
    script = Path(sys.executable).with_name("xconv")
    arguments = [script, "profile", model_file, "--batch-size", "4", "--input-shape", TINY_SHAPE, "--predict",
                 "--max-memory", "16MiB", "--json"]
    done = subprocess.run(arguments, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["max_batch"]["exact"] > 0
    printed = stages(done.stderr)
    assert printed[:3] == ["building the model", "xconv: converting",
                           "exact: preparing the prediction (FakeTensorMode)"]
    assert "exact: largest batch under 0.02 GiB: predicting batch 2" in printed
    assert len(printed) == len(done.stderr.splitlines())  # nothing else on stderr
    assert sorted(path.name for path in model_file.parent.iterdir()) == ["tiny.py"]


def test_profile_predict_table(model_file, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # the reason column unwrapped
    result = invoke("profile", model_file, "--batch-size", 4, "--input-shape", TINY_SHAPE, "--predict",
                    "--max-memory", "64MiB", "--per-layer")
    assert result.exit_code == 0, result.stderr
    for text in ("peak step memory", "saved activations", "largest batch under 64.0 MiB", "blocks.1.conv",
                 "recalibrate_bn", "predicted", "breakdown: the tensors live at the moment of the peak", "reason",
                 "input recomputed from what BatchNorm2d 'blocks.0.bn' keeps"):
        assert text in result.stdout, text
    assert "step time" not in result.stdout
    assert "suggestion:" not in result.stdout  # no shipped recipe keeps clearly less on this net
    monkeypatch.setenv("COLUMNS", "90")  # too narrow for the reason column: the reasons below the table
    narrow = invoke("profile", model_file, "--batch-size", 4, "--input-shape", TINY_SHAPE, "--predict", "--per-layer")
    table, below = narrow.stdout.split("\nreasons:\n")
    assert "┃ reason" not in table
    assert "blocks.1.conv input recomputed from what BatchNorm2d 'blocks.0.bn' keeps: relu(batch_norm(x))" in " ".join(
        below.split()
    )


def test_per_layer_suggests_a_shipped_recipe_that_keeps_clearly_less(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "250")  # the reason column unwrapped
    write(tmp_path, "depthwise.py", DEPTHWISE_NET)
    arguments = ("profile", "depthwise.py", "--batch-size", 2, "--input-shape", "3x32x32", "--predict", "--per-layer")
    document = json.loads(invoke(*arguments, "--json").stdout)
    name = document["suggested_recipe"]
    assert name == "mobilenet"
    assert document["recipes"][name]["activation_bytes"] <= 0.9 * document["conversion"]["activation_bytes_after"]
    result = invoke(*arguments)
    assert result.exit_code == 0, result.stderr
    suggestion = [line for line in result.stdout.splitlines() if line.startswith("suggestion:")]
    assert len(suggestion) == 1, result.stdout
    assert suggestion[0].endswith(
        f"xconv profile depthwise.py --batch-size 2 --input-shape 3x32x32 --recipe {name}"
    ), suggestion
    assert "depthwise: patching costs more compute than it saves" in result.stdout  # the reason column


def test_fidelity_meaning_puts_the_probe_error_against_the_minibatch_noise() -> None:
    def summary(layers: int, ratio: float | None) -> dict:
        return {"layers": layers, "noise_ratio_median": ratio, "noise_ratio_max": ratio}

    below = fidelity_meaning({"all": summary(3, 0.4), "probed": summary(2, 0.5)}, 8)
    assert "0.5 (max 0.5), below the minibatch noise" in below
    assert "x1.12 exact training's at batch 8: exact training's with a 1.25x smaller batch" in below
    above = fidelity_meaning({"all": summary(3, 2.0), "probed": summary(2, 3.0)}, 8)
    assert "above the minibatch noise" in above and "x3.16" in above and "a 10x smaller batch" in above
    assert "no conv is probed" in fidelity_meaning({"all": summary(3, 1e-7), "probed": summary(0, None)}, 8)
    compressed = fidelity_meaning({"all": summary(3, 0.012), "probed": summary(0, None)}, 8, "int8")
    assert "norm inputs kept as int8" in compressed and "rounding" not in compressed.split(";")[1].split("(")[0]
    assert fidelity_meaning({"all": summary(3, None), "probed": summary(0, None)}, 8) is None


def test_plot_draws_the_breakdown_and_the_largest_layers(model_file) -> None:
    image = model_file.with_name("profile.png")
    result = invoke("profile", model_file, "--batch-size", 4, "--input-shape", TINY_SHAPE, "--predict", "--json",
                    "--plot", image)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    pixels = matplotlib.image.imread(image)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 1000
    assert pixels[..., :3].std() > 0.1  # something drawn
    spec = ProfileSpec(str(model_file), batch_size=4, input_shape=SHAPE)
    data = plot_data(run_profile(spec, predict=True), top=2)
    for name in ("exact", "xconv"):
        assert sum(data.peak[name].values()) == document[name]["peak_bytes"]
        assert data.peak[name]["saved activations"] == document[name]["breakdown"]["activations"]
    largest = sorted(document["layers"], key=lambda layer: -layer["activation_bytes_before"])[:2]
    assert data.layers == [
        (layer["name"], layer["activation_bytes_before"], layer["activation_bytes_after"], layer["storage"])
        for layer in largest
    ]


def test_plot_refused_before_measuring(model_file, monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("measured before the --plot check")

    monkeypatch.setattr(sys.modules["xconv_patch.cli.app"], "run_profile", never)
    _error(invoke("profile", model_file, "--plot", "out.bmpx"), 2, "--plot out.bmpx: unknown image format '.bmpx'")
    _error(invoke("profile", model_file, "--plot", "missing/out.png"), 2, "no such folder missing")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    _error(invoke("profile", model_file, "--plot", "out.png"), 2,
           "--plot needs matplotlib: pip install 'xconv-patch[plot]'")
    assert sorted(path.name for path in model_file.parent.iterdir()) == ["tiny.py"]


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
    assert stages(result.stderr) == ["building the model and planning the patch", "writing the recipe"]
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
    assert document["outputs"] == {"recipe": str(recipe_path), "model": str(model_path), "unchanged": []}
    assert document["totals"]["bytes_freed"] > 0
    recipe_path.write_text("# mine\n")
    kept = snapshot(recipe_path), snapshot(model_path)
    refused = invoke(*args, "--save-model", model_path)
    _error(refused, 2, f"{recipe_path}: exists with different contents; pass --force to overwrite it")
    assert (snapshot(recipe_path), snapshot(model_path)) == kept
    assert invoke(*args, "--force").exit_code == 0
    assert recipe_path.read_text() != "# mine\n"


def test_patch_rerun_keeps_identical_outputs_and_refuses_different_ones(model_file) -> None:
    """Each run in a fresh process, as a user reruns it: the second run is not a conflict."""
    script = Path(sys.executable).with_name("xconv")
    arguments = [script, "patch", model_file.name, "--input-shape", TINY_SHAPE, "--save-model", "tiny.pt"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*arguments, *extra], capture_output=True, text=True, cwd=model_file.parent)

    assert run().returncode == 0
    outputs = [model_file.with_name("tiny.xconv.toml"), model_file.with_name("tiny.pt")]
    first = [snapshot(path) for path in outputs]
    again = run()
    assert again.returncode == 0, again.stderr
    assert "kept tiny.xconv.toml (identical" in again.stdout and "kept tiny.pt (identical" in again.stdout
    assert [snapshot(path) for path in outputs] == first
    changed = run("--probes", "2")
    assert changed.returncode == 2 and "tiny.xconv.toml: exists with different contents" in changed.stderr
    assert [snapshot(path) for path in outputs] == first
    forced = run("--probes", "2", "--force")
    assert forced.returncode == 0 and "wrote tiny.xconv.toml" in forced.stdout
    assert snapshot(outputs[0]) != first[0]


def test_model_kwargs_reach_the_model_in_patch_and_in_profile_workers(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "net3d.py", NET3D)
    kwargs = ("--model-kwargs", '{"in_channels": 2, "classes": 3}', "--input-shape", "2x6x6x6")
    patched = invoke("patch", "net3d.py", *kwargs, "--json")
    assert patched.exit_code == 0, patched.stderr
    document = json.loads(patched.stdout)
    assert (document["model_kwargs"], document["input_shape"]) == ({"in_channels": 2, "classes": 3}, [2, 6, 6, 6])
    # measured, not predicted: each worker process builds the model from the spec, kwargs included
    profiled = invoke("profile", "net3d.py", *kwargs, "--batch-size", 2, "--steps", 1, "--threads", 1, "--json")
    assert profiled.exit_code == 0, profiled.stderr
    assert json.loads(profiled.stdout)["exact"]["peak_bytes"] > 0
    resnet = invoke("patch", "torchvision.models:resnet18", "--model-kwargs", '{"num_classes": 10}',
                    "--input-shape", "3x32x32", "--batch-size", 2, "--json")
    assert resnet.exit_code == 0, resnet.stderr
    assert json.loads(resnet.stdout)["outputs"]["recipe"] == "resnet18.xconv.toml"  # the attr names the default
    assert (tmp_path / "resnet18.xconv.toml").is_file()


def test_model_kwargs_and_input_shape_errors_name_the_option(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tiny_net(tmp_path)
    write(tmp_path, "net3d.py", NET3D)
    for command in ("patch", "profile"):
        _error(invoke(command, "tiny.py", "--model-kwargs", "{x"), 2, "--model-kwargs '{x': not valid JSON")
        _error(invoke(command, "tiny.py", "--model-kwargs", "[1]"), 2,
               "--model-kwargs '[1]': expected a JSON object")
        _error(invoke(command, "tiny.py", "--model-kwargs", '{"foo": 1}'), 2,
               "xconv: error: --model-kwargs: TinyNet() got an unexpected keyword 'foo'")
        _error(invoke(command, "net3d.py"), 2,  # a 2-D default shape would run silently (unbatched 4-D input)
               "xconv: error: --input-shape is needed: the model's first layer Conv3d 'stem' expects 4 dimensions"
               " per sample (C x D x H x W)")
        _error(invoke(command, "tiny.py", "--input-shape", "3x224"), 2,
               "xconv: error: --input-shape 3x224: the model's first layer Conv2d 'stem' expects 3 dimensions per"
               " sample (C x H x W), not 2")
        _error(invoke(command, "tiny.py", "--input-shape", "8x16x16", "--batch-size", 3), 2,
               "xconv: error: --input-shape 8x16x16: the model's first layer Conv2d 'stem' expects 3 input channels,"
               " not 8")
        _error(invoke(command, "net3d.py", "--image-size", 32), 2, "--image-size 32 needs a default shape")
    _error(invoke("patch", "tiny.py", "--input-shape", "3x1x1", "--batch-size", 1), 2,
           "xconv: error: --input-shape 3x1x1 with --batch-size 1: TinyNet cannot run on a batch of 1x3x1x1"
           " (ValueError: Expected more than 1 value per channel when training")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["net3d.py", "tiny.py"]


def test_help_shows_plain_flags_the_model_argument_and_the_documented_default(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for command in ("profile", "patch"):
        text = invoke(command, "--help").stdout
        assert re.search(rf"Usage: xconv {command} \[OPTIONS\] MODEL *\n", text), text
        assert "<bool>" not in text and "{model" not in text.lower()
        assert re.search(r"--json +Print one JSON document", text), text
        assert "--model-kwargs" in text and f"### `xconv {command} MODEL`" in readme
    assert "<bool>" not in invoke("--help").stdout
    assert "./<name>.xconv.toml" in invoke("patch", "--help").stdout and "`./<name>.xconv.toml`" in readme


def test_tables_fit_columns_and_headings_break_between_phrases(model_file, monkeypatch) -> None:
    arguments = ("patch", model_file.name, "--input-shape", TINY_SHAPE, "--force")
    monkeypatch.delenv("COLUMNS", raising=False)
    piped = invoke(*arguments).stdout  # not a terminal: 100 columns
    assert max(map(len, piped.splitlines())) == 100 and "reasons:" in piped
    monkeypatch.setenv("COLUMNS", "72")
    narrow = invoke(*arguments).stdout
    assert max(map(len, narrow.splitlines())) <= 72
    summary = plan_patch(model_file.name, input_shape=SHAPE).report.summary()
    for phrase in summary.split("; "):  # the heading breaks between its phrases, never inside one
        assert any(phrase in line for line in narrow.splitlines()), phrase
    monkeypatch.setenv("COLUMNS", "250")
    wide = invoke(*arguments).stdout
    assert "reasons:" not in wide and re.search(r"┃ reason +┃", wide)
    profiled = invoke("profile", model_file.name, "--input-shape", TINY_SHAPE, "--predict", "--batch-size", 2)
    monkeypatch.setenv("COLUMNS", "60")
    lines = invoke("profile", model_file.name, "--input-shape", TINY_SHAPE, "--predict", "--batch-size", 2).stdout
    assert profiled.stdout.splitlines()[0].endswith("recipe default.toml · predicted (FakeTensorMode)")
    assert "recipe default.toml" in lines.splitlines()[1] and max(map(len, lines.splitlines()[:2])) <= 60


def _error(result, code: int, message: str) -> None:
    """One error line on stderr after any progress lines (`xconv: [  0.0 s] stage`), nothing on stdout."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("xconv: error: ") and result.stderr.endswith("\n"), result.stderr
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
    before = snapshot(recipe_path)
    assert write_patch(plan, recipe_path) == {recipe_path: False}  # identical: left as it is
    assert snapshot(recipe_path) == before
    other = plan_patch(str(model_file), probes=2, input_shape=SHAPE, batch_size=2)
    with pytest.raises(OutputExistsError, match=r"tiny\.xconv\.toml: exists with different contents; pass --force"):
        write_patch(other, recipe_path)
    assert snapshot(recipe_path) == before
    assert write_patch(other, recipe_path, force=True) == {recipe_path: True}
    assert load_recipe(recipe_path).rules[1].settings["probes"] == 2


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


def test_norm_storage_and_memory_budget_reach_the_plan_and_the_recipe(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = ("torchvision.models:resnet18", "--model-kwargs", '{"num_classes": 10}', "--input-shape", "3x64x64")
    patched = invoke("patch", *model, "--batch-size", 4, "--norm-storage", "int8", "--json")
    assert patched.exit_code == 0, patched.stderr
    norms = json.loads(patched.stdout)["conversion"]["norms"]
    assert sum(record["storage"] == "int8" for record in norms) == 20
    written = load_recipe(tmp_path / "resnet18.xconv.toml")
    assert written.storage.norm_storage == "int8"
    profiles = [
        json.loads(invoke("profile", *model, "--batch-size", 4, "--predict", "--json", *extra).stdout)
        for extra in ((), ("--norm-storage", "int8"))
    ]
    assert profiles[1]["xconv"]["activation_bytes"] < profiles[0]["xconv"]["activation_bytes"] / 1.5
    _error(invoke("patch", *model, "--norm-storage", "int4"), 2, "--norm-storage must be one of exact, bfloat16, int8")
    _error(invoke("profile", *model, "--memory-budget", "lots"), 2, "--memory-budget: 'lots' is not a size")
    too_small = invoke("patch", *model, "--batch-size", 4, "--memory-budget", "1MiB")
    _error(too_small, 2, "memory budget 1.0 MiB: nothing fits")
