"""Stop signals: SIGTERM / SIGINT end a training run at the next step boundary, with a checkpoint, exit status 0.

Clusters stop jobs by signalling every process of the job: SLURM's preemption and `scancel`, Kubernetes, torchrun's
agent (which forwards its own SIGTERM to the ranks), a terminal's Ctrl-C (the foreground process group). So:
- the trainer's handler only records the signal; the loop asks `should_stop()` at each step boundary (all ranks
  agree), saves and exits 0. A repeated SIGTERM is only logged (launchers send it again, e.g. torchrun's agent after
  the cluster's); a second SIGINT restores the previous handler's behaviour (a second Ctrl-C interrupts at once);
- DataLoader workers ignore both (`ignore_in_worker`, their `worker_init_fn`): a worker killed by the job's SIGTERM
  would fail the run from inside the save. Workers are started with the signals held (`held()`), so one that
  arrives while a worker starts never reaches it before it ignores them.
Nothing here imports torch at module level: the CLI installs the handler before the slow imports, so a signal that
arrives during start-up also stops the run cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalState:
    """What `install_signal_handlers` returns: `requested` is the first signal number received (None before)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def should_stop(self) -> bool:
        """Call at every step boundary, on every rank: true on all ranks as soon as any rank got a signal (so all
        ranks take the save together; under torchrun every rank gets SIGTERM, but not at the same instant)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.requested is not None
        from merv_fast.train.checkpoint import all_true

        return not all_true(self.requested is None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def install_signal_handlers(on_signal: Callable[[int], None] | None = None,
                            signals: tuple[int, ...] = STOP_SIGNALS) -> SignalState:
    """SIGTERM / SIGINT only set a flag (and call `on_signal(signum)` if given): the training loop checks
    `state.should_stop()` at the next step boundary, saves (`Checkpointer.save_final`) and exits 0. A second SIGINT
    while the first is pending restores the previous handler's behaviour (a second Ctrl-C interrupts); a repeated
    SIGTERM changes nothing. Must be called from the main thread."""
    st = SignalState()

    def handler(signum, frame):
        if st.requested is not None:
            if signum == signal.SIGINT and st.requested == signal.SIGINT:
                prev = st._previous.get(signum, signal.SIG_DFL)
                st.restore()
                if callable(prev):
                    prev(signum, frame)
                else:
                    signal.raise_signal(signum)
            return
        st.requested = signum
        log.warning("received %s: saving a checkpoint and stopping at the next step boundary",
                    signal.Signals(signum).name)
        if on_signal is not None:
            on_signal(signum)

    for sig in signals:
        st._previous[sig] = signal.signal(sig, handler)
    return st


@contextlib.contextmanager
def held(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Block `signals` in this thread while the body runs (a signal that arrives meanwhile is delivered at the end).
    Processes forked meanwhile (DataLoader workers) start with them blocked, until `ignore_in_worker`."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_in_worker(worker_id: int | None = None) -> None:
    """A DataLoader `worker_init_fn`: ignore the stop signals (the main process handles them and shuts the workers
    down itself), then unblock them; one already pending is discarded."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
