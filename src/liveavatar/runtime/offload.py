"""Running the DiT in less GPU memory than it needs: the placements of `liveavatar.runtime.placement`.

* Layer streaming (`LayerStreamer`): the weights of the streamed blocks (each with the audio injector that
  follows it) live in one pinned host buffer per block. Two GPU slots take turns: while one block runs
  from one slot, the next streamed block is copied into the other on a side CUDA stream. Module tensors
  are re-pointed at the slot just before the block's code runs (forward pre-hooks), so the DiT itself is
  unchanged.
* KV sets and the cond cache in pinned host memory (`HostKVCache`, `HostCondCache`, sharing one
  `CacheStreamer`): each layer's window is copied into one of two GPU slots one layer ahead of use; the
  block's new K/V are written into the slot (the attention sees them) and copied back to the host
  asynchronously. Only the entries the block does not overwrite are fetched.
* FP8 KV sets (`Fp8KVCache`, or `HostKVCache` with an FP8 storage): e4m3 codes with one scale per token
  and layer, dequantised for the attention.

Every copy is ordered by CUDA events: a slot is refilled only after the work that read it and the copy
back from it are done; compute waits for the copy that filled its slot. On the CPU the same logic runs
with "host" and "device" both in RAM and every copy immediate, so the ordering (which layer sits in which
slot, which entries are fetched) is what the CPU tests check: outputs must be bit-identical to the
resident run.
"""
from __future__ import annotations

import itertools
import math
import weakref
from typing import Callable, Iterable

import torch
from torch import nn

from liveavatar.runtime.fp8 import FP8_DTYPE, convert_to_fp8, dequantize_rows, fp8_kernel_for, quantize_rows
from liveavatar.runtime.kv_cache import check_cond_capacity
from liveavatar.runtime.placement import Placement

SLOT_ALIGNMENT = 256


class _Copier:
    """Host<->device copies on two side streams ordered by events (CUDA), or immediate copies (CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.h2d = torch.cuda.Stream(device)
            self.d2h = torch.cuda.Stream(device)

    def marker(self):
        """An event after everything queued so far on the compute stream (None on the CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def copy(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], *, after: Iterable = (),
             to_host: bool = False):
        """Copy every (destination, source) pair once the events in `after` have happened; returns the
        event of the copy's completion (None on the CPU, where the copy is done on return)."""
        if not self.cuda:
            for destination, source in pairs:
                destination.copy_(source)
            return None
        stream = self.d2h if to_host else self.h2d
        with torch.cuda.stream(stream):
            for event in after:
                if event is not None:
                    stream.wait_event(event)
            for destination, source in pairs:
                destination.copy_(source, non_blocking=True)
                if to_host:  # the source may be a temporary of the compute stream
                    source.record_stream(stream)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def wait(self, event) -> None:
        if event is not None:
            torch.cuda.current_stream().wait_event(event)


class PinnedArena:
    """Host memory for streamed weights and host caches, pinned when the device is a GPU.

    PyTorch's pinned allocator rounds every allocation up to a power of two (a 5.2 GB KV tensor would take
    8 GiB), so tensors are carved out of power-of-two chunks of at least 1 GiB instead, losing only the
    chunks' tails. A chunk is freed with the last tensor carved from it.
    """

    CHUNK_BYTES = 1 << 30

    def __init__(self, pin: bool):
        self.pin = pin
        self.chunk: torch.Tensor | None = None
        self.used = 0

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = max(1, math.prod(shape) * dtype.itemsize)
        start = -(-self.used // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
        if self.chunk is None or start + nbytes > self.chunk.numel():
            size = max(self.CHUNK_BYTES, 1 << (nbytes - 1).bit_length())
            self.chunk, start = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin), 0
        self.used = start + nbytes
        return self.chunk[start:start + nbytes].view(dtype).view(shape).zero_()


# --------------------------------------------------------------------------------------------------
# Layer streaming


