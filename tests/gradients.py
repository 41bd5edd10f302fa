"""Comparing gradients that are exact up to rounding.

A recomputed batch norm is replayed by the inference kernel from its batch statistics, which rounds
differently from the training kernel, so gradients downstream of it agree to rounding, not bit for
bit. Some gradients are cancellations of large terms (a bias right before a norm has a true gradient
of zero): their rounding is relative to the size of all the gradients, not to their own.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

RTOL = 1e-5


def assert_gradients_match(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Each gradient's difference within RTOL of the norm of all the expected gradients."""
    assert set(actual) == set(expected)
    scale = torch.cat([gradient.double().flatten() for gradient in expected.values()]).norm()
    for name, gradient in expected.items():
        difference = (actual[name].double() - gradient.double()).norm()
        assert difference <= RTOL * scale, f"{name}: difference {difference:.3g}, all gradients' norm {scale:.3g}"
