"""Issue 14: 704*384 on a desktop's memory: a 24 GB card (22 GiB cap) and a 12 GB card (12 GiB cap), each
with 32 GiB of host RAM, loaded from a full-size checkpoint on disk.

    PYTHONPATH=src python3 benchmarks/desktop_fit.py [--dir DIR] [--caps 22,12] [--host-limit 32]
    PYTHONPATH=src python3 benchmarks/desktop_fit.py --config tiny --device cpu --size 64*64   # on a CPU

One invocation (about 5 minutes on an H200 with a local disk; it stops adding steps past --time-budget-s):
1. Disk: a 1 GiB probe file gives the write and the cold read rate (read after fsync and
   POSIX_FADV_DONTNEED). A checkpoint in the release's layout with random weights is written once under
   --dir (4 bf16 DiT shards + index + config.json, 32.6 GB, and a rank-128 LoRA, 1.3 GB, written tensor by
   tensor from a pool of random numbers; a marker file makes later runs reuse it). If the disk lacks the
   space or writes slower than --min-write-gbps (the full write would not fit the time), /dev/shm is used
   instead and the report says so; either way the loads below read the shards through a warm page cache
   (cold load ~ load time + 34 GB / the cold read rate).
2. The host->GPU bandwidth (pinned, 1 GiB copies) in its own process.
3. One row per --caps entry: `liveavatar bench --memory-cap CAP --host-memory LIMIT --load-weights` in its
   own process under a host memory limit of --host-limit GiB: a cgroup (v2 memory.max, else v1
   memory.limit_in_bytes) when this machine allows one, else the parent watches the RSS of the child and
   its descendants and kills it past the limit ("rss watch"); the report names the mode. If the planner
   refuses the size at a cap, the refusal is recorded and the first setting it names as fitting is run
   instead.
4. FP8 vs bf16 KV sets: the same 2-clip run (random full-size weights, FP8 linears, everything resident)
   with each, relative L2 difference of every velocity and decoded frame (max, mean).
Every child runs eager (LIVEAVATAR_COMPILE=0) unless --compile is given: the compile's time and the host
memory of Inductor's worker processes (not in the plan) would otherwise enter the rows.
Prints a table (measured next to predicted; the planner's FPS for an RTX 4090 and an RTX 4070-class card
at each row's setting) and writes desktop_fit.json under $OUT (default: a temporary folder).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from full_size_checkpoint import GiB, checkpoint_folder, write_checkpoint

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------
# 2.-3. child processes under a host memory limit


class MemoryLimit:
    """A host memory limit for one child process: a fresh cgroup (v2, else v1) when this machine allows
    it, else RSS watching by the parent. ``wrap(command)`` puts the command into the cgroup first."""

    def __init__(self, limit_bytes: int | None, mode: str = "auto"):
        self.limit = limit_bytes
        self.path: Path | None = None
        self.mode = "rss watch" if limit_bytes is not None else "no limit"
        self.error = ""
        if mode == "rss" or limit_bytes is None:
            return
        for version, make in (("cgroup v2", self._make_v2), ("cgroup v1", self._make_v1)):
            try:
                self.path = make()
                self._check_joinable()
                self.mode = version
                return
            except (OSError, ValueError, StopIteration) as error:
                self.error += f"{version}: {error}; "
                self.close()
        if mode == "cgroup":
            raise SystemExit(f"--limit-mode cgroup: no cgroup could be made ({self.error})")

    def _own(self, controller: str) -> str:
        with open("/proc/self/cgroup") as handle:
            lines = [line.rstrip("\n").split(":", 2) for line in handle]
        return next(path for _, controllers, path in lines if controllers == controller or
                    controller in controllers.split(","))

    def _make_v2(self) -> Path:
        base = Path("/sys/fs/cgroup") / self._own("").lstrip("/")
        if "memory" not in (base / "cgroup.controllers").read_text().split():
            raise ValueError("no memory controller")
        if "memory" not in (base / "cgroup.subtree_control").read_text().split():
            (base / "cgroup.subtree_control").write_text("+memory")
        path = self.path = base / f"liveavatar-fit-{os.getpid()}-{time.monotonic_ns()}"
        path.mkdir()
        (path / "memory.max").write_text(str(self.limit))
        if (path / "memory.swap.max").exists():
            (path / "memory.swap.max").write_text("0")
        return path

    def _make_v1(self) -> Path:
        base = Path("/sys/fs/cgroup/memory") / self._own("memory").lstrip("/")
        path = self.path = base / f"liveavatar-fit-{os.getpid()}-{time.monotonic_ns()}"
        path.mkdir()
        (path / "memory.limit_in_bytes").write_text(str(self.limit))
        if (path / "memory.memsw.limit_in_bytes").exists():
            (path / "memory.memsw.limit_in_bytes").write_text(str(self.limit))
        return path

    def _check_joinable(self) -> None:
        """A process can be moved into the cgroup (else the children could not join it)."""
        probe = subprocess.Popen(["sleep", "10"])
        try:
            (self.path / "cgroup.procs").write_text(str(probe.pid))
        finally:
            probe.kill()
            probe.wait()

    def wrap(self, command: list[str]) -> list[str]:
        if self.path is None:
            return command
        return [sys.executable, str(Path(__file__).resolve()), "--enter-cgroup", str(self.path), "--", *command]

    def stats(self) -> dict:
        """The cgroup's peak usage (page cache included) and its OOM kills (nothing in RSS-watch mode)."""
        if self.path is None:
            return {}
        read = lambda name: (self.path / name).read_text() if (self.path / name).exists() else ""  # noqa: E731
        peak = read("memory.peak") or read("memory.max_usage_in_bytes")
        events = dict(line.split() for line in (read("memory.events") or read("memory.oom_control")).splitlines()
                      if len(line.split()) == 2)
        return {"cgroup_peak_gib": int(peak) / GiB if peak.strip() else None,
                "cgroup_oom_kills": int(events.get("oom_kill", 0))}

    def close(self) -> None:
        if self.path is not None and self.path.exists():
            for _ in range(50):  # a process that just left (or died) may still be counted for a moment
                try:
                    self.path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        self.path = None


