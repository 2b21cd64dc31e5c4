import pytest
import torch
from safetensors.torch import load_file, save_file

from liveavatar.checkpoints.lora import lora_target_modules, merge_lora
from liveavatar.errors import CheckpointError
from liveavatar.models.tiny import save_tiny_lora, save_tiny_transformer
from liveavatar.models.transformer import CausalS2VTransformer, TransformerConfig
from liveavatar.testing import parity

RANK, ALPHA = 4, 2.0  # the release's ratio alpha = rank / 2, also written in the file's metadata


def test_release_lora_targets_448_modules_including_the_audio_injectors():
    with torch.device("meta"):
        targets = lora_target_modules(CausalS2VTransformer(TransformerConfig.full_14b()))
    assert len(targets) == 448
    injectors = [name for name in targets if name.startswith("audio_injector.")]
    assert len(injectors) == 48 and "audio_injector.injector.11.o" in injectors
    assert "blocks.39.ffn.2" in targets and "blocks.0.cross_attn.k" in targets
    assert not any("adain" in name or "embedding" in name or name == "head.head" for name in targets)
    assert sum((m.in_features + m.out_features) * 128 for m in targets.values()) == 676_331_520  # rank 128


def test_fixture_e_passes_at_strict_tolerance(fixtures_dir, capsys):
    assert parity.main([str(fixtures_dir), "--only", "E"]) == 0, capsys.readouterr().out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    config = TransformerConfig.tiny()
    save_tiny_transformer(folder / "dit", config, seed=2)
    save_tiny_lora(folder / "lora.safetensors", config, rank=RANK, alpha=ALPHA, seed=7)
    return folder


def load(base, dtype=torch.float32, **lora):
    return CausalS2VTransformer.from_pretrained(base / "dit", device="cpu", dtype=dtype, **lora)


def expected_merge(base, dtype, scale, adapters=None):
    """W + (B @ A) * scale in float32, rounded once to dtype, for every adapted module."""
    weights = load(base, dtype).state_dict()
    adapters = adapters or load_file(base / "lora.safetensors")
    merged = {}
    for key, down in adapters.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            up = adapters[key.replace(".lora_A.", ".lora_B.")]
            merged[f"{module}.weight"] = (weights[f"{module}.weight"].float() + up @ down * scale).to(dtype)
    return weights, merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_is_float32_then_cast(base, dtype):
    model = load(base, dtype, lora=base / "lora.safetensors")
    weights, merged = expected_merge(base, dtype, ALPHA / RANK)
    assert len(merged) == len(lora_target_modules(model)) == 3 * 10 + 2 * 4
    state = model.state_dict()
    for key, value in state.items():
        assert torch.equal(value, merged.get(key, weights[key])), key


def test_alpha_from_argument_metadata_or_release_ratio(base, tmp_path):
    explicit = load(base, lora=base / "lora.safetensors", lora_alpha=1.0).state_dict()
    _, merged = expected_merge(base, torch.float32, 1.0 / RANK)
    assert all(torch.equal(explicit[key], value) for key, value in merged.items())

    no_metadata = tmp_path / "plain.safetensors"
    save_file(load_file(base / "lora.safetensors"), no_metadata)
    default = load(base, lora=no_metadata).state_dict()
    _, merged = expected_merge(base, torch.float32, 0.5)  # the release's alpha/rank = 64/128
    assert all(torch.equal(default[key], value) for key, value in merged.items())


@pytest.mark.parametrize("rename", [
    lambda key: "base_model.model." + key,
    lambda key: key.replace(".default.weight", ".weight"),
])
def test_key_spellings_merge_the_same(base, tmp_path, rename):
    adapters = load_file(base / "lora.safetensors")
    renamed = tmp_path / "renamed.safetensors"
    save_file({rename(key): value for key, value in adapters.items()}, renamed,
              metadata={"rank": str(RANK), "alpha": str(ALPHA)})
    reference = load(base, lora=base / "lora.safetensors").state_dict()
    model = load(base, lora=renamed)
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())


