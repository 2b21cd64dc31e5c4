"""UMT5-XXL text encoder loaded from the release's `models_t5_umt5-xxl-enc-bf16.pth`.

The release stores Wan's own T5 re-implementation (`token_embedding`, `blocks.N.attn.{q,k,v,o}`,
`blocks.N.pos_embedding.embedding`, `blocks.N.ffn.{gate.0,fc1,fc2}`, `blocks.N.norm{1,2}`, `norm`).
Its maths is exactly transformers' `UMT5EncoderModel` (RMSNorm with the statistic in fp32, attention without
the 1/sqrt(d) scale, a bidirectional 32-bucket relative position table in every layer, gated tanh-GELU FFN),
so the checkpoint is key-mapped onto that class. Every size is read from the weights.

`TextEncoder` is what the pipeline uses: tokenisation as the reference does it, the encoder loaded only on a
prompt-cache miss, and an on-disk cache of prompt embeddings so that repeated runs with the same prompt never
touch the 11 GB checkpoint. The checkpoint is memory-mapped, never read whole: on the CPU in its own dtype the
weights stay mapped (pages read as the encoder runs, which the kernel can reclaim), and a move to the GPU
or to another dtype goes one tensor at a time, dropping each tensor's mapped pages once it is copied.
"""
from __future__ import annotations

import ctypes
import gc
import hashlib
import html
import json
import math
import mmap
import os
import re
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import ftfy
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from liveavatar.errors import CheckpointError

CHECKPOINT_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_SUBDIR = "google/umt5-xxl"
TEXT_LEN = 512
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
# Not stored in the checkpoint: the distance at which the bidirectional buckets saturate.
RELATIVE_MAX_DISTANCE = 128

# The reference uses the `regex` module; its \s differs from `re`'s only on U+001C..U+001F, which ftfy removes.
_WHITESPACE_RUN = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """The reference's "whitespace" cleaning: ftfy repair, HTML-unescape twice, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()


@dataclass(frozen=True)
class UMT5Config:
    vocab_size: int
    dim: int
    dim_attn: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    num_buckets: int = 32
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> "UMT5Config":
        try:
            vocab_size, dim = state_dict["token_embedding.weight"].shape
            num_buckets, num_heads = state_dict["blocks.0.pos_embedding.embedding.weight"].shape
            dim_attn = state_dict["blocks.0.attn.q.weight"].shape[0]
            ffn_dim = state_dict["blocks.0.ffn.fc1.weight"].shape[0]
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{source}: not a UMT5 encoder state dict in the Wan layout (no {error}); "
                                  f"expected the release's {CHECKPOINT_NAME}") from None
        num_layers = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
        return cls(vocab_size, dim, dim_attn, ffn_dim, num_heads, num_layers, num_buckets)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"token_embedding.weight": (self.vocab_size, self.dim), "norm.weight": (self.dim,)}
        for n in range(self.num_layers):
            shapes.update({
                f"blocks.{n}.norm1.weight": (self.dim,),
                f"blocks.{n}.norm2.weight": (self.dim,),
                f"blocks.{n}.attn.q.weight": (self.dim_attn, self.dim),
                f"blocks.{n}.attn.k.weight": (self.dim_attn, self.dim),
                f"blocks.{n}.attn.v.weight": (self.dim_attn, self.dim),
                f"blocks.{n}.attn.o.weight": (self.dim, self.dim_attn),
                f"blocks.{n}.ffn.gate.0.weight": (self.ffn_dim, self.dim),
                f"blocks.{n}.ffn.fc1.weight": (self.ffn_dim, self.dim),
                f"blocks.{n}.ffn.fc2.weight": (self.dim, self.ffn_dim),
                f"blocks.{n}.pos_embedding.embedding.weight": (self.num_buckets, self.num_heads),
            })
        return shapes


def _hf_key(wan_key: str) -> list[str]:
    """Wan T5 key -> transformers UMT5EncoderModel key(s)."""
    if wan_key == "token_embedding.weight":
        return ["shared.weight", "encoder.embed_tokens.weight"]
    if wan_key == "norm.weight":
        return ["encoder.final_layer_norm.weight"]
    _, n, rest = wan_key.split(".", 2)
    block = f"encoder.block.{n}.layer."
    return [{
        "norm1.weight": block + "0.layer_norm.weight",
        "attn.q.weight": block + "0.SelfAttention.q.weight",
        "attn.k.weight": block + "0.SelfAttention.k.weight",
        "attn.v.weight": block + "0.SelfAttention.v.weight",
        "attn.o.weight": block + "0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight": block + "0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight": block + "1.layer_norm.weight",
        "ffn.gate.0.weight": block + "1.DenseReluDense.wi_0.weight",
        "ffn.fc1.weight": block + "1.DenseReluDense.wi_1.weight",
        "ffn.fc2.weight": block + "1.DenseReluDense.wo.weight",
    }[rest]]


def load_t5_state_dict(pth_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the `.pth` (memory-mapped when it is a zip-format file) and check it is a Wan UMT5 encoder."""
    path = Path(pth_path)
    if not path.is_file():
        raise CheckpointError(f"text encoder checkpoint not found: {path} (expected the release's {CHECKPOINT_NAME})")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch raises several unrelated types for truncated/corrupt pickles
        raise CheckpointError(f"{path}: cannot be read as a torch state dict ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'}); the file is corrupt "
                              f"or truncated, download {CHECKPOINT_NAME} again") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors; expected the release's {CHECKPOINT_NAME}")
    config = UMT5Config.from_state_dict(state_dict, str(path))
    expected = config.expected_shapes()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        detail = (f"missing {missing[:3]}" if missing else "") + (" " if missing and unexpected else "") + \
                 (f"unexpected {unexpected[:3]}" if unexpected else "")
        raise CheckpointError(f"{path}: not a UMT5 encoder in the Wan layout ({detail}); "
                              f"expected the release's {CHECKPOINT_NAME}")
    wrong = [k for k, shape in expected.items() if tuple(state_dict[k].shape) != shape]
    if wrong:
        raise CheckpointError(f"{path}: inconsistent tensor shapes ({wrong[0]} is {tuple(state_dict[wrong[0]].shape)}, "
                              f"expected {expected[wrong[0]]}); the checkpoint is damaged or from another model")
    return state_dict


