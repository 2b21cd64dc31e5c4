import os
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


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """`make_tiny_checkpoints` once per session (its layout); a module may make its own."""
    from liveavatar.checkpoints.make_tiny import make_tiny_checkpoints

    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def prompt_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prompt_cache")
