import os
from pathlib import Path

import pytest
import torch

from liveavatar.errors import CheckpointError
from liveavatar.models import text_encoder as te
from liveavatar.models.text_encoder import (CHECKPOINT_NAME, TEXT_LEN, TextEncoder, UMT5Encoder, clean_prompt,
                                            save_tiny_text_encoder)
from liveavatar.testing.parity import Fixture, run_fixture

PROMPT = "A woman with long hair talks to the camera &amp;amp; smiles,\n\tsoft   light."


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("t5")
    save_tiny_text_encoder(ckpt, seed=3, dim=40, dim_attn=32, ffn_dim=64, num_heads=4, num_layers=2)
    return ckpt


def _encoder(ckpt: Path, cache: Path) -> TextEncoder:
    return TextEncoder.from_pretrained(ckpt, device="cpu", dtype=torch.float32, cache_dir=cache)


def test_fixture_d_text_through_runner(fixtures_dir):
    results = [r for r in run_fixture(Fixture(fixtures_dir / "D_encoders.json")) if r.name.startswith("t5.")]
    assert len(results) >= 2
    failed = [f"{r.name}: max_abs {r.max_abs:.2e} {r.note}" for r in results if not r.passed]
    assert not failed, failed


def test_clean_prompt_matches_reference_cleaning():
    # ftfy repairs mojibake (and unescapes HTML itself unless the text holds markup); then entities are
    # unescaped exactly twice; whitespace runs become one space.
    assert clean_prompt("  sch\u00c3\u00b6n  ") == "sch\u00f6n"
    assert clean_prompt("<b> &amp;amp;amp; c") == "<b> &amp; c"
    assert clean_prompt("one\u3000two\n\t three\u00a0 four ") == "one two three four"


def test_encode_matches_the_encoder_on_the_tokenized_prompt(tiny_ckpt, tmp_path):
    encoder = _encoder(tiny_ckpt, tmp_path)
    context = encoder.encode(PROMPT)
    ids, mask = encoder.tokenize(PROMPT)
    assert ids.shape == mask.shape == (1, TEXT_LEN)
    length = int(mask.sum())
    assert ids[0, length - 1] == te.EOS_ID and (ids[0, length:] == te.PAD_ID).all()
    model = UMT5Encoder.from_checkpoint(tiny_ckpt / CHECKPOINT_NAME, dtype=torch.float32)
    with torch.inference_mode():
        direct = model(ids, mask)[0, :length]
    assert context.shape == (length, 40) and context.dtype == torch.float32
    torch.testing.assert_close(context, direct, rtol=1e-5, atol=1e-5)
    # The padded rows are not returned, and padding does not change the real rows.
    torch.testing.assert_close(model(ids[:, :length])[0], direct, rtol=1e-5, atol=1e-5)


def test_long_prompt_is_truncated_to_text_len_with_eos(tiny_ckpt, tmp_path):
    encoder = _encoder(tiny_ckpt, tmp_path)
    ids, mask = encoder.tokenize("the man talks " * 400)
    assert int(mask.sum()) == TEXT_LEN and ids[0, -1] == te.EOS_ID


def test_cache_hit_never_reads_the_weights(tiny_ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = _encoder(tiny_ckpt, cache)
    context = first.encode(PROMPT)
    first.unload()
    assert not first.is_loaded
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".safetensors"  # no temporary file left behind

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read on a cache hit")

    monkeypatch.setattr(te, "load_t5_state_dict", no_weights)
    monkeypatch.setattr(te.torch, "load", no_weights)
    second = _encoder(tiny_ckpt, cache)
    # The same prompt after cleaning (extra whitespace) is the same entry.
    again = second.encode("  " + PROMPT.replace(" ", "  ") + "\n")
    assert not second.is_loaded
    torch.testing.assert_close(again, context, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="weights were read"):
        second.encode("another prompt")


def test_cache_misses_on_other_prompt_checkpoint_or_dtype(tiny_ckpt, tmp_path, monkeypatch):
    loads = []
    real = te.load_t5_state_dict
    monkeypatch.setattr(te, "load_t5_state_dict", lambda path: loads.append(path) or real(path))
    cache = tmp_path / "cache"
    _encoder(tiny_ckpt, cache).encode(PROMPT)
    _encoder(tiny_ckpt, cache).encode(PROMPT)
    assert len(loads) == 1
    _encoder(tiny_ckpt, cache).encode(PROMPT + " Again.")
    assert len(loads) == 2
    TextEncoder.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, cache_dir=cache).encode(PROMPT)
    assert len(loads) == 3
    checkpoint = tiny_ckpt / CHECKPOINT_NAME
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a replaced checkpoint
    _encoder(tiny_ckpt, cache).encode(PROMPT)
    assert len(loads) == 4
    assert len(list(cache.iterdir())) == 4


