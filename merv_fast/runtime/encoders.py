"""The frozen encoders' forward, run one after another, concurrently on CUDA streams, or as one CUDA graph.

`EncoderRunner(encoders, runtime)(pixels, is_image)` maps each encoder's input [B, T_e, 3, S, S] to its features
[B, T_out, N, C], whatever the mode; modes change when kernels run, never what they compute:

- `sequential`: each encoder in turn on the current stream.
- `streams`: encoder e on its own CUDA stream, forked from the current stream (the side stream waits for it, so it
  sees the inputs the caller queued) and joined back (the current stream waits for every side stream, so whatever
  the caller queues next sees the features). GPU-side waits only: the host never synchronises. Lifetimes across
  streams: each input is `record_stream`ed on the side stream that reads it, and each output, allocated on a side
  stream, is `record_stream`ed on the current stream that receives it, so the caching allocator reuses neither
  block before the other stream's queued work is done.
- `graph`: the whole multi-stream forward of `streams`, captured as ONE CUDA graph per key (batch-size bucket, is
  image, input shapes and dtypes, autocast state), lazily on the key's first call, after two warm-up runs on a side
  stream; all graphs share one memory pool. A call copies its inputs into the key's static input buffers (a batch
  smaller than its bucket, the next power of two, fills the first rows; every sample is encoded independently, so
  the other rows cannot affect them), replays, and CLONES the outputs' first B rows on the current stream: the caller
  owns what it gets, and the next replay (for instance the prefetcher's, one micro-batch ahead) may overwrite the
  static outputs while the caller still reads its clone.
- On CPU (or any non-CUDA input) every mode runs `sequential`: identical outputs.

Images: an image is a static video. The per-frame encoders (DINOv2, SigLIP) encode its one frame and tile the
features over time (exact); the video encoders still see every repeated frame (each time step gets its own
embedding). `compile=True` wraps each encoder in `torch.compile` (any mode; in `graph` mode the compiled kernels are
what the graph captures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from merv_fast.config import ENCODER_MODES, EncoderRuntime


def is_per_frame(enc_cfg) -> bool:
    """Encoders that see each frame on its own (no tubelets, no temporal attention): DINOv2, SigLIP."""
    return enc_cfg.tubelet == 1 and enc_cfg.clip_frames == 0


def batch_bucket(batch: int) -> int:
    """The graph key's batch size: the next power of two, so a handful of graphs serves every batch size."""
    return 1 << max(0, batch - 1).bit_length()


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: list[torch.Tensor]  # static input buffers, [bucket, ...] per encoder
    outputs: list[torch.Tensor]  # static outputs, overwritten by every replay


class EncoderRunner:
    """Runs a MERV's frozen encoders (an `nn.ModuleDict`, preset order) in the configured mode. Not a module: it holds
    no parameters of its own, only references to the encoders, their streams and captured graphs."""

    def __init__(self, encoders: nn.ModuleDict, runtime: EncoderRuntime | None = None,
                 compile_backend: str = "inductor"):
        runtime = runtime or EncoderRuntime()
        if runtime.mode not in ENCODER_MODES:
            raise ValueError(f"encoders.mode={runtime.mode!r}; choose one of {list(ENCODER_MODES)}")
        self.encoders = encoders
        self.mode = runtime.mode
        self.compiled = runtime.compile
        self._forwards: list[Callable[[torch.Tensor], torch.Tensor]] = [
            torch.compile(enc, backend=compile_backend, dynamic=False) if runtime.compile else enc
            for enc in encoders.values()]
        self._streams: dict[torch.device, list[torch.cuda.Stream]] = {}
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None  # one memory pool for every captured graph

    @property
    def graph_keys(self) -> list[tuple]:
        return list(self._graphs)

    # ------------------------------------------------------------------------------------------------ entry point
    def __call__(self, pixels: list[torch.Tensor], is_image: bool = False) -> list[torch.Tensor]:
        if len(pixels) != len(self.encoders):
            raise ValueError(f"expected inputs for {len(self.encoders)} encoders {list(self.encoders)}, "
                             f"got {len(pixels)}")
        tiled = [is_image and is_per_frame(enc.config) for enc in self.encoders.values()]
        inputs = [px[:, :1] if tile else px for px, tile in zip(pixels, tiled)]
        if self.mode == "sequential" or not all(x.is_cuda for x in inputs):
            outputs = self.run_sequential(inputs)
        elif self.mode == "streams":
            outputs = self.run_streams(inputs)
        else:
            outputs = self.run_graph(inputs, is_image)
        return [out.expand(-1, px.shape[1], -1, -1) if tile else out
                for out, px, tile in zip(outputs, pixels, tiled)]

    # ------------------------------------------------------------------------------------------------ the modes
    def run_sequential(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [forward(x) for forward, x in zip(self._forwards, inputs)]

    def streams_for(self, device: torch.device) -> list[torch.cuda.Stream]:
        if device not in self._streams:
            self._streams[device] = [torch.cuda.Stream(device=device) for _ in self._forwards]
        return self._streams[device]

    def run_streams(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        device = inputs[0].device
        current = torch.cuda.current_stream(device)
        capturing = torch.cuda.is_current_stream_capturing()
        outputs = []
        for forward, x, stream in zip(self._forwards, inputs, self.streams_for(device)):
            stream.wait_stream(current)  # fork: the side stream sees everything queued before this call
            with torch.cuda.stream(stream):
                outputs.append(forward(x))
            if not capturing:  # under capture every tensor here lives as long as the graph: nothing to protect
                x.record_stream(stream)
        for out, stream in zip(outputs, self.streams_for(device)):
            current.wait_stream(stream)  # join
            if not capturing:
                out.record_stream(current)
        return outputs

    def run_graph(self, inputs: list[torch.Tensor], is_image: bool) -> list[torch.Tensor]:
        batch = inputs[0].shape[0]
        device = inputs[0].device
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        key = (batch_bucket(batch), is_image, tuple((tuple(x.shape[1:]), x.dtype) for x in inputs), autocast)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(key[0], inputs, device)
        for static, x in zip(captured.inputs, inputs):
            static[:batch].copy_(x)
        captured.graph.replay()
        return [out[:batch].clone() for out in captured.outputs]

    def _capture(self, bucket: int, inputs: list[torch.Tensor], device: torch.device) -> _Captured:
        static = []
        for x in inputs:
            buffer = torch.zeros((bucket, *x.shape[1:]), dtype=x.dtype, device=device)
            buffer[:x.shape[0]].copy_(x)
            static.append(buffer)
        # Warm-up off the current stream (lazy cuBLAS/cuDNN set-up, torch.compile) before capture, as CUDA graphs need.
        current = torch.cuda.current_stream(device)
        warm = torch.cuda.Stream(device=device)
        warm.wait_stream(current)
        with torch.cuda.stream(warm):
            for _ in range(2):
                self.run_streams(static)
        current.wait_stream(warm)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may call CUDA during the capture without breaking it
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = self.run_streams(static)
        return _Captured(graph, static, outputs)
