"""The causal Wan2.2-S2V-14B DiT (the release's ``CausalWanModel_S2V``, the reference's
``liveavatar/models/wan/causal_model_s2v.py``) as Live Avatar drives it.

Two calls make up a run:

* ``prefill_sink``: once per cond cache, at t = 0. Only condition tokens (the reference frame followed by
  the frame-packed motion latents) go through the blocks; their un-roped keys and values are kept.
* ``forward_block``: every denoising step of every block. Only the block's noisy tokens go through the
  blocks; they attend to themselves, to earlier blocks of the same step (the step's KV set) and to the
  condition tokens, whose keys are roped per call with the reference frame at its rolling position. It is
  split into ``prepare_block`` (host side: checks, rotations, cache positions) and ``run_block`` (tensor
  work only), so a compiler or a CUDA graph can take the second; the caller computes a request's text K/V
  (``text_kv``), a step's ``time_vectors`` and a block's ``audio_tokens`` once and passes them in.

The tensor work itself is `liveavatar.models.regions` (a model's ``regions``: eager, or compiled by
`liveavatar.runtime.compile`); what stays here is the glue between regions (the KV set's writes and the
keys/values it hands the attention over the KV window and the condition tokens), whose shapes follow the
KV window's fill. RoPE rotations come from per-axis tables (`GridRotation`): the block's and the reference
frame's grids per call, the motion tokens' once per sink prefill.

Precision follows the reference's bf16 run in any run dtype: the residual stream is float32 inside a block
and the run dtype between blocks; modulation, the timestep MLP and the head's linear are float32; norm1 and
the head's norm round their output to the run dtype; the cross-attention norm always sees (and returns)
bfloat16 values, and RoPE cos/sin are float16-rounded — also in float32 runs, because the reference
hard-codes both.

The model draws no random numbers and keeps no request state: the reference frame's RoPE offset
(``ref_rope_offset``, the reference's ``relative_dist``) comes from the caller.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from liveavatar.checkpoints.lora import merge_lora
from liveavatar.checkpoints.safetensors_io import checkpoint_files, checkpoint_shapes, load_into
from liveavatar.errors import CheckpointError
from liveavatar.models.attention import AttentionProjections, CrossAttention, attention
from liveavatar.models.quantised_attention import SelfAttention
from liveavatar.models.audio_injection import AudioInjector, CausalAudioEncoder
from liveavatar.models.regions import EAGER, Regions
from liveavatar.models.rope import GridRotation, condition_positions, rotation, rotation_dtype
from liveavatar.geometry import FRAMEPACK_BUCKETS

CONFIG_NAME = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
RUN_DTYPES = (torch.float32, torch.bfloat16)

# config.json switches of the release and the value this implementation requires; the first value is the
# reference class's default, which applies when the key is absent.
_REQUIRED_SWITCHES = {
    "enable_adain": (False, True),
    "adain_mode": ("attn_norm", "attn_norm"),
    "zero_timestep": (False, True),
    "enable_framepack": (False, True),
    "enable_motioner": (True, False),
    "add_last_motion": (True, True),
}


def _valid_config_value(key: str, value) -> bool:
    """config.json sizes are positive integers (eps a positive number), audio_inject_layers integers."""
    if key == "audio_inject_layers":
        return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    positive = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return positive if key == "eps" else positive and isinstance(value, int)


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes of the DiT. The defaults are the 14B release; ``from_dir`` reads a checkpoint folder."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    cond_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    audio_dim: int = 1024
    audio_layers: int = 25
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    eps: float = 1e-6

    # Fixed by the reference code, not by config.json.
    PATCH_SIZE: ClassVar[tuple[int, int, int]] = (1, 2, 2)
    REF_FRAME: ClassVar[int] = 30                 # sink RoPE frame of the reference tokens
    AUDIO_HISTORY_FRAMES: ClassVar[int] = 73      # copies of a block's first audio frame prepended to it
    AUDIO_HISTORY_LATENTS: ClassVar[int] = 19     # audio-encoder outputs those copies produce (dropped)
    AUDIO_FRAMES_PER_LATENT: ClassVar[int] = 4

    def __post_init__(self):
        # Injector slots are numbered in block order (what the reference's wiring yields for any list).
        object.__setattr__(self, "audio_inject_layers", tuple(sorted(int(i) for i in self.audio_inject_layers)))
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim={self.dim} does not split into num_heads={self.num_heads} heads of even width")
        if len(set(self.audio_inject_layers)) != len(self.audio_inject_layers) or not all(
                0 <= i < self.num_layers for i in self.audio_inject_layers):
            raise ValueError(f"audio_inject_layers={list(self.audio_inject_layers)} must be distinct block "
                             f"indices below num_layers={self.num_layers}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_outputs(self) -> int:
        """Numbers the head emits per token (one latent patch of out_dim channels)."""
        pf, ph, pw = self.PATCH_SIZE
        return pf * ph * pw * self.out_dim

    @classmethod
    def full_14b(cls) -> "TransformerConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "TransformerConfig":
        """A few-MB model for tests: the fixtures' tiny shapes (head.head not square) with a 48-wide text
        input and 32-wide audio input (the tiny umT5 / wav2vec2 widths)."""
        return cls(dim=96, ffn_dim=192, num_heads=3, num_layers=3, text_dim=48, audio_dim=32,
                   audio_inject_layers=(0, 2))

    @classmethod
    def from_dir(cls, ckpt_dir: str | Path) -> "TransformerConfig":
        """Read ``config.json``; widths the reference takes from the weights (text_dim — its loader
        ignores the config entry —, audio_dim, audio_layers, cond_dim) come from the tensor headers."""
        ckpt_dir = Path(ckpt_dir)
        config_path = ckpt_dir / CONFIG_NAME
        try:
            raw = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{config_path}: not found; pass the DiT checkpoint folder "
                                  f"(the one with {CONFIG_NAME} and {WEIGHTS_STEM}*.safetensors)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{config_path}: invalid JSON ({error})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{config_path}: not a JSON object; is this the Wan2.2-S2V config?")
        if raw.get("model_type", "s2v") != "s2v":
            raise CheckpointError(f"{config_path}: model_type {raw['model_type']!r} is not the S2V model")
        # Sizes before switches: a file that is not this config at all should not be blamed on a switch.
        missing = [key for key in ("dim", "ffn_dim", "num_heads", "num_layers", "audio_inject_layers")
                   if key not in raw]
        if missing:
            raise CheckpointError(f"{config_path}: missing {missing[0]!r}; is this the Wan2.2-S2V config?")
        values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        for key, value in values.items():
            if not _valid_config_value(key, value):
                kind = {"audio_inject_layers": "a list of block indices", "eps": "a positive number"}
                raise CheckpointError(f"{config_path}: {key}={value!r} is not {kind.get(key, 'a positive integer')}; "
                                      f"fix the value or re-download {CONFIG_NAME}")
        for key, (default, required) in _REQUIRED_SWITCHES.items():
            if key not in raw and default != required:
                raise CheckpointError(f"{config_path}: {key} is missing, and its default {default!r} is not supported "
                                      f"(the Live Avatar release sets {required!r})")
            if raw.get(key, default) != required:
                raise CheckpointError(f"{config_path}: {key}={raw[key]!r} is not supported "
                                      f"(the Live Avatar release uses {required!r})")
        shapes = checkpoint_shapes(checkpoint_files(ckpt_dir, WEIGHTS_STEM))
        from_weights = {
            "text_dim": ("text_embedding.0.weight", 1),
            "audio_dim": ("casual_audio_encoder.encoder.conv1_local.conv.weight", 1),
            "audio_layers": ("casual_audio_encoder.weights", 1),
            "cond_dim": ("cond_encoder.weight", 1),
        }
        for name, (key, axis) in from_weights.items():
            if key in shapes:
                values[name] = shapes[key][axis]
        try:
            return cls(**values)
        except ValueError as error:
            raise CheckpointError(f"{config_path}: {error}") from None

    def to_json_dict(self) -> dict:
        """config.json content in the release's (diffusers) layout."""
        values = asdict(self)
        values["audio_inject_layers"] = list(self.audio_inject_layers)
        return {
            "_class_name": "WanModel_S2V", "model_type": "s2v", **values,
            "patch_size": list(self.PATCH_SIZE), "window_size": [-1, -1], "qk_norm": True,
            "cross_attn_norm": True, "zero_init": True, "enable_tsm": False, "trainable_token_pos_emb": False,
            "motion_token_num": 1024, "framepack_drop_mode": "padd",
            **{key: required for key, (_, required) in _REQUIRED_SWITCHES.items()},
        }


