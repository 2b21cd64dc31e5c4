"""Layer streaming: running the DiT with some blocks' weights in pinned host memory.

The weights of the streamed blocks (each with the audio injector that follows it) live in one pinned host
buffer per block. Two GPU slots take turns: while one block runs from one slot, the next streamed block is
copied into the other on a side CUDA stream. Module tensors are re-pointed at the slot just before the
block's code runs (forward pre-hooks), so the DiT itself is unchanged. Copies are ordered by CUDA events
(`liveavatar.runtime.transfer`); on the CPU the same logic runs with immediate copies, so the CPU tests
check that a streamed run is bit-identical to the resident one.
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import nn

from liveavatar.runtime.fp8 import convert_to_fp8, fp8_kernel_for
from liveavatar.runtime.placement import Placement
from liveavatar.runtime.pinned_chunks import aligned
from liveavatar.runtime.transfer import Copier, PinnedArena


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


def unit_tensors(modules: dict[str, nn.Module]) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """Every parameter and buffer of a unit as (owner module, attribute, is_parameter, tensor), in the
    order the streamer carves their host buffers and lays them out in a GPU slot."""
    entries = []
    for module in modules.values():
        for owner in module.modules():
            entries += [(owner, name, True, t) for name, t in owner._parameters.items() if t is not None]
            entries += [(owner, name, False, t) for name, t in owner._buffers.items() if t is not None]
    return entries


class _UnitWeights:
    """Every parameter and buffer of one unit in (pinned) host memory, and its place in a flat GPU slot.

    Each tensor is its own arena allocation rather than one buffer per unit: the arena's 1 GiB chunks then
    fill up to the last tensor that fits (about 3 % left over at 14B) instead of losing up to a third of a
    chunk behind units of 0.33 and 0.47 GiB. Tensors carved one after the other lie in the slot as in their
    chunk (both at 256-byte boundaries), so a copy into a slot is one transfer per run of them, a few per unit.
    """

    def __init__(self, layer: int, modules: dict[str, nn.Module], *, arena: PinnedArena):
        self.layer = layer
        self.entries = []  # (owner module, attribute, is_parameter, host tensor, offset in a slot)
        offset = 0
        for owner, name, is_parameter, tensor in unit_tensors(modules):
            host = arena.zeros(tuple(tensor.shape), tensor.dtype)
            host.copy_(tensor.detach())
            self.entries.append((owner, name, is_parameter, host, offset))
            offset += aligned(host.nbytes)
        self.nbytes = offset
        self.runs = self._contiguous_runs()
        self.bind_host()  # drops the references to the device copies

    def _contiguous_runs(self) -> list[tuple[torch.Tensor, int]]:
        """(host bytes, slot offset) of each run of tensors laid out alike in their chunk and in a slot."""
        runs: list[list] = []  # [chunk as bytes, start in the chunk, slot offset, length]
        for _, _, _, host, offset in self.entries:
            start = host.storage_offset() * host.element_size()
            last = runs[-1] if runs else None
            if last and last[0].data_ptr() == host.untyped_storage().data_ptr() and start - last[1] == offset - last[2]:
                last[3] = offset + host.nbytes - last[2]
                continue
            chunk = torch.empty(0, dtype=torch.uint8, device=host.device).set_(host.untyped_storage())
            runs.append([chunk, start, offset, host.nbytes])
        return [(chunk[start:start + length], offset) for chunk, start, offset, length in runs]

    def copies(self, slot: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(slot bytes, host bytes) pairs that copy the unit into ``slot``."""
        return [(slot[offset:offset + host.numel()], host) for host, offset in self.runs]

    def bind(self, slot: torch.Tensor) -> None:
        """Point every tensor of the unit at its place in a GPU slot."""
        self._point([slot[offset:offset + host.nbytes].view(host.dtype).reshape(host.shape)
                     for _, _, _, host, offset in self.entries])

    def bind_host(self) -> None:
        """Point every tensor of the unit at its host buffer."""
        self._point([host for _, _, _, host, _ in self.entries])

    def _point(self, tensors: list[torch.Tensor]) -> None:
        for (owner, name, is_parameter, _, _), tensor in zip(self.entries, tensors):
            if is_parameter:
                owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
            else:
                owner._buffers[name] = tensor


class LayerStreamer:
    """Streams the weights of some DiT blocks from pinned host memory through two GPU slots.

    Forward pre-hooks on every block (and on the head) tell which block's code runs next. When the code
    moves past a streamed unit, its slot is marked free (an event after all its queued work) and is
    refilled with the next streamed unit not already in a slot, in the order the blocks run, wrapping to
    the next forward. A unit is bound to its slot just before its code runs; if it is not in a slot yet
    (the first forward, or a call out of order such as the text keys/values of every block, which the DiT
    computes up front), it is copied on demand. Pre-hooks on the unit's own modules cover those calls.
    """

    def __init__(self, model: nn.Module, units: list[_UnitWeights], device: torch.device, arena: PinnedArena):
        self.device = torch.device(device)
        self.arena = arena  # where the units' host buffers were carved
        self.copier = Copier(self.device)
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
        for index, block in enumerate(model.blocks):
            block.register_forward_pre_hook(self._enter_hook(index))
        model.head.register_forward_pre_hook(self._enter_hook(None))
        for layer in self.order:
            for module in unit_modules(model, layer).values():
                for leaf in module.modules():
                    if any(t is not None for t in (*leaf._parameters.values(), *leaf._buffers.values())):
                        leaf.register_forward_pre_hook(self._enter_hook(layer))

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
            self.units[evicted].bind_host()
        self.slot_unit[slot] = layer
        self.slot_ready[slot] = self.copier.copy(self.units[layer].copies(self.slots[slot]),
                                                 after=[self.slot_free[slot]])
        self.copies += 1

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
    return LayerStreamer(model, streamed, device, arena) if streamed else None
