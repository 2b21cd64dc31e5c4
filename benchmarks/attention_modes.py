"""The quantised self-attention (``--attention int8|fp8``) against bf16 through the real sampling loop: per
output block, the clean latents of each mode against the bf16 path (max |a-b| / max |a| and mean
|a-b| / mean |a|), seconds per block (DiT alone, and with the VAE decode on the GPU), and the tiny parity
fixtures' drift per mode.

    PYTHONPATH=src python benchmarks/attention_modes.py --device cpu    # CPU form: tiny DiT, the PyTorch reference
    PYTHONPATH=src python3 benchmarks/attention_modes.py                # GPU: 14B random weights, FP8, the kernel

GPU rows (``--rows``, default 704*384 at 4 and 3 steps, then 384*256 at 4): one model and one engine per
row size (compiled regions, CUDA graphs, the decode overlapped), every mode on the same synthetic request
(same noise, audio, prompt), ``--warmup-blocks`` then ``--blocks`` measured. The first request of a mode
gives the latents and the DiT's seconds per block (the steady forwards' graphs are captured during the
warm-up); a second, with the decode, the end-to-end seconds per block. Rows past ``--budget-s`` are
skipped and listed. Random weights have no outlier channels:
these numbers bound the kernel's arithmetic, not the quality on the real checkpoint (README, "Quantised attention").
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_fast_path import free_memory, rel_diffs, summarise, workload  # noqa: E402

MODES = ("bf16", "int8", "fp8")
FIXTURES = Path(__file__).parents[1] / "tests" / "data" / "fixtures"


def fixture_drift(names: list[str], modes=MODES[1:]) -> dict:
    """Per loop fixture and mode: the largest relative error of the final latents and video against the
    reference's float32 outputs, and against the bf16 run's (the PyTorch reference of the quantisation)."""
    from liveavatar.models.quantised_attention import resolve_self_attention
    from liveavatar.testing.cases import loop
    from liveavatar.testing.parity import Fixture

    drift = {}
    for name in names:
        fixture = Fixture(FIXTURES / f"{name}.json")
        for mode in ("bf16", *modes):
            attention = resolve_self_attention(mode, "cpu", reference=True)
            results = {r.name: r for r in loop.run(fixture, self_attention=attention)
                       if r.name.startswith(("out.latents", "out.video"))}
            drift.setdefault(name, {})[mode] = {n: {"max_abs": r.max_abs, "max_rel": r.max_rel, "passes": r.passed}
                                                for n, r in results.items()}
            print(f"{name} {mode}: " + ", ".join(f"{n} max_abs {r.max_abs:.2e}" for n, r in results.items()),
                  flush=True)
    return drift


def measure_row(engine, model, vae, size: str, steps: int, args) -> dict:
    from liveavatar.runtime.bench import synthetic_request

    dtype, device = engine.dtype, engine.device
    synthetic = synthetic_request(model.config, vae, workload(size, steps, dtype), device=device, dtype=dtype,
                                  total_blocks=args.warmup_blocks + args.blocks)
    conditioning = synthetic.conditioning(model, device, dtype)
    common = dict(warmup_blocks=args.warmup_blocks, total_blocks=synthetic.total_blocks)
    row, latents = {"size": size, "steps": steps, "modes": {}}, {}
    from liveavatar.runtime.bench import measure_request

    for mode in MODES:  # the engine runs the request's attention mode
        request = replace(synthetic.request, options=replace(synthetic.request.options, attention=mode))
        entry = row["modes"][mode] = {"runs": engine.self_attention(mode).name}
        first = measure_request(engine, request, conditioning, decode=False, keep_latents=True, **common)
        latents[mode] = [t.detach().float().cpu() for t in first["latents"]]
        entry["dit_first_request"] = summarise(first)
        if device.type == "cuda":
            entry["with_decode"] = summarise(measure_request(engine, request, conditioning, **common))
        if mode != "bf16":
            entry["vs_bf16"] = rel_diffs(latents["bf16"], latents[mode])
        timing = entry["dit_first_request"]["block_s"]
        decode = entry.get("with_decode", {}).get("block_s")
        worst = max((d["max"] for d in entry.get("vs_bf16", [])), default=0.0)
        print(f"{size} {steps} steps {mode}: DiT {timing:.3f} s/block"
              + (f", with decode {decode:.3f} s/block ({12 / decode:.1f} FPS)" if decode else "")
              + (f", vs bf16 max rel {worst:.2e}" if mode != "bf16" else ""), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", default="704*384:4,704*384:3,384*256:4", help="SIZE:STEPS,... (GPU)")
    parser.add_argument("--weights", choices=("bf16", "fp8"), default="fp8", help="DiT weights on the GPU")
    parser.add_argument("--warmup-blocks", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument("--est-row-s", type=float, default=60, help="a row's expected seconds (budget check)")
    parser.add_argument("--fixtures", default="B_loop_tpp",
                        help="loop fixtures whose drift the CPU form measures, comma-separated ('' for none)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    from liveavatar.runtime.compile import FastPath
    from liveavatar.runtime.engine import Engine

    report = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
              "cuda": torch.version.cuda, "args": {k: str(v) for k, v in vars(args).items()}, "rows": [],
              "skipped": []}
    if cuda:
        import triton

        report["triton"] = triton.__version__
        from gpu_fast_path import build

        build_args = argparse.Namespace(config="14b")
        model, vae, dtype, placement = build(build_args, device, args.weights)
        rows = [(size, int(steps)) for size, steps in (r.split(":") for r in args.rows.split(","))]
        fast_path = FastPath(True, True)
    else:
        from gpu_fast_path import build

        model, vae, dtype, placement = build(argparse.Namespace(config="tiny"), device, "bf16")
        rows, fast_path = [("128*64", 4)], FastPath(False, False, "CPU form")
        report["note"] = "tiny DiT (head dim 32), float32, the quantisation's PyTorch reference"
    report["build_s"] = round(time.perf_counter() - began, 1)
    engine = Engine(model, vae, None, None, placement=placement, device=device, dtype=dtype, fast_path=fast_path,
                    overlap_decode=cuda, reference_attention=not cuda)

    for size, steps in rows:
        if time.perf_counter() - began + args.est_row_s > args.budget_s:
            report["skipped"].append(f"{size} {steps} steps (budget)")
            continue
        try:
            report["rows"].append(measure_row(engine, model, vae, size, steps, args))
        except Exception as error:  # the error is part of the result; the next row still runs
            report["skipped"].append(f"{size} {steps} steps: {type(error).__name__}: {error}"[:400])
            free_memory()
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    if not cuda and args.fixtures:
        report["fixture_drift"] = fixture_drift(args.fixtures.split(","))
    report["wall_s"] = round(time.perf_counter() - began, 1)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("skipped", "wall_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
