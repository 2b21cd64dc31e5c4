import gc
import os
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIVEAVATAR_SHARED", REPO.parent / "shared"))

# Tiny models: every op is so small that thread hand-offs cost more than they save (measured: an end-to-end
# API test takes 16 s with one thread, 52 s with two on the 2-core CI machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared folder not found at {SHARED}; set LIVEAVATAR_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir) -> Path:
    return shared_dir / "fixtures"


@pytest.fixture(scope="session")
def media_dir(shared_dir) -> Path:
    return shared_dir / "media"


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage reachable from Python (views counted once): allocator-noise free."""
    storages = {}
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
