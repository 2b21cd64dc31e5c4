"""Wan 2.1 causal video VAE (``Wan2.1_VAE.pth``) with streaming encode and decode.

Geometry: 3 pixel channels <-> 16 latent channels, x8 in height and width, x4 in time with a causal
first frame (T = 1 + 4k pixel frames <-> 1 + k latent frames).

Every temporal convolution is causal: it sees zero padding before the first frame and nothing after
the current one. The reference feeds the encoder chunks of 1, 4, 4, ... pixel frames and the decoder
one latent frame at a time, carrying for every causal convolution the last frames of its input
between calls. Here that carried state is a `StreamState` (module -> tensor of at most 2 frames), owned
by a ``StreamingDecoder`` / ``StreamingEncoder``; a whole ``decode`` / ``encode`` is one such stream
started fresh. The state never grows, so a stream can run forever in constant memory. Once every causal
module of a decoder stream holds its full history (after its first three latent frames), the stream is steady:
`FixedStreamState` holds the same frames in fixed buffers updated in place, so the fast path can run each
latent frame as one compiled, graph-captured step (``WanVAE.steady_decoder``,
`liveavatar.runtime.decoding`).

Precision follows the reference: weights in the run dtype and, when that is not float32, every call
under ``torch.autocast`` (convolutions in bf16, the normalisations and the nearest upsampling in
float32). The latent mean, std and 1/std are tensors of the run dtype, so in a bf16 run 1/std is
computed in bf16, as in LiveAvatar. Encode returns float32 latents; decode returns float32 frames
clamped to [-1, 1].
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Per-channel latent statistics, hard-coded in the reference wrapper (not stored in the checkpoint).
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


class StreamState:
    """The carried state of a stream as it grows: per causal module, the last input frames it needs,
    and which temporal upsamplers have seen their first frame."""

    def __init__(self):
        self.frames: dict[nn.Module, torch.Tensor] = {}
        self.started: set[nn.Module] = set()

    def carry(self, module: nn.Module, x: torch.Tensor, keep: int) -> tuple[torch.Tensor, int]:
        """``x`` with ``module``'s carried frames in front, and how many of the ``keep`` frames it needs in
        front are still missing (a stream's start); remembers the last ``keep`` frames for the next call."""
        previous = self.frames.get(module)
        if previous is not None:
            x = torch.cat([previous, x], dim=2)
        self.frames[module] = x[:, :, -keep:].clone()
        return x, keep - (0 if previous is None else previous.shape[2])

    def start(self, module: nn.Module) -> bool:
        """Whether ``module`` has run before in this stream; marks it as having run."""
        seen = module in self.started
        self.started.add(module)
        return seen

    def settled(self, model: nn.Module) -> bool:
        """True once every causal module of ``model`` holds its full history: from here on a call has the
        same shapes and branches every time (`FixedStreamState`)."""
        for module in model.modules():
            if isinstance(module, CausalConv3d) and module.time_padding:
                cached = self.frames.get(module)
                if cached is None or cached.shape[2] != module.time_padding:
                    return False
            elif isinstance(module, Upsample) and module.temporal and module not in self.started:
                return False
        return True


class FixedStreamState:
    """A settled decoder stream's state in fixed buffers, each updated in place (`StreamState`'s steady
    form): a step reads and writes the same memory with the same shapes every time, so one compiled
    graph with no breaks serves every step of every stream of a size, and a CUDA graph can replay it."""

    def __init__(self, settled: StreamState, memory_format: torch.memory_format = torch.contiguous_format):
        self.buffers = {module: frames.clone(memory_format=memory_format)
                        for module, frames in settled.frames.items()}

    def load(self, settled: StreamState) -> None:
        """Take over another settled stream of the same size (the buffers keep their addresses)."""
        for module, buffer in self.buffers.items():
            buffer.copy_(settled.frames[module])

    def carry(self, module: nn.Module, x: torch.Tensor, keep: int) -> tuple[torch.Tensor, int]:
        buffer = self.buffers[module]
        x = torch.cat([buffer, x], dim=2)
        buffer.copy_(x[:, :, -keep:])
        return x, 0

    def start(self, module: nn.Module) -> bool:
        return True


@dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> "VAEConfig":
        """Reads the widths and the level layout off the encoder's weights (real: base 96, tiny: 8)."""
        try:
            base_dim = state_dict["encoder.conv1.weight"].shape[0]
            z_dim = state_dict["conv2.weight"].shape[0]
        except KeyError as missing:
            raise ValueError(f"{source}: not a Wan 2.1 VAE state dict (no {missing.args[0]!r} key)") from None
        if z_dim != len(LATENT_MEAN):
            raise ValueError(f"{source}: latent width {z_dim}, but the Wan 2.1 latent statistics have {len(LATENT_MEAN)}")
        indices = sorted({int(key.split(".")[2]) for key in state_dict
                          if key.startswith("encoder.downsamples.") and key.split(".")[2].isdigit()})
        levels: list[list[int]] = [[]]
        temporal: list[bool] = []
        for index in indices:
            prefix = f"encoder.downsamples.{index}."
            if prefix + "residual.2.weight" in state_dict:
                levels[-1].append(state_dict[prefix + "residual.2.weight"].shape[0])
            elif prefix + "resample.1.weight" in state_dict:
                temporal.append(prefix + "time_conv.weight" in state_dict)
                levels.append([])
            else:
                raise ValueError(f"{source}: unexpected Wan 2.1 VAE encoder block {prefix[:-1]!r}")
        num_res_blocks = len(levels[0])
        if (num_res_blocks == 0 or any(len(level) != num_res_blocks for level in levels)
                or any(width % base_dim for level in levels for width in level)):
            raise ValueError(f"{source}: inconsistent Wan 2.1 VAE encoder layout")
        return cls(base_dim=base_dim, z_dim=z_dim, dim_mult=tuple(level[0] // base_dim for level in levels),
                   num_res_blocks=num_res_blocks, temporal_downsample=tuple(temporal))


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Applies a 2-D module to every frame of [b, c, t, h, w]."""
    b, c, t, h, w = x.shape
    y = module(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


class CausalConv3d(nn.Conv3d):
    """Conv3d with all temporal padding in front (zeros, or the previous frames carried in ``state``).

    Feeding a sequence in pieces with one ``state`` gives the same output as feeding it at once.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size, padding=0):
        super().__init__(in_dim, out_dim, kernel_size)
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_padding = 2 * pad_t
        self.spatial_padding = (pad_w, pad_w, pad_h, pad_h)

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        front = self.time_padding
        if state is not None and front > 0:
            # Caching in the dtype the conv computes in (bf16 under autocast) changes no value and
            # halves the state, as most conv inputs are float32 norm outputs.
            x, front = state.carry(self, x.to(_compute_dtype(x, self.weight)), front)
        return super().forward(F.pad(x, (*self.spatial_padding, front, 0)))


class RMSNorm(nn.Module):
    """L2-normalises the channel vector of every position, times sqrt(C) and a learned gain."""

    def __init__(self, dim: int, spatial_dims: int = 3):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Indices 0..6 are the checkpoint's ("residual.2.weight", ...); index 5 was a training-only dropout.
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        shortcut = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, state) if isinstance(layer, CausalConv3d) else layer(x)
        return x + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention over the positions of each frame (no temporal state)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, c * 3, h * w).transpose(2, 3).contiguous()
        out = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        return _per_frame(self._attend, x) + x


