"""The GPU benchmark scripts' CPU forms (tiny random models), so that a script a GPU session depends on
does not break unnoticed between the sessions that have a GPU. The multi-GPU pipeline's and the desktop
harness's are in test_pipeline.py and test_desktop.py."""
import json
import os
import subprocess
import sys

from conftest import REPO


def test_the_end_to_end_benchmark_streams_and_writes_on_the_cpu():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_end_to_end.py"), "--config", "tiny",
                             "--device", "cpu", "--size", "128*64"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["width"], report["height"], report["clips"], report["frames"]) == (128, 64, 2, 93)
    assert report["video_fps"] > 0 and report["ttff_s"] > 0 and len(report["block_s"]) >= 1


def test_the_fast_path_benchmark_times_every_path_on_the_cpu(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_fast_path.py"), "--config", "tiny",
                             "--device", "cpu", "--size", "64*64", "--budget-s", "600"], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "fast_path.json").read_text())
    assert report["errors"] == [] and report["skipped"] == []
    assert [row["weights"] for row in report["rows"]] == ["bf16", "fp8"]
    for row in report["rows"]:
        assert set(row["paths"]) == {"eager", "graphs", "compiled"}
        # The compiled regions against eager, per block: the same numbers up to float32 reassociation.
        assert max(block["max"] for block in row["paths"]["compiled"]["vs_eager"]) < 1e-3


def test_the_compile_worker_probe_measures_a_pool_on_the_cpu(tmp_path):
    """What calibrates `COMPILE_WORKER_BYTES`: with two compile threads Inductor's compile runs in processes
    below the probe, whose RSS it reports; the same compile with one thread is timed in the process."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compile_workers.py"), "--device", "cpu",
                             "--workers", "2,1"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO / "src"),
                                 "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})  # compiles, no cache hit
    assert result.returncode == 0, result.stderr[-2000:]
    pool, single = json.loads((tmp_path / "compile_workers.json").read_text())
    assert (pool["workers_set"], single["workers_set"]) == (2, 1) and "error" not in pool and "error" not in single
    assert pool["descendant_processes"] >= 1 and 0.01 < pool["per_process_gib"] < 4
    assert pool["compile_s"] > 0 and single["compile_s"] > 0


def test_the_attention_modes_benchmark_compares_every_mode_on_the_cpu(tmp_path):
    out = tmp_path / "modes.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attention_modes.py"), "--device", "cpu",
                             "--warmup-blocks", "1", "--blocks", "1", "--fixtures", "", "--json", str(out)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert list(row["modes"]) == ["bf16", "int8", "fp8"]
    for mode in ("int8", "fp8"):  # the PyTorch reference on the CPU: quantised, and close to bf16
        assert "PyTorch reference" in row["modes"][mode]["runs"]
        assert all(0 < block["max"] < 1e-2 for block in row["modes"][mode]["vs_bf16"])


def test_the_decode_benchmark_compares_the_fixed_buffer_step_on_the_cpu(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_decode.py"), "--device", "cpu", "--tiny",
                             "--dtype", "fp32", "--sizes", "32*32", "--variants", "eager,fixed", "--blocks", "1",
                             "--warmup-blocks", "0"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert [row["variant"] for row in rows] == ["eager", "fixed"]
    assert rows[1]["vs_eager"]["max_abs"] == 0 and rows[1]["second_stream_vs_eager"]["max_abs"] == 0
    assert rows[0]["block_s"] > 0 and rows[1]["compiles"] == 0


def test_the_conv_forms_benchmark_times_every_form_of_the_decoders_convolutions_on_the_cpu(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vae_conv_forms.py"), "--device", "cpu",
                             "--tiny", "--size", "32*32", "--repeats", "1"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "vae_conv_forms.json").read_text())
    assert report["calls"] > 0 and {"native", "channels_last", "stacked2d", "summed2d_cl"} <= set(report["totals_ms_per_block"])
    # Every form computes the same convolution (float32 on the CPU: only the summation order differs).
    assert max(report["max_abs_vs_native"].values()) < 1e-4
