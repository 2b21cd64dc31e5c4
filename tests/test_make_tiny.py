import json

import pytest
import torch

from liveavatar.checkpoints.layout import CheckpointLayout
from liveavatar.cli import main
from liveavatar.io.media import load_audio, load_image, reference_tensor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    assert main(["make-tiny", str(root)]) == 0
    return root


def test_release_files_and_layout(tiny):
    base = tiny / "Wan2.2-S2V-14B"
    index = json.loads((base / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((base / name).is_file() for name in shards)
    for name in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "config.json",
                 "wav2vec2-large-xlsr-53-english/config.json", "wav2vec2-large-xlsr-53-english/model.safetensors",
                 "wav2vec2-large-xlsr-53-english/preprocessor_config.json"):
        assert (base / name).is_file(), name
    assert any((base / "google" / "umt5-xxl" / name).is_file() for name in ("tokenizer.json", "spiece.model"))
    config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == "s2v" and config["dim"] < 5120 and config["num_layers"] < 40
    layout = CheckpointLayout.discover(base)  # the default LoRA id resolves to the folder beside it
    layout.validate()
    assert layout.lora == tiny / "LiveAvatar" / "liveavatar.safetensors"


def test_release_loaders_read_it_and_the_widths_agree(tiny, media_dir):
    from liveavatar.models.audio_features import AudioFeatureExtractor
    from liveavatar.models.text_encoder import TextEncoder
    from liveavatar.models.transformer import CausalS2VTransformer
    from liveavatar.models.vae import WanVAE

    base = tiny / "Wan2.2-S2V-14B"
    dit = CausalS2VTransformer.from_pretrained(base, device="cpu", dtype=torch.float32,
                                               lora=tiny / "LiveAvatar" / "liveavatar.safetensors")
    context = TextEncoder.from_pretrained(base, device="cpu", dtype=torch.float32, cache_dir=tiny / "cache").encode(
        "A stout, cheerful dwarf")
    assert context.shape[-1] == dit.config.text_dim
    assert dit.embed_text(context.to(torch.float32)).shape[-1] == dit.config.dim
    waveform = load_audio(str(media_dir / "cyclops_baker.wav"))
    hidden = AudioFeatureExtractor.from_pretrained(base / "wav2vec2-large-xlsr-53-english", device="cpu",
                                                   dtype=torch.float32).hidden_states(waveform[:16000])
    assert hidden.shape[0] == dit.config.audio_layers and hidden.shape[-1] == dit.config.audio_dim
    vae = WanVAE.from_checkpoint(base / "Wan2.1_VAE.pth", device="cpu", dtype=torch.float32)
    latents = vae.encode(reference_tensor(load_image(media_dir / "cyclops_baker.jpg"), 64, 128))
    assert latents.shape == (1, 16, 1, 8, 16) and torch.isfinite(latents).all()


@pytest.mark.parametrize("size", ["704*384", "704x384", "704X384", "704×384", "704 * 384"])
def test_dry_run_on_tiny_reports_the_reference_size(tiny, media_dir, size, capsys):
    for image, audio, expected in [("dwarven_blacksmith.jpg", "dwarven_blacksmith.wav", (704, 384)),
                                   ("fashion_blogger.jpg", "fashion_blogger.wav", (384, 704))]:
        code = main(["generate", "--ckpt_dir", str(tiny / "Wan2.2-S2V-14B"), "--image", str(media_dir / image),
                     "--audio", str(media_dir / audio), "--size", size, "--dry-run", "--json"])
        report = json.loads(capsys.readouterr().out)
        assert code == 0 and (report["width"], report["height"]) == expected
