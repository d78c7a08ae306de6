import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them when pytest runs alongside data workers.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
