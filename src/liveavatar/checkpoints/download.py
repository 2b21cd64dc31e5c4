"""``liveavatar download DIR``: the two Hub repos into DIR/Wan2.2-S2V-14B and DIR/LiveAvatar.

huggingface_hub does the work: an interrupted download resumes where it stopped when the command is run
again, ``HF_ENDPOINT`` selects a mirror and ``HF_HUB_OFFLINE=1`` forbids the network (then only a
complete local copy passes). Both repos are fetched at the revisions pinned in ``HUB_REVISIONS``, which are
printed. Files inference never reads are skipped: the repo's example media, the wav2vec2 folder's
PyTorch-pickle copy of its ``model.safetensors``, its Flax/TensorFlow/Rust weights and its n-gram
language model (with the alphabet only that decoder reads).
"""
from __future__ import annotations

import sys
from pathlib import Path

from liveavatar.checkpoints.layout import (BASE_DIR_NAME, BASE_REPO, LORA_DIR_NAME, LORA_FILE, LORA_REPO,
                                           WAV2VEC2_DIR, CheckpointLayout)
from liveavatar.errors import LiveAvatarError

# The Hub commit each repo is fetched at. The commit hashes could not be looked up where this was written
# (no Hub access), so "main" is pinned explicitly: replace both with the hashes of a download that passed
# `liveavatar doctor`, so that a later push to either repo cannot change what `download` fetches. Until
# then a user pins them with `download --base-revision SHA --lora-revision SHA`.
HUB_REVISIONS = {BASE_REPO: "main", LORA_REPO: "main"}

BASE_IGNORE = ["assets/*", "examples/*", "*.msgpack", "*.h5", "*.ot", f"{WAV2VEC2_DIR}/pytorch_model.bin",
               f"{WAV2VEC2_DIR}/language_model/*", f"{WAV2VEC2_DIR}/alphabet.json"]


def download_checkpoints(target_dir: str | Path, *, progress: bool = True,
                         revisions: dict[str, str | None] | None = None) -> CheckpointLayout:
    """Fetch (or resume) both repos, then check the result; returns the layout ``generate`` will use.
    ``revisions`` (repo id -> commit, branch or tag) overrides ``HUB_REVISIONS``."""
    import huggingface_hub
    from huggingface_hub.utils import disable_progress_bars

    target_dir = Path(target_dir).expanduser().absolute()
    jobs = [(BASE_REPO, target_dir / BASE_DIR_NAME, {"ignore_patterns": BASE_IGNORE}),
            (LORA_REPO, target_dir / LORA_DIR_NAME, {"allow_patterns": [LORA_FILE]})]
    if not progress:
        disable_progress_bars()
    for repo_id, local_dir, patterns in jobs:
        revision = (revisions or {}).get(repo_id) or HUB_REVISIONS[repo_id]
        if progress:
            print(f"downloading {repo_id} at revision {revision} into {local_dir}", file=sys.stderr, flush=True)
        try:
            huggingface_hub.snapshot_download(repo_id, revision=revision, local_dir=local_dir, **patterns)
        except Exception as error:  # network, auth, disk and offline-mode errors all end the same way
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LiveAvatarError(f"downloading {repo_id} (revision {revision}) into {local_dir} failed: {reason}. "
                                  f"Run the same command again to resume; set HF_ENDPOINT to use a mirror") from error
    layout = CheckpointLayout.discover(target_dir / BASE_DIR_NAME, str(target_dir / LORA_DIR_NAME))
    layout.validate()
    return layout
