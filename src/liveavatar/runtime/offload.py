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
from typing import Callable, Iterable

import torch
from torch import nn

from liveavatar.runtime.fp8 import FP8_DTYPE, FP8_MAX, convert_to_fp8, fp8_kernel_for
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


def _host_empty(nbytes_or_shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    shape = (nbytes_or_shape,) if isinstance(nbytes_or_shape, int) else nbytes_or_shape
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


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

    def __init__(self, layer: int, modules: dict[str, nn.Module], *, pin: bool):
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
        self.host = _host_empty(offset, torch.uint8, pin)
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
        self.copies = 0  # host->GPU unit copies so far (for tests and reports)
        self._hooks = []
        for index, block in enumerate(model.blocks):
            self._hooks.append(block.register_forward_pre_hook(self._enter_hook(index)))
        self._hooks.append(model.head.register_forward_pre_hook(self._enter_hook(None)))
        for layer in self.order:
            for module in unit_modules(model, layer).values():
                for leaf in module.modules():
                    if leaf._parameters:
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
    streamed = []
    for layer in range(num_layers):
        modules = unit_modules(model, layer)
        for name, module in modules.items():
            materialize(name, module)
            if placement.weight_dtype == "fp8":
                convert_to_fp8(module, kernel=kernel, prefix=name)
        if placement.is_streamed(layer):
            streamed.append(_UnitWeights(layer, modules, pin=device.type == "cuda"))
    for name, child in model.named_children():
        if name not in ("blocks", "audio_injector"):  # every block and injector belongs to a unit
            materialize(name, child)
            if placement.weight_dtype == "fp8":
                convert_to_fp8(child, kernel=kernel, prefix=name)
    return LayerStreamer(model, streamed, device) if streamed else None
