"""A per-file timeout enforced from outside the decoder: decoding runs in a child process that is killed on time-out.

Why a process: a decoder stuck inside FFmpeg's C code holds no Python frame that a signal or a thread could
interrupt, so only killing the process that runs it is sure to stop it. Design:

- One long-lived child per calling process (started on first use, in ~0.1 s: it imports numpy and PyAV, not torch;
  it imports torch only if asked to run torchcodec). `subprocess` rather than `multiprocessing`, because the data
  loader's workers are daemonic processes, which multiprocessing forbids from having children.
- A request is `(fn, args, kwargs)` pickled over a pipe (fn by reference: a module-level function). The answer is
  pickled with protocol 5 and its large buffers (the decoded frames) sent raw after it, read straight into the
  array that the caller gets: one copy through the pipe, no pickle copy.
- The caller waits with `select` against a deadline. Past it, the child is SIGKILLed and reaped, the call raises
  MediaError("timed out after Ns"), and the next call starts a fresh child. A child that dies (a decoder crash)
  gives MediaError("decoder crashed ...") the same way: the caller never hangs and never crashes.
- The child dies with its parent (PR_SET_DEATHSIG on Linux; EOF on its request pipe otherwise), and a process
  forked from a caller (a data loader worker) starts its own child instead of sharing its parent's pipes.
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from merv_fast.data.media_types import MediaError

_HEADER = struct.Struct("<Q")  # every message: 8-byte little-endian length, then the bytes


# -------------------------------------------------------------------------------------------------- child side
def _read_exact(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 22))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _send(fd: int, obj: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    _write_all(fd, _HEADER.pack(len(head)) + head + _HEADER.pack(len(raws)))
    for raw in raws:
        _write_all(fd, _HEADER.pack(raw.nbytes))
        _write_all(fd, raw)


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass  # not Linux: the closed request pipe still ends the loop


def serve(request_fd: int, answer_fd: int) -> None:
    """The child's loop: run each request, answer ("ok", result) or ("error", exception)."""
    _die_with_parent()
    while True:
        try:
            (size,) = _HEADER.unpack(_read_exact(request_fd, _HEADER.size))
            fn, args, kwargs = pickle.loads(_read_exact(request_fd, size))
        except EOFError:
            return
        try:
            answer = ("ok", fn(*args, **kwargs))
        except BaseException as err:  # sent back and re-raised in the caller
            answer = ("error", err)
        try:
            _send(answer_fd, answer)
        except (pickle.PicklingError, TypeError, AttributeError) as err:  # an unpicklable result or exception
            _send(answer_fd, ("error", RuntimeError(f"{type(answer[1]).__name__}: {answer[1]} "
                                                    f"(unpicklable: {err})")))


# ------------------------------------------------------------------------------------------------- caller side
class MediaWorker:
    """The caller's handle on one child process; `call` runs a function there under a deadline."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.pid_of_owner = None
        self.lock = threading.Lock()

    def start(self) -> None:
        request_r, request_w = os.pipe()
        answer_r, answer_w = os.pipe()
        code = f"from merv_fast.data.media_worker import serve; serve({request_r}, {answer_w})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(request_r, answer_w),
                                     stdin=subprocess.DEVNULL)
        os.close(request_r)
        os.close(answer_w)
        self.request_fd, self.answer_fd = request_w, answer_r
        self.pid_of_owner = os.getpid()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.pid_of_owner == os.getpid():  # a forked copy must not kill its parent's child
            self.proc.kill()
            self.proc.wait()
            for fd in (self.request_fd, self.answer_fd):
                os.close(fd)
        self.proc = None

    def _read(self, n: int, deadline: float, into: memoryview | None = None) -> bytes | memoryview:
        view = into if into is not None else memoryview(bytearray(n))
        got = 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.answer_fd], [], [], remaining)[0]:
                raise TimeoutError
            k = os.readv(self.answer_fd, [view[got:]])
            if k == 0:
                raise EOFError
            got += k
        return view

    def call(self, fn: Callable, args: tuple, kwargs: dict, timeout_s: float) -> Any:
        with self.lock:
            if self.proc is None or self.pid_of_owner != os.getpid() or self.proc.poll() is not None:
                self.stop()
                self.start()
            request = pickle.dumps((fn, args, kwargs), protocol=5)
            deadline = time.monotonic() + timeout_s
            try:
                _write_all(self.request_fd, _HEADER.pack(len(request)) + request)
                (size,) = _HEADER.unpack(self._read(_HEADER.size, deadline))
                head = bytes(self._read(size, deadline))
                (count,) = _HEADER.unpack(self._read(_HEADER.size, deadline))
                buffers = []
                for _ in range(count):
                    (nbytes,) = _HEADER.unpack(self._read(_HEADER.size, deadline))
                    buffers.append(self._read(nbytes, deadline))
            except TimeoutError:
                self.stop()
                raise _timed_out(args, timeout_s) from None
            except (EOFError, BrokenPipeError):
                code = self.proc.wait()
                self.stop()
                raise MediaError(args[0] if args else "?", f"decoder crashed (exit status {code})") from None
        status, value = pickle.loads(head, buffers=buffers)
        if status == "error":
            raise value
        return value


def _timed_out(args: tuple, timeout_s: float) -> MediaError:
    return MediaError(args[0] if args else "?", f"timed out after {timeout_s:g}s")


_WORKER = MediaWorker()


def load_media_with_timeout(fn: Callable, *args, timeout_s: float | None, **kwargs) -> Any:
    """`fn(*args, **kwargs)` in the decode worker process, killed after `timeout_s` seconds (MediaError naming
    args[0], the path, "timed out after Ns"). `fn` must be a module-level function and its result picklable.
    `timeout_s=None` runs it here, in this process, with no bound."""
    if timeout_s is None:
        return fn(*args, **kwargs)
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    return _WORKER.call(fn, args, kwargs, timeout_s)


def stop_worker() -> None:
    """End the decode worker process (it restarts on the next timed call)."""
    with _WORKER.lock:
        _WORKER.stop()