class Downsample(nn.Module):
    """x2 spatial downsampling; the temporal variant also halves the frame rate after the first frame."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if temporal:
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        x = _per_frame(self.resample, x)
        if not self.temporal:
            return x
        x, missing = state.carry(self, x, 1)
        if missing:  # the causal first frame keeps its own latent frame
            return x
        return self.time_conv(x)


class _NearestUpsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nearest-exact has no bf16 kernel everywhere; the reference runs it in float32 too.
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Upsample(nn.Module):
    """x2 spatial upsampling halving the channels; the temporal variant doubles the frame rate.

    The first frame of a stream skips the time conv (it stays one frame, the causal first frame);
    the time conv then runs causally over the following frames as if the stream began after it.
    """

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.resample = nn.Sequential(_NearestUpsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        if temporal:
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        if self.temporal and state.start(self):
            b, c, t, h, w = x.shape
            # Output channels [0:c] and [c:2c] are the two frames each input frame becomes.
            x = self.time_conv(x, state).reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5)
            x = x.reshape(b, c, t * 2, h, w)
        return _per_frame(self.resample, x)


class Encoder3d(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(config.dim_mult) - 1:
                blocks.append(Downsample(out_dim, config.temporal_downsample[level]))
        self.downsamples = nn.ModuleList(blocks)
        self.middle = nn.ModuleList([ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                     ResidualBlock(dims[-1], dims[-1])])
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], config.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        """One chunk of pixel frames (1 for the first chunk of a stream, then 4) -> one latent frame."""
        x = self.conv1(x, state)
        for block in (*self.downsamples, *self.middle):
            x = block(x, state)
        norm, act, conv = self.head
        return conv(act(norm(x)), state)


class Decoder3d(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        mult = config.dim_mult
        dims = [config.base_dim * m for m in (mult[-1], *reversed(mult))]
        temporal_upsample = config.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = nn.ModuleList([ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                     ResidualBlock(dims[0], dims[0])])
        blocks: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if level > 0:  # the previous level's upsample halved the channels
                in_dim //= 2
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(mult) - 1:
                blocks.append(Upsample(out_dim, temporal_upsample[level]))
        self.upsamples = nn.ModuleList(blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        """One latent frame -> 1 pixel frame (first of a stream) or ``temporal_factor`` frames."""
        x = self.conv1(x, state)
        for block in (*self.middle, *self.upsamples):
            x = block(x, state)
        norm, act, conv = self.head
        return conv(act(norm(x)), state)


class WanVAE(nn.Module):
    """The Wan 2.1 VAE; parameter names are those of ``Wan2.1_VAE.pth``.

    ``steady_decoder``: None (every decode runs eagerly), or the fast path's runner of settled decoder
    streams (`liveavatar.runtime.decoding.SteadyDecoder`): ``start(state, latent_shape)`` returns a step
    ``z -> frames`` that continues a settled `StreamState`."""

    steady_decoder = None
    _latent_stats = None

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "WanVAE":
        """Loads ``Wan2.1_VAE.pth`` (or a tiny one); the architecture widths come from the weights."""
        path = Path(path)
        state_dict = _read_state_dict(path)
        config = VAEConfig.from_state_dict(state_dict, source=str(path))
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        missing = [key for key in expected if key not in state_dict]
        unexpected = [key for key in state_dict if key not in expected]
        if missing or unexpected:
            raise ValueError(f"{path}: not a Wan 2.1 VAE state dict ({len(missing)} missing keys, e.g. "
                             f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
        for key, tensor in expected.items():
            if state_dict[key].shape != tensor.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(state_dict[key].shape)}, "
                                 f"expected {tuple(tensor.shape)} for a Wan 2.1 VAE of width {config.base_dim}")
        model.load_state_dict(state_dict, assign=True)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    def run_precision(self) -> AbstractContextManager:
        """The reference's ``autocast(param_dtype)``: a no-op for float32 weights."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) as [1, z, 1, 1, 1] tensors of the run dtype; 1/std is taken in that dtype. Made once
        per device and dtype: a host-to-device copy per call would break a CUDA-graph capture."""
        key = (self.device, self.dtype)
        if self._latent_stats is None or self._latent_stats[0] != key:
            shape = (1, self.config.z_dim, 1, 1, 1)
            mean = torch.tensor(LATENT_MEAN, dtype=self.dtype, device=self.device).view(shape)
            inv_std = 1.0 / torch.tensor(LATENT_STD, dtype=self.dtype, device=self.device).view(shape)
            self._latent_stats = (key, mean, inv_std)
        return self._latent_stats[1:]

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [b, 3, 1 + 4k, H, W] in [-1, 1] -> normalised latents [b, z, 1 + k, H/8, W/8] float32."""
        return self.stream_encoder().encode(video)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [b, z, L, h, w] -> frames [b, 3, 1 + 4(L-1), 8h, 8w] float32 in [-1, 1]."""
        return self.stream_decoder().decode(z)

    def stream_encoder(self) -> "StreamingEncoder":
        return StreamingEncoder(self)

    def stream_decoder(self) -> "StreamingDecoder":
        return StreamingDecoder(self)


class StreamingEncoder:
    """Encodes a video arriving in pieces: first 1 + 4k frames, then multiples of 4.

    The latents of all pieces together equal ``vae.encode`` of the whole video.
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.state = StreamState()
        self.frames_seen = 0

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        vae, config = self.vae, self.vae.config
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [batch, 3, frames, height, width], got {tuple(video.shape)}")
        frames, height, width = video.shape[2:]
        factor, step = config.spatial_factor, config.temporal_factor
        if height % factor or width % factor:
            raise ValueError(f"video height and width must be multiples of {factor}, got {height}x{width}")
        first = 1 if self.frames_seen == 0 else 0
        if frames < first or (frames - first) % step:
            expected = f"1 + {step}k" if first else f"a multiple of {step}"
            raise ValueError(f"video piece has {frames} frames; this call needs {expected} frames")
        # The first layer is a conv, which autocast would cast the input for anyway.
        video = video.to(vae.device, vae.dtype)
        starts = ([0] if first else []) + list(range(first, frames, step))
        with vae.run_precision():
            out = torch.cat([vae.encoder(video[:, :, start:start + (1 if start < first else step)], self.state)
                             for start in starts], dim=2)
            mu = vae.conv1(out)[:, :config.z_dim]
            mean, inv_std = vae.latent_stats()
            latents = (mu - mean) * inv_std
        self.frames_seen += frames
        return latents.float()