TextKV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per-layer cross-attention keys and values of a request's text."""


class TimeVectors(NamedTuple):
    """A timestep's embedding [dim] (the head's modulation) and block modulation base [6, dim], float32."""

    embedding: torch.Tensor
    modulation: torch.Tensor


class AudioTokens(NamedTuple):
    """A block's audio: per-latent-frame tokens [f, num_audio_token+1, dim] and pooled vectors [f, dim]
    (the reference's audio_emb_local and audio_emb_global)."""

    local: torch.Tensor
    pooled: torch.Tensor


class BlockInputs(NamedTuple):
    """What `prepare_block` computes on the host side of a forward: the (cos, sin) rotations of the
    block's tokens and of the condition keys."""

    block_rotation: tuple[torch.Tensor, torch.Tensor]
    cond_rotation: tuple[torch.Tensor, torch.Tensor]


class KVStore(Protocol):
    """What the model needs of a denoising step's KV set (`liveavatar.runtime.caches`): ``reserve`` and
    ``sync_cond`` on the host side of a forward, ``attention_inputs`` in its tensor work — which stores the
    block's roped k, v and returns the self-attention's keys and values over the window and the cond rows
    (cond keys roped by ``cond_rotation`` with ``rope``), whether the store concatenates them or holds them
    side by side."""

    def reserve(self, start_token: int, tokens: int) -> None: ...
    def sync_cond(self, cond: "CondStore", motion_rotation: tuple[torch.Tensor, torch.Tensor]) -> None: ...
    def attention_inputs(self, layer: int, k: torch.Tensor, v: torch.Tensor, cond: "CondStore",
                         cond_rotation: tuple[torch.Tensor, torch.Tensor],
                         rope: Callable) -> tuple[torch.Tensor, torch.Tensor]: ...


