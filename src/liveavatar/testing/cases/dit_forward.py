"""Fixture kind A: DiT forward parity — the sink prefill, then cached block calls on one KV cache.

Everything (weights folder, latent size, cache length, call arguments, forced ``relative_dist``) is read
from the manifest.
"""
from __future__ import annotations

from typing import Iterator

import torch

from liveavatar.geometry import FRAMEPACK_BUCKETS
from liveavatar.models.rope import block_positions, condition_positions, rotation
from liveavatar.models.transformer import CausalS2VTransformer
from liveavatar.runtime.caches import CondCache, JoinedKVCache
from liveavatar.testing.parity import Comparison, Fixture

RUN_DTYPE = torch.float32


def load_model(fixture: Fixture, weights_dir: str, *, lora: str | None = None,
               lora_alpha: float | None = None) -> CausalS2VTransformer:
    """The DiT of a fixture folder in float32 on CPU (paths relative to the fixture)."""
    return CausalS2VTransformer.from_pretrained(fixture.path(weights_dir), device="cpu", dtype=RUN_DTYPE,
                                                lora=fixture.path(lora) if lora else None, lora_alpha=lora_alpha)


class DitRun:
    """Replays a fixture-A call sequence (sink, then ``calls``) on a model, one call at a time."""

    def __init__(self, model: CausalS2VTransformer, manifest: dict, tensors: Fixture):
        self.model = model
        self.manifest = manifest
        self.tensors = tensors
        self.frame_tokens = manifest["frame_seq_len"]
        cache_tokens = manifest["kv_cache"]["length_tokens"]
        if cache_tokens % self.frame_tokens:
            raise ValueError(f"KV cache length {cache_tokens} is not a whole number of latent frames")
        latent_h, latent_w = manifest["latent_hw"]
        c = model.config
        dims = dict(num_layers=c.num_layers, num_heads=c.num_heads, head_dim=c.head_dim, device="cpu", dtype=RUN_DTYPE)
        cond_tokens = condition_positions(latent_h, latent_w, ref_frame=c.REF_FRAME, buckets=FRAMEPACK_BUCKETS).shape[0]
        self.kv_cache = JoinedKVCache(capacity=cache_tokens, cond_capacity=cond_tokens, **dims)
        self.cond_cache = CondCache(capacity=cond_tokens, **dims)
        self.text = model.embed_text(tensors["in.context"])
        self.text_kv = model.text_kv(self.text)

    def sink(self) -> None:
        self.model.prefill_sink(self.cond_cache, self.text_kv, self.tensors["in.ref_latents"],
                                self.tensors["in.motion_latents"])

    def call(self, spec: dict) -> torch.Tensor:
        audio_start, audio_end = spec["audio_slice"]
        cond_start, cond_end = spec["cond_slice"]
        timestep = self.tensors[spec["t_key"]].reshape(-1)[0].item() if spec.get("t_key") else spec["timestep"]
        return self.model.forward_block(
            self.tensors[spec["x_key"]], timestep, self.text_kv,
            self.tensors["in.audio_emb"][..., audio_start:audio_end], self.kv_cache, self.cond_cache,
            start_frame=spec["current_start"] // self.frame_tokens, ref_rope_offset=spec["relative_dist"],
            cond_states=self.tensors["in.cond_states"][0, :, cond_start:cond_end])


def run(fixture: Fixture) -> Iterator[Comparison]:
    manifest = fixture.manifest
    model = load_model(fixture, manifest["weights_dir"])
    replay = DitRun(model, manifest, fixture)
    if "sink.debug.text_embedding_out" in fixture:
        yield fixture.compare("sink.debug.text_embedding_out", replay.text, "debug")

    config = model.config
    latent_h, latent_w = manifest["latent_hw"]
    tables = {"sink": condition_positions(latent_h, latent_w, ref_frame=config.REF_FRAME,
                                          buckets=FRAMEPACK_BUCKETS)}
    first = manifest["calls"][0]
    tables["call0"] = block_positions(first["current_start"] // replay.frame_tokens,
                                      fixture[first["x_key"]].shape[1], latent_h // 2, latent_w // 2)
    for prefix, positions in tables.items():
        cos, sin = rotation(positions, config.head_dim, torch.float32)
        for part, values in (("real", cos), ("imag", sin)):
            name = f"{prefix}.debug.rope_{part}"
            if name in fixture:
                yield fixture.compare(name, values.expand(-1, config.num_heads, -1)[None], "debug")

    replay.sink()
    cond_length = manifest["sink_call"].get("cond_end", replay.cond_cache.length)
    if replay.cond_cache.length != cond_length:
        raise ValueError(f"sink produced {replay.cond_cache.length} condition tokens, the fixture {cond_length}")
    for layer in range(model.config.num_layers):
        for kind, got in zip(("k", "v"), replay.cond_cache.entries(layer)):
            name = f"sink.cache.layer{layer}.cond_{kind}"
            if name in fixture:
                yield fixture.compare(name, got, "sink_cond_cache")

    for spec in manifest["calls"]:
        out = replay.call(spec)
        yield fixture.compare(spec["out_key"], out, "out")
        offset = spec["kv_write_offset"]
        for layer in range(model.config.num_layers):
            for kind, written in zip(("k", "v"), replay.kv_cache.ring_entries(layer)):
                name = f"call{spec['call']}.cache.layer{layer}.{kind}_written"
                if name in fixture:
                    length = fixture[name].shape[1]
                    yield fixture.compare(name, written[offset:offset + length][None], "written_kv")
