import os
import random

import pytest
import torch


def pytest_report_header(config):
    return f"stepscope test base seed: {BASE_SEED} (set STEPSCOPE_TEST_SEED to replay)"


# Fresh random inputs every run; the base seed is printed in the header and in every failure.
BASE_SEED = int(os.environ.get("STEPSCOPE_TEST_SEED", random.SystemRandom().randrange(2**31)))


@pytest.fixture
def base_seed():
    return BASE_SEED


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_torch_thread():
    """Timing tests run with one torch thread: idle OpenMP workers take ms to wake on a shared VM."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_torch_thread():
    """Timing under sleeps: idle OpenMP workers take milliseconds to wake after a sleep (the
    README's note on this VM), run-to-run noise of the machine rather than of what a test compares."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
