"""`liveavatar bench` on the CPU with the tiny configuration: the real sampling loop, timed."""
import json

import pytest

from liveavatar.cli import main

TINY = ["bench", "--config", "tiny", "--size", "64*64", "--dtype", "float32", "--blocks", "1",
        "--warmup-blocks", "1", "--json"]


def test_bench_tiny_json_reports_speed_and_memory(capsys):
    assert main(TINY + ["--weights", "fp8", "--kv-location", "host", "--stream-layers", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"fps", "ttff_s", "peak_gib", "forward_s", "host_rss_peak_gib", "placement", "loop"} <= set(report)
    # Each figure as it is defined: fps from the measured time per block of 12 frames; the first frames come
    # after the first block is denoised; the blocks' 4 forwards fit in a block's time; the RSS peak is the
    # largest phase peak.
    assert report["measured_blocks"] == 1 and report["frames_measured"] == 12 * report["measured_blocks"]
    assert report["fps"] == pytest.approx(12 / report["block_s"], rel=1e-9)
    assert 0 < report["first_block_s"] <= report["ttff_s"]
    assert 0 < 4 * report["forward_s"] <= report["block_s"] + report["first_block_s"]
    assert report["host_rss_peak_gib"] == max(report["host_phase_peaks_gib"].values())
    assert report["peak_gib"] is None  # no GPU here
    assert report["placement"]["weight_dtype"] == "fp8" and report["placement"]["kv_location"] == "host"
    assert len(report["placement"]["streamed_layers"]) == 2 and report["streamed_layer_copies"] >= 2
    assert report["kv_host_fetched_gb"] > 0
    assert "sampler.sample" in report["loop"]
    # The CPU runs eagerly by default: no compiler counters, no CUDA graphs; the streamed placement would
    # take the compiled path without graphs on a GPU.
    assert report["fast_path"].startswith("eager") and report["compiles"] is None and report["cuda_graphs"] is None
    assert report["predicted_path"] == "compiled"


def test_bench_serves_several_requests_on_one_engine(capsys):
    assert main(TINY + ["--no-compile", "--requests", "2"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["requests"] == 2 and report["first_request_ttff_s"] > 0 and report["ttff_s"] > 0
    assert report["fast_path"] == "eager (turned off)" and not report["decode_overlapped"]
    # Progress on stderr, a line per phase and per decoded block of each request (the JSON stays clean).
    lines = err.splitlines()
    assert lines[0].startswith("bench: 64x64, float32 on cpu") and "building random weights" in lines[0]
    assert sum(" frames after " in line for line in lines) == 2 * 2


def test_bench_on_the_cpu_runs_float32_like_generate_and_quiet_silences_it(capsys):
    without_dtype = [arg for arg in TINY if arg not in ("--dtype", "float32")]
    assert main(without_dtype + ["--quiet"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["dtype"] == "float32" and err == ""


def test_bench_refuses_bad_counts_and_the_full_model_on_the_cpu(capsys):
    assert main(TINY[:-5] + ["--blocks", "0"]) == 2
    assert "--blocks" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu"]) == 2
    assert "--config tiny" in capsys.readouterr().err
