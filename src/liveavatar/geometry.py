"""Every number a run derives from its size and length, in one place that imports nothing of the project.

Rates (video 25 fps, audio 16 kHz, wav2vec2 50 Hz resampled to 30 Hz), the VAE's strides, the block and
clip structure of the causal pipeline, the reference's size search and its clip count, and `ClipGeometry`,
which turns (height, width, frames per clip) into latents, tokens and blocks. Where the reference uses
another name for a quantity, the comment says which.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

FPS = 25
AUDIO_SAMPLE_RATE = 16_000
SAMPLES_PER_FRAME = AUDIO_SAMPLE_RATE // FPS  # audio samples one video frame shows
# wav2vec2 frames: a 400-sample receptive field and a 320-sample hop (50 Hz at 16 kHz), resampled to 30 Hz
# and then to the video rate (the reference's ``get_audio_embed_bucket_fps``).
WAV2VEC_WINDOW, WAV2VEC_HOP, WAV2VEC_RATE, AUDIO_FEATURE_RATE = 400, 320, 50, 30

VAE_STRIDE = 8  # pixels per latent, each spatial axis
VAE_TIME_STRIDE = 4  # video frames per latent frame (the first latent frame is one video frame)
PATCH = 2  # latent pixels per token, each spatial axis (patch_size (1, 2, 2))
LATENT_CHANNELS = 16

LATENT_FRAMES_PER_BLOCK = 3  # the reference's num_frame_per_block
FRAMES_PER_BLOCK = LATENT_FRAMES_PER_BLOCK * VAE_TIME_STRIDE  # video frames a block adds
MOTION_FRAMES = 73  # pixel frames of motion history (motion_frames[0] of the reference)
MOTION_LATENT_FRAMES = (MOTION_FRAMES + 3) // VAE_TIME_STRIDE  # 19 (motion_frames[1])
# Motion latents packed into condition tokens, newest first: 1 at full patch resolution, 2 at a 2x coarser
# grid, 16 at 4x (the reference's FramePackMotioner zip_frame_buckets, 1 + 2 + 16 = 19).
FRAMEPACK_BUCKETS = (1, 2, 16)
DROPPED_LEADING_FRAMES = 3  # the reference drops the first 3 decoded frames of a video

SIZE_GRANULARITY = 64
MIN_AREA = SIZE_GRANULARITY * SIZE_GRANULARITY

# The rolling sink's RoPE offset: the reference's ``relative_dist``, drawn with random.randint(4, 30).
REF_ROPE_OFFSET_RANGE = (4, 30)


def size_for_area(image_h: int, image_w: int, area: int, divisor: int = SIZE_GRANULARITY) -> tuple[int, int]:
    """The reference's ``get_size_less_than_area``: the largest (height, width), multiples of 64, with
    height*width <= area and the image's aspect ratio, found by a 100-step scale scan.

    Kept exactly, quirks included: the lower scan bound solves the quadratic with 2ac instead of 4ac, the
    candidates are rounded up to 64 whatever ``divisor`` is, and the fallback is the reference's.
    """
    if image_h * image_w <= area:
        min_scale, max_scale = 0.1, 1.0
    else:
        d = divisor - 1
        a = image_h * image_w
        b = d * (image_h + image_w)
        c = d**2 - area
        min_scale = (-b + math.sqrt(b**2 - 2 * a * c)) / (2 * a)
        max_scale = math.sqrt(area / (image_h * image_w))
    for i in range(100):
        scale = max_scale - (max_scale - min_scale) * i / 100
        height, width = int(image_h * scale), int(image_w * scale)
        height += (64 - height % 64) % 64
        width += (64 - width % 64) % 64
        if height * width <= area:
            return height, width
    aspect = image_w / image_h
    width = int((area * aspect) ** 0.5 // divisor * divisor)
    height = int((area / aspect) ** 0.5 // divisor * divisor)
    if width >= image_w or height >= image_h:
        width = int(image_w // divisor * divisor)
        height = int(image_h // divisor * divisor)
    return height, width


def audio_clip_count(num_samples_16k: int, infer_frames: int) -> int:
    """Clips the reference derives from an audio of ``num_samples_16k`` samples at 16 kHz (without wav2vec2):
    T50 wav2vec2 frames -> int(T50/50*30) frames at 30 Hz -> int(N30 / (infer_frames*1.2)) + 1 clips."""
    frames_50 = (num_samples_16k - WAV2VEC_WINDOW) // WAV2VEC_HOP + 1
    frames_30 = int(frames_50 / float(WAV2VEC_RATE) * AUDIO_FEATURE_RATE)
    return int(frames_30 / (infer_frames * (AUDIO_FEATURE_RATE / FPS))) + 1


def audio_video_frames(num_samples_16k: int) -> int:
    """Video frames the audio lasts (an mp4 muxed to the shorter stream ends there): ceil(seconds * fps)."""
    return -(-num_samples_16k * FPS // AUDIO_SAMPLE_RATE)


@dataclass(frozen=True)
class ClipGeometry:
    """Sizes of one clip: pixels, latents, tokens and blocks."""

    height: int
    width: int
    infer_frames: int

    def __post_init__(self):
        if self.height % SIZE_GRANULARITY or self.width % SIZE_GRANULARITY or self.height <= 0 or self.width <= 0:
            raise ValueError(f"video size must be positive multiples of 64 (got {self.width}x{self.height})")
        if self.infer_frames <= 0 or self.infer_frames % FRAMES_PER_BLOCK:
            raise ValueError(f"infer_frames must be a positive multiple of {FRAMES_PER_BLOCK} (got "
                             f"{self.infer_frames}); other values leave latent frames of every clip undenoised "
                             f"in the reference")

    @property
    def latent_height(self) -> int:
        return self.height // VAE_STRIDE

    @property
    def latent_width(self) -> int:
        return self.width // VAE_STRIDE

    @property
    def token_rows(self) -> int:
        return self.latent_height // PATCH

    @property
    def token_cols(self) -> int:
        return self.latent_width // PATCH

    @property
    def frame_tokens(self) -> int:
        """Tokens per latent frame after the 1x2x2 patch embedding (the reference's frame_seq_length)."""
        return self.token_rows * self.token_cols

    @property
    def block_tokens(self) -> int:
        return LATENT_FRAMES_PER_BLOCK * self.frame_tokens

    @property
    def cond_tokens(self) -> int:
        """Sink tokens: the reference frame, then the motion latents packed by `FRAMEPACK_BUCKETS` (bucket i
        packs its frames on a 2^i-times coarser grid)."""
        packed = sum((frames // 2**i) * (self.token_rows // 2**i) * (self.token_cols // 2**i)
                     for i, frames in enumerate(FRAMEPACK_BUCKETS))
        return self.frame_tokens + packed

    @property
    def latent_frames(self) -> int:
        """Latent frames per clip, computed as the reference does (its lat_target_frames)."""
        return (self.infer_frames + 3 + MOTION_FRAMES) // VAE_TIME_STRIDE - MOTION_LATENT_FRAMES

    @property
    def kv_tokens(self) -> int:
        """Tokens one KV set holds: one clip (the reference's kv_cache_size)."""
        return self.latent_frames * self.frame_tokens

    @property
    def blocks_per_clip(self) -> int:
        return self.latent_frames // LATENT_FRAMES_PER_BLOCK

    @property
    def frames_per_block(self) -> int:
        """Video frames a block contributes (= the audio frames it is driven by)."""
        return self.infer_frames // self.blocks_per_clip

    def start_frame(self, clip: int, block: int) -> int:
        """Absolute latent-frame index of a block (the reference's current_start // frame_seq_length)."""
        return (clip * self.blocks_per_clip + block) * LATENT_FRAMES_PER_BLOCK

    def video_frames(self, num_clips: int) -> int:
        """Frames ``num_clips`` clips decode to (48·N − 3 for 48-frame clips)."""
        return num_clips * self.infer_frames - DROPPED_LEADING_FRAMES

    def blocks_for_frames(self, frames: int) -> int:
        """Blocks that must be generated for the video to hold ``frames`` frames (the first block's first 3
        frames are dropped)."""
        return max(1, -(-(frames + DROPPED_LEADING_FRAMES) // self.frames_per_block))

    def block_slice(self, block: int) -> slice:
        return slice(block * LATENT_FRAMES_PER_BLOCK, (block + 1) * LATENT_FRAMES_PER_BLOCK)