class CondStore(Protocol):
    """What the model needs of the sink's cond cache (`liveavatar.runtime.caches`)."""

    length: int
    positions: torch.Tensor | None
    ref_tokens: int
    latent_hw: tuple[int, int] | None
    version: int  # bumped by every prefill

    def begin(self, positions: torch.Tensor, ref_tokens: int, latent_hw: tuple[int, int]) -> None: ...
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, roped_k: torch.Tensor) -> None: ...
    def entries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def _fp32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer evaluated in float32 whatever its stored dtype (the reference's float32 autocast)."""
    return F.linear(x.float(), layer.weight.float(), layer.bias.float())


class TransformerBlock(nn.Module):
    """One DiT block; its tensor work is `liveavatar.models.regions` (self_attention_qkv*, after_self_attention)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.eps = config.eps
        self.modulation = nn.Parameter(torch.zeros(1, 6, config.dim))
        self.self_attn = AttentionProjections(config.dim, config.num_heads, config.eps)
        self.norm3 = nn.LayerNorm(config.dim, eps=config.eps)
        self.cross_attn = CrossAttention(config.dim, config.num_heads, config.eps)
        self.ffn = nn.Sequential(nn.Linear(config.dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, config.dim))

    def forward(self, x: torch.Tensor, time_modulation: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor],
                text_kv: tuple[torch.Tensor, torch.Tensor], regions: Regions) -> torch.Tensor:
        """x [1, L, dim] in the run dtype; time_modulation [6, dim] float32 (the same for every token);
        ``attend(x)`` computes the block's self-attention output [1, L, heads, head_dim] (q/k/v through
        ``regions``, RoPE, caches). Called as a module so that hooks (layer and cache streaming) see the
        block start."""
        return regions.after_self_attention(self, x, attend(x), time_modulation, *text_kv)


class Head(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.eps = config.eps
        self.modulation = nn.Parameter(torch.zeros(1, 2, config.dim))
        self.head = nn.Linear(config.dim, config.patch_outputs)

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor, regions: Regions) -> torch.Tensor:
        return regions.head(self, x, time_embedding)


class FramePacker(nn.Module):
    """Motion latents as tokens: the newest latent at full patch resolution (``proj``), the two before it
    2x coarser in time and space (``proj_2x``), the 16 before those 4x coarser (``proj_4x``)."""

    def __init__(self, dim: int, in_dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_dim, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_dim, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        """motion [1, C, T, h, w] -> tokens [1, M, dim], newest group first."""
        buckets = FRAMEPACK_BUCKETS
        frames = sum(buckets)
        kept = min(frames, motion.shape[2])
        padded = motion.new_zeros(*motion.shape[:2], frames, *motion.shape[3:])
        padded[:, :, frames - kept:] = motion[:, :, motion.shape[2] - kept:]
        oldest, middle, newest = padded.split(list(reversed(buckets)), dim=2)
        groups = [self.proj(newest), self.proj_2x(middle), self.proj_4x(oldest)]
        return torch.cat([g.flatten(2).transpose(1, 2) for g in groups], dim=1)


class CausalS2VTransformer(nn.Module):
    """The DiT with the release's parameter names (1260 tensors, 16,295,755,609 parameters at 14B)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        c = config
        patch = c.PATCH_SIZE
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=patch, stride=patch)
        self.cond_encoder = nn.Conv3d(c.cond_dim, c.dim, kernel_size=patch, stride=patch)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.trainable_cond_mask = nn.Embedding(3, c.dim)  # rows: 0 noisy, 1 reference, 2 motion tokens
        self.frame_packer = FramePacker(c.dim, c.in_dim)
        self.blocks = nn.ModuleList(TransformerBlock(c) for _ in range(c.num_layers))
        self.head = Head(c)
        self.casual_audio_encoder = CausalAudioEncoder(c.audio_dim, c.dim, c.num_audio_token, c.audio_layers)
        self.audio_injector = AudioInjector(c.dim, c.num_heads, len(c.audio_inject_layers), c.eps)
        self._injector_slot = {layer: slot for slot, layer in enumerate(c.audio_inject_layers)}
        # The functions the tensor work runs through; `liveavatar.runtime.compile` swaps in compiled ones.
        self.regions: Regions = EAGER
        # The blocks' self-attention over the KV window and the condition tokens (the engine sets the one a
        # request asked for: `liveavatar.models.quantised_attention`); the sink prefill's stays exact.
        self.self_attention: SelfAttention = SelfAttention()
        self._grid_rotation: GridRotation | None = None
        self._motion_rotation: tuple | None = None  # (cond positions it was made for, cos, sin)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # ------------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | Path, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16, lora: str | Path | None = None,
                        lora_alpha: float | None = None) -> "CausalS2VTransformer":
        """Build the model from a checkpoint folder (sharded safetensors with an index, or one file),
        each tensor streamed to ``device`` in ``dtype``; then merge ``lora`` (see ``merge_lora``)."""
        if dtype not in RUN_DTYPES:
            raise ValueError(f"dtype {dtype} is not supported; use torch.bfloat16 or torch.float32")
        config = TransformerConfig.from_dir(ckpt_dir)
        with torch.device("meta"):
            model = cls(config)
        load_into(model, checkpoint_files(Path(ckpt_dir), WEIGHTS_STEM), device=device, dtype=dtype,
                  source=str(ckpt_dir))
        if lora is not None:
            merge_lora(model, lora, alpha=lora_alpha)
        return model.eval().requires_grad_(False)

    # ------------------------------------------------------------------------------------------------
    # per request and per step: computed once by the caller, passed to every forward

    @torch.no_grad()
    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Text encoder output [L_txt, text_dim] -> cross-attention context [1, text_len, dim].

        The context is zero-padded to text_len rows first; the padding rows are attended too.
        """
        c = self.config
        if context.ndim != 2 or context.shape[1] != c.text_dim:
            raise ValueError(f"text context must be [tokens, {c.text_dim}], got {list(context.shape)}; "
                             f"does the text encoder match this DiT?")
        if context.shape[0] > c.text_len:
            raise ValueError(f"text context has {context.shape[0]} tokens, more than text_len={c.text_len}")
        padded = torch.zeros(1, c.text_len, c.text_dim, device=self.device, dtype=self.dtype)
        padded[0, :context.shape[0]] = context
        return self.text_embedding(padded)

    @torch.no_grad()
    def text_kv(self, text: torch.Tensor) -> TextKV:
        """Per-layer text cross-attention keys/values of a request (every forward of it reuses them).

        ``text`` is the output of ``embed_text`` [1, text_len, dim] or a raw encoder output [L, text_dim].
        """
        context = self.embed_text(text) if text.ndim == 2 else text.to(self.device, self.dtype)
        if tuple(context.shape) != (1, self.config.text_len, self.config.dim):
            raise ValueError(f"text must come from embed_text ([1, {self.config.text_len}, {self.config.dim}]), "
                             f"got {list(context.shape)}")
        return [block.cross_attn.context_kv(context) for block in self.blocks]

    @torch.no_grad()
    def time_vectors(self, timestep: float) -> TimeVectors:
        """Timestep embedding e [dim] (for the head) and block modulation base e0 [6, dim], float32."""
        c = self.config
        # The reference feeds the timestep as a float32 tensor and embeds it in float64.
        position = torch.tensor([float(timestep)], dtype=torch.float32, device=self.device).double()
        half = c.freq_dim // 2
        frequencies = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=self.device).div(half))
        angles = torch.outer(position, frequencies)
        sinusoid = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()
        e = _fp32_linear(self.time_embedding[2], F.silu(_fp32_linear(self.time_embedding[0], sinusoid)))
        e0 = _fp32_linear(self.time_projection[1], F.silu(e)).unflatten(1, (6, c.dim))
        return TimeVectors(e[0], e0[0])

    @torch.no_grad()
    def audio_tokens(self, audio: torch.Tensor) -> AudioTokens:
        """A block's audio [1, 25, audio_dim, 4f] -> per latent frame: local tokens [f, num_audio_token+1,
        dim] and the global vector [f, dim] (the same for every denoising step of the block).

        The block's audio is prefixed with copies of its own first frame (no history crosses blocks), and
        the encoder outputs those copies produce are dropped.
        """
        c = self.config
        if audio.ndim != 4 or audio.shape[:3] != (1, c.audio_layers, c.audio_dim) \
                or audio.shape[3] % c.AUDIO_FRAMES_PER_LATENT:
            raise ValueError(f"audio must be [1, {c.audio_layers}, {c.audio_dim}, 4*frames], got {list(audio.shape)}")
        audio = audio.to(self.device, self.dtype)
        history = audio[..., :1].expand(-1, -1, -1, c.AUDIO_HISTORY_FRAMES)
        audio_global, audio_local = self.casual_audio_encoder(torch.cat([history, audio], dim=-1))
        audio_global = audio_global[0, c.AUDIO_HISTORY_LATENTS:, 0].to(self.dtype)
        audio_local = audio_local[0, c.AUDIO_HISTORY_LATENTS:].to(self.dtype)
        return AudioTokens(audio_local, audio_global)

    def _rotation(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotation(positions.to(self.device), self.config.head_dim, rotation_dtype(self.dtype))

    def _grid(self) -> GridRotation:
        grid = self._grid_rotation
        if grid is None or (grid.dtype, grid.device) != (rotation_dtype(self.dtype), self.device):
            grid = self._grid_rotation = GridRotation(self.config.head_dim, rotation_dtype(self.dtype), self.device)
        return grid

    def _patchify(self, conv: nn.Conv3d, latents: torch.Tensor) -> torch.Tensor:
        """[1, C, f, h, w] latents -> [1, f*(h/2)*(w/2), dim] tokens in frame, row, column order."""
        return conv(latents.to(self.device, self.dtype)).flatten(2).transpose(1, 2)

    def _run_blocks(self, x: torch.Tensor, time_modulation: torch.Tensor, attend: Callable[..., torch.Tensor],
                    text_kv: TextKV, audio: AudioTokens | None) -> torch.Tensor:
        """The blocks (and the audio injectors after theirs); ``attend(layer, block, x)`` is a block's
        self-attention output."""
        regions, injectors = self.regions, self.audio_injector
        for index, block in enumerate(self.blocks):
            x = block(x, time_modulation, partial(attend, index, block), text_kv[index], regions)
            if audio is not None and index in self._injector_slot:
                slot = self._injector_slot[index]
                x = regions.inject_audio(injectors.injector[slot], injectors.injector_adain_layers[slot], x,
                                         audio.local, audio.pooled)
        return x

    # ------------------------------------------------------------------------------------------------
    # the two calls

    @torch.no_grad()
    def prefill_sink(self, cond_cache: CondStore, text_kv: TextKV, ref_latents: torch.Tensor,
                     motion_latents: torch.Tensor) -> None:
        """The t = 0 sink call: run the condition tokens and store their K (un-roped, and roped at the sink
        positions for a store that keeps roped rows) and V per layer.

        ref_latents [1, 16, 1, h, w]; motion_latents [1, 16, T, h, w] (only the last 19 frames are used,
        zero-padded in front when fewer).
        """
        c = self.config
        if ref_latents.ndim != 5 or ref_latents.shape[:3] != (1, c.in_dim, 1):
            raise ValueError(f"ref_latents must be [1, {c.in_dim}, 1, h, w], got {list(ref_latents.shape)}")
        latent_hw = tuple(ref_latents.shape[3:])
        if latent_hw[0] % 2 or latent_hw[1] % 2:
            raise ValueError(f"latent size {latent_hw[0]}x{latent_hw[1]} must be even (2x2 patches); "
                             f"use a video size that is a multiple of 16 pixels")
        if motion_latents.ndim != 5 or motion_latents.shape[:2] != (1, c.in_dim) \
                or tuple(motion_latents.shape[3:]) != latent_hw:
            raise ValueError(f"motion_latents must be [1, {c.in_dim}, T, {latent_hw[0]}, {latent_hw[1]}], "
                             f"got {list(motion_latents.shape)}")

        mask = self.trainable_cond_mask.weight
        ref_tokens = self._patchify(self.patch_embedding, ref_latents)
        motion_tokens = self.frame_packer(motion_latents.to(self.device, self.dtype))
        x = torch.cat([ref_tokens + mask[1], motion_tokens + mask[2]], dim=1)
        positions = condition_positions(*latent_hw, ref_frame=c.REF_FRAME, buckets=FRAMEPACK_BUCKETS)
        cond_cache.begin(positions.to(self.device), ref_tokens.shape[1], latent_hw)
        cos, sin = self._rotation(positions)
        modulation, regions = self.time_vectors(0.0).modulation, self.regions

        def attend(layer: int, block: TransformerBlock, x: torch.Tensor) -> torch.Tensor:
            q, k, v = regions.self_attention_qkv(block, x, modulation)
            roped_k = regions.rope(k, cos, sin)
            cond_cache.write(layer, k, v, roped_k)
            return attention(regions.rope(q, cos, sin), roped_k, v)

        self._run_blocks(x, modulation, attend, text_kv, audio=None)

    def prepare_block(self, x: torch.Tensor, audio: AudioTokens, kv_cache: KVStore, cond_cache: CondStore, *,
                      start_frame: int, ref_rope_offset: int) -> BlockInputs:
        """The host side of a forward: checks, RoPE rotations of the block and of the condition keys (the
        reference frame sits at frame max(30, start_frame + ref_rope_offset), the reference's
        relative_dist rule), and the KV ring positions (reserved in ``kv_cache``)."""
        c = self.config
        if x.ndim != 4 or x.shape[0] != c.in_dim:
            raise ValueError(f"x must be [{c.in_dim}, frames, h, w], got {list(x.shape)}")
        frames, latent_h, latent_w = x.shape[1:]
        if cond_cache.length == 0:
            raise ValueError("the cond cache is empty: call prefill_sink before forward_block")
        if cond_cache.latent_hw != (latent_h, latent_w):
            raise ValueError(f"block latents are {latent_h}x{latent_w} but the sink was prefilled for "
                             f"{cond_cache.latent_hw[0]}x{cond_cache.latent_hw[1]}")
        if audio.local.shape[0] != frames:
            raise ValueError(f"audio for {audio.local.shape[0]} latent frames does not drive a {frames}-frame "
                             f"block (audio must be [1, {c.audio_layers}, {c.audio_dim}, {4 * frames}])")
        if start_frame < 0:
            raise ValueError(f"start_frame must be >= 0, got {start_frame}")
        rows, cols = latent_h // 2, latent_w // 2
        kv_cache.reserve(start_frame * rows * cols, frames * rows * cols)
        grid = self._grid()
        # The reference frame's tokens are its full grid at one (rolling) frame, the motion tokens never move.
        ref_frame = c.REF_FRAME + max(0, start_frame - (c.REF_FRAME - ref_rope_offset))
        ref_cos, ref_sin = grid(ref_frame, 1, rows, cols)
        motion_cos, motion_sin = self._motion_rotations(cond_cache)
        kv_cache.sync_cond(cond_cache, (motion_cos, motion_sin))
        return BlockInputs(grid(start_frame, frames, rows, cols),
                           (torch.cat([ref_cos, motion_cos]), torch.cat([ref_sin, motion_sin])))

    def _motion_rotations(self, cond_cache: CondStore) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotations of the motion tokens of a prefilled sink, computed once per prefill."""
        positions = cond_cache.positions
        if self._motion_rotation is None or self._motion_rotation[0] is not positions:
            self._motion_rotation = (positions, *self._rotation(positions[cond_cache.ref_tokens:]))
        return self._motion_rotation[1:]

    @torch.no_grad()
    def run_block(self, x: torch.Tensor, time: TimeVectors, text_kv: TextKV, audio: AudioTokens,
                  kv_cache: KVStore, cond_cache: CondStore, inputs: BlockInputs,
                  cond_states: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor work of a forward (`prepare_block` did the rest): noisy latents x [16, f, h, w] ->
        flow velocity [16, f, h, w] in the model dtype. Shapes are fixed by the clip size and the KV fill;
        no host-side decision is taken here. cond_states [16, f, h, w] are pose latents (None: zeros)."""
        c = self.config
        frames, latent_h, latent_w = x.shape[1:]
        tokens = self._patchify(self.patch_embedding, x[None])
        if cond_states is None:  # the encoder of all-zero pose latents yields exactly its bias
            tokens = tokens + self.cond_encoder.bias
        else:
            if cond_states.shape != x.shape:
                raise ValueError(f"cond_states must have the shape of x {list(x.shape)}, got {list(cond_states.shape)}")
            tokens = tokens + self._patchify(self.cond_encoder, cond_states[None])
        tokens = tokens + self.trainable_cond_mask.weight[0]

        regions, modulation, self_attention = self.regions, time.modulation, self.self_attention

        def attend(layer: int, block: TransformerBlock, x: torch.Tensor) -> torch.Tensor:
            q, k, v = regions.self_attention_qkv_roped(block, x, modulation, *inputs.block_rotation)
            keys, values = kv_cache.attention_inputs(layer, k, v, cond_cache, inputs.cond_rotation, regions.rope)
            return self_attention(q, keys, values)

        hidden = self._run_blocks(tokens, modulation, attend, text_kv, audio=audio)
        out = self.head(hidden, time.embedding, regions)[0]
        # Unpatchify: token (t, y, x) holds its (pt, ph, pw, channel) patch values, channel fastest.
        pf, ph, pw = c.PATCH_SIZE
        rows, cols = latent_h // ph, latent_w // pw
        out = out.view(frames, rows, cols, pf, ph, pw, c.out_dim).permute(6, 0, 3, 1, 4, 2, 5)
        return out.reshape(c.out_dim, frames * pf, rows * ph, cols * pw)

    @torch.no_grad()
    def forward_block(self, x: torch.Tensor, timestep: float, text_kv: TextKV, audio: torch.Tensor,
                      kv_cache: KVStore, cond_cache: CondStore, *, start_frame: int, ref_rope_offset: int,
                      cond_states: torch.Tensor | None = None) -> torch.Tensor:
        """One forward from raw inputs (`time_vectors`, `audio_tokens`, `prepare_block`, `run_block`):
        x [16, f, h, w] noisy latents at ``timestep`` (0..1000), audio [1, 25, audio_dim, 4f] wav2vec2
        features of the block's video frames, start_frame the block's absolute latent-frame index."""
        audio_tokens = self.audio_tokens(audio)
        inputs = self.prepare_block(x, audio_tokens, kv_cache, cond_cache, start_frame=start_frame,
                                    ref_rope_offset=ref_rope_offset)
        return self.run_block(x, self.time_vectors(timestep), text_kv, audio_tokens, kv_cache, cond_cache, inputs,
                              cond_states)
