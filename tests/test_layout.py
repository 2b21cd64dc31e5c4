"""Checkpoint layout discovery and the header-only completeness checks, on small files in the release's
layout (the checks look at names and headers only, so the tensors can be anything)."""
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import filter_repo_objects
import pytest
import torch
from safetensors.torch import save_file

from liveavatar.checkpoints.download import BASE_IGNORE, HUB_REVISIONS, download_checkpoints
from liveavatar.checkpoints.files import check_torch_file
from liveavatar.checkpoints.layout import CheckpointLayout, resolve_lora
from liveavatar.checkpoints.safetensors_io import checkpoint_files
from liveavatar.cli import main
from liveavatar.errors import CheckpointError, LiveAvatarError


def build_checkpoint_dir(root: Path) -> Path:
    """root/Wan2.2-S2V-14B (sharded DiT, T5, tokenizer, VAE, wav2vec2) + root/LiveAvatar/liveavatar.safetensors."""
    base = root / "Wan2.2-S2V-14B"
    (base / "google" / "umt5-xxl").mkdir(parents=True)
    (base / "wav2vec2-large-xlsr-53-english").mkdir()
    (root / "LiveAvatar").mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "s2v", "dim": 8, "num_layers": 1}))
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": {"blocks.0.modulation": torch.zeros(1, 6, 8)},
              "diffusion_pytorch_model-00002-of-00002.safetensors": {"head.head.weight": torch.zeros(64, 8)}}
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(base / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (base / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save({"token_embedding.weight": torch.zeros(4, 4)}, base / "models_t5_umt5-xxl-enc-bf16.pth")
    (base / "google" / "umt5-xxl" / "tokenizer.json").write_text("{}")
    torch.save({"conv1.weight": torch.zeros(2, 2)}, base / "Wan2.1_VAE.pth")
    w2v = base / "wav2vec2-large-xlsr-53-english"
    (w2v / "config.json").write_text(json.dumps({"hidden_size": 4}))
    (w2v / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 16000}))
    save_file({"lm_head.weight": torch.zeros(2, 4)}, str(w2v / "model.safetensors"))
    save_file({"blocks.0.self_attn.q.lora_A.default.weight": torch.zeros(2, 8),
               "blocks.0.self_attn.q.lora_B.default.weight": torch.zeros(8, 2)},
              str(root / "LiveAvatar" / "liveavatar.safetensors"))
    return base


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a Hub id is also looked up in ./ckpt/LiveAvatar: keep the caller's out
    return build_checkpoint_dir(tmp_path)


def test_complete_layout(base):
    layout = CheckpointLayout.discover(base)
    layout.validate()
    assert layout.problems() == []
    assert layout.dit_dir == base and layout.t5 == base / "models_t5_umt5-xxl-enc-bf16.pth"
    assert layout.tokenizer == base / "google" / "umt5-xxl" and layout.vae == base / "Wan2.1_VAE.pth"
    assert layout.wav2vec2 == base / "wav2vec2-large-xlsr-53-english"
    # the default LoRA id is found as the `liveavatar download` folder beside the base directory
    assert layout.lora == base.parent / "LiveAvatar" / "liveavatar.safetensors"


def test_single_file_dit_is_accepted(base):
    for shard in base.glob("diffusion_pytorch_model-*.safetensors"):
        shard.unlink()
    (base / "diffusion_pytorch_model.safetensors.index.json").unlink()
    save_file({"head.head.weight": torch.zeros(64, 8)}, str(base / "diffusion_pytorch_model.safetensors"))
    layout = CheckpointLayout.discover(base)
    assert layout.problems() == []  # validate() raises on the first problem; this says there is none
    assert checkpoint_files(layout.dit_dir) == {"head.head.weight": base / "diffusion_pytorch_model.safetensors"}


