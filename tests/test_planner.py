"""The memory planner: the reference's canonical numbers (the 14B release at 704x384), placement choice,
refusal with the numbers and the nearest setting that fits, and the `plan` command."""
import json

import pytest

from liveavatar.cli import main
from liveavatar.models.transformer import TransformerConfig
from liveavatar.runtime.placement import Placement
from liveavatar.runtime.planner.hardware import HARDWARE_PRESETS, GiB
from liveavatar.runtime.pinned_chunks import packed_bytes
from liveavatar.runtime.planner.memory import (Workload, dit_inventory, kv_allocations, memory_components,
                                               vae_state_elements)
from liveavatar.runtime.planner.policy import MemoryPlanError, Pins, make_plan
from liveavatar.runtime.planner.speed import simulate_forward

H100 = HARDWARE_PRESETS["h100"]
RTX4090 = HARDWARE_PRESETS["rtx4090"]


@pytest.fixture(scope="module")
def inventory():
    return dit_inventory(TransformerConfig.full_14b())


def component(components, prefix):
    (match,) = [c for c in components if c.name.startswith(prefix)]
    return match


def test_canonical_704x384_numbers_match_the_reference(inventory):
    assert inventory.num_params == 16_295_755_609
    assert inventory.total.nbytes("bf16") == 32_591_511_218  # 32.59 GB
    total = inventory.total
    assert total.fp8_elements == 15_938_355_200 and total.fp8_linears == 460  # e4m3 codes: 15.94 GB
    assert total.other_elements == 357_400_409  # stays bf16 under FP8: 0.71 GB
    assert inventory.kv_bytes_per_token(2) == 819_200

    work = Workload(384, 704)
    assert (work.geometry.frame_tokens, work.kv_tokens, work.geometry.cond_tokens) == (1056, 12_672, 2640)
    components = memory_components(inventory, work, Placement(), H100)
    assert component(components, "DiT weights").nbytes == 32_591_511_218
    kv = component(components, "KV sets")  # resident in bf16: each pair of sets holds a copy of the cond rows
    assert kv.nbytes == (4 * 12_672 + 2 * 2640) * 819_200 == 45_848_985_600 and kv.where == "gpu"
    assert component(components, "cond cache").nbytes == 1056 * 819_200 // 2  # the reference frame's keys
    concatenating = memory_components(inventory, work, Placement(kv_dtype="fp8"), H100)
    assert component(concatenating, "cond cache").nbytes == 2640 * 819_200
    concatenating = memory_components(inventory, work, Placement(cond_location="host"), H100)
    assert component(concatenating, "KV sets").nbytes == 4 * 10_380_902_400 == 41_523_609_600
    assert vae_state_elements(48, 88) == 639_209_472  # the decoder's causal-conv caches: 2 input frames per conv

    fp8 = memory_components(inventory, work, Placement(weight_dtype="fp8"), H100)
    assert component(fp8, "DiT weights").nbytes == 15_938_355_200 + 4 * 460 + 2 * 357_400_409


def test_kv_and_cond_sizes_follow_the_config_and_the_size():
    tiny = dit_inventory(TransformerConfig.tiny())
    work = Workload(256, 384, infer_frames=24)
    assert tiny.kv_bytes_per_token(2) == 2 * 96 * 3 * 2
    tokens = 6 * 24 * 16
    per_set = kv_allocations(tiny, tokens, 2, fp8=True)  # codes, then one fp32 scale per token for K and V
    assert sum(per_set) == tokens * tiny.kv_bytes_per_token(1) + 2 * 4 * tokens * tiny.num_layers
    on_gpu = component(memory_components(tiny, work, Placement(kv_dtype="fp8"), H100), "KV sets")
    assert on_gpu.nbytes == 4 * sum(per_set) and on_gpu.where == "gpu"
    on_host = component(memory_components(tiny, work, Placement(kv_dtype="fp8", kv_location="host"), H100),
                        "KV sets")
    assert on_host.where == "host" and on_host.pinned and on_host.nbytes == packed_bytes(4 * per_set) == GiB


