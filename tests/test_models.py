"""Model resolution: torchvision names, model files (the documented rules) and module:attr."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from model_files import NET3D, TINY_NET, snapshot, tiny_net, write
from torch import nn

from xconv_patch.models import (
    ModelKwargsError,
    ModelLoadError,
    ModelNotFoundError,
    input_shape_problem,
    missing_shape_reason,
    parse_input_shape,
    parse_model_kwargs,
    resolve_model,
    with_image_size,
)


@pytest.mark.filterwarnings("ignore:The default weight initialization of inception_v3")
@pytest.mark.parametrize(
    ("name", "family", "shape"),
    [
        ("resnet18", "classification", (3, 224, 224)),
        ("inception_v3", "classification", (3, 299, 299)),
        ("lraspp_mobilenet_v3_large", "segmentation", (3, 224, 224)),
        ("r3d_18", "video", (3, 16, 112, 112)),
        ("fasterrcnn_mobilenet_v3_large_320_fpn", "detection", (3, 224, 224)),
        ("raft_small", "optical_flow", (3, 128, 128)),
    ],
)
def test_torchvision_models_build_with_random_weights(name, family, shape, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # a download would land here
    loaded = resolve_model(name)
    assert isinstance(loaded.model, nn.Module)
    assert (loaded.name, loaded.family, loaded.input_shape) == (name, family, shape)
    assert not any(tmp_path.iterdir())


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'resnet5O'.*did you mean resnet50"):
        resolve_model("resnet5O")


def test_single_argument_free_class_is_found(tmp_path) -> None:
    loaded = resolve_model(str(tiny_net(tmp_path)))
    assert type(loaded.model).__name__ == "TinyNet"
    assert (loaded.family, loaded.input_shape) == ("custom", (3, 224, 224))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("model = TinyNet(classes=3)\n", 3),
        ("def model():\n    return TinyNet(classes=4)\n", 4),
        ("def get_model():\n    return TinyNet(classes=5)\n", 5),
        ("def build_model():\n    return TinyNet(classes=6)\n\ndef get_model():\n    return TinyNet(classes=7)\n", 6),
    ],
)
def test_model_then_factories_take_precedence(tmp_path, extra, expected) -> None:
    loaded = resolve_model(str(tiny_net(tmp_path, extra=extra)))
    assert loaded.model.head.out_features == expected


def test_attr_names_an_instance_or_a_callable(tmp_path) -> None:
    path = tiny_net(tmp_path, extra="small = TinyNet(classes=2)\n")
    assert resolve_model(str(path), attr="small").model.head.out_features == 2
    assert resolve_model(f"{path}:TinyNet").model.head.out_features == 10
    assert resolve_model(str(path), attr="TinyNet").name == f"{path}:TinyNet"


def test_attr_errors_name_the_attribute(tmp_path) -> None:
    path = tiny_net(tmp_path, extra="count = 3\n")
    with pytest.raises(ModelNotFoundError, match=r"no attribute 'TinyNe'; did you mean TinyNet"):
        resolve_model(str(path), attr="TinyNe")
    with pytest.raises(ModelLoadError, match=r"count is a int, not an nn.Module"):
        resolve_model(str(path), attr="count")
    with pytest.raises(ModelLoadError, match=r"Block needs arguments"):
        resolve_model(str(path), attr="Block")
    with pytest.raises(ModelNotFoundError, match="--attr says 'other'"):
        resolve_model(f"{path}:TinyNet", attr="other")


def test_several_candidate_classes_are_ambiguous(tmp_path) -> None:
    path = tiny_net(tmp_path, extra="class Other(TinyNet):\n    pass\n")
    with pytest.raises(ModelLoadError, match=r"several nn.Module classes .*\(TinyNet, Other\); use --attr"):
        resolve_model(str(path))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("import torch\nx = (\n", r"bad\.py:2: syntax error"),
        ("import torch\nimport not_a_module_xyz\n", r"bad\.py:2: import failed: No module named 'not_a_module_xyz'"),
        ("import torch\n\n1 / 0\n", r"bad\.py:3: ZeroDivisionError: division by zero"),
        ("x = 1\n", r"bad\.py: no model found"),
        ("def build_model():\n    raise RuntimeError('boom')\n", r"build_model\(\) failed: RuntimeError: boom"),
        ("def get_model():\n    return 3\n", r"get_model\(\) returned a int, not an nn.Module"),
    ],
)
def test_broken_files_fail_with_the_file_and_line(tmp_path, monkeypatch, source, message) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "bad.py", source)
    with pytest.raises(ModelLoadError, match=message):
        resolve_model("bad.py")


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such file"):
        resolve_model(str(tmp_path / "absent.py"))


def test_loading_leaves_the_directory_untouched(tmp_path) -> None:
    path = tiny_net(tmp_path, extra="from helper import WIDTH\n")
    write(tmp_path, "helper.py", "WIDTH = 8\n")
    before = snapshot(path)
    resolve_model(str(path))
    assert snapshot(path) == before
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["helper.py", "tiny.py"]


def test_module_attr_imports_from_the_working_directory(tmp_path, monkeypatch) -> None:
    package = tmp_path / "zoo"
    package.mkdir()
    write(package, "__init__.py", "")
    write(package, "nets.py", TINY_NET)
    monkeypatch.chdir(tmp_path)
    loaded = resolve_model("zoo.nets:TinyNet")
    assert (type(loaded.model).__name__, loaded.name) == ("TinyNet", "zoo.nets:TinyNet")
    with pytest.raises(ModelNotFoundError, match=r"no module named 'zoo\.absent'"):
        resolve_model("zoo.absent:TinyNet")
    assert not (package / "__pycache__").exists()


def test_input_shapes() -> None:
    assert parse_input_shape("3x224x224") == parse_input_shape("3,224,224") == (3, 224, 224)
    assert with_image_size((3, 16, 112, 112), 64) == (3, 16, 64, 64)
    assert with_image_size((2, 100), 50) == (2, 50)
    with pytest.raises(ValueError, match="--input-shape '3xax4'"):
        parse_input_shape("3xax4")
    with pytest.raises(ValueError, match="positive"):
        parse_input_shape("3x0x4")
    with pytest.raises(ValueError, match="--image-size"):
        with_image_size((3, 8, 8), 0)


def test_relative_and_absolute_paths_name_the_same_file(tmp_path, monkeypatch) -> None:
    tiny_net(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("tiny.py").source == resolve_model(str(Path(tmp_path, "tiny.py"))).source


def test_timm_models_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("timm")
    loaded = resolve_model("timm:resnet18")
    assert (loaded.name, loaded.family, loaded.input_shape) == ("timm:resnet18", "classification", (3, 224, 224))
    with pytest.raises(ModelNotFoundError, match=r"unknown model timm:resnet181; did you mean resnet18"):
        resolve_model("timm:resnet181")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ModelNotFoundError, match=r"timm:resnet18 needs timm, .* pip install 'xconv-patch\[timm\]'"):
        resolve_model("timm:resnet18")


def test_model_kwargs_reach_every_kind_of_builder(tmp_path, monkeypatch) -> None:
    assert resolve_model("resnet18", model_kwargs={"num_classes": 10}).model.fc.out_features == 10
    loaded = resolve_model("torchvision.models:resnet18", model_kwargs={"num_classes": 7})
    assert (loaded.model.fc.out_features, loaded.family, loaded.input_shape) == (7, "custom", (3, 224, 224))
    path = tiny_net(tmp_path, extra="def wide(width=8, classes=10):\n    return TinyNet(classes=width)\n")
    assert resolve_model(str(path), model_kwargs={"classes": 3}).model.head.out_features == 3  # the found class
    assert resolve_model(f"{path}:wide", model_kwargs={"width": 5}).model.head.out_features == 5
    block = resolve_model(str(path), attr="Block", model_kwargs={"channels": 4}).model  # required argument given
    assert block.conv.in_channels == 4
    write(tmp_path, "net3d.py", NET3D)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("net3d:Net3d", model_kwargs={"in_channels": 2}).model.stem.in_channels == 2


def test_model_kwargs_choose_among_classes_that_need_them(tmp_path) -> None:
    path = tiny_net(tmp_path, extra="class Wide(nn.Module):\n    def __init__(self, width):\n"
                                    "        super().__init__()\n        self.fc = nn.Linear(width, 1)\n")
    classes = r"several nn.Module classes build with --model-kwargs \(Block, TinyNet, Wide\); use --attr"
    with pytest.raises(ModelLoadError, match=classes):
        resolve_model(str(path), model_kwargs={"channels": 2, "width": 2})  # none takes both
    assert resolve_model(str(path), model_kwargs={"width": 6}).model.fc.in_features == 6
    assert type(resolve_model(str(path)).model).__name__ == "TinyNet"


def test_model_kwargs_errors_name_the_option_and_the_keyword(tmp_path) -> None:
    path = tiny_net(tmp_path, extra="small = TinyNet(classes=2)\n")
    with pytest.raises(ModelKwargsError, match=r"^--model-kwargs: TinyNet\(\) got an unexpected keyword 'clases'; "
                                               r"did you mean 'classes'\?$"):
        resolve_model(f"{path}:TinyNet", model_kwargs={"clases": 3})
    with pytest.raises(ModelKwargsError, match=r"^--model-kwargs: TinyNet\(\) got an unexpected keyword 'foo'; "
                                               r"it takes classes$"):
        resolve_model(str(path), attr="TinyNet", model_kwargs={"foo": 1})
    with pytest.raises(ModelKwargsError, match=r"^--model-kwargs: resnet18\(\) got an unexpected keyword 'foo' "
                                               r"\(TypeError: ResNet.__init__\(\) got an unexpected keyword"):
        resolve_model("resnet18", model_kwargs={"foo": 1})  # a builder with **kwargs passes it on
    with pytest.raises(ModelKwargsError, match=r"--model-kwargs: 'weights' is not accepted: .* random weights"):
        resolve_model("resnet18", model_kwargs={"weights": "DEFAULT"})
    with pytest.raises(ModelKwargsError, match=r"small is an nn.Module instance, which takes no keywords"):
        resolve_model(str(path), attr="small", model_kwargs={"classes": 3})
    with pytest.raises(ModelLoadError, match=r"Block needs arguments \(channels\); give them with --model-kwargs"):
        resolve_model(str(path), attr="Block")
    assert issubclass(ModelKwargsError, ValueError)  # a usage error: exit status 2 on the command line


def test_parse_model_kwargs() -> None:
    assert parse_model_kwargs('{"spatial_dims": 3, "channels": [16, 32], "act": null}') == {
        "spatial_dims": 3, "channels": [16, 32], "act": None,
    }
    with pytest.raises(ModelKwargsError, match=r"""--model-kwargs '\{in_channels: 1\}': not valid JSON \(Expecting"""):
        parse_model_kwargs("{in_channels: 1}")
    with pytest.raises(ModelKwargsError, match=r"--model-kwargs '\[1\]': expected a JSON object .* got an array"):
        parse_model_kwargs("[1]")


def test_default_input_shape_only_where_the_first_conv_makes_it_unambiguous(tmp_path) -> None:
    gray = write(tmp_path, "gray.py", "from torch import nn\nmodel = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())\n")
    assert resolve_model(str(gray)).input_shape == (1, 224, 224)
    net3d = resolve_model(str(write(tmp_path, "net3d.py", NET3D)))
    assert net3d.input_shape is None
    assert missing_shape_reason(net3d.model) == (
        "the model's first layer Conv3d 'stem' expects 4 dimensions per sample (C x D x H x W), e.g. 1x96x96x96"
    )
    mlp = resolve_model(str(write(tmp_path, "mlp.py", "from torch import nn\nmodel = nn.Linear(4, 2)\n")))
    assert mlp.input_shape is None and "no convolution" in missing_shape_reason(mlp.model)
    assert input_shape_problem(net3d.model, (1, 8, 8, 8)) is None
    assert input_shape_problem(net3d.model, (3, 224)) == (
        "the model's first layer Conv3d 'stem' expects 4 dimensions per sample (C x D x H x W), not 2"
    )
    assert input_shape_problem(net3d.model, (3, 8, 8, 8)) == (
        "the model's first layer Conv3d 'stem' expects 1 input channel, not 3"
    )
    assert input_shape_problem(mlp.model, (4,)) is None


def test_timm_default_shape_follows_in_chans() -> None:
    pytest.importorskip("timm")
    loaded = resolve_model("timm:resnet18", model_kwargs={"in_chans": 1, "num_classes": 5})
    assert (loaded.input_shape, loaded.model.fc.out_features) == ((1, 224, 224), 5)
    with pytest.raises(ModelKwargsError, match=r"'pretrained' is not accepted"):
        resolve_model("timm:resnet18", model_kwargs={"pretrained": True})
