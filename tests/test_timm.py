"""timm models (timm is a test dependency, never a runtime one): fused norm-activation layers
(BatchNormAct2d), squeeze-excitation gates and SiLU are recomputed, gradients stay exact (to rounding)."""

from __future__ import annotations

import copy

import pytest
import torch
from gradients import assert_same_training_step

from xconv_patch import convert
from xconv_patch.memory import saved_activation_bytes

timm = pytest.importorskip("timm")


@pytest.mark.parametrize(("name", "ratio"), [("efficientnet_b0", 2.5), ("resnet50d", 1.7)])
def test_timm_model_is_recomputed_exactly(name: str, ratio: float) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    converted = convert(copy.deepcopy(model), example_inputs=(x,))  # its own Parameters, to compare grads
    report = converted.xconv_report
    assert report.recomputes and not any(layer.storage == "probed" for layer in report.layers)
    assert report.activation_bytes_before / report.activation_bytes_after > ratio
    assert saved_activation_bytes(converted, lambda: converted(x)) == report.activation_bytes_after
    assert_same_training_step(model, converted, x)


def test_timm_fused_norm_activation_layers() -> None:
    """timm's BatchNormAct2d and GroupNormAct: the conv after them keeps nothing and stays exact."""
    from timm.layers import BatchNormAct2d, GroupNormAct

    for norm in (BatchNormAct2d(8, act_layer="silu"), GroupNormAct(8, num_groups=2, act_layer="gelu")):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), norm, torch.nn.Conv2d(8, 4, 3, padding=1))
        x = torch.randn(2, 3, 16, 16)
        converted = convert(copy.deepcopy(model), example_inputs=(x,))
        report = converted.xconv_report
        assert report.layer("2").storage == "recomputed", report.layer("2").reason
        assert saved_activation_bytes(converted, lambda c=converted, x=x: c(x)) == report.activation_bytes_after
        assert report.activation_bytes_after < report.activation_bytes_before
        assert_same_training_step(model, converted, x)


def test_timm_fused_norms_store_their_inputs_compressed() -> None:
    """BatchNormAct2d runs F.batch_norm inside its forward: the module owning its statistics is the one
    whose input is stored as int8, and what autograd keeps is what the report says."""
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    converted = convert(model, example_inputs=(x,), norm_storage="int8")
    report = converted.xconv_report
    by_module = {name: record for record in report.norms for name in record.modules}
    assert len(by_module) == 49 and all(record.storage == "int8" for record in report.norms)
    assert by_module["blocks.0.0.bn1"].name == "BatchNormAct2d 'blocks.0.0.bn1'"
    assert saved_activation_bytes(converted, lambda: converted(x)) == report.activation_bytes_after
    assert report.activation_bytes_after < convert(model, example_inputs=(x,)).xconv_report.activation_bytes_after / 2
