"""The fast path against today's forward on one GPU, in one process: eager (``--no-compile``), compiled
regions, and compiled regions replayed as CUDA graphs, for bf16 and FP8 weights.

    python benchmarks/gpu_fast_path.py                      # suite main: 704*384, 4 steps (one call, ~8 min)
    python benchmarks/gpu_fast_path.py --suite more         # 384*256 and 3 steps (eager against graphs)
    python benchmarks/gpu_fast_path.py --suite extra        # 22 GiB cap, end to end with mp4, as subprocesses
    python benchmarks/gpu_fast_path.py --config tiny --device cpu --size 64*64 --budget-s 900   # smoke test

One 14B DiT and the full-width VAE are built on the GPU with random weights (bf16; converted to FP8 in
place for the FP8 rows) and shared by every measurement. Per row (weights, size, steps) and path:
DiT-only seconds per block (GPU clock between clean blocks, mean over the steady blocks: the KV ring full,
after the sink refresh), with the VAE decode (host clock between decoded frame batches, the decode in
line or overlapped on a second stream), time to first frame, peak allocated memory, what the compiler
did (graphs compiled, seconds, compiles after the first block: must be 0), the CUDA graphs' captures
and replays, and per output block the max and mean relative difference of the compiled and the graph
path against eager. For the graph path of each weight type, a torch.profiler kernel table of one steady
block (top kernels, GEMM / attention / other shares, kernel and graph launches). Suite main ends with a
new process that loads the warm compile cache (time to first frame after the weights are built) and,
when small enough, packs the compile cache into $OUT for the next call (``--compile-cache``).

Writes $OUT/fast_path.json (every number; rewritten after each step, so a cut-off run keeps what it
measured), $OUT/profile_<weights>.txt, prints a table last. Steps that would not fit ``--budget-s``
are skipped and listed.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

START = time.perf_counter()
SUITES = {
    "main": [("bf16", "704*384", 4), ("fp8", "704*384", 4)],
    "more": [("bf16", "384*256", 4), ("bf16", "384*256", 3), ("bf16", "704*384", 3),
             ("fp8", "384*256", 4), ("fp8", "384*256", 3), ("fp8", "704*384", 3)],
}
GiB = 2**30


def elapsed() -> float:
    return time.perf_counter() - START


class Run:
    """The results so far, written to $OUT after every step; steps past the time budget are skipped."""

    def __init__(self, out: Path, budget_s: float, meta: dict):
        self.out, self.budget_s = out, budget_s
        self.data = {"meta": meta, "rows": [], "skipped": [], "errors": []}

    def fits(self, what: str, needs_s: float) -> bool:
        if elapsed() + needs_s <= self.budget_s:
            return True
        self.data["skipped"].append(f"{what} (needs ~{needs_s:.0f} s, {self.budget_s - elapsed():.0f} s left)")
        return False

    @contextlib.contextmanager
    def attempt(self, what: str):
        """A measurement whose failure is recorded and does not stop the others."""
        try:
            yield
        except Exception as error:
            self.errors(f"{what}: {type(error).__name__}: {error}")
            free_memory()

    def errors(self, text: str) -> None:
        self.data["errors"].append(text)
        print(f"error: {text}", file=sys.stderr, flush=True)

    def save(self) -> None:
        self.data["meta"]["elapsed_s"] = round(elapsed(), 1)
        (self.out / "fast_path.json").write_text(json.dumps(self.data, indent=1, default=str))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_diffs(reference: list, other: list) -> list[dict]:
    """Per block: max |a-b| / max |a| and mean |a-b| / mean |a|."""
    out = []
    for a, b in zip(reference, other):
        a, b = a.float(), b.float()
        out.append({"max": round(((a - b).abs().max() / a.abs().max()).item(), 6),
                    "mean": round(((a - b).abs().mean() / a.abs().mean()).item(), 6)})
    return out


def kernel_summary(prof, top: int = 25) -> dict:
    """GPU time by kernel class, the top kernels, and how many kernel / graph launches the host issued."""
    gpu, launches = [], {}
    for event in prof.key_averages():
        device_time = getattr(event, "self_device_time_total", None)
        if device_time is None:
            device_time = getattr(event, "self_cuda_time_total", 0)
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA and device_time > 0:
            gpu.append((event.key, device_time / 1e3, event.count))
        elif event.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                           "cudaGraphLaunch", "cudaMemcpyAsync"):
            launches[event.key] = launches.get(event.key, 0) + event.count

    def kind(name: str) -> str:
        low = name.lower()
        if low.startswith("triton_"):  # Inductor names its kernels after every op fused in, `_scaled_mm` too
            return "other (element-wise, copies, reductions)"
        if any(k in low for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "_mm_")):
            return "gemm"
        if any(k in low for k in ("flash", "fmha", "attention", "sdpa", "cudnn")):
            return "attention"
        return "other (element-wise, copies, reductions)"

    shares: dict[str, float] = {}
    for name, ms, _ in gpu:
        shares[kind(name)] = shares.get(kind(name), 0.0) + ms
    total = sum(shares.values()) or 1.0
    gpu.sort(key=lambda item: -item[1])
    return {"gpu_ms": round(total, 1), "ms_by_kind": {k: round(v, 1) for k, v in shares.items()},
            "share_by_kind": {k: round(v / total, 3) for k, v in shares.items()},
            "kernels": len(gpu), "launches": launches,
            "top": [{"kernel": name[:120], "ms": round(ms, 2), "calls": calls} for name, ms, calls in gpu[:top]]}


def profile_block(engine, synthetic, model, device, dtype, warmup_blocks: int) -> tuple[dict, str]:
    """torch.profiler over one steady block (after ``warmup_blocks`` clean blocks) of a DiT-only request."""
    from torch.profiler import ProfilerActivity, profile

    events = engine.run(synthetic.request, synthetic.conditioning(model, device, dtype), decode=False)
    for _ in range(warmup_blocks):
        next(events)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        next(events)
        torch.cuda.synchronize()
    events.close()
    table = ""
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=90)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    return kernel_summary(prof), table


def summarise(result: dict) -> dict:
    """The numbers of one measured request that the table and RESULTS.md use."""
    keys = ("block_s", "block_s_median", "fps", "ttff_s", "first_block_s", "forward_s", "compiles",
            "compiles_after_first_block", "compile_s", "graph_breaks", "compile_reasons")
    return {k: (round(result[k], 4) if isinstance(result.get(k), float) else result.get(k)) for k in keys}


def measure_path(run: Run, row: dict, path: str, *, model, vae, synthetic, placement, device, dtype, args,
                 reference_latents) -> list:
    from liveavatar.runtime.bench import engine_report, measure_request
    from liveavatar.runtime.compile import FastPath
    from liveavatar.runtime.engine import Engine

    cuda = device.type == "cuda"
    fast_path = {"eager": FastPath(False, False, "--no-compile"), "compiled": FastPath(True, False),
                 "graphs": FastPath(True, cuda)}[path]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    engine = Engine(model, vae, None, None, placement=placement, device=device, dtype=dtype, fast_path=fast_path,
                    overlap_decode=False)
    common = dict(warmup_blocks=args.warmup_blocks, total_blocks=synthetic.total_blocks)
    entry = row["paths"][path] = {"fast_path": fast_path.name}
    # DiT alone; the first request of every path has the same conditioning (for the numerics).
    first = measure_request(engine, synthetic.request, row_conditioning(row, synthetic, model, device, dtype),
                            decode=False, keep_latents=True, **common)
    entry["dit_first_request"] = summarise(first)
    latents = [t.detach().clone() for t in first["latents"]]
    if path == "graphs":  # warm: graphs captured (fill-phase keys on their second use)
        entry["dit"] = summarise(measure_request(engine, synthetic.request,
                                                 synthetic.conditioning(model, device, dtype),
                                                 decode=False, **common))
    else:
        entry["dit"] = entry["dit_first_request"]
    run.save()
    if args.decode:
        modes = [("with_decode_overlapped", True), ("with_decode_in_line", False)] if path == "graphs" and cuda \
            else [("with_decode_in_line", False)] if path == "eager" else []
        for name, overlapped in modes:
            if not run.fits(f"{row['name']} {path} {name}", 3 * args.est_block_s * synthetic.total_blocks):
                continue
            engine.overlap_decode = overlapped
            with run.attempt(f"{row['name']} {path} {name}"):
                entry[name] = summarise(measure_request(engine, synthetic.request,
                                                        synthetic.conditioning(model, device, dtype), **common))
            run.save()
    if path == "graphs" and cuda and args.profile and run.fits(f"{row['name']} profile", 30):
        with run.attempt(f"{row['name']} profile"):
            summary, table = profile_block(engine, synthetic, model, device, dtype, args.warmup_blocks)
            row["profile"] = summary
            name = f"profile_{row['weights']}_{row['size'].replace('*', 'x')}_{row['steps']}.txt"
            (run.out / name).write_text(table)
    entry.update(engine_report(engine))
    entry["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GiB, 2) if cuda else None
    if reference_latents is not None:
        entry["vs_eager"] = rel_diffs(reference_latents, latents)
    print(f"[{elapsed():.0f} s] {row['name']} {path}: DiT {entry['dit']['block_s']:.3f} s/block, first block "
          f"{entry['dit_first_request']['first_block_s']:.1f} s, compile {entry['dit_first_request']['compile_s']} s, "
          f"peak {entry['peak_allocated_gib']} GiB", flush=True)
    del engine
    free_memory()
    run.save()
    return latents


def row_conditioning(row, synthetic, model, device, dtype):
    if "conditioning" not in row["_private"]:
        row["_private"]["conditioning"] = synthetic.conditioning(model, device, dtype)
    return row["_private"]["conditioning"]


def measure_row(run: Run, weights: str, size: str, steps: int, paths: list[str], *, model, vae, device, dtype,
                args) -> None:
    from liveavatar.runtime.bench import synthetic_request
    from liveavatar.runtime.placement import Placement

    work = workload(size, steps, dtype)
    placement = Placement(weight_dtype=weights)
    synthetic = synthetic_request(model.config, vae, work, device=device, dtype=dtype,
                                  total_blocks=args.warmup_blocks + args.blocks)
    row = {"name": f"{weights} {size} {steps} steps", "weights": weights, "size": size, "steps": steps,
           "paths": {}, "_private": {}}
    run.data["rows"].append(row)
    latents = {}
    for path in paths:
        if not run.fits(f"{row['name']} {path}", args.est_path_s[path]):
            continue
        try:
            latents[path] = measure_path(run, row, path, model=model, vae=vae, synthetic=synthetic,
                                         placement=placement, device=device, dtype=dtype, args=args,
                                         reference_latents=latents.get("eager") if path != "eager" else None)
        except Exception as error:  # keep measuring the other paths; the error is part of the result
            run.errors(f"{row['name']} {path}: {type(error).__name__}: {error}")
            free_memory()
    if "graphs" in latents and "compiled" in latents:  # the same kernels, replayed: expected identical
        row["graphs_vs_compiled"] = rel_diffs(latents["compiled"], latents["graphs"])
    row.pop("_private")
    run.save()


def warm_start(args, device) -> dict:
    """In this (new) process: build the model, then time a compiled engine's first request from the
    engine's creation to its first decoded frame, with the compile cache a previous process left."""
    from liveavatar.runtime.bench import measure_request, synthetic_request
    from liveavatar.runtime.compile import FastPath, compile_counters
    from liveavatar.runtime.engine import Engine

    model, vae, dtype, placement = build(args, device, args.weights)
    synthetic = synthetic_request(model.config, vae, workload(args.size, 4, dtype), device=device, dtype=dtype,
                                  total_blocks=2)
    start = time.perf_counter()
    engine = Engine(model, vae, None, None, placement=placement, device=device, dtype=dtype,
                    fast_path=FastPath(True, device.type == "cuda"))
    conditioning = synthetic.conditioning(model, device, dtype)
    setup_s = time.perf_counter() - start
    result = measure_request(engine, synthetic.request, conditioning, warmup_blocks=1, total_blocks=2)
    return {"weights": args.weights, "size": args.size,
            "first_frame_after_weights_s": round(setup_s + result["ttff_s"], 2),
            "loop_ttff_s": round(result["ttff_s"], 2), "compile_s": result["compile_s"],
            "compiles": compile_counters()["compiles"]}


