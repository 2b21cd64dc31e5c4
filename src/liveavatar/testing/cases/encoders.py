"""Fixture kind D: umT5 token ids -> context, and waveform -> wav2vec2 -> `audio_emb` -> the DiT's audio tokens.

Every sequence `t5.in.ids{i}` listed in the manifest is encoded in one batch padded with 0 to the text length
with a mask (as the reference), and once more unpadded (padding must not change the real tokens). The audio
chain is compared at every stored stage; `infer_frames`, `fps` and the video rate come from the manifest.
"""
from __future__ import annotations

from typing import Iterator

import torch

from liveavatar.models.audio_features import (AudioFeatureExtractor, bucket_video_frames,
                                              resample_to_video_rate)
from liveavatar.models.text_encoder import PAD_ID, TEXT_LEN, UMT5Encoder
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
