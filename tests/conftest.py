"""Shared fixtures: tiny random models of each family, offline environment, markers."""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the token cache, teacher samples and dense perplexities (vtrans.cache) of the tests' runs stay out of ~/.cache
os.environ.setdefault("VTRANS_CACHE", tempfile.mkdtemp(prefix="vtrans-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny import tiny_model  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny matmuls are ~15x slower with two OpenMP threads on this class of machine; modules with many tiny-model
    runs use it (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