class StreamingDecoder:
    """Decodes a latent stream block by block with the causal caches carried between calls.

    The frames of all calls together equal ``vae.decode`` of the concatenated latents. The carried
    state is at most 2 frames per causal conv, so memory does not depend on how much came before.
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.state = StreamState()
        self.steady = None  # the fast path's step, once the stream has settled

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        if z.ndim != 5 or z.shape[1] != vae.config.z_dim:
            raise ValueError(f"latents must be [batch, {vae.config.z_dim}, frames, h, w], got {tuple(z.shape)}")
        z = z.to(vae.device)
        return torch.cat([self._decode_frame(z[:, :, i:i + 1]) for i in range(z.shape[2])], dim=2)

    def _decode_frame(self, z: torch.Tensor) -> torch.Tensor:
        if self.steady is None and self.vae.steady_decoder is not None and self.state.settled(self.vae.decoder):
            self.steady = self.vae.steady_decoder.start(self.state, z.shape)
            self.state.frames.clear()  # the fixed buffers hold it from here on
        if self.steady is not None:
            return self.steady(z)
        return decode_latent_frame(self.vae, z, self.state)

    def state_nbytes(self) -> int:
        """Bytes held by the eager stream's carried causal state (constant once every module has seen two
        frames; 0 once the fast path's fixed buffers carry it)."""
        return sum(t.untyped_storage().nbytes() for t in self.state.frames.values())