class UMT5Encoder(torch.nn.Module):
    """The umT5 encoder stack; `forward(ids[B, L], mask[B, L]) -> [B, L, dim]` (mask 1 = real token)."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        from transformers import UMT5Config as HFUMT5Config
        from transformers import UMT5EncoderModel

        self.config = config
        hf_config = HFUMT5Config(
            vocab_size=config.vocab_size, d_model=config.dim, d_kv=config.head_dim, d_ff=config.ffn_dim,
            num_layers=config.num_layers, num_heads=config.num_heads,
            relative_attention_num_buckets=config.num_buckets, relative_attention_max_distance=RELATIVE_MAX_DISTANCE,
            feed_forward_proj="gated-gelu", layer_norm_epsilon=config.eps, dropout_rate=0.0,
            is_encoder_decoder=False, use_cache=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
            # Eager attention adds bias and mask to the unscaled scores before a softmax, as the reference does.
            attn_implementation="eager",
        )
        self.model = UMT5EncoderModel(hf_config)

    @classmethod
    def from_checkpoint(cls, pth_path: str | os.PathLike, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16) -> "UMT5Encoder":
        state_dict = load_t5_state_dict(pth_path)
        file_backed = zipfile.is_zipfile(pth_path)  # load_t5_state_dict memory-maps these
        with torch.device("meta"):
            encoder = cls(UMT5Config.from_state_dict(state_dict))
        placed = {}
        for key in list(state_dict):
            source = state_dict.pop(key)
            tensor = source.to(device=device, dtype=dtype)
            if file_backed and tensor.data_ptr() != source.data_ptr():
                _drop_mapped_pages(source)
            placed.update(dict.fromkeys(_hf_key(key), tensor))
        encoder.model.load_state_dict(placed, strict=True, assign=True)
        # One embedding module for both names (transformers 5 builds two), so that the 2 GB table is held once.
        encoder.model.shared = encoder.model.encoder.embed_tokens
        return encoder.eval().requires_grad_(False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


_MADV_DONTNEED = 4  # <sys/mman.h>


def _drop_mapped_pages(tensor: torch.Tensor) -> None:
    """Take the pages of a tensor memory-mapped from a file (privately, never written) out of this process's
    resident memory; they stay in the page cache and are read again if touched. Linux only (elsewhere the
    kernel keeps them mapped until the whole map goes)."""
    if not sys.platform.startswith("linux") or tensor.nbytes == 0:
        return
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    length = tensor.data_ptr() + tensor.nbytes - start
    ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED)


def default_prompt_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "liveavatar" / "prompts"


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class TextEncoder:
    """Prompt -> UMT5 context `[L_txt, dim]` (real tokens incl. EOS), with an on-disk prompt cache.

    The cache key is the cleaned prompt, the checkpoint's identity (resolved path, size, mtime of the
    `.pth` and of every tokenizer file; no byte of the weights is read), the text length and the dtype.
    A hit returns the stored embedding without loading the tokenizer or the encoder. Entries are written
    to a temporary file and renamed, so a crash never leaves a half-written entry; an unreadable entry is
    treated as a miss and rewritten. The device the encoder ran on is not part of the key (CPU and GPU bf16
    results differ only by rounding).

    The encoder is loaded on the first miss and stays loaded until `unload()` (or the end of a `with`
    block), so that several prompts can be encoded with one load.
    """

    def __init__(self, checkpoint_path: str | os.PathLike, tokenizer_dir: str | os.PathLike, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                 cache_dir: str | os.PathLike | None = None, text_len: int = TEXT_LEN):
        self.checkpoint_path = Path(checkpoint_path)
        self.tokenizer_dir = Path(tokenizer_dir)
        for path, what in ((self.checkpoint_path, "text encoder checkpoint"), (self.tokenizer_dir, "tokenizer folder")):
            if not path.exists():
                raise CheckpointError(f"{what} not found: {path}; point --ckpt_dir at the Wan2.2-S2V-14B folder "
                                      f"(it holds {CHECKPOINT_NAME} and {TOKENIZER_SUBDIR}/)")
        self.device = torch.device(device)
        self.dtype = dtype
        self.text_len = text_len
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_prompt_cache_dir()
        self._encoder: UMT5Encoder | None = None
        self._tokenizer = None

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | os.PathLike, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16,
                        cache_dir: str | os.PathLike | None = None) -> "TextEncoder":
        ckpt_dir = Path(ckpt_dir)
        return cls(ckpt_dir / CHECKPOINT_NAME, ckpt_dir / TOKENIZER_SUBDIR, device=device, dtype=dtype,
                   cache_dir=cache_dir)

    @property
    def is_loaded(self) -> bool:
        return self._encoder is not None

    def is_cached(self, prompt: str) -> bool:
        """True when `encode(prompt)` will read the prompt cache instead of loading the encoder."""
        return self.cache_path(prompt).is_file()

    def cache_path(self, prompt: str) -> Path:
        tokenizer_files = sorted(p for p in self.tokenizer_dir.rglob("*") if p.is_file())
        key = json.dumps({
            "prompt": clean_prompt(prompt),
            "checkpoint": _file_identity(self.checkpoint_path),
            "tokenizer": [_file_identity(p) for p in tokenizer_files],
            "text_len": self.text_len,
            "dtype": str(self.dtype),
        }, sort_keys=True)
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"

    def encode(self, prompt: str) -> torch.Tensor:
        """`[L_txt, dim]` on this encoder's device and dtype; L_txt counts the real tokens and the EOS."""
        cache_path = self.cache_path(prompt)
        context = self._read_cache(cache_path)
        if context is None:
            context = self._encode_uncached(prompt)
            self._write_cache(cache_path, context, prompt)
        return context.to(device=self.device, dtype=self.dtype)

    def tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned, EOS-terminated ids and mask, truncated and padded to `text_len`: `[1, text_len]` each."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
            except (OSError, ValueError) as error:
                raise CheckpointError(f"{self.tokenizer_dir}: cannot load the umT5 tokenizer ({error}); "
                                      f"copy the release's {TOKENIZER_SUBDIR} folder there") from None
        tokens = self._tokenizer([clean_prompt(prompt)], padding="max_length", truncation=True,
                                 max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask

    def _encode_uncached(self, prompt: str) -> torch.Tensor:
        ids, mask = self.tokenize(prompt)
        if self._encoder is None:
            self._encoder = UMT5Encoder.from_checkpoint(self.checkpoint_path, device=self.device, dtype=self.dtype)
        if int(ids.max()) >= self._encoder.config.vocab_size:
            raise CheckpointError(f"{self.tokenizer_dir}: tokenizer produced id {int(ids.max())} but "
                                  f"{self.checkpoint_path.name} has only {self._encoder.config.vocab_size} embeddings; "
                                  f"the tokenizer folder does not belong to this checkpoint")
        with torch.inference_mode():
            context = self._encoder(ids.to(self.device), mask.to(self.device))
        return context[0, : int(mask.sum())].clone()

    def _read_cache(self, path: Path) -> torch.Tensor | None:
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["context"]
        except (SafetensorError, OSError, KeyError, ValueError):
            return None

    def _write_cache(self, path: Path, context: torch.Tensor, prompt: str) -> None:
        """Best effort: an unwritable cache costs a re-encode next time, never the current run."""
        temp_name = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
            os.close(handle)
            save_file({"context": context.detach().to("cpu").contiguous()}, temp_name,
                      metadata={"prompt": clean_prompt(prompt), "checkpoint": str(self.checkpoint_path)})
            os.replace(temp_name, path)
        except OSError as error:
            warnings.warn(f"prompt cache {self.cache_dir} not written ({error}); set another cache folder to "
                          f"skip re-encoding this prompt next time")
        finally:
            if temp_name is not None and os.path.exists(temp_name):
                os.unlink(temp_name)

    def unload(self) -> None:
        """Free the encoder weights (and the GPU memory they held); a later miss loads them again."""
        on_cuda = self.device.type == "cuda"
        self._encoder = None
        self._tokenizer = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    def __enter__(self) -> "TextEncoder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.unload()


# ---------------------------------------------------------------------------------------------------------
# Tiny random checkpoint for tests and `make-tiny`.

_TINY_WORDS = (
    "the a an and of in on with to is are at by from for her his their its this that as "
    "man woman person girl boy face eyes mouth hair smile smiles talking talks speaking speaks "
    "looks camera light background video portrait realistic high quality natural expression "
    "head moves slowly gently wearing shirt dress room studio warm soft sunlight"
).split()


def build_tiny_tokenizer(out_dir: str | os.PathLike) -> int:
    """Write a small umT5-like fast tokenizer (`<pad>`=0, `</s>`=1, `<unk>`=2, EOS appended) that
    `AutoTokenizer.from_pretrained(out_dir)` loads offline. Returns its vocabulary size."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = ["\u2581"] + list(string.ascii_letters + string.digits + string.punctuation)
    pieces += ["\u2581" + c for c in string.ascii_lowercase] + ["\u2581" + w for w in _TINY_WORDS]
    # Equal scores: the Viterbi split then prefers the fewest pieces, i.e. whole words where known.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0) for p in dict.fromkeys(pieces)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=False))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)])
    tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>", extra_ids=0, model_max_length=TEXT_LEN)
    tokenizer.save_pretrained(str(out_dir))
    return len(vocab)


def save_tiny_text_encoder(ckpt_dir: str | os.PathLike, *, seed: int = 0, dim: int = 48, dim_attn: int = 64,
                           ffn_dim: int = 128, num_heads: int = 4, num_layers: int = 2, num_buckets: int = 32,
                           dtype: torch.dtype = torch.float32) -> Path:
    """Write `<ckpt_dir>/models_t5_umt5-xxl-enc-bf16.pth` (seeded random weights in the Wan layout) and a
    working `<ckpt_dir>/google/umt5-xxl/` tokenizer. `dim` is the output width (the DiT's `text_dim`)."""
    if dim_attn % num_heads:
        raise ValueError(f"dim_attn {dim_attn} must be a multiple of num_heads {num_heads}")
    ckpt_dir = Path(ckpt_dir)
    tokenizer_size = build_tiny_tokenizer(ckpt_dir / TOKENIZER_SUBDIR)
    config = UMT5Config(vocab_size=64 * math.ceil(tokenizer_size / 64), dim=dim, dim_attn=dim_attn,
                        ffn_dim=ffn_dim, num_heads=num_heads, num_layers=num_layers, num_buckets=num_buckets)
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in config.expected_shapes().items():
        if key == "token_embedding.weight":
            tensor = torch.randn(shape, generator=generator)
        elif key.split(".")[-2].startswith("norm"):
            tensor = 1 + 0.1 * torch.randn(shape, generator=generator)
        elif "pos_embedding" in key:
            tensor = torch.randn(shape, generator=generator) * (2 * num_buckets * num_heads) ** -0.5
        else:
            tensor = torch.randn(shape, generator=generator) * shape[1] ** -0.5
        state_dict[key] = tensor.to(dtype)
    path = ckpt_dir / CHECKPOINT_NAME
    torch.save(state_dict, path)
    return path