def _cut(path: Path, keep: int = -100):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _breakages():
    shard1 = "diffusion_pytorch_model-00001-of-00002.safetensors"
    w2v = "wav2vec2-large-xlsr-53-english"
    return {
        "config missing": (lambda b: (b / "config.json").unlink(), "config.json"),
        "config not json": (lambda b: (b / "config.json").write_text("{oops"), "config.json"),
        "config other model": (lambda b: (b / "config.json").write_text('{"model_type": "t2v"}'), "model_type"),
        "index lists a missing shard": (lambda b: (b / shard1).unlink(), shard1),
        "truncated shard": (lambda b: _cut(b / shard1), shard1),
        "shard does not match index": (
            lambda b: save_file({"other.weight": torch.zeros(1)}, str(b / shard1)), shard1),
        "no DiT weights": (lambda b: [p.unlink() for p in b.glob("diffusion_pytorch_model*")], "diffusion_pytorch_model"),
        "t5 missing": (lambda b: (b / "models_t5_umt5-xxl-enc-bf16.pth").unlink(), "models_t5_umt5-xxl-enc-bf16.pth"),
        "t5 truncated": (lambda b: _cut(b / "models_t5_umt5-xxl-enc-bf16.pth"), "models_t5_umt5-xxl-enc-bf16.pth"),
        "t5 is text": (lambda b: (b / "models_t5_umt5-xxl-enc-bf16.pth").write_text("hello"), "not a PyTorch"),
        "tokenizer missing": (lambda b: shutil.rmtree(b / "google"), "umt5-xxl"),
        "vae missing": (lambda b: (b / "Wan2.1_VAE.pth").unlink(), "Wan2.1_VAE.pth"),
        "vae empty": (lambda b: (b / "Wan2.1_VAE.pth").write_bytes(b""), "Wan2.1_VAE.pth"),
        "vae truncated": (lambda b: _cut(b / "Wan2.1_VAE.pth", 200), "Wan2.1_VAE.pth"),
        "wav2vec2 folder missing": (lambda b: shutil.rmtree(b / w2v), w2v),
        "wav2vec2 weights missing": (lambda b: (b / w2v / "model.safetensors").unlink(), w2v),
        "wav2vec2 weights truncated": (lambda b: _cut(b / w2v / "model.safetensors"), "model.safetensors"),
        "lora missing": (lambda b: (b.parent / "LiveAvatar" / "liveavatar.safetensors").unlink(), "liveavatar download"),
        "lora without lora keys": (lambda b: save_file({"x": torch.zeros(1)},
                                                       str(b.parent / "LiveAvatar" / "liveavatar.safetensors")), "LoRA"),
        "lora truncated": (lambda b: _cut(b.parent / "LiveAvatar" / "liveavatar.safetensors"), "liveavatar.safetensors"),
    }


@pytest.mark.parametrize("case", list(_breakages()))
def test_each_bad_piece_gives_one_line_naming_it(base, case, monkeypatch, tmp_path):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    breakage, named = _breakages()[case]
    breakage(base)
    layout = CheckpointLayout.discover(base)
    problems = layout.problems()
    assert len(problems) == 1 and named in problems[0] and "\n" not in problems[0]
    with pytest.raises(CheckpointError) as error:
        layout.validate()
    assert str(error.value) == problems[0]


def test_several_problems_are_counted(base):
    (base / "Wan2.1_VAE.pth").unlink()
    (base / "models_t5_umt5-xxl-enc-bf16.pth").unlink()
    with pytest.raises(CheckpointError, match="and 1 more"):
        CheckpointLayout.discover(base).validate()


def test_missing_ckpt_dir_points_to_download(tmp_path):
    problems = CheckpointLayout.discover(tmp_path / "nowhere").problems()
    assert len(problems) == 1 and "liveavatar download" in problems[0]


