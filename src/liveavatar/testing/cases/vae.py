"""Fixture kind C: the Wan 2.1 VAE (encode, full decode, streaming decode and encode).

The tensors are stored without the batch dimension; shapes, chunk schedules and tolerances all come
from the manifest.
"""
from __future__ import annotations

from typing import Iterator

import torch

from liveavatar.models.vae import WanVAE
from liveavatar.testing.parity import Comparison, Fixture


def run(fixture: Fixture) -> Iterator[Comparison]:
    manifest = fixture.manifest
    vae = WanVAE.from_checkpoint(fixture.path(manifest["weights"]), device="cpu", dtype=torch.float32)

    def batched(name: str) -> torch.Tensor:
        return fixture[name].unsqueeze(0)

    yield fixture.compare("out.encode_clip", vae.encode(batched("in.clip"))[0], "encode")
    yield fixture.compare("out.encode_image", vae.encode(batched("in.image"))[0], "encode")
    yield fixture.compare("out.decode_of_encode_clip", vae.decode(batched("out.encode_clip"))[0], "decode")
    full = vae.decode(batched("in.z"))[0]
    yield fixture.compare("out.decode_full", full, "decode")

    chunks = manifest["decode_chunks"]
    decoder = vae.stream_decoder()
    pieces = []
    for k, (start, end) in enumerate(chunks):
        pieces.append(decoder.decode(batched("in.z")[:, :, start:end])[0])
        yield fixture.compare(f"out.stream_decode.chunk{k}", pieces[-1], "decode")
    if chunks[0][0] == 0 and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:])):
        # One stream from latent 0 on: its frames are the first frames of the all-at-once decode.
        streamed = torch.cat(pieces, dim=1)
        yield fixture.compare("streamed chunks vs our full decode", streamed, "decode",
                              ref=full[:, :streamed.shape[1]])

    encoder = vae.stream_encoder()
    for k, (start, end) in enumerate(manifest["encode_chunks"]):
        got = encoder.encode(batched("in.clip")[:, :, start:end])[0]
        yield fixture.compare(f"out.stream_encode.chunk{k}", got, "encode")
