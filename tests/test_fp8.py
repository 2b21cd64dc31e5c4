"""FP8 e4m3 linears (the reference's fp8_linear.py): the reference's per-tensor scheme, which layers stay in bf16, and the
two kernels (W8A8 torch._scaled_mm, weight-only)."""
import pytest
import torch
from torch import nn

from liveavatar.geometry import ClipGeometry
from liveavatar.models.transformer import CausalS2VTransformer, TransformerConfig
from liveavatar.runtime.caches import build_caches
from liveavatar.runtime.fp8 import (
    FP8_DTYPE,
    FP8Linear,
    convert_to_fp8,
    dequantize_rows,
    fp8_kernel_for,
    quantize_per_row,
    quantize_per_tensor,
    quantize_rows,
    tensor_amax,
)
from liveavatar.runtime.placement import Placement

KEPT_AT_14B = {"text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
               "time_projection.1", "head.head", "casual_audio_encoder.encoder.final_linear"}


def test_the_14b_model_gets_460_fp8_linears_and_keeps_the_reference_seven_in_bf16():
    with torch.device("meta"):
        model = CausalS2VTransformer(TransformerConfig.full_14b()).to(torch.bfloat16)
    assert convert_to_fp8(model, kernel="weight_only") == 460
    fp8 = {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}
    kept = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    assert len(fp8) == 460 and kept == KEPT_AT_14B
    assert sum(m.weight_fp8.numel() for m in fp8.values()) == 15_938_355_200  # bytes of e4m3 codes
    assert all(m.weight_fp8.dtype == FP8_DTYPE for m in fp8.values())
    other = sum(p.numel() for p in model.parameters())  # biases, norms, embeddings, the 7 kept linears
    assert other == 357_400_409
    assert {name.split(".")[0] for name in fp8} == {"blocks", "audio_injector"}
    assert sum(name.startswith("audio_injector.injector_adain_layers") for name in fp8) == 12


def test_quantisation_follows_the_reference_formula():
    x = torch.tensor([[0.5, -2.0, 1e-3], [3.5, 0.0, -0.25]])
    codes, inverse_scale = quantize_per_tensor(x)
    scale = 448 / 3.5
    assert codes.dtype == FP8_DTYPE
    assert inverse_scale.item() == pytest.approx(1 / scale)
    assert torch.equal(codes, (x * scale).clamp(-448, 448).to(FP8_DTYPE))
    assert codes.float().abs().max().item() == 448  # amax maps to the e4m3 maximum
    # Tiny tensors are not blown up: the scale is capped at 448.
    _, tiny_inverse = quantize_per_tensor(torch.full((4,), 1e-6))
    assert tiny_inverse.item() == pytest.approx(1 / 448)
    rows, row_inverse = quantize_rows(torch.randn(5, 3, 8))
    assert row_inverse.shape == (5,) and rows.shape == (5, 3, 8)
    assert dequantize_rows(rows, row_inverse, torch.float32).shape == (5, 3, 8)


@pytest.mark.parametrize("shape", [(7,), (5, 9), (2, 6, 4)])
def test_tensor_amax_is_the_whole_tensors_max_taken_by_rows(shape):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=generator).to(torch.bfloat16)
    x.view(-1)[-1] = -40.0  # the largest magnitude, negative, in the last row
    assert tensor_amax(x).item() == 40.0
    assert torch.equal(tensor_amax(x), x.abs().amax())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_only_linear_is_close_to_the_original(dtype):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(256, 384).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(384, 256, generator=g) / 16)
        linear.bias.copy_(torch.randn(384, generator=g) / 10)
    x = torch.randn(2, 7, 256, generator=g).to(dtype)
    fp8 = FP8Linear.from_linear(linear, kernel="weight_only")
    got, expected = fp8(x), linear(x)
    assert got.dtype == dtype and got.shape == expected.shape
    relative = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    assert relative < 0.04  # e4m3 keeps 3 mantissa bits; per-tensor scaling adds no more than that
    # The weight it uses is exactly the dequantised codes.
    assert torch.equal(fp8.dequantized_weight(torch.float32), fp8.weight_fp8.float() * fp8.weight_scale)
    assert fp8_kernel_for("cpu") == "weight_only"


@pytest.mark.parametrize("kernel", ["scaled_mm", "scaled_mm_rows"])
def test_scaled_mm_kernel_matches_the_w8a8_formula(kernel):
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(3, 5, 64, generator=g).to(torch.bfloat16)
    x[1] *= 50  # rows of very different size: one tensor scale and row scales differ
    fp8 = FP8Linear.from_linear(linear, kernel=kernel)
    got = fp8(x)
    quantize = quantize_per_row if kernel == "scaled_mm_rows" else quantize_per_tensor
    x_codes, x_inverse = quantize(x.reshape(-1, 64))
    expected = (x_codes.float() @ fp8.weight_fp8.float().t()) * x_inverse * fp8.weight_scale + linear.bias.float()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.view(3, 5, 32), rtol=2e-2, atol=2e-2)
    # An fp32 input comes back as fp32 (the reference's FP8 layer returns its input's dtype).
    assert fp8(x.float()).dtype == torch.float32


def test_tiny_dit_with_fp8_weights_tracks_the_bf16_model():
    torch.manual_seed(0)
    config = TransformerConfig.tiny()
    model = CausalS2VTransformer(config)
    reference = CausalS2VTransformer(config)
    reference.load_state_dict(model.state_dict())
    assert convert_to_fp8(model, kernel="weight_only") == 3 * 10 + 2 * 5
    h, w = 8, 8
    out = []
    for m in (model, reference):
        g = torch.Generator().manual_seed(2)
        text = m.text_kv(torch.randn(4, config.text_dim, generator=g))
        caches = build_caches(m, Placement(), ClipGeometry(8 * h, 8 * w, 24), range(1), device="cpu",
                              dtype=torch.float32)
        kv, cond = caches.kv_sets[0], caches.cond
        m.prefill_sink(cond, text, torch.randn(1, 16, 1, h, w, generator=g), torch.randn(1, 16, 19, h, w, generator=g))
        out.append(m.forward_block(torch.randn(16, 3, h, w, generator=g), 900.0, text,
                                   torch.randn(1, config.audio_layers, config.audio_dim, 12, generator=g), kv, cond,
                                   start_frame=0, ref_rope_offset=5))
    assert ((out[0] - out[1]).norm() / out[1].norm()).item() < 0.1
