import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIVEAVATAR_SHARED", REPO.parent / "shared"))


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