def workload(size: str, steps: int, dtype):
    """A one-GPU streaming workload of ``size`` = "W*H" (an image of that shape keeps it exactly)."""
    from liveavatar.runtime.planner.memory import Workload

    width, height = (int(v) for v in size.split("*"))
    return Workload(height, width, 48, steps, 1, "streaming", 2 if dtype == torch.bfloat16 else 4)


def build(args, device, weights: str):
    from liveavatar.models.transformer import TransformerConfig
    from liveavatar.models.vae import VAEConfig
    from liveavatar.runtime.bench import build_random_models
    from liveavatar.runtime.fp8 import convert_to_fp8
    from liveavatar.runtime.placement import Placement

    tiny = args.config == "tiny"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = TransformerConfig.tiny() if tiny else TransformerConfig()
    model, vae, _, _ = build_random_models(Placement(), config=config, device=device, dtype=dtype,
                                           vae_config=VAEConfig(base_dim=8) if tiny else VAEConfig())
    if weights == "fp8":
        convert_to_fp8(model, kernel=args.fp8_kernel)
    return model, vae, dtype, Placement(weight_dtype=weights)


def pack_compile_cache(out: Path, limit_bytes: int = 15 * 2**20) -> str:
    folder = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""))
    if not folder.is_dir():
        return "no cache folder"
    target = out / "compile_cache.tgz"
    with tarfile.open(target, "w:gz") as archive:
        archive.add(folder, arcname="compile")
    if target.stat().st_size > limit_bytes:
        size = target.stat().st_size
        target.unlink()
        return f"not packed: {size / 2**20:.1f} MiB > {limit_bytes / 2**20:.0f} MiB"
    return f"packed {target.stat().st_size / 2**20:.1f} MiB"