def test_foreign_or_mismatched_files_give_clear_errors(base, tmp_path):
    adapters = load_file(base / "lora.safetensors")
    model = load(base)

    def write(tensors, metadata=None):
        path = tmp_path / "bad.safetensors"
        save_file(tensors, path, metadata=metadata)
        return path

    with pytest.raises(CheckpointError, match="is a folder; pass the .safetensors file"):
        merge_lora(model, base)
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        merge_lora(model, base / "missing.safetensors")
    dit_shard = next((base / "dit").glob("*-00001-of-*.safetensors"))
    with pytest.raises(CheckpointError, match="no LoRA weights in this file"):
        merge_lora(model, dit_shard)
    with pytest.raises(CheckpointError, match=r"1 keys are not LoRA A/B weights \(first: 'head.scale_shift'\)"):
        merge_lora(model, write(dict(adapters, **{"head.scale_shift": torch.zeros(1, 2, 96)})))
    moved = {key.replace("blocks.2.", "blocks.7."): value for key, value in adapters.items()}
    with pytest.raises(CheckpointError, match=r"10 LoRA modules do not exist in this DiT \(first: 'blocks.7."):
        merge_lora(model, write(moved))
    with pytest.raises(CheckpointError, match="the file says rank 8 but its tensors have rank 4"):
        merge_lora(model, write(adapters, {"rank": "8", "alpha": "4"}))
    uneven = dict(adapters)
    uneven["blocks.0.ffn.0.lora_A.default.weight"] = torch.zeros(2, 96)
    uneven["blocks.0.ffn.0.lora_B.default.weight"] = torch.zeros(192, 2)
    with pytest.raises(CheckpointError, match=r"different ranks \[2, 4\]"):
        merge_lora(model, write(uneven))
    wide = dict(adapters)
    wide["blocks.0.self_attn.q.lora_A.default.weight"] = torch.zeros(RANK, 128)
    with pytest.raises(CheckpointError, match="maps 128->96 features but the layer is 96->96"):
        merge_lora(model, write(wide))
    lonely = {key: value for key, value in adapters.items() if key != "blocks.1.ffn.2.lora_B.default.weight"}
    with pytest.raises(CheckpointError, match="'blocks.1.ffn.2' has no lora_B weight"):
        merge_lora(model, write(lonely))


def _write(tmp_path, tensors, metadata=None):
    path = tmp_path / "variant.safetensors"
    save_file(tensors, path, metadata=metadata)
    return path


def test_metadata_alpha_other_than_half_the_rank_stops_unless_alpha_is_given(base, tmp_path):
    # The reference merges with alpha = rank/2 whatever the file says; another stated alpha is a question.
    stated = _write(tmp_path, load_file(base / "lora.safetensors"), {"rank": str(RANK), "alpha": "3"})
    with pytest.raises(CheckpointError) as error:
        load(base, lora=stated)
    message = str(error.value)
    assert message.startswith(f"{stated}: the file's metadata says alpha 3 for rank 4; the reference ignores it")
    assert "--lora_alpha" in message and "\n" not in message
    model = load(base, lora=stated, lora_alpha=3.0).state_dict()
    _, merged = expected_merge(base, torch.float32, 3.0 / RANK)
    assert all(torch.equal(model[key], value) for key, value in merged.items())


def test_a_lora_covering_fewer_target_modules_is_refused_with_the_count(base, tmp_path):
    adapters = load_file(base / "lora.safetensors")
    partial = {key: value for key, value in adapters.items() if not key.startswith("audio_injector.injector.1.")}
    with pytest.raises(CheckpointError, match=r"the LoRA covers 34 of the 38 target modules of this DiT \(first "
                                              r"missing: 'audio_injector.injector.1.q'\)"):
        merge_lora(load(base), _write(tmp_path, partial))


def test_full_weights_in_the_file_replace_base_weights_before_the_merge(base, tmp_path):
    # load_state_dict(strict=False) on the PEFT model: a plain module's weight by its own name, a targeted
    # layer's weight as <module>.base_layer.weight; the merge then adds B @ A to the replaced weight.
    adapters = load_file(base / "lora.safetensors")
    modulation = torch.randn(1, 2, 96)
    q_base = torch.randn(96, 96)
    extended = dict(adapters, **{"head.modulation": modulation,
                                 "blocks.0.self_attn.q.base_layer.weight": q_base})
    model = load(base)
    plan = merge_lora(model, _write(tmp_path, extended))
    assert plan.full_weights == {"head.modulation": "head.modulation",
                                 "blocks.0.self_attn.q.weight": "blocks.0.self_attn.q.base_layer.weight"}
    assert "holds 2 full weights, which replace the base model's" in plan.notice
    state = model.state_dict()
    assert torch.equal(state["head.modulation"], modulation)
    delta = adapters["blocks.0.self_attn.q.lora_B.default.weight"] @ adapters["blocks.0.self_attn.q.lora_A.default.weight"]
    assert torch.equal(state["blocks.0.self_attn.q.weight"], q_base + delta * (ALPHA / RANK))
    assert merge_lora(load(base), base / "lora.safetensors").notice is None

    # the reference's loader ignores a targeted layer's weight under its plain name; here that is an error
    with pytest.raises(CheckpointError, match="1 keys are not LoRA A/B weights \\(first: 'blocks.0.self_attn.q.weight'"):
        merge_lora(load(base), _write(tmp_path, dict(adapters, **{"blocks.0.self_attn.q.weight": q_base})))
    with pytest.raises(CheckpointError, match=r"full weight 'head.modulation' has shape \[1, 2, 8\], the model's "
                                              r"'head.modulation' is \[1, 2, 96\]"):
        merge_lora(load(base), _write(tmp_path, dict(adapters, **{"head.modulation": torch.zeros(1, 2, 8)})))
