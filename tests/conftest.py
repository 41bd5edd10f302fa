"""Shared test set-up: one intra-op thread, and every test starts from the same seeds.

One thread: the suite's tensors are small, and on a shared 2-core machine a second intra-op
thread that gets descheduled stalls every kernel (measured: 1.2 s against 53 s for the same
tests under load). Reductions then also run in one fixed order.
"""

import pytest
import torch

from xconv_patch import restart_probe_stream


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than about 20 seconds on a 2-core CPU")
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
    restart_probe_stream()