def unit_modules(model: nn.Module, layer: int) -> dict[str, nn.Module]:
    """The modules that stream together as one unit: block `layer` and, if an audio injector follows
    it, that injector's cross-attention and AdaLN (by their names in the DiT)."""
    modules = {f"blocks.{layer}": model.blocks[layer]}
    slots = {block: slot for slot, block in enumerate(model.config.audio_inject_layers)}
    if layer in slots:
        slot = slots[layer]
        modules[f"audio_injector.injector.{slot}"] = model.audio_injector.injector[slot]
        modules[f"audio_injector.injector_adain_layers.{slot}"] = model.audio_injector.injector_adain_layers[slot]
    return modules


class _UnitWeights:
    """Every parameter and buffer of one unit packed into one flat (pinned) host byte buffer."""

    def __init__(self, layer: int, modules: dict[str, nn.Module], *, arena: PinnedArena):
        self.layer = layer
        self.entries = []  # (owner module, attribute, is_parameter, dtype, shape, offset, nbytes)
        offset = 0
        for module in modules.values():
            for owner in module.modules():
                tensors = [(name, t, True) for name, t in owner._parameters.items() if t is not None]
                tensors += [(name, t, False) for name, t in owner._buffers.items() if t is not None]
                for name, tensor, is_parameter in tensors:
                    nbytes = tensor.numel() * tensor.element_size()
                    self.entries.append((owner, name, is_parameter, tensor.dtype, tuple(tensor.shape), offset, nbytes))
                    offset += -(-nbytes // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
        self.nbytes = offset
        self.host = arena.zeros((offset,), torch.uint8)
        for owner, name, is_parameter, dtype, shape, start, nbytes in self.entries:
            source = (owner._parameters if is_parameter else owner._buffers)[name]
            self._view(self.host, dtype, shape, start, nbytes).copy_(source.detach())
        self.bind(self.host)  # drops the references to the device copies

    @staticmethod
    def _view(storage: torch.Tensor, dtype, shape, start: int, nbytes: int) -> torch.Tensor:
        return storage[start:start + nbytes].view(dtype).reshape(shape)

    def bind(self, storage: torch.Tensor) -> None:
        """Point every tensor of the unit into `storage` (the host buffer or a GPU slot)."""
        for owner, name, is_parameter, dtype, shape, start, nbytes in self.entries:
            view = self._view(storage, dtype, shape, start, nbytes)
            if is_parameter:
                owner._parameters[name] = nn.Parameter(view, requires_grad=False)
            else:
                owner._buffers[name] = view


class LayerStreamer:
    """Streams the weights of some DiT blocks from pinned host memory through two GPU slots.

    Forward pre-hooks on every block (and on the head) tell which block's code runs next. When the code
    moves past a streamed unit, its slot is marked free (an event after all its queued work) and is
    refilled with the next streamed unit not already in a slot, in the order the blocks run, wrapping to
    the next forward. A unit is bound to its slot just before its code runs; if it is not in a slot yet
    (the first forward, or a call out of order such as the text keys/values of every block, which the DiT
    computes up front), it is copied on demand. Pre-hooks on the unit's own modules cover those calls.
    """

    def __init__(self, model: nn.Module, units: list[_UnitWeights], device: torch.device):
        self.device = torch.device(device)
        self.copier = _Copier(self.device)
        self.units = {unit.layer: unit for unit in units}
        self.order = sorted(self.units)
        slot_bytes = max(unit.nbytes for unit in units)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self.slot_unit: list[int | None] = [None, None]
        self.slot_ready = [None, None]
        self.slot_free = [None, None]
        self.active: int | None = None  # block whose code runs now (streamed or not)
        self._last_bound: int | None = None
        self.copies = 0  # host->GPU unit copies so far
        self.on_demand = 0  # of which the compute had to wait for without any overlap
        self._hooks = []
        for index, block in enumerate(model.blocks):
            self._hooks.append(block.register_forward_pre_hook(self._enter_hook(index)))
        self._hooks.append(model.head.register_forward_pre_hook(self._enter_hook(None)))
        for layer in self.order:
            for module in unit_modules(model, layer).values():
                for leaf in module.modules():
                    if any(t is not None for t in (*leaf._parameters.values(), *leaf._buffers.values())):
                        self._hooks.append(leaf.register_forward_pre_hook(self._enter_hook(layer)))

    @property
    def streamed_layers(self) -> tuple[int, ...]:
        return tuple(self.order)

    @property
    def slot_bytes(self) -> int:
        return self.slots[0].numel()

    def _enter_hook(self, layer: int | None) -> Callable:
        def hook(module, args):
            self.enter(layer)
        return hook

    def enter(self, layer: int | None) -> None:
        """The code of block `layer` (None: past the last block) is about to be queued."""
        if layer == self.active:
            return
        previous, self.active = self.active, layer
        if previous in self.units:
            self._release(previous)
        if layer in self.units:
            self._acquire(layer)

    def _slot_of(self, layer: int) -> int | None:
        return self.slot_unit.index(layer) if layer in self.slot_unit else None

    def _release(self, layer: int) -> None:
        """Prefetch the next streamed unit that is in no slot: into the empty slot if there is one, else
        into the slot `layer` just left."""
        slot = self._slot_of(layer)
        self.slot_free[slot] = self.copier.marker()
        position = self.order.index(layer)
        for candidate in itertools.chain(self.order[position + 1:], self.order[:position]):
            if candidate not in self.slot_unit:
                self._fetch(candidate, self.slot_unit.index(None) if None in self.slot_unit else slot)
                return

    def _acquire(self, layer: int) -> None:
        slot = self._slot_of(layer)
        if slot is None:  # on demand, into the slot not holding the unit that ran last
            slot = 1 if self.slot_unit[0] is not None and self.slot_unit[0] == self._last_bound else 0
            self.slot_free[slot] = self.copier.marker()
            self._fetch(layer, slot)
            self.on_demand += 1
        self.copier.wait(self.slot_ready[slot])
        self.units[layer].bind(self.slots[slot])
        self._last_bound = layer

    def _fetch(self, layer: int, slot: int) -> None:
        evicted = self.slot_unit[slot]
        if evicted is not None and evicted != layer:
            self.units[evicted].bind(self.units[evicted].host)
        unit = self.units[layer]
        self.slot_unit[slot] = layer
        self.slot_ready[slot] = self.copier.copy([(self.slots[slot][:unit.nbytes], unit.host)],
                                                 after=[self.slot_free[slot]])
        self.copies += 1

    def remove(self) -> None:
        """Detach the hooks (the streamed weights stay in host memory)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def place_dit(model: nn.Module, placement: Placement, device: torch.device | str, *,
              materialize: Callable[[str, nn.Module], None] | None = None,
              fp8_kernel: str | None = None) -> LayerStreamer | None:
    """Put the DiT on `device` as `placement` says, one unit at a time, so that at most one block is ever
    held in the run dtype on the device: materialise it there (`materialize(name, module)`, default a
    plain move), convert its linears to FP8 (after the LoRA merge, which the loader has done), and for a
    streamed block move it on into pinned host memory. Returns the streamer when layers stream.
    """
    device = torch.device(device)
    kernel = fp8_kernel or fp8_kernel_for(device)
    materialize = materialize or (lambda name, module: module.to(device))
    num_layers = len(model.blocks)
    for index in placement.streamed_layers:
        if index >= num_layers:
            raise ValueError(f"placement streams block {index} but the DiT has {num_layers} blocks")
    streamed, arena = [], PinnedArena(pin=device.type == "cuda")
    for layer in range(num_layers):
        modules = unit_modules(model, layer)
        for name, module in modules.items():
            materialize(name, module)
            if placement.weight_dtype == "fp8":
                convert_to_fp8(module, kernel=kernel, prefix=name)
        if placement.is_streamed(layer):
            streamed.append(_UnitWeights(layer, modules, arena=arena))
    for name, child in model.named_children():
        if name not in ("blocks", "audio_injector"):  # every block and injector belongs to a unit
            materialize(name, child)
            if placement.weight_dtype == "fp8":
                convert_to_fp8(child, kernel=kernel, prefix=name)
    return LayerStreamer(model, streamed, device) if streamed else None


# --------------------------------------------------------------------------------------------------
# KV sets and the cond cache: FP8 storage, host storage


def _ring_spans(start: int, count: int, capacity: int) -> list[tuple[int, int, int]]:
    """(ring position, offset in the block, length) of `count` tokens written from absolute `start`."""
    position = start % capacity
    first = min(count, capacity - position)
    spans = [(position, 0, first)]
    if count > first:
        spans.append((0, first, count - first))
    return spans


class _KVBuffer:
    """K and V [tokens, heads, head_dim] (per layer when `layers` is given) in the run dtype, or as e4m3
    codes with one fp32 inverse scale per token (`fp8`). On the device the layers are one stacked
    tensor; in an `arena` (host memory) one tensor per layer, so no single allocation is huge."""

    def __init__(self, layers: int | None, tokens: int, num_heads: int, head_dim: int, *, dtype: torch.dtype,
                 fp8: bool, device: torch.device | str | None = None, arena: PinnedArena | None = None):
        self.dtype, self.fp8, self.tokens = dtype, fp8, tokens
        storage = FP8_DTYPE if fp8 else dtype

        def zeros(shape, dtype_):
            if arena is None:
                return torch.zeros(shape if layers is None else (layers, *shape), dtype=dtype_, device=device)
            return [arena.zeros(shape, dtype_) for _ in range(layers)]

        self.tensors = [zeros((tokens, num_heads, head_dim), storage), zeros((tokens, num_heads, head_dim), storage)]
        if fp8:
            self.tensors += [zeros((tokens,), torch.float32), zeros((tokens,), torch.float32)]

    @property
    def nbytes(self) -> int:
        return sum(sum(t.nbytes for t in entry) if isinstance(entry, list) else entry.nbytes
                   for entry in self.tensors)

    def part(self, index, start: int, end: int) -> list[torch.Tensor]:
        """Every stored tensor of tokens start:end (of layer `index`; None for a single-layer buffer)."""
        return [t[index][start:end] if index is not None else t[start:end] for t in self.tensors]

    def store(self, index, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [tokens, heads, head_dim] at `position`."""
        end = position + k.shape[0]
        if self.fp8:
            (k_codes, k_scale), (v_codes, v_scale) = quantize_rows(k), quantize_rows(v)
            values = [k_codes, v_codes, k_scale, v_scale]
        else:
            values = [k, v]
        for destination, value in zip(self.part(index, position, end), values):
            destination.copy_(value)

    def load(self, index, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `count` tokens as k, v [1, count, heads, head_dim] in the run dtype."""
        parts = self.part(index, 0, count)
        if self.fp8:
            k, v = dequantize_rows(parts[0], parts[2], self.dtype), dequantize_rows(parts[1], parts[3], self.dtype)
        else:
            k, v = parts
        return k.unsqueeze(0), v.unsqueeze(0)


class Fp8KVCache:
    """A `KVCache` on the device whose entries are stored as e4m3 codes with a per-token scale; the
    window is dequantised to the run dtype for each attention call."""

    def __init__(self, *, num_layers: int, capacity: int, num_heads: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16):
        if capacity <= 0:
            raise ValueError(f"KV cache capacity must be positive, got {capacity} tokens")
        self.buffer = _KVBuffer(num_layers, capacity, num_heads, head_dim, dtype=dtype, fp8=True, device=device)
        self.end = 0

    capacity = property(lambda self: self.buffer.tokens)
    nbytes = property(lambda self: self.buffer.nbytes)

    def reset(self) -> None:
        self.end = 0

    def reserve(self, start_token: int, tokens: int) -> None:
        _check_block(tokens, self.capacity, start_token)
        self.end = max(self.end, start_token + tokens)

    def write(self, layer: int, start_token: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for position, offset, length in _ring_spans(start_token, k.shape[1], self.capacity):
            self.buffer.store(layer, position, k[0, offset:offset + length], v[0, offset:offset + length])

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buffer.load(layer, min(self.end, self.capacity))


def _check_block(tokens: int, capacity: int, start_token: int) -> None:
    if tokens > capacity:
        raise ValueError(f"a block of {tokens} tokens does not fit a KV cache of {capacity} tokens; "
                         f"make the cache at least one block long")
    if start_token < 0:
        raise ValueError(f"start token must be >= 0, got {start_token}")


class HostKVCache:
    """A `KVCache` kept in pinned host memory; the attention reads and writes it through the
    `CacheStreamer`'s GPU slots. Same interface as `KVCache`."""

    def __init__(self, streamer: "CacheStreamer", *, num_layers: int, capacity: int, num_heads: int,
                 head_dim: int, dtype: torch.dtype, fp8: bool = False):
        if capacity <= 0:
            raise ValueError(f"KV cache capacity must be positive, got {capacity} tokens")
        self.streamer = streamer
        self.host = _KVBuffer(num_layers, capacity, num_heads, head_dim, dtype=dtype, fp8=fp8,
                              arena=streamer.arena)
        self.end = 0
        self.block: tuple[int, int] | None = None  # (start, tokens) of the block in flight
        self.end_before_block = 0
        self.block_tokens = 0
        self.written_back = [None] * num_layers  # per layer: event of the last copy back to the host
        streamer.register_kv(self)

    capacity = property(lambda self: self.host.tokens)
    nbytes = property(lambda self: self.host.nbytes)

    def reset(self) -> None:
        self.end = 0
        self.end_before_block = 0

    def reserve(self, start_token: int, tokens: int) -> None:
        _check_block(tokens, self.capacity, start_token)
        self.end_before_block = self.end
        self.end = max(self.end, start_token + tokens)
        self.block, self.block_tokens = (start_token, tokens), tokens
        self.streamer.begin_forward(self)

    def needed(self) -> tuple[int, tuple]:
        """(tokens valid on the host, ring spans the coming block overwrites): what a layer's slot must
        hold before the block writes into it. Before this cache's forward starts, the coming block is
        predicted to follow the last one."""
        if self.block is not None:
            valid, (start, tokens) = self.end_before_block, self.block
        else:
            valid, start, tokens = self.end, self.end, self.block_tokens
        spans = tuple((p, n) for p, _, n in _ring_spans(start, tokens, self.capacity)) if tokens else ()
        return min(valid, self.capacity), spans

    def write(self, layer: int, start_token: int, k: torch.Tensor, v: torch.Tensor) -> None:
        slot = self.streamer.kv_slot(self, layer)
        spans = _ring_spans(start_token, k.shape[1], self.capacity)
        for position, offset, length in spans:
            slot.store(None, position, k[0, offset:offset + length], v[0, offset:offset + length])
        pairs = [(host, device) for position, _, length in spans
                 for host, device in zip(self.host.part(layer, position, position + length),
                                         slot.part(None, position, position + length))]
        self.written_back[layer] = self.streamer.write_back(pairs, from_slot=slot)

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.streamer.kv_slot(self, layer).load(None, min(self.end, self.capacity))


class HostCondCache:
    """A `CondCache` kept in pinned host memory: the sink prefill writes each layer's K/V straight back
    to the host; streaming calls read them through the `CacheStreamer`'s GPU slots."""

    def __init__(self, streamer: "CacheStreamer", *, num_layers: int, capacity: int, num_heads: int,
                 head_dim: int, dtype: torch.dtype):
        if capacity <= 0:
            raise ValueError(f"cond cache capacity must be positive, got {capacity} tokens")
        self.streamer = streamer
        self.host = _KVBuffer(num_layers, capacity, num_heads, head_dim, dtype=dtype, fp8=False,
                              arena=streamer.arena)
        self.length = 0
        self.positions: torch.Tensor | None = None
        self.ref_tokens = 0
        self.latent_hw: tuple[int, int] | None = None
        self.version = 0  # bumped by every prefill; slots holding an older version are refetched
        self.written_back = [None] * num_layers
        streamer.register_cond(self)

    capacity = property(lambda self: self.host.tokens)
    nbytes = property(lambda self: self.host.nbytes)

    def begin(self, positions: torch.Tensor, ref_tokens: int, latent_hw: tuple[int, int]) -> None:
        tokens = check_cond_capacity(positions.shape[0], self.capacity, latent_hw)
        self.length, self.positions, self.ref_tokens, self.latent_hw = tokens, positions, ref_tokens, latent_hw
        self.version += 1
        self.streamer.begin_prefill()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        pairs = list(zip(self.host.part(layer, 0, self.length), (k[0], v[0])))
        self.written_back[layer] = self.streamer.write_back(pairs)

    def entries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.streamer.cond_slot(layer).load(None, self.length)


class CacheStreamer:
    """Two GPU slots through which host-resident KV sets and the cond cache reach the attention.

    A slot belongs to one (KV set, layer) of a forward and holds that layer's KV window (the entries on
    the host that the coming block does not overwrite) and/or its cond entries. Block pre-hooks mark the
    slot of the layer that just ran free and fill the other one for the layer after the running one; at
    the end of a forward, for the first layers of the next KV set (sets are used in the order they were
    created, as the denoising steps use them). A slot is refilled only after the work that read it and
    the copy back from it are done; a missing or stale part (after a new sink prefill, or a block that
    does not follow the previous one) is fetched on demand.
    """

    def __init__(self, model: nn.Module, device: torch.device | str):
        self.device = torch.device(device)
        self.copier = _Copier(self.device)
        self.arena = PinnedArena(pin=self.copier.cuda)
        self.num_layers = len(model.blocks)
        self._kv_caches: list[weakref.ref] = []  # weak: a finished request's sets free their host memory
        self.cond: HostCondCache | None = None
        self.slots_kv: list[_KVBuffer | None] = [None, None]
        self.slots_cond: list[_KVBuffer | None] = [None, None]
        self.owner: list[tuple | None] = [None, None]  # (KV set or None, layer)
        self.kv_key: list[tuple | None] = [None, None]
        self.cond_key: list[tuple | None] = [None, None]
        self.ready: list[list] = [[], []]
        self.free = [None, None]
        self.back = [None, None]
        self.current: HostKVCache | None = None
        self.streaming = False
        self.active: int | None = None
        self.fetched_bytes = 0
        self.on_demand = 0  # fetches issued at the moment of use (no overlap with compute)
        self._hooks = [block.register_forward_pre_hook(self._enter_hook(i)) for i, block in enumerate(model.blocks)]
        self._hooks.append(model.head.register_forward_pre_hook(self._enter_hook(None)))

    def _enter_hook(self, layer: int | None) -> Callable:
        def hook(module, args):
            self.enter(layer)
        return hook

    # -- registration and forward boundaries

    def register_kv(self, cache: HostKVCache) -> None:
        if any((other.host.fp8, other.host.dtype) != (cache.host.fp8, cache.host.dtype) for other in self.kv_caches):
            raise ValueError("all host KV sets of one streamer must share their storage dtype")
        self._kv_caches.append(weakref.ref(cache))
        if self.slots_kv[0] is None or self.slots_kv[0].tokens < cache.capacity:
            k = cache.host.tensors[0][0]
            self.slots_kv = [_KVBuffer(None, cache.capacity, k.shape[-2], k.shape[-1], dtype=cache.host.dtype,
                                       fp8=cache.host.fp8, device=self.device) for _ in range(2)]
            self.kv_key = [None, None]

    def register_cond(self, cond: HostCondCache) -> None:
        self.cond = cond
        k = cond.host.tensors[0][0]
        self.slots_cond = [_KVBuffer(None, cond.capacity, k.shape[-2], k.shape[-1], dtype=cond.host.dtype,
                                     fp8=False, device=self.device) for _ in range(2)]
        self.cond_key = [None, None]

    def begin_forward(self, cache: HostKVCache) -> None:
        if self.current is not None and self.current is not cache:
            self.current.block = None
        self.current, self.streaming = cache, True

    def begin_prefill(self) -> None:
        if self.current is not None:
            self.current.block = None
        self.current, self.streaming = None, False

    # -- hooks: which layer runs

    def enter(self, layer: int | None) -> None:
        if layer == self.active:
            return
        previous, self.active = self.active, layer
        if not self.streaming:
            return
        if previous is not None and (self.current, previous) in self.owner:
            self.free[self.owner.index((self.current, previous))] = self.copier.marker()
        if layer is None:  # the forward is over: prepare the first two layers of the next one
            following = self._next_set(self.current)
            self._assign([(following, 0), (following, min(1, self.num_layers - 1))])
            if self.current is not None:
                # The next forward announces itself with reserve(); a sink prefill (which never
                # reserves, and with the cond cache on the GPU is not announced) must not fetch.
                self.current.block = None
                self.streaming = False
        else:
            self._assign([(self.current, layer), self._next_key(self.current, layer)])

    def _next_set(self, cache: HostKVCache | None) -> HostKVCache | None:
        if cache is None:
            return None
        caches = self.kv_caches
        return caches[(caches.index(cache) + 1) % len(caches)]

    @property
    def kv_caches(self) -> list[HostKVCache]:
        """The live host KV sets in creation order (the order the denoising steps use them)."""
        self._kv_caches = [ref for ref in self._kv_caches if ref() is not None]
        return [ref() for ref in self._kv_caches]

    def _next_key(self, cache, layer: int) -> tuple:
        return (cache, layer + 1) if layer + 1 < self.num_layers else (self._next_set(cache), 0)

    # -- slots

    def _assign(self, targets: list[tuple]) -> None:
        for target in targets:
            if target in self.owner:
                continue
            slot = next(s for s in (0, 1) if self.owner[s] not in targets)
            self.owner[slot] = target
            self._fill(slot)

    def _slot(self, cache, layer: int) -> int:
        target = (cache, layer)
        if target not in self.owner:  # on demand: everything queued so far may still read either slot
            prefetched = self._next_key(self.current, layer)
            slot = self.owner.index(None) if None in self.owner else int(self.owner[0] == prefetched)
            self.free[slot] = self.copier.marker()
            self.owner[slot] = target
        slot = self.owner.index(target)
        if self._fill(slot):
            self.on_demand += 1
        for event in self.ready[slot]:
            self.copier.wait(event)
        self.ready[slot] = []
        return slot

    def _fill(self, slot: int) -> bool:
        """Fetch the parts of the slot's (set, layer) it does not hold yet; True if anything was fetched."""
        cache, layer = self.owner[slot]
        pairs, after = [], [self.free[slot], self.back[slot]]
        if cache is not None:
            needed = cache.needed()
            if self.kv_key[slot] != (cache, layer, needed):
                valid, overwritten = needed
                for start, end in _complement(valid, overwritten):
                    pairs += zip(self.slots_kv[slot].part(None, start, end), cache.host.part(layer, start, end))
                after.append(cache.written_back[layer])
                self.kv_key[slot] = (cache, layer, needed)
        cond = self.cond
        if cond is not None and cond.length and self.cond_key[slot] != (layer, cond.version):
            pairs += zip(self.slots_cond[slot].part(None, 0, cond.length), cond.host.part(layer, 0, cond.length))
            after.append(cond.written_back[layer])
            self.cond_key[slot] = (layer, cond.version)
        if pairs:
            self.ready[slot].append(self.copier.copy(pairs, after=after))
            self.fetched_bytes += sum(source.nbytes for _, source in pairs)
        return bool(pairs)

    def kv_slot(self, cache: HostKVCache, layer: int) -> _KVBuffer:
        return self.slots_kv[self._slot(cache, layer)]

    def cond_slot(self, layer: int) -> _KVBuffer:
        if not self.streaming:  # the first streaming call after a prefill, with the KV sets on the GPU
            self.streaming = True
        return self.slots_cond[self._slot(self.current, layer)]

    def write_back(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], from_slot: _KVBuffer | None = None):
        """Copy (host destination, device source) pairs back once the compute stream has produced them."""
        event = self.copier.copy(pairs, after=[self.copier.marker()], to_host=True)
        if from_slot is not None:
            self.back[self.slots_kv.index(from_slot)] = event
        return event

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def _complement(valid: int, overwritten: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    """Intervals of [0, valid) outside the (position, length) spans."""
    intervals, start = [], 0
    for position, length in sorted(overwritten):
        if position > start:
            intervals.append((start, min(position, valid)))
        start = max(start, position + length)
    if start < valid:
        intervals.append((start, valid))
    return [(a, b) for a, b in intervals if a < b]


def install_cache_placement(model: nn.Module, placement: Placement) -> CacheStreamer | None:
    """Make `model.new_kv_cache` / `model.new_cond_cache` create the caches `placement` asks for (FP8
    and/or pinned host memory); callers such as the sampling loop's executor keep calling the model's
    factories. Returns the streamer that serves host caches (None when every cache is on the device)."""
    c = model.config
    streamer = CacheStreamer(model, model.device) if "host" in (placement.kv_location, placement.cond_location) \
        else None
    dims = dict(num_layers=c.num_layers, num_heads=c.num_heads, head_dim=c.head_dim)

    if placement.kv_location == "host":
        def new_kv_cache(*, cache_frames: int, frame_tokens: int, device=None, dtype=None):
            return HostKVCache(streamer, capacity=cache_frames * frame_tokens, dtype=dtype or model.dtype,
                               fp8=placement.kv_dtype == "fp8", **dims)
        model.new_kv_cache = new_kv_cache
    elif placement.kv_dtype == "fp8":
        def new_kv_cache(*, cache_frames: int, frame_tokens: int, device=None, dtype=None):
            return Fp8KVCache(capacity=cache_frames * frame_tokens, device=device or model.device,
                              dtype=dtype or model.dtype, **dims)
        model.new_kv_cache = new_kv_cache
    if placement.cond_location == "host":
        def new_cond_cache(*, cond_tokens: int, device=None, dtype=None):
            return HostCondCache(streamer, capacity=cond_tokens, dtype=dtype or model.dtype, **dims)
        model.new_cond_cache = new_cond_cache
    return streamer


def load_placed_dit(ckpt_dir, placement: Placement, *, device: torch.device | str, dtype: torch.dtype,
                    lora=None, lora_alpha: float | None = None) -> nn.Module:
    """Load the DiT from a checkpoint folder as `placement` says, caches included (see `place_dit` and
    `install_cache_placement`). With every block resident in bf16 the weights stream straight to the
    device; otherwise they are read and LoRA-merged on the host (one bf16 copy of the DiT in RAM, 32.6 GB
    at 14B) and then placed unit by unit, so the device never holds more than one block beyond the plan.
    """
    from liveavatar.models.transformer import CausalS2VTransformer

    direct = placement.weight_dtype == "bf16" and not placement.streams_layers
    model = CausalS2VTransformer.from_pretrained(ckpt_dir, device=device if direct else "cpu", dtype=dtype,
                                                 lora=lora, lora_alpha=lora_alpha)
    if not direct:
        place_dit(model, placement, device)
    install_cache_placement(model, placement)
    return model
