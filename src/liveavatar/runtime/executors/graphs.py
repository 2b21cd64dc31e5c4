"""CUDA graphs of the DiT forward: with everything resident, a forward's tensor work is one graph replay.

`ForwardGraphs.forward` has `run_block`'s signature. A graph is kept per (KV set, window length, cond
cache, shapes, the model's self-attention): the KV set's ring, its write positions (`KVCache.write_index`,
refreshed in place by `prepare_block`) and the cond cache are baked in by address; everything else a forward
reads is copied into static buffers that all graphs share before each replay: the latents, the step's time vectors, the
block's audio tokens, the RoPE rotations, and the request's text K/V when the request changes. A key is
captured the second time it comes up (the first run compiles and warms every kernel it uses), so a
request's steady forwards replay from the second full-window block on, and the fill-phase forwards of the
first clip (one key per step and window length) replay from the second request on. All graphs share one
memory pool (they run one at a time); only their outputs outlive a replay, and each is cloned.

Layer or cache streaming issues copies and waits from Python between layers, which a graph cannot hold:
those placements run the regions without graphs (`graphs_allowed`).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from liveavatar.models.transformer import BlockInputs, TimeVectors

Capture = Callable[[Callable[[], torch.Tensor]], tuple[object, torch.Tensor]]
"""Records ``run`` once: returns an object whose ``replay()`` reruns the recorded work, and its output."""


def graphs_allowed(placement, layer_streamer, caches) -> bool:
    """True when a forward has no host-side work between layers (`Placement.resident`, and neither a
    layer streamer nor a cache streamer in use)."""
    return placement.resident and layer_streamer is None and caches.streamer is None


def cuda_capture(pool) -> Capture:
    """Capture on one side stream (so cuBLAS keeps one workspace for all graphs) into ``pool``.
    ``thread_local`` confines the capture's restrictions to this thread; the capture executes nothing."""
    stream = torch.cuda.Stream()

    def capture(run):
        graph = torch.cuda.CUDAGraph()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                output = run()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        return graph, output

    return capture


class ForwardGraphs:
    """Replays `model.run_block` from CUDA graphs (see the module docstring); counts what it did."""

    def __init__(self, model, *, capture: Capture | None = None):
        self.model = model
        self._capture = capture
        self.graphs: dict[tuple, tuple[object, torch.Tensor]] = {}
        self.seen: set[tuple] = set()
        self.static: dict[str, torch.Tensor] = {}
        self.static_text: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._text_source = None
        self.failed: str | None = None
        self.captures = self.replays = self.direct = 0

    def key(self, x: torch.Tensor, kv, cond) -> tuple:
        return (id(kv), kv.storage.tensors[0].data_ptr(), kv.write_index.data_ptr(), kv.length,
                id(cond), cond.address, cond.length, tuple(x.shape), x.dtype,
                self.model.self_attention)

    def forward(self, x: torch.Tensor, time: TimeVectors, text_kv, audio, kv, cond, inputs: BlockInputs
                ) -> torch.Tensor:
        key = self.key(x, kv, cond)
        if key not in self.graphs and (self.failed is not None or key not in self.seen):
            self.seen.add(key)
            self.direct += 1
            return self.model.run_block(x, time, text_kv, audio, kv, cond, inputs)
        static = self._load(x, time, text_kv, audio, inputs)
        entry = self.graphs.get(key)  # after the load, which drops graphs of buffers it had to replace
        if entry is None:
            entry = self._record(key, static, kv, cond)
            if entry is None:
                self.direct += 1
                return self.model.run_block(x, time, text_kv, audio, kv, cond, inputs)
        graph, output = entry
        graph.replay()
        self.replays += 1
        return output.clone()

    def _record(self, key: tuple, static, kv, cond):
        if self._capture is None:
            self._capture = cuda_capture(torch.cuda.graph_pool_handle())
        try:
            entry = self._capture(lambda: self.model.run_block(*static, kv, cond, static_inputs(self.static)))
        except Exception as error:  # e.g. an op that cannot be captured here: run without graphs from now on
            self.failed = f"{type(error).__name__}: {error}"
            warnings.warn(f"CUDA graph capture failed ({self.failed}); forwards run without graphs")
            return None
        self.graphs[key] = entry
        self.captures += 1
        return entry

    def _put(self, name: str, value: torch.Tensor) -> torch.Tensor:
        buffer = self.static.get(name)
        if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
            self.graphs.clear()  # they read the buffer this one replaces
            buffer = self.static[name] = torch.empty_like(value)
        return buffer.copy_(value)

    def _load(self, x, time: TimeVectors, text_kv, audio, inputs: BlockInputs) -> tuple:
        """Copy a forward's inputs into the static buffers; returns run_block's leading arguments."""
        if text_kv is not self._text_source:
            if self.static_text is None or [k.shape for k, _ in self.static_text] != [k.shape for k, _ in text_kv]:
                self.graphs.clear()
                self.static_text = [(torch.empty_like(k), torch.empty_like(v)) for k, v in text_kv]
            for (k, v), (static_k, static_v) in zip(text_kv, self.static_text):
                static_k.copy_(k)
                static_v.copy_(v)
            self._text_source = text_kv
        (block_cos, block_sin), (cond_cos, cond_sin) = inputs
        for name, value in (("block_cos", block_cos), ("block_sin", block_sin), ("cond_cos", cond_cos),
                            ("cond_sin", cond_sin)):
            self._put(name, value)
        static_x = self._put("x", x)
        static_time = TimeVectors(self._put("time_embedding", time.embedding),
                                  self._put("time_modulation", time.modulation))
        static_audio = type(audio)(self._put("audio_local", audio.local), self._put("audio_pooled", audio.pooled))
        return static_x, static_time, self.static_text, static_audio


def static_inputs(static: dict[str, torch.Tensor]) -> BlockInputs:
    return BlockInputs((static["block_cos"], static["block_sin"]), (static["cond_cos"], static["cond_sin"]))
