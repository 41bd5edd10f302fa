"""The largest batch that fits a memory limit, searched with few evaluations of the peak."""

from __future__ import annotations

from collections.abc import Callable, Mapping


def largest_batch(peak: Callable[[int], int], limit: int, cap: int = 1 << 20) -> int:
    """The largest batch size in [1, cap] whose `peak(batch)` is at most `limit` bytes (0 if none).

    Peak memory is close to affine in the batch size, so a secant guess and a check of its
    neighbour usually settle it in two predictions; every third step bisects, which bounds the rest.
    """
    known: dict[int, int] = {}

    def fits(size: int) -> bool:
        if size not in known:
            known[size] = peak(size)
        return known[size] <= limit

    low = min(2, cap)
    if not fits(low):
        return 1 if low == 2 and fits(1) else 0
    high, previous, turn = cap + 1, low, 0
    while high - low > 1:
        if turn % 3 == 0:
            candidate = _secant_guess(known, low, high, limit)
        elif turn % 3 == 1:
            candidate = previous + 1 if known[previous] <= limit else previous - 1
        else:
            candidate = (low + high) // 2 if high <= cap else 2 * low
        candidate = min(max(candidate, low + 1), high - 1)
        if fits(candidate):
            low = candidate
        else:
            high = candidate
        previous, turn = candidate, turn + 1
    return low


def _secant_guess(known: Mapping[int, int], low: int, high: int, limit: int) -> int:
    """Where the peak crosses `limit` on the line through `low` and `high` (once a batch is known
    not to fit), else on the line through the smallest known batch and `low`."""
    other = high if high in known else min(known)
    if other == low:
        return 2 * low
    slope = (known[other] - known[low]) / (other - low)
    return low + int((limit - known[low]) // slope) if slope > 0 else 2 * low
