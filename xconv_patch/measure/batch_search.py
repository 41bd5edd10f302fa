"""The largest batch, or input side, that fits a memory limit, searched with few evaluations of the peak."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping


def largest_batch(peak: Callable[[int], int], limit: int, cap: int = 1 << 20) -> int:
    """The largest batch size in [1, cap] whose `peak(batch)` is at most `limit` bytes (0 if none).

    Peak memory is close to affine in the batch size, so two predictions give a line, and a secant
    guess and a check of its neighbour usually settle it in two to four more (resnet50 under 8 GiB:
    5 predictions each, exact and patched); bisection bounds the worst case.
    """
    return _largest(peak, limit, cap, degree=1)


def largest_side(
    peak: Callable[[int], int], limit: int, *, dims: int, multiple: int = 1, cap: int = 1 << 14
) -> int:
    """The largest input side in [multiple, cap], a multiple of `multiple`, whose `peak(side)` is at
    most `limit` bytes (0 if none). `peak(side)` is the peak of an input whose `dims` spatial sides
    all equal `side` (a network that halves its input n times needs multiple = 2 ** n).

    Peak memory is close to affine in the number of pixels, side ** dims: the secant guesses are
    made on that scale, then checked as for the batch size. Only monotonicity is assumed.
    """
    if dims < 1 or multiple < 1:
        raise ValueError(f"dims and multiple must be at least 1, got dims={dims}, multiple={multiple}")
    return multiple * _largest(lambda steps: peak(steps * multiple), limit, cap // multiple, degree=dims)


def _largest(peak: Callable[[int], int], limit: int, cap: int, degree: int) -> int:
    """The largest n in [1, cap] with peak(n) <= limit (0 if none), for a peak close to affine in n ** degree."""
    known: dict[int, int] = {}

    def fits(size: int) -> bool:
        if size not in known:
            known[size] = peak(size)
        return known[size] <= limit

    if cap < 1:
        return 0
    low = min(2, cap)
    if not fits(low):
        return 1 if low == 2 and fits(1) else 0
    # Secant guesses; after one interpolated between a fitting and a failing n (accurate: the peak is
    # affine in pieces, mildly convex), its neighbour; a guess extrapolated from two fitting n (the
    # line from small batches overshoots) is followed by another secant. Every third evaluation, if
    # the bracket has not halved since the previous check, a bisection: O(log cap) evaluations at worst.
    high, previous, interpolated = cap + 1, low, False
    width, since = cap, 0
    while high - low > 1:
        stalled = False
        if since == 3:
            stalled, width, since = high - low > width // 2, high - low, 0
        if stalled and high <= cap:
            candidate, interpolated = (low + high) // 2, False
        elif interpolated:
            candidate, interpolated = (previous + 1 if known[previous] <= limit else previous - 1), False
        else:
            interpolated = high in known
            candidate = _secant_guess(known, low, high, limit, degree)
        candidate = min(max(candidate, low + 1), high - 1)
        if fits(candidate):
            low = candidate
        else:
            high = candidate
        previous, since = candidate, since + 1
    return low


def _secant_guess(known: Mapping[int, int], low: int, high: int, limit: int, degree: int) -> int:
    """Where the peak crosses `limit` on the line (in n ** degree) through `low` and `high` (once an
    n is known not to fit), else on the line through `low` and the nearest known n below it (the
    local slope: the peak is affine in pieces, and small batches may peak elsewhere); with `low`
    alone, 2 * low."""
    below = [n for n in known if n < low]
    other = high if high in known else max(below, default=low)
    if other == low:
        return 2 * low
    slope = (known[other] - known[low]) / (other**degree - low**degree)
    if slope <= 0:
        return 2 * low
    if degree == 1:
        return low + int((limit - known[low]) // slope)
    return math.floor((low**degree + (limit - known[low]) / slope) ** (1 / degree) + 1e-9)