def subprocess_json(command: list[str], timeout_s: float) -> dict:
    """Run a benchmark command that prints one JSON object last; its object, or what went wrong."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s", "command": " ".join(command)}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-3:]}",
                "command": " ".join(command)}
    return {**json.loads(lines[-1]), "command": " ".join(command)}


def extra_suite(run: Run, args) -> None:
    """The 22 GiB-capped plan (compiled and eager) and end to end with mp4, each in its own process."""
    env_src = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                        os.environ.get("PYTHONPATH")])))
    os.environ.update(env_src)
    bench = [sys.executable, "-m", "liveavatar", "bench", "--size", "704*384", "--memory-cap", "22GiB",
             "--blocks", "4", "--warmup-blocks", "5", "--json"]
    e2e = [sys.executable, str(Path(__file__).parent / "gpu_end_to_end.py"), "--clips", "3"]
    # The end-to-end FP8 run and the capped plan first: the rows the targets are about.
    steps = [("end_to_end_fp8", e2e + ["--fp8"], 240), ("cap22_compiled", bench, 240),
             ("end_to_end_bf16", e2e, 240), ("cap22_eager", bench + ["--no-compile"], 150)]
    for name, command, timeout_s in steps:
        if run.fits(name, timeout_s * 0.6):
            run.data[name] = subprocess_json(command, min(timeout_s, max(30.0, run.budget_s - elapsed())))
            run.save()


def print_table(run: Run) -> None:
    print("\nrow                      path      DiT s/blk  DiT FPS  +decode s/blk (FPS)        TTFF warm  "
          "compile s  compiles>1st blk  peak GiB  vs eager max/mean rel. (worst block)")
    for row in run.data["rows"]:
        for path, entry in row["paths"].items():
            dit = entry.get("dit", {})
            first = entry.get("dit_first_request", {})
            overlapped = "with_decode_overlapped" in entry
            decode = entry.get("with_decode_overlapped") or entry.get("with_decode_in_line") or {}
            decode_text = f"{decode['block_s']:.3f} ({decode['fps']:.1f}){' overlapped' if overlapped else ''}" \
                if decode else "-"
            # Compiles once the first block of the first request is done (must be 0), and time to first
            # frame of a request on a warm engine (a decode run after the DiT-only ones).
            later = [first.get("compiles_after_first_block")] + ([dit.get("compiles")] if dit is not first else [])
            later = [v for v in later if v is not None]
            warm_ttff = decode.get("ttff_s") if decode else (dit.get("ttff_s") if dit is not first else None)
            diffs = entry.get("vs_eager") or []
            worst = max(diffs, key=lambda d: d["max"]) if diffs else None
            print(f"{row['name']:<24} {path:<9} {dit.get('block_s', float('nan')):>9.3f}  "
                  f"{dit.get('fps', float('nan')):>7.2f}  {decode_text:<26} "
                  f"{warm_ttff if warm_ttff is not None else float('nan'):>9.2f}  {first.get('compile_s') or 0:>9.1f}  "
                  f"{sum(later) if later else '-':>16}  {entry.get('peak_allocated_gib') or float('nan'):>8.2f}  "
                  + (f"{worst['max']:.2e}/{worst['mean']:.2e}" if worst else "-"))
        if "profile" in row:
            p = row["profile"]
            print(f"  profile {row['name']} (graphs, one steady block): {p['gpu_ms']:.0f} ms GPU, "
                  + ", ".join(f"{k} {v:.0%}" for k, v in p["share_by_kind"].items()) + f"; launches {p['launches']}")
    for key in ("warm_start", "cap22_compiled", "cap22_eager", "end_to_end_fp8", "end_to_end_bf16"):
        if key in run.data:
            value = run.data[key]
            print(f"{key}: " + json.dumps({k: value.get(k) for k in ("fps", "block_s", "block_s_median", "ttff_s",
                                                                     "video_fps", "first_frame_after_weights_s",
                                                                     "peak_gib", "fast_path", "error")
                                           if value.get(k) is not None}))
    if run.data["skipped"]:
        print("skipped: " + "; ".join(run.data["skipped"]))
    if run.data["errors"]:
        print("errors: " + " | ".join(e[:300] for e in run.data["errors"]))
    print(f"total {elapsed():.0f} s; JSON in {run.out / 'fast_path.json'}")


def main(argv: list[str] | None = None) -> int:
    from liveavatar.runtime.fp8 import FP8_KERNELS, fp8_kernel_for

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["main", "more", "extra", "warm-start"], default="main")
    parser.add_argument("--size", help="one size instead of the suite's (e.g. 64*64 with --config tiny)")
    parser.add_argument("--weights", default="bf16", help="warm-start only: bf16 or fp8")
    parser.add_argument("--paths", default=None, help="comma list of eager, compiled, graphs")
    parser.add_argument("--suite-weights", choices=["bf16", "fp8"], help="only the suite's rows with these weights "
                        "(e.g. the FP8 rows of --suite more, when its bf16 rows are recorded)")
    parser.add_argument("--config", choices=["14b", "tiny"], default="14b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--blocks", type=int, default=4, help="measured blocks (steady: ring full, sink refreshed; "
                        "a multiple of the 4 blocks of a clip weighs the sink refresh as a stream pays it)")
    parser.add_argument("--warmup-blocks", type=int, default=5, help="first clip + the sink-refresh block")
    parser.add_argument("--budget-s", type=float, default=510.0, help="wall-clock budget of the whole script")
    parser.add_argument("--no-decode", dest="decode", action="store_false")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--fp8-kernel", choices=FP8_KERNELS, help="the FP8 rows' linear kernel (default: the "
                        "device's, scaled_mm on FP8 tensor cores); scaled_mm_rows scales activations per token")
    parser.add_argument("--compile-cache", help="a compile_cache.tgz from an earlier call, unpacked first")
    args = parser.parse_args(argv)

    from liveavatar.devices import configure_cuda_allocator, resolve_device
    from liveavatar.runtime.compile import configure_compiler

    device = resolve_device(args.device)
    args.fp8_kernel = args.fp8_kernel or fp8_kernel_for(device)
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="fast_path_"))
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        configure_cuda_allocator()
        torch.cuda.set_device(device)
    if args.compile_cache:
        folder = Path(tempfile.mkdtemp(prefix="liveavatar_compile_"))
        with tarfile.open(args.compile_cache) as archive:
            archive.extractall(folder, filter="data")
        os.environ["LIVEAVATAR_COMPILE_CACHE"] = str(folder / "compile")
    cache = configure_compiler()
    torch.set_grad_enabled(False)
    if args.suite == "warm-start":
        print(json.dumps(warm_start(args, device)))
        return 0
    meta = {"suite": args.suite, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d"),
            "command": " ".join([Path(sys.executable).name] + sys.argv), "compile_cache": str(cache),
            "blocks": args.blocks, "warmup_blocks": args.warmup_blocks, "fp8_kernel": args.fp8_kernel}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    run = Run(out, args.budget_s, meta)
    if args.suite == "extra":
        extra_suite(run, args)
        run.save()
        print_table(run)
        return 0
    rows = SUITES[args.suite] if not args.size else [(w, args.size, s) for w, _, s in SUITES[args.suite]]
    rows = [row for row in rows if args.suite_weights in (None, row[0])]
    paths = args.paths.split(",") if args.paths else (["eager", "graphs", "compiled"] if args.suite == "main"
                                                       else ["eager", "graphs"])
    tiny = args.config == "tiny"
    # Rough costs for the budget check (the compile of a new shape dominates the first compiled path).
    args.est_block_s = 0.05 if tiny else 1.0
    args.est_path_s = {"eager": 40 if not tiny else 5, "graphs": 150 if not tiny else 60,
                       "compiled": 40 if not tiny else 10}
    built = None
    for weights, size, steps in rows:
        if built is None or built[2] != weights:
            if built is not None and weights == "fp8" and built[2] == "bf16":
                from liveavatar.runtime.fp8 import convert_to_fp8

                convert_to_fp8(built[0], kernel=args.fp8_kernel)  # in place: the bf16 copy is freed
                free_memory()
                built = (built[0], built[1], "fp8", built[3])
            else:
                start = time.perf_counter()
                # No names of main's own hold the models: the warm-start child below needs them freed
                # (a `model` left bound here kept 17.5 GiB and ran the child out of memory on an H100).
                built = build(args, device, weights)
                built = (built[0], built[1], weights, built[2])
                run.data["meta"]["build_s"] = round(time.perf_counter() - start, 1)
        measure_row(run, weights, size, steps, paths, model=built[0], vae=built[1], device=device, dtype=built[3],
                    args=args)
    if args.suite == "main" and device.type == "cuda":
        del built
        free_memory()
        if device.type == "cuda":
            run.data["parent_allocated_gib_at_warm_start"] = round(torch.cuda.memory_allocated(device) / GiB, 2)
        run.data["compile_cache_packed"] = pack_compile_cache(out)
        if run.fits("warm start in a new process", 90):
            size = args.size or "704*384"
            run.data["warm_start"] = subprocess_json(
                [sys.executable, __file__, "--suite", "warm-start", "--size", size, "--config", args.config,
                 "--weights", args.suite_weights or "bf16", "--fp8-kernel", args.fp8_kernel],
                max(60.0, run.budget_s - elapsed()))
    run.save()
    print_table(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