def process_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    children = [int(child) for child in handle.read().split()]
                found += children
                pending += children
        except OSError:
            continue
    return found


def tree_rss(pid: int) -> int:
    """VmRSS of a process and all its descendants (Inductor's compile workers included): what a desktop
    must hold. Pages a forked child shares with its parent count twice, so this bounds from above."""
    total = 0
    for process in [pid, *descendants(pid)]:
        try:
            total += process_rss(process)
        except (OSError, StopIteration):  # gone since it was listed
            continue
    return total


def run_child(command: list[str], limit: MemoryLimit, timeout_s: float, env_extra: dict | None = None) -> dict:
    """Run ``command`` (its last stdout line is JSON) under ``limit``, watching its process tree's RSS every
    20 ms."""
    env = {**os.environ, **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    process = subprocess.Popen(limit.wrap(command), env=env, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    watched = {"peak": 0, "killed": False}

    def watch():
        while process.poll() is None:
            rss = tree_rss(process.pid)
            watched["peak"] = max(watched["peak"], rss)
            if limit.mode == "rss watch" and rss > limit.limit:
                watched["killed"] = True
                process.send_signal(signal.SIGKILL)
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        return {"error": f"timed out after {timeout_s:.0f} s", "stderr": err[-1500:]}
    finally:
        thread.join()
    result = {"watched_rss_peak_gib": watched["peak"] / GiB, "limit_mode": limit.mode, **limit.stats()}
    if limit.error:
        result["cgroup_error"] = limit.error
    if watched["killed"]:
        return {**result, "error": f"RSS passed the {limit.limit / GiB:.0f} GiB limit: killed"}
    if process.returncode != 0:
        return {**result, "error": f"exit status {process.returncode}", "stderr": err[-1500:]}
    return {**result, **json.loads(out.strip().splitlines()[-1])}


def child_bandwidth() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from capped import bandwidth_gbps

    h2d, d2h = bandwidth_gbps()
    return {"h2d_gbps": h2d, "d2h_gbps": d2h}


def child_drift(args) -> dict:
    import torch

    from liveavatar.runtime.bench import kv_fp8_drift

    work = _workload(args, args.size, 48)
    weights = "fp8" if args.device != "cpu" else "bf16"
    return kv_fp8_drift(work, weight_dtype=weights, device=torch.device(args.device),
                        config_name="tiny" if args.config == "tiny" else None, num_clips=args.drift_clips)


# ------------------------------------------------------------------------------------------------------
# planning in the parent: the setting each row runs, and the desktop cards' predictions


def _workload(args, size: str, frames: int):
    from liveavatar.geometry import size_for_area
    from liveavatar.runtime.planner.memory import Workload
    from liveavatar.options import parse_size

    width, height = (int(n) for n in size.replace("x", "*").split("*"))
    height, width = size_for_area(height, width, parse_size(size))
    return Workload(height, width, frames, run_dtype_bytes=4 if args.device == "cpu" else 2)


def row_setting(args, cap_gib: float, inventory, hardware) -> dict:
    """What a row runs: the requested size at the cap and host limit, or the planner's nearest fit."""
    from liveavatar.runtime.planner.policy import Pins, make_plan, nearest_fitting_plans

    work = _workload(args, args.size, 48)
    budget, host = int(cap_gib * GiB), int(args.host_limit * GiB)
    plan = make_plan(inventory, work, hardware, budget, budget_source=f"{cap_gib:g} GiB cap", host_budget_bytes=host)
    if plan.fits or args.device == "cpu":
        return {"work": work, "plan": plan, "refused": None}
    nearest = nearest_fitting_plans(inventory, work, hardware, budget, headroom=plan.headroom_bytes,
                                    host_budget_bytes=host, pins=Pins())
    if not nearest:
        return {"work": None, "plan": plan, "refused": plan.refusal()}
    text, fitting = nearest[0]
    return {"work": fitting.workload, "plan": fitting, "refused": plan.refusal(), "instead": text}


def desktop_predictions(work, inventory, host_gib: float) -> dict:
    from liveavatar.runtime.planner.hardware import HARDWARE_PRESETS
    from liveavatar.runtime.planner.policy import make_plan, resolve_budget

    out = {}
    for key in ("rtx4090", "rtx4070"):
        card = HARDWARE_PRESETS[key]
        budget, source = resolve_budget(hardware=card, detect=False)
        plan = make_plan(inventory, replace(work, run_dtype_bytes=2), card, budget, budget_source=source,
                         host_budget_bytes=int(host_gib * GiB))
        out[key] = {"fits": plan.fits, "fps": round(plan.speed.fps, 2), "placement": plan.placement.describe(),
                    "predicted_peak_gib": round(plan.predicted_peak_bytes / GiB, 2),
                    "predicted_host_peak_gib": round(plan.predicted_host_peak_bytes / GiB, 2)}
    return out


# ------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "liveavatar-desktop-fit")
    parser.add_argument("--config", choices=("14b", "tiny"), default="14b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="704*384")
    parser.add_argument("--caps", default="22,12", help="GPU caps in GiB, one row each (default 22,12)")
    parser.add_argument("--host-limit", type=float, default=32.0, help="host memory limit in GiB (default 32)")
    parser.add_argument("--limit-mode", choices=("auto", "cgroup", "rss"), default="auto")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--warmup-blocks", type=int, default=2)
    parser.add_argument("--drift-clips", type=int, default=2)
    parser.add_argument("--min-write-gbps", type=float, default=0.3)
    parser.add_argument("--time-budget-s", type=float, default=520.0)
    parser.add_argument("--compile", action="store_true", help="run the compiled fast path (default: eager, "
                        "so that compile time and Inductor's worker processes stay out of the time and the limit)")
    parser.add_argument("--child", choices=("bandwidth", "drift"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_bandwidth() if args.child == "bandwidth" else child_drift(args)))
        return 0

    from liveavatar.models.transformer import TransformerConfig
    from liveavatar.runtime.planner.hardware import CPU_HARDWARE, HARDWARE_PRESETS
    from liveavatar.runtime.planner.memory import dit_inventory

    started = time.perf_counter()
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="desktop_fit_"))
    out.mkdir(parents=True, exist_ok=True)
    inventory = dit_inventory(TransformerConfig.tiny() if args.config == "tiny" else TransformerConfig.full_14b())
    needed = int(inventory.total.nbytes("bf16") * 1.05)
    folder, where, probe = checkpoint_folder(args.dir, needed, args.min_write_gbps)
    checkpoint = write_checkpoint(folder, args.config)
    report = {"checkpoint": {**checkpoint, "location": where, **probe}, "rows": [], "host_limit_gib": args.host_limit}
    print(f"checkpoint: {checkpoint['dit']} ({where}; {'reused' if checkpoint['reused'] else 'written'}: "
          f"{checkpoint['bytes'] / 1e9:.1f} GB at {checkpoint['gbps']:.2f} GB/s; cold read "
          f"{probe.get('cold_read_gbps', float('nan')):.2f} GB/s)", flush=True)

    cuda = args.device != "cpu"
    python = [sys.executable, str(Path(__file__).resolve())]
    fast_path = {"LIVEAVATAR_COMPILE": "1" if args.compile else "0"}
    report["fast_path"] = "compiled" if args.compile else "eager (LIVEAVATAR_COMPILE=0)"
    link = run_child([*python, "--child", "bandwidth"], MemoryLimit(None), 120) if cuda else {}
    report["bandwidth"] = link
    hardware = replace(HARDWARE_PRESETS["h200"], h2d_bytes_per_s=link["h2d_gbps"] * 1e9,
                       d2h_bytes_per_s=link["d2h_gbps"] * 1e9) if "h2d_gbps" in link else CPU_HARDWARE
    if link:
        print(f"host link: {link['h2d_gbps']:.1f} GB/s up, {link['d2h_gbps']:.1f} GB/s down", flush=True)

    for cap in (float(c) for c in args.caps.split(",")):
        setting = row_setting(args, cap, inventory, hardware)
        row = {"cap_gib": cap, "refused": setting["refused"], "instead": setting.get("instead")}
        if setting["work"] is None:
            report["rows"].append(row)
            continue
        work = setting["work"]
        command = [sys.executable, "-m", "liveavatar", "bench", "--size", f"{work.width}*{work.height}",
                   "--infer_frames", str(work.infer_frames), "--ckpt_dir", checkpoint["dit"], "--load-weights",
                   "--lora", checkpoint["lora"], "--blocks", str(args.blocks), "--warmup-blocks",
                   str(args.warmup_blocks), "--device", args.device, "--json"]
        if cuda:
            command += ["--memory-cap", f"{cap:g}GiB", "--host-memory", f"{args.host_limit:g}GiB",
                        "--h2d-gbps", f"{min(link['h2d_gbps'], link['d2h_gbps']):.1f}"]
        else:  # the tiny VAE too: a full-size VAE decode at this size takes minutes on a CPU
            command += ["--config", "tiny", "--dtype", "float32", "--weights", "fp8", "--kv-location", "host",
                        "--kv-dtype", "fp8", "--stream-layers", "2"]
        limit = MemoryLimit(int(args.host_limit * GiB), args.limit_mode)
        try:
            result = run_child(command, limit, timeout_s=300, env_extra=fast_path)
        finally:
            limit.close()
        row.update(result=result, predicted_here=_plan_summary(setting["plan"]),
                   desktop=desktop_predictions(work, inventory, args.host_limit),
                   size=f"{work.width}x{work.height}", infer_frames=work.infer_frames)
        report["rows"].append(row)
        print(_row_line(row), flush=True)

    if time.perf_counter() - started < args.time_budget_s - 120:
        drift = run_child([*python, "--child", "drift", "--config", args.config, "--device", args.device, "--size",
                           args.size, "--drift-clips", str(args.drift_clips)], MemoryLimit(None), 240, fast_path)
    else:
        drift = {"error": "skipped: not enough time left in --time-budget-s"}
    report["kv_fp8_drift"] = drift
    report["seconds"] = time.perf_counter() - started
    (out / "desktop_fit.json").write_text(json.dumps(report, indent=1, default=str))
    print(_table(report))
    print(f"\nJSON: {out / 'desktop_fit.json'} ({report['seconds']:.0f} s)")
    return 0


def _plan_summary(plan) -> dict:
    return {"placement": plan.placement.describe(), "predicted_peak_gib": plan.predicted_peak_bytes / GiB,
            "predicted_host_peak_gib": plan.predicted_host_peak_bytes / GiB, "fps": plan.speed.fps,
            "notes": plan.notes}


def _placement(result: dict) -> str:
    from liveavatar.runtime.placement import Placement

    return Placement(**result["placement"]).describe()


def _within(measured, predicted) -> str:
    if not measured or predicted is None:
        return "n/a"
    error = predicted / measured - 1
    return f"{error:+.1%} {'ok' if abs(error) <= 0.10 else 'OFF'}"


def _predicted_tree_gib(result: dict) -> float:
    """The planner's host peak for the child's whole process tree: its own and its compile workers'."""
    return result["predicted_host_peak_gib"] + result["predicted_compile_workers_gib"]


def _row_line(row: dict) -> str:
    r = row["result"]
    if "error" in r:
        return f"cap {row['cap_gib']:g} GiB: FAILED ({r['error']}) {r.get('stderr', '')[-400:]}"
    return (f"cap {row['cap_gib']:g} GiB, {row['size']} {row['infer_frames']}-frame clips: {_placement(r)}\n"
            f"    VRAM peak {r['peak_gib'] or 0:.2f} GiB (pred {r['predicted_peak_gib']:.2f}), host RSS peak "
            f"{r['host_rss_peak_gib']:.2f} GiB (pred {r['predicted_host_peak_gib']:.2f}; watched "
            f"{r['watched_rss_peak_gib']:.2f} with its descendants (pred {_predicted_tree_gib(r):.2f}), "
            f"{r['limit_mode']}; taken from the machine "
            f"{r['host_taken_from_machine_gib']:.2f}), pinned {r['pinned_gib']:.2f} GiB (pred "
            f"{r['predicted_pinned_gib']:.2f}); {r['fps']:.2f} FPS, TTFF {r['ttff_s']:.1f} s, load {r['build_s']:.1f} s")


def _table(report: dict) -> str:
    c = report["checkpoint"]
    link = report.get("bandwidth") or {}
    lines = [f"\ncheckpoint {c['location']}, {c['bytes'] / 1e9:.1f} GB, written at {c['gbps']:.2f} GB/s "
             f"(probe: write {c.get('write_gbps', float('nan')):.2f}, cold read {c.get('cold_read_gbps', float('nan')):.2f}"
             f" GB/s); loads below read it from a warm page cache; host link "
             + (f"{link['h2d_gbps']:.1f} GB/s up, {link['d2h_gbps']:.1f} down" if "h2d_gbps" in link else "n/a")
             + f"; DiT {report['fast_path']}",
             "", "| GPU cap | host limit (how) | setting | placement | VRAM peak (predicted, error) | host RSS peak "
             "(predicted, error) | with compile workers (predicted) | pinned (predicted) | FPS (predicted) | TTFF | "
             "load | RTX 4090 predicted FPS | RTX 4070-class predicted FPS |", "|" + "---|" * 13]
    for row in report["rows"]:
        r = row.get("result", {})
        if "error" in r or not r:
            lines.append(f"| {row['cap_gib']:g} GiB | {report['host_limit_gib']:g} GiB | "
                         f"{'refused' if row['refused'] else 'failed'} | {row.get('refused') or r.get('error')} |"
                         + " |" * 9)
            continue
        desk = row["desktop"]
        lines.append(
            f"| {row['cap_gib']:g} GiB | {report['host_limit_gib']:g} GiB ({r['limit_mode']}"
            + (f", cgroup peak {r['cgroup_peak_gib']:.1f}, OOM kills {r['cgroup_oom_kills']}"
               if r.get("cgroup_peak_gib") is not None else "") + ") | "
            f"{row['size']}, {row['infer_frames']}-frame clips | {_placement(r)} | "
            f"{r['peak_gib'] or 0:.2f} GiB ({r['predicted_peak_gib']:.2f}, {_within(r['peak_gib'], r['predicted_peak_gib'])}) | "
            f"{r['host_rss_peak_gib']:.2f} GiB ({r['predicted_host_peak_gib']:.2f}, "
            f"{_within(r['host_rss_peak_gib'], r['predicted_host_peak_gib'])}) | "
            f"{r['watched_rss_peak_gib']:.2f} GiB ({_predicted_tree_gib(r):.2f}) | "
            f"{r['pinned_gib']:.2f} GiB ({r['predicted_pinned_gib']:.2f}) | {r['fps']:.2f} "
            f"({r['predicted_fps'] or 0:.2f}) | {r['ttff_s']:.1f} s | {r['build_s']:.1f} s | "
            f"{desk['rtx4090']['fps'] if desk['rtx4090']['fits'] else 'does not fit'} | "
            f"{desk['rtx4070']['fps'] if desk['rtx4070']['fits'] else 'does not fit'} |")
        if row["refused"]:
            lines.append(f"\n(cap {row['cap_gib']:g} GiB: the requested size was refused: {row['refused']} "
                         f"Ran instead: {row['instead']})")
    d = report.get("kv_fp8_drift", {})
    if "error" not in d:
        lines.append(f"\nFP8 vs bf16 KV sets ({d['num_clips']} clips, {d['forwards']} forwards, {d['frames']} frames, "
                     f"random {d['config']} weights in {d['weights']}): velocity rel. L2 max {d['velocity_rel_l2_max']:.2e} "
                     f"mean {d['velocity_rel_l2_mean']:.2e}; frames rel. L2 max {d['frame_rel_l2_max']:.2e} mean "
                     f"{d['frame_rel_l2_mean']:.2e}, largest pixel difference {d['frame_abs_max']:.3f}")
    else:
        lines.append(f"\nFP8 vs bf16 KV sets: {d['error']}")
    return "\n".join(lines)


def enter_cgroup_and_exec(argv: list[str]) -> None:
    """``--enter-cgroup PATH -- command...``: join the cgroup, then become the command (same process)."""
    path, command = argv[2], argv[4:]
    Path(path, "cgroup.procs").write_text(str(os.getpid()))
    os.execvp(command[0], command)


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--enter-cgroup" and sys.argv[3] == "--":
        enter_cgroup_and_exec(sys.argv)
    sys.exit(main())
