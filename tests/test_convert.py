"""convert(), plan() and revert() through the public API, on hand-written models and a torchvision zoo."""

from __future__ import annotations

import copy
import io
import json
import operator
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gradients import assert_gradients_match
from rich.console import Console
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd
from torchvision import models
from torchvision.models import video
from xconv_patch.cli.render import print_conversion

from xconv_patch import BitLeakyReLU, BitReLU, ConversionReport, Recipe, XConvMixin, convert, plan, revert
from xconv_patch.conversion.saved_tensors import KEEP_NOTHING_FUNCTIONS, KEEP_NOTHING_METHODS, KEEP_NOTHING_MODULES
from xconv_patch.memory import saved_activation_bytes
from xconv_patch.probes import ProbeSpec

PATCH_ALL = {"recipe": Recipe(ProbeSpec(probes=4))}


class SmallNet(nn.Module):
    """A ResNet-like toy: stem, a residual pair sharing one ReLU module, a head, and a method."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)
        self.label = "toy"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stem(x)))
        x = x + self.conv2(self.relu(self.conv1(x)))
        return self.relu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class WeightStandardizedConv2d(nn.Conv2d):
    """A conv with its own forward semantics: convert must leave it alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, weight / (weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5), self.bias)


class TaggedConv2d(nn.Conv2d):
    """A conv subclass that only adds an attribute, like torchvision's Conv3DSimple."""

    tag = "mine"


class SubclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.standardized = WeightStandardizedConv2d(8, 8, 3, padding=1)
        self.tagged = TaggedConv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tagged(torch.relu(self.standardized(torch.relu(self.stem(x)))))


