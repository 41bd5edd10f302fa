"""MONAI's 3-D networks (monai is a test dependency and a user extra, never a runtime one), built by
name with keyword arguments as `xconv profile monai.networks.nets:NAME --model-kwargs` builds them."""

from __future__ import annotations

import copy

import pytest
import torch
from gradients import assert_same_training_step

from xconv_patch import convert
from xconv_patch.memory import saved_activation_bytes
from xconv_patch.models import resolve_model

pytest.importorskip("monai")

SHAPE = (1, 1, 32, 32, 32)


@pytest.mark.parametrize(
    ("name", "kwargs", "recomputed"),
    [
        # fx traces a graph that drops UpCat's concatenation (torch.jit.isinstance on a Proxy): module swap
        ("BasicUNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "features": [8, 8, 16, 32, 64, 8]}, 18),
        # residual units: a unit's output adds a conv's output, which nothing recomputes
        ("UNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32], "strides": [2, 2],
                  "num_res_units": 1}, 2),
    ],
)
def test_monai_3d_networks_recompute_exactly_and_compress_on_request(name: str, kwargs: dict, recomputed: int) -> None:
    torch.manual_seed(0)
    model = resolve_model(f"monai.networks.nets:{name}", model_kwargs=kwargs).model
    x = torch.randn(SHAPE)
    converted = convert(copy.deepcopy(model), input_shape=SHAPE, probes=0)  # exact: recomputed or kept
    report = converted.xconv_report
    assert sum(layer.storage == "recomputed" for layer in report.layers) == recomputed
    assert saved_activation_bytes(converted, lambda: converted(x)) == report.activation_bytes_after
    assert report.activation_bytes_after < report.activation_bytes_before / 1.5
    assert_same_training_step(model, converted, x)
    compressed = convert(model, input_shape=SHAPE, probes=0, norm_storage="int8").xconv_report
    assert any(record.storage == "int8" for record in compressed.norms)
    assert compressed.activation_bytes_after < report.activation_bytes_after
