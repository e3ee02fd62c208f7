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


def pytest_configure(config):
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    # model hashes are cached across runs (stablexl/io/hashing.py): keep the tests' out of the user's cache
    os.environ.setdefault("STABLEXL_CACHE_DIR", tempfile.mkdtemp(prefix="stablexl-test-cache-"))
