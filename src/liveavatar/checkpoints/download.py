"""``liveavatar download DIR``: the two Hub repos into DIR/Wan2.2-S2V-14B and DIR/LiveAvatar.

huggingface_hub does the work: an interrupted download resumes where it stopped when the command is run
again, ``HF_ENDPOINT`` selects a mirror and ``HF_HUB_OFFLINE=1`` forbids the network (then only a
complete local copy passes). Files inference never reads (the repo's example media, other framework
formats of the wav2vec2 weights, its n-gram language model) are skipped.
"""
from __future__ import annotations

from pathlib import Path

from liveavatar.checkpoints.layout import (BASE_DIR_NAME, BASE_REPO, LORA_DIR_NAME, LORA_FILE, LORA_REPO,
                                           WAV2VEC2_DIR, CheckpointLayout)
from liveavatar.errors import LiveAvatarError

BASE_IGNORE = ["assets/*", "examples/*", "*.msgpack", "*.h5", "*.ot", f"{WAV2VEC2_DIR}/language_model/*"]


def download_checkpoints(target_dir: str | Path, *, progress: bool = True) -> CheckpointLayout:
    """Fetch (or resume) both repos, then check the result; returns the layout ``generate`` will use."""
    import huggingface_hub
    from huggingface_hub.utils import disable_progress_bars

    target_dir = Path(target_dir).expanduser().absolute()
    jobs = [(BASE_REPO, target_dir / BASE_DIR_NAME, {"ignore_patterns": BASE_IGNORE}),
            (LORA_REPO, target_dir / LORA_DIR_NAME, {"allow_patterns": [LORA_FILE]})]
    if not progress:
        disable_progress_bars()
    for repo_id, local_dir, patterns in jobs:
        try:
            huggingface_hub.snapshot_download(repo_id, local_dir=local_dir, **patterns)
        except Exception as error:  # network, auth, disk and offline-mode errors all end the same way
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LiveAvatarError(f"downloading {repo_id} into {local_dir} failed: {reason}. Run the same command "
                                  f"again to resume; set HF_ENDPOINT to use a mirror") from error
    layout = CheckpointLayout.discover(target_dir / BASE_DIR_NAME, str(target_dir / LORA_DIR_NAME))
    layout.validate()
    return layout