def test_an_80gb_card_keeps_everything_resident_and_a_24gb_card_streams(inventory):
    work = Workload(384, 704)
    big = make_plan(inventory, work, H100, 78 * GiB, budget_source="test")
    assert big.fits and big.placement == Placement(weight_dtype="fp8")
    assert big.slowdown == pytest.approx(1.0)

    small = make_plan(inventory, work, RTX4090, 22 * GiB, budget_source="test")
    assert small.fits
    assert small.placement.weight_dtype == "fp8" and small.placement.kv_location == "host"
    assert small.placement.kv_dtype == "bf16"  # FP8 KV only when no bf16 KV placement fits
    assert small.predicted_reserved_bytes + small.headroom_bytes <= 22 * GiB
    assert small.headroom_bytes >= GiB

    tighter = make_plan(inventory, work, RTX4090, 16 * GiB, budget_source="test")
    assert tighter.fits and len(tighter.placement.streamed_layers) > len(small.placement.streamed_layers)
    assert 0 not in tighter.placement.streamed_layers
    assert tighter.speed.fps <= small.speed.fps <= big.baseline.fps * RTX4090.fp8_flops / H100.fp8_flops * 1.5


def test_nothing_fits_refuses_with_the_numbers_and_the_nearest_setting(inventory):
    plan = make_plan(inventory, Workload(384, 704), RTX4090, 6 * GiB, budget_source="a 6 GiB test budget")
    assert not plan.fits
    message = plan.refusal()
    assert "needs 7.67 GiB" in message and "a 6 GiB test budget" in message
    assert any(s.startswith("--size 384*256 -> 384x256") for s in plan.nearest)
    with pytest.raises(MemoryPlanError, match="Nearest setting that fits: --size 384\\*256"):
        plan.check()
    hopeless = make_plan(inventory, Workload(384, 704), RTX4090, 3 * GiB, budget_source="3 GiB")
    assert not hopeless.fits and hopeless.nearest == []


def test_a_pinned_choice_that_does_not_fit_points_at_the_planners_choice(inventory):
    plan = make_plan(inventory, Workload(384, 704), RTX4090, 22 * GiB, budget_source="22 GiB",
                     pins=Pins(kv_location="gpu"))
    assert not plan.fits
    assert plan.nearest[0].startswith("drop the pinned kv_location=gpu")


def test_prefetch_simulation_overlaps_copies_with_compute():
    compute = [1.0] * 4
    nothing = [0.0] * 4
    assert simulate_forward(compute, [nothing], nothing) == pytest.approx(4.0)
    # One streamed layer whose copy takes less than the compute before it: fully hidden.
    assert simulate_forward(compute, [[0, 0, 0, 1.5]], nothing) == pytest.approx(4.0)
    # Every layer needs a 2 s copy: the link sets the pace.
    assert simulate_forward(compute, [[2.0] * 4], nothing) == pytest.approx(8.0, rel=0.05)


def test_plan_json_has_the_agreed_keys(capsys):
    status = main(["plan", "--gpu-memory", "24GiB", "--hardware", "rtx4090", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["fits"] is True
    assert {"fits", "predicted_peak_gib", "placement", "headroom_gib", "fps", "slowdown"} <= set(report)
    assert report["predicted_peak_gib"] + report["headroom_gib"] <= 24 - 0.6
    assert set(report["placement"]) == {"weight_dtype", "streamed_layers", "kv_dtype", "kv_location",
                                        "cond_location", "text_encoder", "compile_workers"}


def test_plan_refuses_with_exit_status_1(capsys):
    assert main(["plan", "--gpu-memory", "7GiB", "--hardware", "rtx4090"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "refused:" in out and "--size 384*256" in out
    assert main(["plan", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory 'lots'" in capsys.readouterr().err


def test_speed_model_knows_the_attention_mode(inventory):
    from liveavatar.runtime.planner.speed import estimate_speed

    def block_s(attention, hardware):
        return estimate_speed(inventory, Workload(384, 704, attention=attention), Placement(weight_dtype="fp8"),
                              HARDWARE_PRESETS[hardware]).block_s

    # Measured on an H100 (benchmarks/RESULTS.md, 2026-12-07): the Triton kernel attends about as fast as
    # cuDNN's bf16 kernel, and its quantisation passes come on top (DiT 0.836 s/block int8 vs 0.781 bf16).
    assert block_s("bf16", "h100") < block_s("int8", "h100") < 1.1 * block_s("bf16", "h100")
    assert block_s("fp8", "a100") == block_s("bf16", "a100")  # no FP8 tensor cores: the bf16 fallback
