"""Fixture kind D: umT5 token ids -> context, and waveform -> wav2vec2 -> `audio_emb` -> the DiT's audio tokens.

Every sequence `t5.in.ids{i}` listed in the manifest is encoded in one batch padded with 0 to the text length
with a mask (as the reference), and once more unpadded (padding must not change the real tokens). The audio
chain is compared at every stored stage; `infer_frames`, `fps` and the video rate come from the manifest.
The DiT side runs our own `audio_emb` through the causal audio encoder of the fixture folder's DiT
(`weights/dit` unless the manifest names another folder); the block length is the stored block's.
"""
from __future__ import annotations

from typing import Iterator

import torch

from liveavatar.io.media import load_audio
from liveavatar.models.audio_features import (AudioFeatureExtractor, bucket_video_frames,
                                              resample_to_video_rate)
from liveavatar.models.text_encoder import PAD_ID, TEXT_LEN, UMT5Encoder
from liveavatar.models.transformer import CausalS2VTransformer
from liveavatar.testing.parity import Comparison, Fixture, compare


def run(fixture: Fixture) -> Iterator[Comparison]:
    yield from _text(fixture)
    yield from _audio(fixture)


def _text(fixture: Fixture) -> Iterator[Comparison]:
    spec = fixture.manifest["t5"]
    encoder = UMT5Encoder.from_checkpoint(fixture.path(spec["weights"]), device="cpu", dtype=torch.float32)
    sequences = [fixture[f"t5.in.ids{i}"] for i in range(len(spec["lengths"]))]
    text_len = max(TEXT_LEN, *(len(s) for s in sequences))
    ids = torch.full((len(sequences), text_len), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    with torch.inference_mode():
        padded = encoder(ids, mask)
        for i, sequence in enumerate(sequences):
            name = f"t5.out.context{i}"
            yield fixture.compare(name, padded[i, : len(sequence)], "t5")
            yield fixture.compare(f"{name} (unpadded run)", encoder(sequence[None])[0], "t5", ref=fixture[name])


def _audio(fixture: Fixture) -> Iterator[Comparison]:
    spec = fixture.manifest["audio"]
    extractor = AudioFeatureExtractor.from_pretrained(fixture.path(spec["wav2vec2_dir"]), device="cpu",
                                                      dtype=torch.float32)
    waveform = fixture["audio.in.waveform"].numpy()
    decoded = torch.from_numpy(load_audio(fixture.path(spec["wav"])))
    yield fixture.compare("audio.in.waveform (decoded from the wav)", decoded, "audio_emb",
                          ref=fixture["audio.in.waveform"])
    yield fixture.compare("audio.debug.input_values", extractor.input_values(waveform), "wav2vec2_hidden_states")
    hidden = extractor.hidden_states(waveform)
    yield fixture.compare("audio.debug.hidden_states", hidden, "wav2vec2_hidden_states")
    video_rate = spec.get("video_rate", 30)
    features = resample_to_video_rate(hidden, video_rate=video_rate)
    yield fixture.compare("audio.debug.feat_30fps", features, "audio_emb")
    audio_emb, num_clips = bucket_video_frames(features, infer_frames=spec["infer_frames"], fps=spec["fps"],
                                               video_rate=video_rate)
    yield fixture.compare("audio.out.audio_emb", audio_emb, "audio_emb")
    yield compare("audio num_clips", torch.tensor(float(num_clips)), torch.tensor(float(spec["num_clips"])),
                  fixture.tolerance("audio_emb"))
    yield from _dit_audio(fixture, audio_emb)


def _dit_audio(fixture: Fixture, audio_emb: torch.Tensor) -> Iterator[Comparison]:
    spec = fixture.manifest["audio"]
    model = CausalS2VTransformer.from_pretrained(fixture.path(spec.get("dit_dir", "weights/dit")), device="cpu",
                                                 dtype=torch.float32)
    config = model.config
    latent_frames = fixture.manifest["tensors"]["audio.dit.merged_audio_emb_block0"]["shape"][1]
    block = audio_emb[..., : latent_frames * config.AUDIO_FRAMES_PER_LATENT]
    # The reference prefixes every block with copies of its own first frame.
    audio_input = torch.cat([block[..., :1].expand(-1, -1, -1, config.AUDIO_HISTORY_FRAMES), block], dim=-1)
    yield fixture.compare("audio.dit.audio_input_block0", audio_input, "dit_audio")
    audio_global, audio_local = model.casual_audio_encoder(audio_input)
    yield fixture.compare("audio.dit.global", audio_global, "dit_audio")
    yield fixture.compare("audio.dit.local", audio_local, "dit_audio")
    yield fixture.compare("audio.dit.merged_audio_emb_block0", audio_local[:, config.AUDIO_HISTORY_LATENTS:],
                          "dit_audio")
