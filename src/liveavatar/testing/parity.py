"""Fixture runner: ``python -m liveavatar.testing.parity DIR``.

Runs every parity case found in DIR (each ``X.json`` manifest with its ``X.safetensors``), prints for
every compared tensor its max absolute / relative error and the tolerance, and exits non-zero if any
comparison fails. The case kind comes from the manifest's ``fixture`` name (``A_…`` transformer forward,
``B_…`` sampling loop, ``C_…`` VAE, ``D_…`` encoders, ``E_…`` LoRA); every shape, length, seed and
tolerance is read from the manifest, never assumed. ``--ranks N`` runs the loop fixtures' DiT steps in
the timestep pipeline over N local processes (gloo), the other fixtures as without it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file

CASE_MODULES = {
    "A": "liveavatar.testing.cases.dit_forward",
    "B": "liveavatar.testing.cases.loop",
    "C": "liveavatar.testing.cases.vae",
    "D": "liveavatar.testing.cases.encoders",
    "E": "liveavatar.testing.cases.lora",
}
LOOP_KIND = "B"


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    max_mean_abs: float | None = None

    def __str__(self) -> str:
        text = f"atol {self.atol:g} rtol {self.rtol:g}"
        return text + (f" mean {self.max_mean_abs:g}" if self.max_mean_abs is not None else "")


@dataclass(frozen=True)
class Comparison:
    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    tolerance: Tolerance
    passed: bool
    note: str = ""


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, tol: Tolerance) -> Comparison:
    """Elementwise |got - ref| <= atol + rtol*|ref| and, where given, mean |got - ref| <= max_mean_abs."""
    got = got.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if got.shape != ref.shape:
        return Comparison(name, float("inf"), float("inf"), float("inf"), tol, False,
                          f"shape {tuple(got.shape)} != expected {tuple(ref.shape)}")
    if got.numel() == 0:
        return Comparison(name, 0.0, 0.0, 0.0, tol, True)
    diff = (got - ref).abs()
    if not torch.isfinite(got).all():
        return Comparison(name, float("inf"), float("inf"), float("inf"), tol, False, "non-finite values")
    max_abs = diff.max().item()
    max_rel = (diff / ref.abs().clamp_min(1e-12)).max().item()
    mean_abs = diff.mean().item()
    passed = bool((diff <= tol.atol + tol.rtol * ref.abs()).all())
    if tol.max_mean_abs is not None:
        passed = passed and mean_abs <= tol.max_mean_abs
    return Comparison(name, max_abs, max_rel, mean_abs, tol, passed)


class Fixture:
    """One manifest + its tensor file; paths inside the manifest are relative to the fixture folder."""

    def __init__(self, manifest_path: Path, mode: str = "strict"):
        self.manifest_path = Path(manifest_path)
        self.dir = self.manifest_path.parent
        self.manifest = json.loads(self.manifest_path.read_text())
        self.mode = mode
        self.tensors: dict[str, torch.Tensor] = load_file(str(self.dir / self.manifest["tensor_file"]))

    @property
    def name(self) -> str:
        return self.manifest["fixture"]

    @property
    def kind(self) -> str:
        return self.name.split("_", 1)[0]

    def path(self, relative: str) -> Path:
        return self.dir / relative

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def tolerance(self, group: str) -> Tolerance:
        entry = self.manifest["tolerances"][group]
        if "atol" not in entry:
            entry = entry[self.mode]
        return Tolerance(entry["atol"], entry["rtol"], entry.get("max_mean_abs"))

    def compare(self, name: str, got: torch.Tensor, group: str, ref: torch.Tensor | None = None) -> Comparison:
        """Compare ``got`` with the stored tensor ``name`` (or ``ref``) under tolerance ``group``."""
        return compare(name, got, self.tensors[name] if ref is None else ref, self.tolerance(group))


def find_manifests(directory: Path) -> list[Path]:
    manifests = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "fixture" in data and "tensor_file" in data:
            manifests.append(path)
    return manifests


def run_fixture(fixture: Fixture, ranks: int | None = None) -> Iterator[Comparison]:
    module_name = CASE_MODULES.get(fixture.kind)
    if module_name is None:
        raise ValueError(f"{fixture.manifest_path.name}: unknown fixture kind {fixture.name!r}")
    module = importlib.import_module(module_name)
    yield from (module.run(fixture, ranks=ranks) if ranks and fixture.kind == LOOP_KIND else module.run(fixture))


def _format(result: Comparison) -> str:
    status = "ok  " if result.passed else "FAIL"
    line = (f"  {status} {result.name:<48} max_abs {result.max_abs:.3e}  max_rel {result.max_rel:.3e}"
            f"  mean_abs {result.mean_abs:.3e}  ({result.tolerance})")
    return line + (f"  {result.note}" if result.note else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m liveavatar.testing.parity", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="folder with fixture manifests (X.json + X.safetensors)")
    parser.add_argument("--mode", choices=["strict", "relaxed"], default="strict",
                        help="tolerance set for tensors that have both (default: strict)")
    parser.add_argument("--only", action="append", default=[],
                        help="run only fixtures whose name starts with this (repeatable)")
    parser.add_argument("--ranks", type=int, metavar="N",
                        help="run the loop fixtures (B) through the timestep pipeline on N local processes")
    args = parser.parse_args(argv)
    if args.ranks is not None and args.ranks < 1:
        parser.error(f"--ranks {args.ranks}: must be at least 1")

    torch.set_grad_enabled(False)
    manifests = find_manifests(args.directory)
    if args.only:
        manifests = [m for m in manifests if any(json.loads(m.read_text())["fixture"].startswith(p) for p in args.only)]
    if not manifests:
        print(f"error: no fixture manifests in {args.directory}", file=sys.stderr)
        return 2

    failed_cases: list[str] = []
    total = 0
    for manifest in manifests:
        fixture = Fixture(manifest, args.mode)
        pipelined = args.ranks and args.ranks > 1 and fixture.kind == LOOP_KIND
        print(f"{fixture.name} ({manifest.name}{f', pipeline over {args.ranks} ranks' if pipelined else ''})")
        start = time.perf_counter()
        case_failed = False
        try:
            for result in run_fixture(fixture, args.ranks):
                total += 1
                print(_format(result), flush=True)
                case_failed |= not result.passed
        except Exception as error:  # a crash in one case must not hide the others' results
            print(f"  FAIL {type(error).__name__}: {error}")
            case_failed = True
        print(f"  -> {'FAIL' if case_failed else 'pass'} in {time.perf_counter() - start:.1f}s")
        if case_failed:
            failed_cases.append(fixture.name)
    passed = len(manifests) - len(failed_cases)
    print(f"{passed} passed, {len(failed_cases)} failed ({total} tensors compared)")
    return 1 if failed_cases else 0


if __name__ == "__main__":
    sys.exit(main())
