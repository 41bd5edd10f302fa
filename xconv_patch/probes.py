"""Random probe bases for the XConv weight-gradient estimator.

A probe basis V (P x m x N, P = 1 for probes shared by the batch or B for per-sample probes)
satisfies E[V^T diag(w) V] = I_N for the per-column weights w returned alongside it, so the
projection X V^T diag(w) stored in forward recovers X in expectation (DESIGN.md section 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PROBE_KINDS = ("rademacher", "gaussian", "orthogonal")


@dataclass(frozen=True)
class ProbeSpec:
    """How one layer draws its probes.

    kind: 'rademacher' (+-1), 'gaussian' (the paper's) or 'orthogonal' (Haar-random orthonormal
    columns, exact when probes equal the number of pixels).
    per_sample: an independent basis per sample, so the batch averages estimator errors.
    deflate: keep the per-channel spatial mean exactly and probe only its complement.
    """

    probes: int
    kind: str = "rademacher"
    per_sample: bool = True
    deflate: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < 0:
            raise ValueError(f"probes must be a non-negative integer (0 = exact), got {self.probes!r}")
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"probe must be one of {', '.join(PROBE_KINDS)}; got {self.kind!r}")
        if self.deflate and self.probes == 1:
            raise ValueError("probes must be at least 2 with deflate=True (one slot holds the mean)")

    @property
    def random_probes(self) -> int:
        return self.probes - int(self.deflate)

    def basis(
        self, batch: int, spatial: torch.Size, dtype: torch.dtype, device: torch.device, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The basis as images (P, m, *spatial) and the weight of each column (m,)."""
        pixels = math.prod(spatial)
        samples = batch if self.per_sample else 1
        count = self.random_probes
        if self.kind == "orthogonal" and count > pixels - int(self.deflate):
            raise ValueError(
                f"orthogonal probes: {count} random probes exceed the {pixels - int(self.deflate)} "
                f"dimensions available for a {tuple(spatial)} input"
            )
        work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        generator = _generator(device, seed)
        if self.kind == "rademacher":
            probes = torch.randint(0, 2, (samples, count, pixels), generator=generator, device=device)
            probes = probes.to(work_dtype).mul_(2).sub_(1)
        else:
            probes = torch.randn(samples, count, pixels, generator=generator, device=device, dtype=work_dtype)
        if self.deflate:
            probes -= probes.mean(dim=-1, keepdim=True)
        if self.kind == "orthogonal":
            q, r = torch.linalg.qr(probes.transpose(1, 2))
            q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
            probes = q.transpose(1, 2) * math.sqrt(pixels - int(self.deflate))
        weights = torch.full((self.probes,), 1.0 / count if count else 0.0, dtype=work_dtype, device=device)
        if self.deflate:
            mean_image = torch.full((samples, 1, pixels), 1.0 / math.sqrt(pixels), dtype=work_dtype, device=device)
            probes = torch.cat([mean_image, probes], dim=1)
            weights[0] = 1.0
        return probes.to(dtype).reshape(samples, self.probes, *spatial), weights.to(dtype)


_GENERATORS: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A dedicated generator for the device, reseeded: the global RNG state is never touched."""
    generator = _GENERATORS.get(device)
    if generator is None:
        generator = _GENERATORS[device] = torch.Generator(device=device)
    return generator.manual_seed(seed)


class _SeedStream:
    """Per-call probe seeds derived from torch's seed and the distributed rank.

    The stream restarts whenever torch.initial_seed() changes, so a run seeded with
    torch.manual_seed is reproducible, and ranks of a distributed job draw different probes.
    """

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._count = 0

    def restart(self) -> None:
        self._key = None

    def next_seed(self) -> int:
        key = (torch.initial_seed(), _rank())
        if key != self._key:
            self._key, self._count = key, 0
        self._count += 1
        return _mix(key[0], key[1], self._count)


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
