"""What one FP8 KV scale should cover: the tiny model's loop fixture with its KV sets quantised to e4m3 at
several scale granularities, against the fixture's float32 results (CPU, about a minute).

    PYTHONPATH=src python3 benchmarks/fp8_kv_granularity.py [FIXTURES_DIR (default tests/data/fixtures)]

Every variant quantises and dequantises the K/V a block writes into a KV set (the ``write`` of each KV cache
class, through which every write passes), with the amax taken over: each token (all heads: the engine's
scheme), each (token, head), each (block, head), or the whole block. The stored values then carry exactly
the variant's rounding, so the run measures its error without a storage format per variant. Prints, per
variant, the relative L2 error of the recorded velocities and the mean / max |error| of velocities, latents
and video; exits 1 if a variant's writes were not quantised.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from liveavatar.runtime.caches.device import KVCache
from liveavatar.runtime.caches.host import HostKVCache
from liveavatar.runtime.caches.joined import JoinedKVCache
from liveavatar.runtime.fp8 import FP8_DTYPE, FP8_MAX, scale_for_amax
from liveavatar.testing.cases import loop
from liveavatar.testing.parity import Fixture

# Dimensions of a written block [tokens, heads, head_dim] the amax is taken over.
VARIANTS = {"float32 KV": None, "token": (1, 2), "(token, head)": (2,), "(block, head)": (0, 2), "block": (0, 1, 2)}


def fake_quantize(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    amax = x.detach().abs().amax(dim=dims, keepdim=True).float()
    scale = scale_for_amax(amax)
    return ((x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() / scale).to(x.dtype)


def measure(fixture_path: Path, dims) -> dict[str, tuple[float, float, float]]:
    writes = {cache: cache.write for cache in (KVCache, JoinedKVCache, HostKVCache)}  # each its own write

    def quantizing(write):
        def quantized_write(self, layer, k, v):  # k, v [1, tokens, heads, head_dim]
            if dims is not None:
                k, v = fake_quantize(k[0], dims)[None], fake_quantize(v[0], dims)[None]
            write(self, layer, k, v)
        return quantized_write

    for cache, write in writes.items():
        cache.write = quantizing(write)
    try:
        fixture = Fixture(fixture_path)
        compared = {}
        real_compare = Fixture.compare

        def keep(self, name, got, group, ref=None):
            compared[name.split(" ")[0]] = (got.double(), (self.tensors[name] if ref is None else ref).double())
            return real_compare(self, name, got, group, ref)

        Fixture.compare = keep
        for _ in loop.run(fixture):
            pass
    finally:
        for cache, write in writes.items():
            cache.write = write
        Fixture.compare = real_compare
    return {name: (float((got - ref).norm() / ref.norm()), float((got - ref).abs().mean()),
                   float((got - ref).abs().max()))
            for name, (got, ref) in compared.items() if name.startswith(("trace", "out.latents", "out.video"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixtures", nargs="?", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/fixtures",
                        help="folder holding B_loop_tpp.json (default tests/data/fixtures)")
    folder = parser.parse_args().fixtures
    if not (folder / "B_loop_tpp.json").is_file():
        parser.error(f"{folder}: no B_loop_tpp.json there")
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    print("| one scale per | velocities rel. L2 | velocities mean / max abs | latents clip 1 mean abs | video max abs |")
    print("|---|---|---|---|---|")
    unquantised = None
    for label, dims in VARIANTS.items():
        r = measure(folder / "B_loop_tpp.json", dims)
        velocity, latents, video = r["trace.*.out"], r["out.latents.clip1"], r["out.video"]
        print(f"| {label} | {velocity[0]:.1e} | {velocity[1]:.1e} / {velocity[2]:.1e} | {latents[1]:.1e} | "
              f"{video[2]:.1e} |", flush=True)
        if dims is None:
            unquantised = velocity
        elif velocity == unquantised:  # the KV writes bypassed the quantiser: the table would mean nothing
            print(f"error: {label}: no KV write was quantised (a KV cache class whose write this script does "
                  "not wrap)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
