import gc
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

REPO = Path(__file__).resolve().parents[1]
# LIVEAVATAR_SHARED names a folder with fixtures/ and media/ of the same formats (another fixture set);
# by default the suite reads the copies inside the repository.
SHARED = os.environ.get("LIVEAVATAR_SHARED")
FIXTURES = Path(SHARED) / "fixtures" if SHARED else REPO / "tests" / "data" / "fixtures"
MEDIA = Path(SHARED) / "media" if SHARED else REPO / "examples"

# Tiny models: every op is so small that thread hand-offs cost more than they save (measured: an end-to-end
# API test takes 16 s with one thread, 52 s with two on the 2-core CI machine).
torch.set_num_threads(1)


def _existing(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.fail(f"test data folder not found at {folder}" + ("; check LIVEAVATAR_SHARED" if SHARED else ""))
    return folder


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return _existing(FIXTURES)


@pytest.fixture(scope="session")
def media_dir() -> Path:
    return _existing(MEDIA)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """`make_tiny_checkpoints` once per session (its layout); a module may make its own."""
    from liveavatar.models.tiny import make_tiny_checkpoints

    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def prompt_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prompt_cache")


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage reachable from Python (views counted once): allocator-noise free."""
    storages = {}
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        # FakeTensors an earlier compile left behind (test_fast_path's) hold no memory and no data pointer.
        if obj.device.type != "meta" and not isinstance(obj, FakeTensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
