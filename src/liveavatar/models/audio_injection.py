"""The DiT's audio path: the causal audio encoder (``casual_audio_encoder``, the release's spelling) that
turns wav2vec2 features into per-latent-frame audio tokens, and the audio injectors (``audio_injector``)
that add per-frame audio cross-attention after selected transformer blocks.

Precision as in the reference: the layer mixing runs in the model dtype, the convolutional encoder and its
final linear in float32 (the reference wraps it in a float32 autocast region).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from liveavatar.models.attention import CrossAttention

ENCODER_NORM_EPS = 1e-6
ADAIN_NORM_EPS = 1e-5


class CausalConv1d(nn.Module):
    """Conv1d that pads only on the left (replicating the first step), so output t sees inputs <= t."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size=3, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (self.conv.kernel_size[0] - 1, 0), mode="replicate")
        return F.conv1d(padded, self.conv.weight.float(), self.conv.bias.float(), stride=self.conv.stride)


def _norm_silu(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine) over channels then SiLU, for x [B, C, T]; returns [B, T, C]."""
    x = x.transpose(1, 2)
    return F.silu(F.layer_norm(x, (x.shape[-1],), eps=ENCODER_NORM_EPS))


class AudioMotionEncoder(nn.Module):
    """Strided causal convolutions 50→…: ``num_tokens`` local tokens (+ a learned padding token) and one
    global vector per output step. Both paths share conv2 and conv3."""

    def __init__(self, audio_dim: int, dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(audio_dim, dim // 4 * num_tokens, stride=1)
        self.conv1_global = CausalConv1d(audio_dim, dim // 4, stride=1)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = nn.Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, dim/4] -> [B, T/4, dim] through conv2 and conv3."""
        x = _norm_silu(self.conv2(x.transpose(1, 2)))
        return _norm_silu(self.conv3(x.transpose(1, 2)))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, audio_dim, T] (float32) -> (global [B, T', 1, dim], local [B, T', tokens+1, dim])."""
        batch = features.shape[0]
        local = self.conv1_local(features)                                   # [B, tokens*dim/4, T]
        local = local.unflatten(1, (self.num_tokens, -1)).flatten(0, 1)      # [B*tokens, dim/4, T]
        local = self._downsample(_norm_silu(local))                          # [B*tokens, T', dim]
        local = local.unflatten(0, (batch, self.num_tokens)).transpose(1, 2)  # [B, T', tokens, dim]
        padding = self.padding_tokens.expand(batch, local.shape[1], 1, -1)
        local = torch.cat([local, padding.to(local.dtype)], dim=2)

        global_ = self._downsample(_norm_silu(self.conv1_global(features)))
        global_ = F.linear(global_, self.final_linear.weight.float(), self.final_linear.bias.float())
        return global_.unsqueeze(2), local


class CausalAudioEncoder(nn.Module):
    """Mixes the wav2vec2 hidden states with learned softmax-free weights, then encodes them."""

    def __init__(self, audio_dim: int, dim: int, num_tokens: int, audio_layers: int):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, audio_layers, 1, 1), 0.01))
        self.encoder = AudioMotionEncoder(audio_dim, dim, num_tokens)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, layers, audio_dim, T] in the model dtype -> float32 (global, local) tokens."""
        weights = F.silu(self.weights)
        mixed = ((features * weights) / weights.sum(dim=1, keepdim=True)).sum(dim=1)
        return self.encoder(mixed.float())


class AdaLayerNorm(nn.Module):
    """LayerNorm (eps 1e-5, no affine) shifted and scaled by a projection of an embedding; the
    projection's first half is the shift, the second the scale (diffusers' chunk_dim=1 order). Computed
    by `liveavatar.models.regions.inject_audio`."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)


class AudioInjector(nn.Module):
    """One audio cross-attention (with its AdaLN) per injection slot; slot J follows block
    ``inject_layers[J]`` (`liveavatar.models.regions.inject_audio` runs a slot)."""

    def __init__(self, dim: int, num_heads: int, num_slots: int, eps: float):
        super().__init__()
        self.injector = nn.ModuleList(CrossAttention(dim, num_heads, eps) for _ in range(num_slots))
        self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(dim) for _ in range(num_slots))
