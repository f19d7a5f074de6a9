"""Batches onto the GPU one step ahead: the next batch is copied and preprocessed on a side stream while the current
one trains (issue 4, item 4: uint8 frames cross PCIe, 4x fewer bytes than float, and become every encoder's input
on the GPU).

`CudaPrefetcher(loader, device, preprocess_fn)` yields `preprocess_fn(batch moved to device)`. On a CUDA device:
  1. the batch's CPU tensors are pinned (a no-op for a DataLoader with pin_memory=True), so that the copy can be
     asynchronous;
  2. on a side stream: every tensor is copied with non_blocking=True, `preprocess_fn` runs (its kernels queue on
     that stream), and an event is recorded;
  3. `__next__` makes the consumer's current stream wait for that event (a GPU-side wait: the host does not block),
     calls `record_stream(current)` on every CUDA tensor it hands over, and starts step 1-2 for the following batch.
`record_stream` matters because those tensors were allocated on the side stream: without it, once the training step
drops them, the caching allocator could give their memory to the side stream's next copy while the current stream
still reads them. With it, their blocks are reused only after the work the current stream has queued so far is done.
The pinned host buffers need nothing: the caching host allocator keeps a pinned block until its copy has finished.

On a CPU device it is a pass-through: `preprocess_fn(batch)` for each batch, the same outputs in the same order.

Batches may be tensors or any nesting of dicts, lists, tuples (named ones too) and dataclasses; other leaves pass
through untouched. The iterable is read one batch ahead of the consumer (the batch being prepared).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Iterable, Iterator

import torch


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`obj` with every tensor t inside it replaced by fn(t) (dicts, lists, tuples, namedtuples, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple: positional constructor
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # A shallow copy with its fields replaced: works for frozen dataclasses and init=False fields alike.
        new = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(new, f.name, map_tensors(getattr(obj, f.name), fn))
        return new
    return obj


def _visit_tensors(obj: Any, fn: Callable[[torch.Tensor], None]) -> None:
    def visit(t):
        fn(t)
        return t

    map_tensors(obj, visit)


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t


class CudaPrefetcher:
    """Iterate `iterable`, yielding `preprocess_fn(batch on device)`, the next batch prepared on a side stream."""

    def __init__(self, iterable: Iterable, device: torch.device | str,
                 preprocess_fn: Callable[[Any], Any] | None = None):
        self.iterable = iterable
        self.device = torch.device(device)
        self.preprocess_fn = preprocess_fn if preprocess_fn is not None else (lambda batch: batch)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream: torch.cuda.Stream | None = None  # the side stream, made by __iter__ on a CUDA device
        self._source: Iterator | None = None
        self._ready: tuple[Any, torch.cuda.Event] | None = None  # the prepared batch and its event
        self._error: BaseException | None = None  # raised by the __next__ that would have returned that batch
        self._exhausted = True

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        if self.device.type != "cuda":
            return (self.preprocess_fn(batch) for batch in self.iterable)
        self.stream = torch.cuda.Stream(device=self.device)
        self._source = iter(self.iterable)
        self._exhausted, self._error, self._ready = False, None, None
        self._prepare_next()
        return self

    def _prepare_next(self) -> None:
        """Read the next batch, pin it, and queue its copy and preprocessing on the side stream."""
        self._ready = None
        try:
            batch = next(self._source)
        except StopIteration:
            self._exhausted = True
            return
        except Exception as err:  # the loader's error surfaces when its batch is asked for, not one step early
            self._error = err
            return
        batch = map_tensors(batch, _pinned)
        try:
            with torch.cuda.stream(self.stream):
                moved = map_tensors(batch, lambda t: t.to(self.device, non_blocking=True))
                prepared = self.preprocess_fn(moved)
                event = torch.cuda.Event()
                event.record(self.stream)
        except Exception as err:
            self._error = err
            return
        self._ready = (prepared, event)

    def __next__(self) -> Any:
        if self._error is not None:
            err, self._error = self._error, None
            self._exhausted = True
            raise err
        if self._ready is None:
            raise StopIteration
        prepared, event = self._ready
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)

        def hand_over(t: torch.Tensor) -> None:
            if t.is_cuda:
                t.record_stream(current)

        _visit_tensors(prepared, hand_over)
        if not self._exhausted:
            self._prepare_next()  # the next batch's copy overlaps the step the caller runs on `prepared`
        else:
            self._ready = None
        return prepared
