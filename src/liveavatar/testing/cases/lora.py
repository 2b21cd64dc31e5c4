"""Fixture kind E: the LoRA merge — merged weights, and fixture A's sink + first call on the merged model.

The base weights and the forward inputs are those of the fixture-A manifest whose tensor file the E
manifest names in ``merged_forward.inputs``; rank and alpha come from the E manifest.
"""
from __future__ import annotations

import re
from typing import Iterator

from liveavatar.testing.cases.dit_forward import DitRun, load_model
from liveavatar.testing.parity import Comparison, Fixture, find_manifests

MERGED_PREFIX = "merged."


def _forward_fixture(fixture: Fixture) -> Fixture:
    """The fixture whose inputs the merged forward replays (named by its tensor file)."""
    tensor_file = fixture.manifest["merged_forward"]["inputs"].split()[0]
    for manifest in find_manifests(fixture.dir):
        other = Fixture(manifest, fixture.mode)
        if other.manifest["tensor_file"] == tensor_file:
            return other
    raise ValueError(f"{fixture.manifest_path.name}: the forward inputs {tensor_file} are not in {fixture.dir}")


def run(fixture: Fixture) -> Iterator[Comparison]:
    manifest = fixture.manifest
    inputs = _forward_fixture(fixture)
    weights_dir = manifest.get("weights_dir", inputs.manifest["weights_dir"])
    model = load_model(fixture, weights_dir, lora=manifest["lora_file"], lora_alpha=manifest["alpha"])

    state = model.state_dict()
    for name in fixture.tensors:
        if name.startswith(MERGED_PREFIX):
            yield fixture.compare(name, state[name.removeprefix(MERGED_PREFIX)], "merged")

    # The forward is the sink followed by calls 0..N of fixture A, N named by the output key (callN.out).
    out_key = manifest["merged_forward"]["out_key"]
    last_call = int(re.search(r"call(\d+)", out_key).group(1))
    replay = DitRun(model, inputs.manifest, inputs)
    replay.sink()
    for spec in inputs.manifest["calls"][:last_call + 1]:
        out = replay.call(spec)
    yield fixture.compare(out_key, out, "forward")
