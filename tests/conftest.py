import ctypes
import gc
import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/refconfigs.py is shared by the test modules


@pytest.fixture(autouse=True)
def _free_memory():
    """Full-size references take several GB: make sure nothing of the previous test survives, and hand the
    freed memory back to the OS (glibc keeps freed blocks otherwise, and peak RSS creeps up across tests)."""
    yield
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="where pipelines run (auto | cpu | cuda | cuda:N | mps): the suite runs unchanged on a GPU "
                          "machine with --device cuda; compute stays fp32 (the parity tolerances are fp32's) unless a "
                          "test asks for another dtype")


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    """The --device option: tests pass it explicitly where they choose a device."""
    return pytestconfig.getoption("--device")


def pytest_configure(config):
    # every Pipeline.from_pretrained(..., device="auto") in the suite lands on --device, in fp32
    os.environ["STABLEXL_DEVICE"] = config.getoption("--device")
    os.environ["STABLEXL_DTYPE"] = "fp32"
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    # model hashes are cached across runs (stablexl/io/hashing.py): keep the tests' out of the user's cache
    os.environ.setdefault("STABLEXL_CACHE_DIR", tempfile.mkdtemp(prefix="stablexl-test-cache-"))
