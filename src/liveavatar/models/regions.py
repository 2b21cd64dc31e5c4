"""The tensor-only pieces of a DiT forward ("regions"): plain functions of modules and tensors, with no
host-side decision, no cache access and no Python state, so one compiled version of each serves every
transformer block (`liveavatar.runtime.compile` swaps a model's `Regions` for compiled ones).

The glue between them (KV-cache writes and reads, the attention over the window and the condition
tokens) stays outside: its shapes grow while the first clip fills the KV window, theirs never change
for a clip size, so compiled regions see the same shapes on every call.

Precision as the reference's bf16 run (see `liveavatar.models.transformer`): the residual stream is float32
inside a block; modulation and the head's linear are float32.

Submodules are run through `_run` (their ``forward`` without module hooks): the layer streamer binds a
streamed block's weights from the block's own hook, before any region runs, and a hook inside a
compiled region would make the compiler specialise on the streamer's state.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from liveavatar.models.attention import attention, context_kv
from liveavatar.models.audio_injection import ADAIN_NORM_EPS
from liveavatar.models.rope import apply_rotation


def _run(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    return module.forward(*args)


def _modulation(block: nn.Module, time_modulation: torch.Tensor) -> torch.Tensor:
    """shift1, scale1, gate1, shift2, scale2, gate2 [6, dim] float32."""
    return block.modulation.float()[0] + time_modulation


def self_attention_qkv(block: nn.Module, x: torch.Tensor, time_modulation: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """norm1 and the modulation, then un-roped q, k, v [1, L, heads, head_dim] of the block's input x."""
    dtype, width = x.dtype, (x.shape[-1],)
    shift1, scale1 = _modulation(block, time_modulation)[:2]
    normed = F.layer_norm(x.float(), width, eps=block.eps).to(dtype)
    modulated = (normed.float() * (1 + scale1) + shift1).to(dtype)
    attn = block.self_attn
    heads = (attn.num_heads, -1)
    q = _run(attn.norm_q, _run(attn.q, modulated)).unflatten(-1, heads)
    k = _run(attn.norm_k, _run(attn.k, modulated)).unflatten(-1, heads)
    return q, k, _run(attn.v, modulated).unflatten(-1, heads)


def self_attention_qkv_roped(block: nn.Module, x: torch.Tensor, time_modulation: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`self_attention_qkv` with q and k roped by the tokens' (cos, sin): what a block forward caches and
    attends with."""
    q, k, v = self_attention_qkv(block, x, time_modulation)
    return apply_rotation(q, cos, sin), apply_rotation(k, cos, sin), v


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return apply_rotation(x, cos, sin)


def _cross_attention(layer: nn.Module, x: torch.Tensor, context_k: torch.Tensor,
                     context_v: torch.Tensor) -> torch.Tensor:
    q = _run(layer.norm_q, _run(layer.q, x)).unflatten(-1, (layer.num_heads, -1))
    return _run(layer.o, attention(q, context_k, context_v).flatten(-2))


def after_self_attention(block: nn.Module, x: torch.Tensor, attended: torch.Tensor, time_modulation: torch.Tensor,
                         text_k: torch.Tensor, text_v: torch.Tensor) -> torch.Tensor:
    """The rest of a transformer block: output projection and gated residual, text cross-attention, the
    modulated FFN and its gated residual. x is the block's input, ``attended`` the self-attention's
    output [1, L, heads, head_dim]; returns the block's output in the run dtype."""
    dtype, width = x.dtype, (x.shape[-1],)
    _, _, gate1, shift2, scale2, gate2 = _modulation(block, time_modulation)
    y = _run(block.self_attn.o, attended.flatten(-2))
    x = x.float() + y.float() * gate1
    # The reference casts the residual to bfloat16 before norm3 in every run dtype.
    norm3 = block.norm3
    context_query = F.layer_norm(x.to(torch.bfloat16), width, norm3.weight, norm3.bias, block.eps)
    x = x + _cross_attention(block.cross_attn, context_query.to(dtype), text_k, text_v).float()
    normed = F.layer_norm(x, width, eps=block.eps)
    ffn_in, activation, ffn_out = block.ffn
    z = _run(ffn_out, _run(activation, _run(ffn_in, (normed * (1 + scale2) + shift2).to(dtype))))
    return (x + z.float() * gate2).to(dtype)


def inject_audio(injector: nn.Module, adain: nn.Module, hidden: torch.Tensor, audio_tokens: torch.Tensor,
                 audio_global: torch.Tensor) -> torch.Tensor:
    """One audio injection slot (its cross-attention and AdaLN): hidden [1, F*S, dim]; audio_tokens
    [F, tokens, dim] and audio_global [F, dim] per latent frame. Each latent frame's S tokens attend only
    to that frame's audio tokens; the result is added to the hidden states in their dtype."""
    frames = audio_tokens.shape[0]
    per_frame = hidden.reshape(frames, -1, hidden.shape[-1])
    shift, scale = _run(adain.linear, F.silu(audio_global)).unsqueeze(1).chunk(2, dim=-1)
    normed = F.layer_norm(per_frame.float(), (per_frame.shape[-1],), eps=ADAIN_NORM_EPS) * (1 + scale) + shift
    normed = normed.to(hidden.dtype)
    k, v = context_kv(injector, audio_tokens, run=_run)
    return hidden + _cross_attention(injector, normed, k, v).reshape(hidden.shape)


def head(module: nn.Module, x: torch.Tensor, time_embedding: torch.Tensor) -> torch.Tensor:
    """The output head: modulated norm, then its linear in float32; returns the run dtype."""
    shift, scale = module.modulation.float()[0] + time_embedding
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=module.eps).to(x.dtype)
    linear = module.head
    return F.linear(normed.float() * (1 + scale) + shift, linear.weight.float(), linear.bias.float()).to(x.dtype)


@dataclass(frozen=True)
class Regions:
    """The functions a forward runs its tensor work through: these plain ones (`EAGER`), or compiled
    versions of them."""

    self_attention_qkv: Callable = self_attention_qkv
    self_attention_qkv_roped: Callable = self_attention_qkv_roped
    rope: Callable = rope
    after_self_attention: Callable = after_self_attention
    inject_audio: Callable = inject_audio
    head: Callable = head

    def map(self, transform: Callable[[str, Callable], Callable]) -> "Regions":
        """Every region passed through ``transform(name, function)`` (e.g. a compiler)."""
        return Regions(**{f.name: transform(f.name, getattr(self, f.name)) for f in fields(self)})


EAGER = Regions()