def test_lora_as_file_folder_and_no_lora(base):
    lora_file = base.parent / "LiveAvatar" / "liveavatar.safetensors"
    assert resolve_lora(str(lora_file), base) == lora_file
    assert resolve_lora(str(lora_file.parent), base) == lora_file
    assert CheckpointLayout.discover(base, None).lora is None
    CheckpointLayout.discover(base, None).validate()
    moved = base.parent / "elsewhere" / "my.safetensors"
    moved.parent.mkdir()
    shutil.move(lora_file, moved)
    assert CheckpointLayout.discover(base, str(moved)).lora == moved


def _hf_cache_entry(cache_dir: Path, repo_id: str, source: Path) -> Path:
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    shutil.copy(source, snapshot / "liveavatar.safetensors")
    return snapshot / "liveavatar.safetensors"


def test_hub_id_resolves_through_the_local_caches(base, tmp_path, monkeypatch):
    source = base.parent / "LiveAvatar" / "liveavatar.safetensors"
    moved = tmp_path / "lora.safetensors"
    shutil.move(source, moved)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    assert resolve_lora("Quark-Vision/Live-Avatar", base) is None
    # the user's Hugging Face cache
    in_user_cache = _hf_cache_entry(cache, "Quark-Vision/Live-Avatar", moved)
    assert resolve_lora("Quark-Vision/Live-Avatar", base) == in_user_cache
    # the reference's cache_dir: ckpt/LiveAvatar in the Hugging Face layout (preferred: beside the base)
    in_ckpt_cache = _hf_cache_entry(base.parent / "LiveAvatar", "Quark-Vision/Live-Avatar", moved)
    assert resolve_lora("Quark-Vision/Live-Avatar", base) == in_ckpt_cache
    # a folder that is such a cache
    assert resolve_lora(str(base.parent / "LiveAvatar"), base) == in_ckpt_cache
    CheckpointLayout.discover(base).validate()


