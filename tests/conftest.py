import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import `reference` and `models` as plain modules


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