class SharedConvNet(nn.Module):
    """One conv module called twice and registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.alias = self.shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        return self.alias(F.relu(self.shared(x)))


class FunctionalNet(nn.Module):
    """Functional convolutions (plain, 'same' padding, transposed) and functional ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(16, 8, 3, 3) * 0.1)
        self.bias = nn.Parameter(torch.zeros(16))
        self.up = nn.Parameter(torch.randn(16, 8, 2, 2) * 0.1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = F.relu(F.conv2d(x, self.weight, self.bias, padding="same"))
        x = F.conv_transpose2d(x, self.up, stride=2).relu_()
        return self.head(x.mean((2, 3)))


class SequenceNet(nn.Module):
    """Conv1d and ConvTranspose1d in an nn.Sequential, with ReLU6 in place (it keeps a copy of its
    input) and not (it keeps its input)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(2, 8, 5, padding=2),
            nn.ReLU6(inplace=True),
            nn.Conv1d(8, 8, 3, padding=1),
            nn.ReLU6(),
            nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DataDependentNet(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.other = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        return self.other(x) if x.sum() > 0 else -x


class ReflectPadNet(nn.Module):
    """A ReLU whose output a reflect padding keeps (F.pad in constant mode keeps nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        return self.conv(x) + F.pad(x, (1, 1, 1, 1), mode="reflect").mean()


class KeptElsewhereNet(nn.Module):
    """One ReLU output read by a patched conv, an exact conv and a max-pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.wide = nn.Conv2d(8, 8, 3, padding=1)
        self.pooled = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        return self.wide(x).mean() + self.pooled(self.pool(x)).mean()


def _seeded(model: nn.Module, *inputs: object, seed: int = 7) -> object:
    torch.manual_seed(seed)
    return model(*inputs)


def _conv_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, _ConvNd)}


def _saved(model: nn.Module, x: torch.Tensor) -> int:
    return saved_activation_bytes(model, lambda: _seeded(model, x))


def test_caller_model_untouched_and_class_kept() -> None:
    model = SmallNet()
    before = copy.deepcopy(model.state_dict())
    converted = convert(model, input_shape=(2, 3, 16, 16))
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert isinstance(converted, SmallNet) and converted is not model
    assert converted.label == "toy" and converted.features(torch.randn(1, 3, 8, 8)).shape == (1, 8, 8, 8)
    assert all(type(module) in (nn.Conv2d, nn.ReLU) for module in (model.stem, model.conv1, model.relu))
    assert isinstance(converted.conv2, XConvMixin) and isinstance(converted.relu, BitReLU)
    conv1 = converted.xconv_report.layer("conv1")
    assert conv1.storage == "recomputed"
    assert conv1.reason == "input recomputed from what BatchNorm2d 'bn' keeps: relu(batch_norm(x))"
    assert not hasattr(model, "xconv_report")
    assert all(p is q for p, q in zip(model.parameters(), converted.parameters(), strict=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    converted(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    assert not torch.equal(before["conv2.weight"], converted.conv2.weight)


def test_inplace_keeps_parameters_dtype_and_mode() -> None:
    model = SmallNet().double().eval()
    parameters = list(model.parameters())
    converted = convert(model, inplace=True)
    assert converted is model
    assert all(p is q for p, q in zip(parameters, converted.parameters(), strict=True))
    assert not converted.training and not converted.conv1.training
    assert converted.conv1.weight.dtype == torch.float64


def test_outputs_state_dict_and_checkpoints() -> None:
    model = SmallNet()
    converted = convert(model)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(_seeded(model, x), _seeded(converted, x))
    assert list(converted.state_dict()) == list(model.state_dict())
    plain = SmallNet()
    plain.load_state_dict(converted.state_dict())
    converted.load_state_dict(SmallNet().state_dict())


def test_idempotent() -> None:
    once = convert(SmallNet(), input_shape=(2, 3, 16, 16))
    twice = convert(once, input_shape=(2, 3, 16, 16))
    assert [type(m) for m in twice.modules()] == [type(m) for m in once.modules()]
    assert [repr(m) for m in twice.modules()] == [repr(m) for m in once.modules()]
    assert twice.xconv_report.to_dicts() == once.xconv_report.to_dicts()


def test_shared_conv_module_handled_once() -> None:
    model = SharedConvNet()
    converted = convert(model, **PATCH_ALL, input_shape=(2, 3, 16, 16), rewrite_forward=True)
    report = converted.xconv_report
    assert [layer.name for layer in report.layers] == ["stem", "shared"]
    assert report.layer("shared").calls == 2 and report.layer("shared").action == "patched"
    assert converted.get_submodule("shared") is converted.get_submodule("alias")
    assert isinstance(converted.get_submodule("shared"), XConvMixin)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), converted(x))
    assert (_saved(model, x), _saved(converted, x)) == (report.activation_bytes_before, report.activation_bytes_after)


def test_conv_subclasses() -> None:
    model = SubclassNet()
    converted = convert(model, **PATCH_ALL)
    report = converted.xconv_report
    assert report.layer("standardized").action == "skipped"
    assert "WeightStandardizedConv2d overrides forward" in report.layer("standardized").reason
    assert type(converted.standardized) is WeightStandardizedConv2d
    assert report.layer("tagged").action == "patched"
    assert isinstance(converted.tagged, TaggedConv2d) and isinstance(converted.tagged, XConvMixin)
    assert converted.tagged.tag == "mine"
    assert type(revert(converted).tagged) is TaggedConv2d


def test_functional_convs_rewritten_through_fx(tmp_path) -> None:
    model = FunctionalNet()
    converted = convert(model, **PATCH_ALL, input_shape=(2, 3, 16, 16), rewrite_forward=True)
    report = converted.xconv_report
    assert isinstance(converted, fx.GraphModule) and report.forward_rewritten and report.path == "fx"
    assert "GraphModule" in report.path_reason and "eval-mode graph is the same" in report.path_reason
    assert {layer.name: layer.type for layer in report.layers} == {
        "stem": "Conv2d",
        "weight": "F.conv2d",
        "up": "F.conv_transpose2d",
    }
    assert {record.name for record in report.activations if record.switched_to == "BitReLU"} == {
        "xconv_relu",
        "xconv_relu_1",
    }
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), converted(x))
    assert list(converted.state_dict()) == list(model.state_dict())
    assert (_saved(model, x), _saved(converted, x)) == (report.activation_bytes_before, report.activation_bytes_after)
    torch.save(converted, tmp_path / "model.pt")
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=False)(x), model(x))
    reverted = revert(converted)
    assert "probed_conv" not in reverted.code and not any(isinstance(m, BitReLU) for m in reverted.modules())
    assert torch.equal(reverted(x), model(x))
    again = convert(converted, **PATCH_ALL, input_shape=(2, 3, 16, 16), rewrite_forward=True)
    assert again.xconv_report.to_dicts() == report.to_dicts()


class LeakyNet(nn.Module):
    """Norm-free convs after functional LeakyReLUs: out of place (it keeps its input, the stem's
    output) and in place (it keeps its output, the next conv's input)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid(F.leaky_relu(self.stem(x), 0.2))
        return self.head(F.leaky_relu_(x, 0.1))


def test_functional_leaky_relus_before_probed_convs_keep_bit_masks() -> None:
    model = LeakyNet()
    converted = convert(model, **PATCH_ALL, input_shape=(2, 3, 16, 16), rewrite_forward=True)
    report = converted.xconv_report
    unmeasured = plan(LeakyNet(), **PATCH_ALL, rewrite_forward=True)  # from the graph: what each call keeps
    for decisions in (report.activations, unmeasured.activations):
        assert [(record.switched_to, record.reason) for record in decisions] == [
            ("BitLeakyReLU", "switching frees its input"),
            ("BitLeakyReLU", "switching frees its output"),
        ]
    assert [module.negative_slope for module in converted.modules() if type(module) is BitLeakyReLU] == [0.2, 0.1]
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), converted(x))
    assert (_saved(model, x), _saved(converted, x)) == (report.activation_bytes_before, report.activation_bytes_after)
    reverted = revert(converted)
    assert not any(isinstance(module, BitLeakyReLU) for module in reverted.modules())
    assert _saved(reverted, x) == report.activation_bytes_before


class TrainingBranchNet(nn.Module):
    """Functional convolutions and a branch on self.training, as in GoogLeNet or Inception."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
        self.other = nn.Parameter(torch.randn(8, 8, 1, 1) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid(F.relu(self.stem(x)))
        x = F.relu(F.conv2d(x, self.weight, padding=1))
        x = F.conv2d(x, self.other)
        return x * 2 if self.training else x.mean((2, 3))


def test_functional_calls_left_exact_unless_rewrite_is_asked_for() -> None:
    model = TrainingBranchNet()
    converted = convert(model, **PATCH_ALL, input_shape=(2, 3, 16, 16))
    report = converted.xconv_report
    assert type(converted) is TrainingBranchNet and not report.forward_rewritten
    assert report.layer("weight").action == "skipped" and "rewrite_forward=True" in report.layer("weight").reason
    assert not any(record.switched_to for record in report.activations)
    assert "rewrite_forward=True" in report.activations[0].reason
    assert "probing would free nothing: its input is still kept by relu()" in report.layer("mid").reason
    x = torch.randn(2, 3, 16, 16)
    model.eval(), converted.eval()
    assert torch.equal(model(x), converted(x)) and converted(x).shape == (2, 8)

    rewritten = convert(model.train(), **PATCH_ALL, input_shape=(2, 3, 16, 16), rewrite_forward=True)
    assert rewritten.xconv_report.forward_rewritten
    assert "eval-mode forward differs" in rewritten.xconv_report.path_reason


def test_recompute_false_probes_instead() -> None:
    model = models.resnet18()
    x = torch.randn(2, 3, 64, 64)
    converted = convert(model, input_shape=(2, 3, 64, 64), recompute=False)
    report = converted.xconv_report
    assert not report.recomputes and not any(layer.storage == "recomputed" for layer in report.layers)
    assert report.layer("layer1.0.conv2").storage == "probed"
    assert _saved(converted, x) == report.activation_bytes_after
    recomputing = convert(model, input_shape=(2, 3, 64, 64))
    assert recomputing.xconv_report.activation_bytes_after < report.activation_bytes_after
    assert report.activation_bytes_after < report.activation_bytes_before
    again = convert(recomputing, input_shape=(2, 3, 64, 64), recompute=False)
    assert _saved(again, x) == report.activation_bytes_after


def test_googlenet_keeps_its_class_and_eval_output() -> None:
    model = models.googlenet(weights=None, aux_logits=True, init_weights=False)
    converted = convert(model, input_shape=(2, 3, 64, 64))
    assert type(converted) is type(model)
    x = torch.randn(2, 3, 64, 64)
    model.eval(), converted.eval()
    with torch.no_grad():
        expected, output = model(x), converted(x)
    assert isinstance(output, torch.Tensor) and torch.equal(expected, output)


def test_conv1d_transposed_and_relu6() -> None:
    model = SequenceNet()
    converted = convert(model, **PATCH_ALL, input_shape=(2, 2, 32))
    report = converted.xconv_report
    assert [layer.action for layer in report.layers] == ["patched"] * 3
    activations = {record.name: record for record in report.activations}
    assert activations["body.1"].reason == "switching frees its copy of its input"
    assert activations["body.3"].reason == "switching frees its input"
    assert activations["body.1"].switched_to == activations["body.3"].switched_to == "BitReLU6"
    x = torch.randn(2, 2, 32)
    assert torch.equal(model(x), converted(x))
    assert (_saved(model, x), _saved(converted, x)) == (report.activation_bytes_before, report.activation_bytes_after)


def test_untraceable_model_falls_back_to_module_swap() -> None:
    model = DataDependentNet()
    for shape in (None, (2, 3, 16, 16)):
        report = plan(model, **PATCH_ALL, input_shape=shape)
        assert report.path == "module-swap" and "torch.fx could not trace DataDependentNet" in report.path_reason
        assert [layer.action for layer in report.layers] == ["patched"] * 3
        assert [record.switched_to for record in report.activations] == ["BitReLU"]
    converted = convert(model, **PATCH_ALL, input_shape=(2, 3, 16, 16))
    assert isinstance(converted, DataDependentNet)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), converted(x))
    report = converted.xconv_report
    assert (_saved(model, x), _saved(converted, x)) == (report.activation_bytes_before, report.activation_bytes_after)


def test_nothing_freed_where_something_else_keeps_the_input() -> None:
    model = KeptElsewhereNet()
    filtered = plan(model, probes=4, filter_fn=lambda module, name: name != "pooled")
    assert (filtered.layer("pooled").action, filtered.layer("pooled").reason) == ("skipped", "filter_fn returned False")
    report = plan(model, probes=4, input_shape=(2, 3, 16, 16))
    wide = report.layer("wide")
    assert (wide.action, wide.storage, wide.bytes_freed) == ("exact", "kept", 0)
    assert wide.reason == "probing would free nothing: its input is still kept by MaxPool2d 'pool', ReLU 'relu'"
    (relu,) = report.activations
    assert relu.switched_to is None and "also kept by MaxPool2d 'pool'" in relu.reason
    converted = convert(model, probes=4, input_shape=(2, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    assert (_saved(model, x), _saved(converted, x)) == (report.activation_bytes_before, report.activation_bytes_after)


def test_graph_only_decisions_match_measured_ones() -> None:
    for model in (SmallNet(), SequenceNet(), KeptElsewhereNet(), ReflectPadNet(), models.resnet18()):
        shape = (2, 2, 32) if isinstance(model, SequenceNet) else (2, 3, 128, 128)
        measured = plan(model, **PATCH_ALL, input_shape=shape)
        graph_only = plan(model, **PATCH_ALL)
        assert graph_only.activation_bytes_before is None and "no input to analyse" in graph_only.analysis
        recomputed = {r.name for r in measured.activations if r.storage == "recomputed"}  # needs an input to see
        assert [r.switched_to for r in graph_only.activations if r.name not in recomputed] == [
            r.switched_to for r in measured.activations if r.name not in recomputed
        ]


def test_first_conv_stays_exact_and_tiny_inputs_too() -> None:
    report = plan(SmallNet(), probes=16, input_shape=(2, 3, 4, 4))
    assert report.layer("stem").action == "exact"
    assert report.layer("conv2").action == "exact"
    assert report.layer("conv2").reason == "its input has 16 pixels, not more than 16 probes"


def test_report_formats() -> None:
    report = plan(SmallNet(), input_shape=(2, 3, 16, 16))
    assert isinstance(report, ConversionReport)
    document = json.loads(report.to_json())
    assert document["counts"] == {"patched": 1, "exact": 2, "skipped": 0}
    assert document["storage"] == {"recomputed": 1, "probed": 1, "kept": 1, "none": 0}
    assert sum(document["storage_bytes"][kind] for kind in ("kept", "probed", "bits")) == report.activation_bytes_after
    assert document["activation_bytes_before"] - document["activation_bytes_after"] == report.bytes_freed
    assert {"name", "type", "action", "probes", "activation_bytes_before", "activation_bytes_after"} <= set(
        report.to_dicts()[0]
    )
    console = Console(file=io.StringIO(), width=200)
    print_conversion(console, report)
    text = console.file.getvalue()
    assert "conv1" in text and "patched" in text and "probed" in text and "path: fx" in text


def test_probes_must_be_a_non_negative_integer() -> None:
    with pytest.raises(ValueError, match="probes must be a non-negative integer"):
        convert(SmallNet(), probes=-1)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"model": models.resnet18}, TypeError, "model must be an nn.Module, got function"),
        ({"input_shape": (2, 3, 224)}, ValueError, r"input_shape \(2, 3, 224\): SmallNet cannot run on this input"),
        ({"input_shape": (2, 0, 16, 16)}, ValueError, "input_shape must be a sequence of positive integers"),
        ({"input_shape": "2x3x16x16"}, TypeError, "input_shape must be a sequence of positive integers"),
        ({"recipe": 16}, TypeError, "recipe must be a shipped recipe's name"),
        ({"filter_fn": "stem"}, TypeError, "filter_fn must be callable"),
    ],
)
def test_bad_arguments_name_the_argument(arguments: dict, error: type, message: str) -> None:
    model = arguments.pop("model", SmallNet())
    with pytest.raises(error, match=message):
        convert(model, **arguments)
    with pytest.raises(error, match=message):
        plan(model, **arguments)


_KEEP_NOTHING_EXAMPLES: dict[object, Callable[[torch.Tensor], object]] = {
    operator.add: lambda x: x + 1,
    operator.sub: lambda x: x - 1,
    operator.iadd: lambda x: operator.iadd(x.clone(), x),
    operator.getitem: lambda x: x[:, :2],
    getattr: lambda x: x.shape,
    torch.add: lambda x: torch.add(x, x),
    torch.sub: lambda x: torch.sub(x, x),
    torch.cat: lambda x: torch.cat([x, x], 1),
    torch.concat: lambda x: torch.concat([x, x], 1),
    torch.stack: lambda x: torch.stack([x, x]),
    torch.flatten: lambda x: torch.flatten(x, 1),
    torch.reshape: lambda x: torch.reshape(x, (2, -1)),
    torch.permute: lambda x: torch.permute(x, (0, 2, 3, 1)),
    torch.transpose: lambda x: torch.transpose(x, 1, 2),
    torch.squeeze: lambda x: torch.squeeze(x),
    torch.unsqueeze: lambda x: torch.unsqueeze(x, 0),
    torch.chunk: lambda x: torch.chunk(x, 2, 1),
    torch.split: lambda x: torch.split(x, 2, 1),
    F.dropout: lambda x: F.dropout(x, 0.5),
    F.dropout1d: lambda x: F.dropout1d(x.flatten(2), 0.5),
    F.dropout2d: lambda x: F.dropout2d(x, 0.5),
    F.dropout3d: lambda x: F.dropout3d(x.unsqueeze(2), 0.5),
    F.pad: lambda x: F.pad(x, (1, 1, 1, 1)),
    F.interpolate: lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"),
    "add": lambda x: x.add(x),
    "add_": lambda x: x.clone().add_(x),
    "sub": lambda x: x.sub(x),
    "view": lambda x: x.view(2, -1),
    "reshape": lambda x: x.reshape(2, -1),
    "flatten": lambda x: x.flatten(1),
    "permute": lambda x: x.permute(0, 2, 3, 1),
    "transpose": lambda x: x.transpose(1, 2),
    "contiguous": lambda x: x.permute(0, 2, 3, 1).contiguous(),
    "size": lambda x: x.size(),
    "dim": lambda x: x.dim(),
    "chunk": lambda x: x.chunk(2, 1),
    "split": lambda x: x.split(2, 1),
    "unsqueeze": lambda x: x.unsqueeze(0),
    "squeeze": lambda x: x.squeeze(),
    "expand": lambda x: x.expand(3, -1, -1, -1, -1),
    "mean": lambda x: x.mean((2, 3)),
    "sum": lambda x: x.sum(),
    nn.Dropout: nn.Dropout(),
    nn.Dropout1d: lambda x: nn.Dropout1d()(x.flatten(2)),
    nn.Dropout2d: nn.Dropout2d(),
    nn.Dropout3d: lambda x: nn.Dropout3d()(x.unsqueeze(2)),
    nn.Identity: nn.Identity(),
    nn.Flatten: nn.Flatten(),
    nn.Unflatten: nn.Unflatten(1, (2, 2)),
    nn.Upsample: nn.Upsample(scale_factor=2, mode="nearest"),
    nn.ZeroPad1d: lambda x: nn.ZeroPad1d(1)(x.flatten(2)),
    nn.ZeroPad2d: nn.ZeroPad2d(1),
    nn.ZeroPad3d: lambda x: nn.ZeroPad3d(1)(x.unsqueeze(2)),
}


def test_operations_said_to_keep_nothing_keep_nothing_of_their_input() -> None:
    table = {*KEEP_NOTHING_FUNCTIONS, *KEEP_NOTHING_METHODS, *KEEP_NOTHING_MODULES}
    assert set(_KEEP_NOTHING_EXAMPLES) == table
    for operation, example in _KEEP_NOTHING_EXAMPLES.items():
        x = torch.randn(2, 4, 6, 6, requires_grad=True) * 1
        storage = x.untyped_storage().data_ptr()
        saved: list[int] = []

        def pack(tensor: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(tensor.untyped_storage().data_ptr())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            example(x)
        assert storage not in saved, operation


def _detection_model() -> nn.Module:
    return models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=64, max_size=64
    )


def _detection_inputs() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    return images, targets


ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (models.resnet18, (2, 3, 64, 64)),
    "densenet121": (models.densenet121, (2, 3, 32, 32)),
    "mobilenet_v3_small": (models.mobilenet_v3_small, (2, 3, 64, 64)),
    "efficientnet_b0": (models.efficientnet_b0, (2, 3, 64, 64)),
    "regnet_x_400mf": (models.regnet_x_400mf, (2, 3, 64, 64)),
    "convnext_tiny": (models.convnext_tiny, (2, 3, 32, 32)),
    "lraspp_mobilenet_v3_large": (
        lambda: models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None),
        (2, 3, 64, 64),
    ),
    "r3d_18": (video.r3d_18, (2, 3, 4, 32, 32)),
    "fasterrcnn_mobilenet_v3_large_fpn": (_detection_model, (3, 64, 64)),
    "functional": (FunctionalNet, (2, 3, 16, 16)),
    "conv1d": (SequenceNet, (2, 2, 32)),
    "shared": (SharedConvNet, (2, 3, 16, 16)),
}


def _loss(output: object) -> torch.Tensor:
    if isinstance(output, dict):
        return sum(value.float().square().mean() if value.dim() else value for value in output.values())
    return output.square().mean()


@pytest.mark.parametrize("name", ZOO)
def test_zoo(name: str) -> None:
    build, shape = ZOO[name]
    model = build()
    inputs = _detection_inputs() if name.startswith("fasterrcnn") else (torch.randn(shape),)
    # a copy with its own Parameters, so that the gradients compared below are two different tensors
    converted = convert(copy.deepcopy(model), example_inputs=inputs, rewrite_forward=name in ("functional", "shared"))
    report = converted.xconv_report
    assert {layer.name for layer in report.layers if not layer.type.startswith("F.")} == _conv_names(model)
    assert any(layer.storage in ("probed", "recomputed") for layer in report.layers)
    assert (report.path == "module-swap") == name.startswith("fasterrcnn")

    expected, output = _seeded(model, *inputs), _seeded(converted, *inputs)
    assert _loss(expected).item() == _loss(output).item()
    _loss(expected).backward()
    _loss(output).backward()
    patched = {layer.name for layer in report.layers if layer.action == "patched"}
    weights = {f"{name}.weight" for name in patched} | {f"{name}" for name in patched}
    pairs = zip(model.named_parameters(), converted.parameters(), strict=True)
    compared = {key: (twin.grad, parameter.grad) for (key, parameter), twin in pairs
                if key not in weights and parameter.grad is not None}  # fmt: skip
    assert_gradients_match({k: a for k, (a, _) in compared.items()}, {k: b for k, (_, b) in compared.items()})

    before = saved_activation_bytes(model, lambda: _seeded(model, *inputs))
    after = saved_activation_bytes(converted, lambda: _seeded(converted, *inputs))
    assert (before, after) == (report.activation_bytes_before, report.activation_bytes_after)
    assert after < before

    model.eval(), converted.eval()
    with torch.no_grad():
        expected, output = model(*inputs[:1]), converted(*inputs[:1])
    leaves = zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(output), strict=True)
    assert all(torch.equal(a, b) for a, b in leaves)

    reverted = revert(converted)
    assert not any(isinstance(m, (XConvMixin, BitReLU)) for m in reverted.modules())
    for key, original in model.named_modules():
        if (key and not isinstance(reverted, fx.GraphModule)) or isinstance(original, _ConvNd):
            assert type(reverted.get_submodule(key)) is type(original), key


@pytest.mark.parametrize(("probes", "storage"), [(0, "kept"), (4, "probed")])
def test_a_recipe_rule_can_refuse_recomputation(probes: int, storage: str) -> None:
    model, shape = models.resnet18(), (2, 3, 64, 64)

    def rule(recompute: str) -> Recipe:
        text = f'[[rules]]\nmatch = {{ name = "layer1.0.conv2" }}\nprobes = {probes}\nrecompute = {recompute}\n'
        return Recipe.from_toml(text, source="rule.toml")

    converted = convert(copy.deepcopy(model), recipe=rule("false"), input_shape=shape)
    report = converted.xconv_report
    assert report.layer("layer1.0.conv2").storage == storage
    assert report.layer("layer1.1.conv2").storage == "recomputed"
    x = torch.randn(shape)
    assert _saved(converted, x) == report.activation_bytes_after
    assert report.activation_bytes_after > plan(model, recipe=rule("true"), input_shape=shape).activation_bytes_after
    assert "recompute = false" in Recipe.from_toml("[defaults]\nrecompute = false\n").to_toml()
    assert _saved(revert(converted), x) == report.activation_bytes_before