def test_hub_id_is_also_found_where_the_reference_puts_it_after_the_folder_beside_the_base(base, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    beside = base.parent / "LiveAvatar" / "liveavatar.safetensors"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # the reference's hf_hub_download(cache_dir="ckpt/LiveAvatar"), relative to the working folder
    in_reference_cache = _hf_cache_entry(work / "ckpt" / "LiveAvatar", "Quark-Vision/Live-Avatar", beside)
    assert resolve_lora("Quark-Vision/Live-Avatar", base) == beside  # the folder beside --ckpt_dir comes first
    beside.unlink()
    assert resolve_lora("Quark-Vision/Live-Avatar", base) == in_reference_cache
    CheckpointLayout.discover(base).validate()
    # the same folder holding the file itself (huggingface-cli download --local-dir ./ckpt/LiveAvatar)
    flat = work / "ckpt" / "LiveAvatar" / "liveavatar.safetensors"
    shutil.copy(in_reference_cache, flat)
    assert resolve_lora("Quark-Vision/Live-Avatar", base) == flat


def test_torch_file_check_accepts_real_torch_files(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.randn(300, 300)}, path)
    check_torch_file(path)
    _cut(path, path.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        check_torch_file(path)


def test_download_fetches_both_repos_into_the_layout(tmp_path, monkeypatch):
    calls, revisions = [], []
    staged = tmp_path / "staged"
    build_checkpoint_dir(staged)

    def fake_snapshot_download(repo_id, *, local_dir, revision, **patterns):
        calls.append((repo_id, Path(local_dir), patterns))
        revisions.append(revision)
        shutil.copytree(staged / Path(local_dir).name, local_dir, dirs_exist_ok=True)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    layout = download_checkpoints(tmp_path / "ckpt", progress=False)
    assert [(repo, path) for repo, path, _ in calls] == [
        ("Wan-AI/Wan2.2-S2V-14B", tmp_path / "ckpt" / "Wan2.2-S2V-14B"),
        ("Quark-Vision/Live-Avatar", tmp_path / "ckpt" / "LiveAvatar")]
    assert calls[1][2] == {"allow_patterns": ["liveavatar.safetensors"]}
    assert layout.ckpt_dir == tmp_path / "ckpt" / "Wan2.2-S2V-14B"
    assert layout.lora == tmp_path / "ckpt" / "LiveAvatar" / "liveavatar.safetensors"
    assert revisions == [HUB_REVISIONS["Wan-AI/Wan2.2-S2V-14B"], HUB_REVISIONS["Quark-Vision/Live-Avatar"]]


def test_download_failure_is_one_line_that_says_how_to_resume(tmp_path, monkeypatch):
    def offline(repo_id, **kwargs):
        raise OSError("Cannot reach https://huggingface.co\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(LiveAvatarError) as error:
        download_checkpoints(tmp_path, progress=False)
    assert "Wan-AI/Wan2.2-S2V-14B" in str(error.value) and "again to resume" in str(error.value)
    assert "\n" not in str(error.value)


def test_download_pins_and_prints_both_revisions(tmp_path, monkeypatch, capsys):
    staged = tmp_path / "staged"
    build_checkpoint_dir(staged)

    def fake_snapshot_download(repo_id, *, local_dir, revision, **patterns):
        shutil.copytree(staged / Path(local_dir).name, local_dir, dirs_exist_ok=True)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert set(HUB_REVISIONS) == {"Wan-AI/Wan2.2-S2V-14B", "Quark-Vision/Live-Avatar"}
    download_checkpoints(tmp_path / "ckpt")
    printed = capsys.readouterr().err
    for repo, revision in HUB_REVISIONS.items():
        assert f"downloading {repo} at revision {revision} into" in printed
    # A user pins other revisions from the command line.
    assert main(["download", str(tmp_path / "ckpt"), "--base-revision", "0123abc", "--lora-revision", "v1"]) == 0
    printed = capsys.readouterr().err
    assert "Wan-AI/Wan2.2-S2V-14B at revision 0123abc" in printed and "Live-Avatar at revision v1" in printed


def test_download_skips_what_inference_never_reads():
    w2v = "wav2vec2-large-xlsr-53-english"
    needed = ["config.json", "diffusion_pytorch_model.safetensors.index.json",
              "diffusion_pytorch_model-00001-of-00004.safetensors", "models_t5_umt5-xxl-enc-bf16.pth",
              "google/umt5-xxl/spiece.model", "google/umt5-xxl/tokenizer.json", "Wan2.1_VAE.pth",
              f"{w2v}/config.json", f"{w2v}/preprocessor_config.json", f"{w2v}/vocab.json", f"{w2v}/model.safetensors"]
    unused = [f"{w2v}/pytorch_model.bin", f"{w2v}/flax_model.msgpack", f"{w2v}/tf_model.h5",
              f"{w2v}/language_model/lm.binary", f"{w2v}/language_model/unigrams.txt", f"{w2v}/alphabet.json",
              "examples/i2v_input.JPG", "assets/logo.png"]
    # huggingface_hub's own matcher, as snapshot_download applies it
    assert list(filter_repo_objects(needed + unused, ignore_patterns=BASE_IGNORE)) == needed


LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 4548313\n")


@pytest.mark.parametrize("relative", [
    "google/umt5-xxl/tokenizer.json", "config.json", "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth",
    "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    "wav2vec2-large-xlsr-53-english/model.safetensors", "wav2vec2-large-xlsr-53-english/preprocessor_config.json",
    "../LiveAvatar/liveavatar.safetensors",
])
def test_a_git_lfs_pointer_in_place_of_a_file_is_named_as_such(base, relative):
    path = Path(os.path.normpath(base / relative))
    path.write_text(LFS_POINTER)
    assert CheckpointLayout.discover(base).problems() == [
        f"{path}: a Git LFS pointer, not the file itself (the repository was cloned without git-lfs); "
        f"run `git lfs pull` in it, or fetch it with `liveavatar download`"]
