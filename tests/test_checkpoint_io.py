import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from liveavatar.checkpoints.safetensors_io import read_header
from liveavatar.errors import CheckpointError
from liveavatar.models.tiny import save_tiny_transformer
from liveavatar.models.transformer import CausalS2VTransformer, TransformerConfig

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def release_key_shapes() -> dict[str, list[int]]:
    """The 14B release's key list, written out independently of the model code."""
    d, ffn, audio = 5120, 13824, 1024
    shapes = {}
    for n in range(40):
        shapes[f"blocks.{n}.modulation"] = [1, 6, d]
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"blocks.{n}.{attn}.{proj}.weight"] = [d, d]
                shapes[f"blocks.{n}.{attn}.{proj}.bias"] = [d]
            shapes[f"blocks.{n}.{attn}.norm_q.weight"] = [d]
            shapes[f"blocks.{n}.{attn}.norm_k.weight"] = [d]
        shapes[f"blocks.{n}.norm3.weight"] = [d]
        shapes[f"blocks.{n}.norm3.bias"] = [d]
        shapes[f"blocks.{n}.ffn.0.weight"], shapes[f"blocks.{n}.ffn.0.bias"] = [ffn, d], [ffn]
        shapes[f"blocks.{n}.ffn.2.weight"], shapes[f"blocks.{n}.ffn.2.bias"] = [d, ffn], [d]
    conv = {"patch_embedding": [d, 16, 1, 2, 2], "cond_encoder": [d, 16, 1, 2, 2],
            "frame_packer.proj": [d, 16, 1, 2, 2], "frame_packer.proj_2x": [d, 16, 2, 4, 4],
            "frame_packer.proj_4x": [d, 16, 4, 8, 8], "text_embedding.0": [d, 4096], "text_embedding.2": [d, d],
            "time_embedding.0": [d, 256], "time_embedding.2": [d, d], "time_projection.1": [6 * d, d],
            "head.head": [64, d], "casual_audio_encoder.encoder.conv1_local.conv": [d, audio, 3],
            "casual_audio_encoder.encoder.conv1_global.conv": [d // 4, audio, 3],
            "casual_audio_encoder.encoder.conv2.conv": [d // 2, d // 4, 3],
            "casual_audio_encoder.encoder.conv3.conv": [d, d // 2, 3],
            "casual_audio_encoder.encoder.final_linear": [d, d]}
    for j in range(12):
        for proj in "qkvo":
            conv[f"audio_injector.injector.{j}.{proj}"] = [d, d]
        shapes[f"audio_injector.injector.{j}.norm_q.weight"] = [d]
        shapes[f"audio_injector.injector.{j}.norm_k.weight"] = [d]
        conv[f"audio_injector.injector_adain_layers.{j}.linear"] = [2 * d, d]
    for name, shape in conv.items():
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = shape, [shape[0]]
    shapes["head.modulation"] = [1, 2, d]
    shapes["trainable_cond_mask.weight"] = [3, d]
    shapes["casual_audio_encoder.weights"] = [1, 25, 1, 1]
    shapes["casual_audio_encoder.encoder.padding_tokens"] = [1, 1, 1, d]
    return shapes


def write_sparse_checkpoint(folder, shapes: dict[str, list[int]], config: dict, num_shards: int = 4):
    """A bf16 safetensors checkpoint whose data regions are holes: full-size headers, ~no disk use."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(shapes)
    weight_map = {}
    for shard in range(num_shards):
        name = f"diffusion_pytorch_model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key in keys[shard::num_shards]:
            size = 2 * torch.Size(shapes[key]).numel()
            header[key] = {"dtype": "BF16", "shape": shapes[key], "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[key] = name
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(folder / name, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)) + encoded)
            handle.truncate(8 + len(encoded) + offset)
    (folder / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))


def test_full_size_checkpoint_loads_on_the_meta_device(tmp_path):
    shapes = release_key_shapes()
    assert len(shapes) == 1260
    config = TransformerConfig.full_14b().to_json_dict()
    write_sparse_checkpoint(tmp_path / "full", shapes, config)
    model = CausalS2VTransformer.from_pretrained(tmp_path / "full", device="meta", dtype=torch.bfloat16)
    assert model.config == TransformerConfig.full_14b()
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())

    renamed = dict(shapes)
    renamed["blocks.7.ffn.O.weight"] = renamed.pop("blocks.7.ffn.0.weight")
    write_sparse_checkpoint(tmp_path / "renamed", renamed, config)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(first: 'blocks.7.ffn.0.weight'\), "
                                              r"1 unexpected keys \(first: 'blocks.7.ffn.O.weight'\)"):
        CausalS2VTransformer.from_pretrained(tmp_path / "renamed", device="meta")


@pytest.fixture
def tiny_dir(tmp_path):
    return save_tiny_transformer(tmp_path / "dit", seed=1, num_shards=3)


def test_tiny_checkpoint_round_trip(tiny_dir):
    index = json.loads((tiny_dir / INDEX).read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert shard_names == [f"diffusion_pytorch_model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    saved = {}
    for name in shard_names:
        saved.update(load_file(tiny_dir / name))
    model = CausalS2VTransformer.from_pretrained(tiny_dir, device="cpu", dtype=torch.bfloat16)
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert state[key].dtype == torch.bfloat16 and state[key].device.type == "cpu"
        assert torch.equal(state[key], value.to(torch.bfloat16)), key
    # Every parameter is random (no zero-initialised layer hides a code path).
    assert all(value.std() > 0 for value in saved.values() if value.numel() > 1)


def test_single_file_layout_and_widths_from_the_weights(tmp_path):
    config = TransformerConfig.tiny()
    folder = save_tiny_transformer(tmp_path, config, num_shards=1)
    assert not (folder / INDEX).exists()
    raw = json.loads((folder / "config.json").read_text())
    raw.update(text_dim=4096, audio_dim=1024)  # the release's config.json values; the weights decide
    (folder / "config.json").write_text(json.dumps(raw))
    loaded = TransformerConfig.from_dir(folder)
    assert (loaded.text_dim, loaded.audio_dim) == (config.text_dim, config.audio_dim)
    model = CausalS2VTransformer.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert model.text_embedding[0].in_features == config.text_dim


def test_key_mismatch_names_first_missing_and_unexpected_keys(tiny_dir, tmp_path):
    single = tmp_path / "single"
    state = {}
    for name in set(json.loads((tiny_dir / INDEX).read_text())["weight_map"].values()):
        state.update(load_file(tiny_dir / name))
    state.pop("head.modulation")
    state.pop("blocks.1.norm3.bias")
    state["blocks.1.norm3.gamma"] = torch.zeros(3)
    single.mkdir()
    save_file(state, single / "diffusion_pytorch_model.safetensors")
    (single / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(CheckpointError) as error:
        CausalS2VTransformer.from_pretrained(single, device="cpu", dtype=torch.float32)
    message = str(error.value)
    assert "2 missing keys" in message and "1 unexpected keys (first: 'blocks.1.norm3.gamma')" in message
    assert "'blocks.1.norm3.bias'" in message or "'head.modulation'" in message

    state.pop("blocks.1.norm3.gamma")
    state["blocks.1.norm3.bias"] = torch.zeros(3)
    state["head.modulation"] = torch.zeros(1, 2, 96)
    save_file(state, single / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"'blocks.1.norm3.bias' has shape \[3\], the model expects \[96\]"):
        CausalS2VTransformer.from_pretrained(single, device="cpu", dtype=torch.float32)


def test_truncated_corrupt_or_missing_shards_name_the_file(tiny_dir):
    shard = tiny_dir / "diffusion_pytorch_model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{shard}: truncated safetensors file"):
        CausalS2VTransformer.from_pretrained(tiny_dir, device="cpu")
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match=rf"{shard}: corrupt safetensors header"):
        CausalS2VTransformer.from_pretrained(tiny_dir, device="cpu")
    shard.write_bytes(b"\x00\x01")
    with pytest.raises(CheckpointError, match=rf"{shard}: truncated or not a safetensors file"):
        read_header(shard)
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard}: shard listed in {INDEX} is missing"):
        CausalS2VTransformer.from_pretrained(tiny_dir, device="cpu")


def test_header_errors_are_the_one_checkpoint_error_a_user_acts_on(tmp_path):
    shard = tmp_path / "cut.safetensors"
    shard.write_bytes(b"\x00\x01")
    with pytest.raises(CheckpointError) as error:
        read_header(shard)
    assert error.value.exit_code == 2  # an InputError: the CLI prints one line and exits 2


def test_missing_weights_or_config_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json: not found"):
        CausalS2VTransformer.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(TransformerConfig.tiny().to_json_dict()))
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors.index.json or"):
        CausalS2VTransformer.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(dict(TransformerConfig.tiny().to_json_dict(),
                                                          enable_framepack=False)))
    with pytest.raises(ValueError, match="enable_framepack=False is not supported"):
        TransformerConfig.from_dir(tmp_path)
