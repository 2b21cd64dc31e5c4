"""The header-only checkpoint check: what loading would refuse after reading the weights is refused before,
with one line naming the file, the key and the shapes."""
import json
from dataclasses import replace

import pytest

from liveavatar.checkpoints import lora, safetensors_io
from liveavatar.errors import CheckpointError
from liveavatar.models.checkpoint_check import check_transformer_checkpoint
from liveavatar.models.tiny import save_tiny_lora, save_tiny_transformer
from liveavatar.models.transformer import TransformerConfig

CONFIG = TransformerConfig.tiny()


@pytest.fixture
def dit(tmp_path):
    folder = save_tiny_transformer(tmp_path / "dit", CONFIG, seed=0)
    save_tiny_lora(tmp_path / "lora.safetensors", CONFIG, rank=4, alpha=2, seed=1)
    return folder


def _edit_config(folder, **changes):
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))


def _error(*args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as error:
        check_transformer_checkpoint(*args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_sound_checkpoint_passes_without_reading_a_weight(dit, monkeypatch):
    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(safetensors_io.TensorReader, "read", no_reading)
    monkeypatch.setattr(lora, "safe_open", no_reading)
    checked = check_transformer_checkpoint(dit, dit.parent / "lora.safetensors")
    assert checked.config == CONFIG
    assert checked.lora.rank == 4 and checked.lora.scale == 0.5 and checked.lora.notice is None
    assert check_transformer_checkpoint(dit).lora is None


def test_a_lora_made_for_another_model_size(dit, tmp_path):
    wider = tmp_path / "wider.safetensors"
    save_tiny_lora(wider, replace(CONFIG, dim=128, num_heads=4, ffn_dim=256), rank=4, alpha=2, seed=1)
    assert _error(dit, wider).startswith(f"{wider}: LoRA for ")
    assert "features but the layer is 96->96" in _error(dit, wider)
    deeper = tmp_path / "deeper.safetensors"
    save_tiny_lora(deeper, replace(CONFIG, num_layers=5), rank=4, alpha=2, seed=1)
    assert "20 LoRA modules do not exist in this DiT (first: 'blocks.3." in _error(dit, deeper)


def test_config_sizes_that_do_not_match_the_shards_name_the_shard_key_and_shapes(dit):
    _edit_config(dit, ffn_dim=256)
    message = _error(dit)
    shard = json.loads((dit / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"][
        "blocks.0.ffn.0.weight"]
    assert message.startswith(f"{dit / shard}: tensor 'blocks.0.ffn.0.weight' has shape [192, 96], "
                              f"the model expects [256, 96]")


@pytest.mark.parametrize("changes, words", [
    ({"num_heads": 5}, "config.json: dim=96 does not split into num_heads=5 heads of even width"),
    ({"num_heads": 32}, "config.json: dim=96 does not split into num_heads=32 heads of even width"),  # width 3
    ({"audio_inject_layers": [0, 7]}, "config.json: audio_inject_layers=[0, 7] must be distinct block indices "
                                      "below num_layers=3"),
    ({"num_layers": "three"}, "config.json: num_layers='three' is not a positive integer"),
    ({"dim": -96}, "config.json: dim=-96 is not a positive integer"),
    ({"eps": "tiny"}, "config.json: eps='tiny' is not a positive number"),
    ({"audio_inject_layers": 2}, "config.json: audio_inject_layers=2 is not a list of block indices"),
])
def test_nonsense_config_values_name_the_file_and_the_key(dit, changes, words):
    _edit_config(dit, **changes)
    assert _error(dit).startswith(f"{dit}/{words}")


def test_a_config_that_is_not_the_s2v_one_is_not_blamed_on_a_switch(dit):
    (dit / "config.json").write_text(json.dumps({"dim": "x", "num_heads": 1, "ffn_dim": 1, "num_layers": 1,
                                                 "audio_inject_layers": []}))
    assert _error(dit) == f"{dit / 'config.json'}: dim='x' is not a positive integer; fix the value or " \
                          f"re-download config.json"
    _edit_config(dit, dim=96)
    assert "enable_adain is missing, and its default False is not supported" in _error(dit)
