"""Checks of one checkpoint file that the layout check and the loaders share: a Git LFS pointer left
in place of the file, a cut or foreign ``torch.save`` file."""
from __future__ import annotations

import zipfile
from pathlib import Path

from liveavatar.errors import CheckpointError

_LFS_POINTER = b"version https://git-lfs"


def check_not_lfs_pointer(path: Path) -> None:
    """Raise CheckpointError if ``path`` is a Git LFS pointer: the ~130-byte text that a clone without
    git-lfs leaves in place of every large file of a Hub repository."""
    with open(path, "rb") as file:
        if file.read(len(_LFS_POINTER)) == _LFS_POINTER:
            raise CheckpointError(f"{path}: a Git LFS pointer, not the file itself (the repository was cloned "
                                  f"without git-lfs); run `git lfs pull` in it, or fetch it with `liveavatar download`")


def check_torch_file(path: Path) -> None:
    """A ``torch.save`` file is a zip whose directory is written last: a cut file has none."""
    try:
        with zipfile.ZipFile(path):
            return
    except zipfile.BadZipFile:
        pass
    check_not_lfs_pointer(path)
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic.startswith(b"PK"):
        raise CheckpointError(f"{path}: truncated (the end of the file is missing); download it again")
    if not magic.startswith(b"\x80"):  # the legacy pickle format, which has no size to check
        raise CheckpointError(f"{path}: not a PyTorch checkpoint")
