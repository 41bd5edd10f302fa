"""Comparing gradients that are exact up to rounding.

A recomputed batch norm is replayed by the inference kernel from its batch statistics, which rounds
differently from the training kernel, so gradients downstream of it agree to rounding, not bit for
bit. Some gradients are cancellations of large terms (a bias right before a norm has a true gradient
of zero): their rounding is relative to the size of all the gradients, not to their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

RTOL = 1e-5


def assert_gradients_match(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Each gradient's difference within RTOL of the norm of all the expected gradients."""
    assert set(actual) == set(expected)
    scale = torch.cat([gradient.double().flatten() for gradient in expected.values()]).norm()
    for name, gradient in expected.items():
        difference = (actual[name].double() - gradient.double()).norm()
        assert difference <= RTOL * scale, f"{name}: difference {difference:.3g}, all gradients' norm {scale:.3g}"


def assert_same_training_step(model: nn.Module, converted: nn.Module, *inputs: Any) -> None:
    """The converted model (with its own Parameters) gives the same output and, after a backward of the
    same loss, every Parameter's gradient to rounding."""
    expected, output = model(*inputs), converted(*inputs)
    assert torch.equal(expected, output)
    expected.square().sum().backward()
    output.square().sum().backward()
    pairs = list(zip(model.named_parameters(), converted.parameters(), strict=True))
    assert_gradients_match({key: twin.grad for (key, _), twin in pairs}, {key: p.grad for (key, p), _ in pairs})