def test_unreadable_cache_entry_is_recomputed(tiny_ckpt, tmp_path):
    encoder = _encoder(tiny_ckpt, tmp_path)
    context = encoder.encode(PROMPT)
    entry = encoder.cache_path(PROMPT)
    entry.write_bytes(entry.read_bytes()[:20])
    torch.testing.assert_close(_encoder(tiny_ckpt, tmp_path).encode(PROMPT), context, rtol=0, atol=0)
    assert entry.stat().st_size > 20


def _broken_checkpoints(source: Path, folder: Path) -> dict[str, Path]:
    data = source.read_bytes()
    folder.mkdir()
    files = {"truncated": data[: len(data) // 2], "random bytes": os.urandom(4096), "empty": b""}
    paths = {}
    for name, payload in files.items():
        paths[name] = folder / f"{name.replace(' ', '_')}.pth"
        paths[name].write_bytes(payload)
    state = torch.load(source, weights_only=True)
    paths["foreign layout"] = folder / "hf_layout.pth"
    torch.save({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)}, paths["foreign layout"])
    paths["missing a key"] = folder / "missing.pth"
    torch.save({k: v for k, v in state.items() if k != "blocks.1.ffn.fc2.weight"}, paths["missing a key"])
    paths["not a state dict"] = folder / "list.pth"
    torch.save([torch.zeros(2)], paths["not a state dict"])
    paths["wrong shape"] = folder / "shape.pth"
    torch.save({**state, "blocks.0.attn.o.weight": torch.zeros(3, 3)}, paths["wrong shape"])
    return paths


def test_bad_checkpoint_files_give_one_clear_error(tiny_ckpt, tmp_path):
    for what, path in _broken_checkpoints(tiny_ckpt / CHECKPOINT_NAME, tmp_path / "bad").items():
        with pytest.raises(CheckpointError) as info:
            UMT5Encoder.from_checkpoint(path, dtype=torch.float32)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, (what, message)
    with pytest.raises(CheckpointError, match="not found"):
        UMT5Encoder.from_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="not found"):
        TextEncoder.from_pretrained(tmp_path)


def test_tiny_checkpoint_layout_and_offline_tokenizer(tiny_ckpt):
    from transformers import AutoTokenizer

    state = torch.load(tiny_ckpt / CHECKPOINT_NAME, weights_only=True)
    config = te.UMT5Config.from_state_dict(state)
    assert (config.dim, config.dim_attn, config.ffn_dim, config.num_heads, config.num_layers) == (40, 32, 64, 4, 2)
    assert set(state) == set(config.expected_shapes())
    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt / te.TOKENIZER_SUBDIR)
    ids = tokenizer(["the man talks"], add_special_tokens=True).input_ids[0]
    assert ids[-1] == te.EOS_ID and tokenizer.pad_token_id == te.PAD_ID
    assert max(ids) < config.vocab_size


def test_unwritable_cache_warns_and_still_encodes(tiny_ckpt, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    encoder = _encoder(tiny_ckpt, blocker / "cache")
    with pytest.warns(UserWarning, match="prompt cache"):
        context = encoder.encode(PROMPT)
    assert context.shape[0] == int(encoder.tokenize(PROMPT)[1].sum())
    assert not list(tmp_path.glob("**/*.tmp"))