def decode_latent_frame(vae: WanVAE, z: torch.Tensor, state: StreamState | FixedStreamState) -> torch.Tensor:
    """One normalised latent frame [b, z, 1, h, w] -> its pixel frames [b, 3, 1 or 4, 8h, 8w] float32 in
    [-1, 1], continuing ``state``. With a `FixedStreamState` this is the fast path's compiled step."""
    with vae.run_precision():
        mean, inv_std = vae.latent_stats()
        x = vae.conv2((z / inv_std + mean).to(_compute_dtype(z, vae.conv2.weight)))
        return vae.decoder(x, state).float().clamp(-1, 1)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"VAE checkpoint not found: {path} (expected Wan2.1_VAE.pth in the checkpoint folder)")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails on damaged files with many exception types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: cannot read the VAE checkpoint ({reason}); the file is corrupt or "
                         f"truncated, download Wan2.1_VAE.pth again") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: not a Wan 2.1 VAE checkpoint (expected a state dict of tensors, "
                         f"got {type(state_dict).__name__})")
    return state_dict


def save_tiny_vae(path: str | Path, *, seed: int = 0, base_dim: int = 8) -> Path:
    """Writes a seeded random VAE of width ``base_dim`` in the official key layout (``torch.save``).

    Matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.05^2), norm gains ~ 1 + N(0, 0.1^2), so that every
    parameter influences the output.
    """
    path = Path(path)
    with torch.device("meta"):
        shapes = {key: t.shape for key, t in WanVAE(VAEConfig(base_dim=base_dim)).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if key.endswith(".gamma"):
            state_dict[key] = 1 + 0.1 * noise
        elif key.endswith(".bias"):
            state_dict[key] = 0.05 * noise
        else:
            state_dict[key] = noise / math.sqrt(math.prod(shape[1:]))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)
    return path
