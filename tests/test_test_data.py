"""The suite's inputs live in the repository: a fresh clone runs every test, parity included."""
import json
import re
from pathlib import Path

from safetensors import safe_open

from liveavatar.testing.parity import find_manifests

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "fixtures"


def test_every_public_fixture_is_in_the_repository_with_what_its_manifest_names():
    manifests = {json.loads(path.read_text())["fixture"]: json.loads(path.read_text())
                 for path in find_manifests(FIXTURES)}
    assert sorted(manifests) == ["A_dit_forward", "B_loop_offline", "B_loop_online", "B_loop_tpp", "C_vae",
                                 "D_encoders", "E_lora"]
    for name, manifest in manifests.items():
        with safe_open(str(FIXTURES / manifest["tensor_file"]), "pt") as tensors:
            # the manifests list exactly the stored tensors (the dropped intermediates left both)
            assert set(tensors.keys()) == set(manifest["tensors"]), name
        named_files = [manifest.get(key) for key in ("weights_dir", "lora_file", "wav", "wav2vec2_dir")]
        named_files += [manifest.get("generate_kwargs", {}).get(key) for key in ("ref_image_path", "audio_path")]
        for relative in filter(None, named_files):
            assert (FIXTURES / relative).exists(), f"{name}: {relative}"


def test_the_readme_examples_exist_with_their_credit():
    named = set(re.findall(r"examples/([\w.]+\.(?:jpg|wav))", (REPO / "README.md").read_text()))
    assert named and all((REPO / "examples" / name).is_file() for name in named), named
    credit = (REPO / "examples" / "README.md").read_text()
    assert "Alibaba-Quark/LiveAvatar" in credit and "Apache License 2.0" in credit
    assert "Apache License" in (REPO / "examples" / "LICENSE").read_text()
