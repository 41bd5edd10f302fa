"""Random probe bases for the XConv weight-gradient estimator.

A probe basis V (P x m x N, P = 1 for probes shared by the batch or B for per-sample probes) is
scaled so that E[V^T V] = I_N, summed over its m columns: the projection X V^T stored in forward
recovers X in expectation as X V^T V (DESIGN.md section 1).
"""

from __future__ import annotations

import math
import numbers
import threading
from dataclasses import dataclass

import torch

from .bits import byte_table, expand_bytes

PROBE_KINDS = ("rademacher", "gaussian", "orthogonal")
DEFAULT_PROBES = 16


@dataclass(frozen=True)
class ProbeSpec:
    """How one layer estimates its weight gradient: the one settings type of layers, recipes and reports.

    probes: the budget r (0 = the layer stays exact). An input with no more pixels than r is kept
    whole for the exact weight gradient: its projection would be no smaller.
    probe: 'rademacher' (+-1), 'gaussian' (the paper's) or 'orthogonal' (Haar-random orthonormal
    columns, exact when probes equal the number of pixels).
    per_sample: an independent basis per sample, so the batch averages estimator errors.
    deflate: keep the per-channel spatial mean exactly and probe only its complement.
    """

    probes: int = DEFAULT_PROBES
    probe: str = "rademacher"
    per_sample: bool = True
    deflate: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.probes, bool) or not isinstance(self.probes, numbers.Integral) or self.probes < 0:
            raise ValueError(f"probes must be a non-negative integer (0 = exact), got {self.probes!r}")
        object.__setattr__(self, "probes", int(self.probes))
        for flag in ("per_sample", "deflate"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.probe not in PROBE_KINDS:
            raise ValueError(f"probe must be one of {', '.join(PROBE_KINDS)}; got {self.probe!r}")
        if self.deflate and self.probes == 1:
            raise ValueError("probes must be at least 2 with deflate=True (one slot holds the mean)")

    @property
    def random_probes(self) -> int:
        return self.probes - int(self.deflate)

    def basis(
        self, batch: int, spatial: torch.Size, dtype: torch.dtype, device: torch.device, seed: int
    ) -> torch.Tensor:
        """The basis as images (P, m, *spatial), regenerated identically from the same seed.

        Needs fewer probes than pixels (more would store more than the input: layers then keep
        the input and compute the exact gradient instead).
        """
        pixels = math.prod(spatial)
        samples = batch if self.per_sample else 1
        count = self.random_probes
        dimensions = pixels - int(self.deflate)  # probed: all pixels, or the complement of the mean
        if self.probe == "orthogonal" and count > dimensions:
            raise ValueError(
                f"orthogonal probes: {count} random probes exceed the {dimensions} dimensions available "
                f"for a {tuple(spatial)} input"
            )
        work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        generator = _generator(device, seed)
        shape, scale = (samples, count, pixels), 1 / math.sqrt(count)
        if self.probe == "rademacher":
            probes = _rademacher(shape, scale, work_dtype, device, generator)
        else:
            probes = torch.empty(shape, dtype=work_dtype, device=device).normal_(0, scale, generator=generator)
        if self.probe == "orthogonal":
            if self.deflate:
                probes -= probes.mean(dim=-1, keepdim=True)
            q, r = torch.linalg.qr(probes.transpose(1, 2))
            q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
            probes = q.transpose(1, 2).mul_(math.sqrt(dimensions / count))
        if self.deflate:
            # The mean image first, then the probes' projection on its complement, written in place.
            basis = torch.empty((samples, self.probes, pixels), dtype=dtype, device=device)
            basis[:, 0].fill_(1 / math.sqrt(pixels))
            if self.probe == "orthogonal":
                basis[:, 1:].copy_(probes)
            else:
                torch.sub(probes, probes.mean(dim=-1, keepdim=True), out=basis[:, 1:])
            probes = basis
        return probes.to(dtype).view(samples, self.probes, *spatial)


def _rademacher(
    shape: tuple[int, ...], scale: float, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """+-scale entries: one random byte per 8 entries, expanded by a lookup in the table of all bytes."""
    numel = math.prod(shape)
    random_bytes = torch.randint(0, 256, (-(-numel // 8),), dtype=torch.int32, generator=generator, device=device)
    return expand_bytes(byte_table(scale, -scale, dtype, device), random_bytes, numel).view(shape)


_GENERATORS = threading.local()


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """This thread's dedicated generator for the device, reseeded: the global RNG state is never
    touched, and threads never reseed each other's generator between seeding and drawing."""
    generators: dict[torch.device, torch.Generator] = vars(_GENERATORS).setdefault("by_device", {})
    generator = generators.get(device)
    if generator is None:
        generator = generators[device] = torch.Generator(device=device)
    return generator.manual_seed(seed)


class _SeedStream:
    """Per-call probe seeds derived from torch's seed and the distributed rank.

    The stream restarts whenever torch.initial_seed() changes, so a run seeded with
    torch.manual_seed is reproducible, and ranks of a distributed job draw different probes.
    """

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._count = 0
        self._lock = threading.Lock()  # threads sharing the stream never draw the same seed

    def restart(self) -> None:
        with self._lock:
            self._key = None

    def next_seed(self) -> int:
        key = (torch.initial_seed(), _rank())
        with self._lock:
            if key != self._key:
                self._key, self._count = key, 0
            self._count += 1
            count = self._count
        return _mix(key[0], key[1], count)


def _rank() -> int:
    distributed = torch.distributed
    return distributed.get_rank() if distributed.is_available() and distributed.is_initialized() else 0


def _mix(*values: int) -> int:
    """SplitMix64 over the values: well-spread 63-bit seeds from small integers."""
    state = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for value in values:
        state = (state ^ (value & mask)) * 0xBF58476D1CE4E5B9 & mask
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & mask
        state ^= state >> 29
    return state >> 1


SEEDS = _SeedStream()


def restart_probe_stream() -> None:
    """Replay the probe sequence from its start, e.g. after torch.manual_seed with the same seed."""
    SEEDS.restart()


def fresh_generator(device: torch.device) -> torch.Generator:
    """This thread's generator for the device, seeded with the next seed of the probe stream (for other
    random draws of the backward's estimates, such as stochastic rounding)."""
    return _generator(device, SEEDS.next_seed())
