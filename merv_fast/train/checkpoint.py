"""Sharded, atomic, exactly-resumable training checkpoints (torch.distributed.checkpoint), and weight export.

Layout of `out_dir` (every name below is ours; DCP owns the files inside a step directory except `meta.json` and
`rng/`):

    out_dir/
      latest                       text: the name of the newest complete checkpoint ("step-00000012"), atomically
                                   replaced; a convenience for people and tools, `load_latest` does not need it
      step-00000008/               a complete checkpoint (a directory is only ever renamed into this name after
        .metadata, *.distcp        every rank has finished writing into `step-00000008.tmp`)
        meta.json                  step, world size, LR scheduler, sampler position, optimizer hyper-parameters
        rng/rank-00000.safetensors per-rank RNG states (python and numpy in the safetensors metadata as JSON)
      step-00000012/
      step-00000016.tmp/           a save in progress, or the leftover of a killed one: never loaded, removed by the
                                   next save of that step

What goes into the DCP shards: the model's weights except the frozen encoders (they come from their weights
directories; the visual path's few frozen-but-randomly-initialised weights are kept) and the optimizer's tensor state (exp_avg, exp_avg_sq, step), both as produced by
`torch.distributed.checkpoint.state_dict.get_state_dict` (sharded DTensors under FSDP2, so each rank writes only its
shard and a load on another world size reshards). Everything that is not a tensor goes to JSON, never through
pickle of ours; DCP writes tensors with torch.save and reads them with `torch.load(weights_only=True)` (no code is
unpickled). DCP's own `.metadata` index is DCP's format.

Exactness: a checkpoint taken after step N and loaded into freshly built objects continues with bitwise the same
losses as an uninterrupted run, provided the trainer (a) builds model, optimizer, scheduler and sampler the same way,
(b) saves at a step boundary, and (c) restores before drawing any random number for step N+1 (`load_latest` restores
the RNG states last, after everything that might consume randomness while loading).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{8})$")
META_FILE = "meta.json"
RNG_DIR = "rng"
LATEST_FILE = "latest"

# get_state_dict options: optimizer state keyed by flat FQN strings ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr")
# so that its tensor and non-tensor halves can be split between DCP and JSON. The model's state dict is filtered by
# prefix afterwards (`exclude`): frozen parameters outside the encoders (e.g. the fusion attention's frozen
# value/output projections, randomly initialised as in the release) are saved, the encoders are not.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_LOAD_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)
DEFAULT_EXCLUDE = ("encoders.",)
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or does not fit what it is loaded into."""


class TrainStateLike(Protocol):
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # state_dict() / load_state_dict()
    sampler: Any  # state_dict() / load_state_dict(); its state_dict() must count *consumed* micro-batches
    step: int


# ----------------------------------------------------------------------------------------------- distributed helpers
def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _all_true(flag: bool) -> bool:
    """True on every rank iff `flag` is true on every rank."""
    if not _dist():
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int32,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    if t.device.type == "cuda":
        t = t.to(torch.cuda.current_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) == 0


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group that it assumes a single process: that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    """This process's RNG states: python `random`, numpy's global generator, torch CPU, and every CUDA device's when
    CUDA is initialised. Tensors stay tensors; `save_rng` writes them as safetensors + JSON."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng` (also accepts the JSON-round-tripped form `load_rng` returns)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            log.warning("checkpoint holds %d CUDA RNG states, this process sees %d devices: restoring the first %d",
                        len(cuda), torch.cuda.device_count(), min(len(cuda), torch.cuda.device_count()))
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


def save_rng(path: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors = {"torch": state["torch"].contiguous()}
    for i, s in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = s.contiguous()
    meta = {"python": json.dumps(state["python"]), "numpy": json.dumps(state["numpy"]),
            "cuda_devices": str(len(state.get("cuda", [])))}
    save_file(tensors, str(path), metadata=meta)


def load_rng(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state: dict[str, Any] = {"python": json.loads(meta["python"]), "numpy": json.loads(meta["numpy"]),
                                 "torch": f.get_tensor("torch")}
        n = int(meta.get("cuda_devices", "0"))
        if n:
            state["cuda"] = [f.get_tensor(f"cuda.{i}") for i in range(n)]
    return state


# ----------------------------------------------------------------------------------------------- signals
class SignalState:
    """What `install_signal_handlers` returns: `requested` is the first signal number received (None before)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def should_stop(self) -> bool:
        """Call at every step boundary, on every rank: true on all ranks as soon as any rank got a signal (so all
        ranks take the save together; under torchrun every rank gets SIGTERM, but not at the same instant)."""
        if not _dist():
            return self.requested is not None
        return not _all_true(self.requested is None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def install_signal_handlers(on_signal: Callable[[int], None] | None = None,
                            signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> SignalState:
    """SIGTERM / SIGINT only set a flag (and call `on_signal(signum)` if given): the training loop checks
    `state.should_stop()` at the next step boundary, saves (`Checkpointer.save_final`) and exits 0. A second signal
    of the same kind while the first is pending restores the previous handler's behaviour (a second Ctrl-C kills).
    Must be called from the main thread."""
    st = SignalState()

    def handler(signum, frame):
        if st.requested is not None and signum == st.requested:
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


# ----------------------------------------------------------------------------------------------- state dicts
def _split_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, other = {}, {}
    for k, v in osd.items():
        (tensors if isinstance(v, torch.Tensor) else other)[k] = v
    return tensors, other


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{what} is not JSON-serialisable ({err}); checkpoints never pickle") from err


def _retuple(loaded: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """JSON turns tuples (AdamW's betas) into lists: give them back the type the live optimizer has."""
    out = {}
    for k, v in loaded.items():
        if isinstance(v, list) and isinstance(current.get(k), tuple):
            v = tuple(v)
        out[k] = v
    return out


def _trainable_finite(model: torch.nn.Module) -> bool:
    ok = True
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                t = p.to_local() if hasattr(p, "to_local") else p
                if t.numel() and not bool(torch.isfinite(t).all()):
                    ok = False
                    break
    return _all_true(ok)


def _writer(path: Path):
    # Tensors in DCP's default serialisation (torch.save of plain tensors, which DCP's reader opens with
    # `torch.load(weights_only=True)`). DCP's safetensors serialisation is not used: torch's FileSystemReader cannot
    # read it back (torch 2.13).
    return dcp.FileSystemWriter(str(path))


# ----------------------------------------------------------------------------------------------- the checkpointer
def _model_config(state: TrainStateLike) -> dict | None:
    """The MERV config of the model being checkpointed (`state.model`: the MERV or the TrainModule over it)."""
    model = getattr(state, "model", None)
    cfg = getattr(getattr(model, "merv", model), "config", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else None


def step_dir_name(step: int) -> str:
    return f"step-{int(step):08d}"


class Checkpointer:
    """`maybe_save(step, state)` every `save_every` steps (0: never on the way), `save_final(state)` at the end (also
    after a signal), `load_latest(state)` at start-up for `--resume`. Keeps the newest `keep_last` checkpoints
    (0: keep all). All ranks must call every method together (they contain collectives). Model weights under the
    `exclude` prefixes (default: the frozen encoders, which come from their weights directories) are not saved."""

    def __init__(self, out_dir: str | os.PathLike, keep_last: int = 3, save_every: int = 0,
                 exclude: tuple[str, ...] = DEFAULT_EXCLUDE):
        if keep_last < 0 or save_every < 0:
            raise ValueError("keep_last and save_every must be >= 0")
        self.out_dir = Path(out_dir)
        self.exclude = tuple(exclude)
        self.keep_last = int(keep_last)
        self.save_every = int(save_every)
        self.last_saved_step: int | None = None

    # ------------------------------------------------------------------ discovery
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (`.tmp` leftovers are never listed)."""
        if not self.out_dir.is_dir():
            return []
        found = []
        for p in self.out_dir.iterdir():
            m = STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / META_FILE).is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the `latest` pointer if it names one, else the highest step on disk."""
        pointer = self.out_dir / LATEST_FILE
        complete = self.checkpoints()
        if pointer.is_file():
            named = self.out_dir / pointer.read_text().strip()
            if named in complete and named == complete[-1]:
                return named
        return complete[-1] if complete else None

    # ------------------------------------------------------------------ saving
    def maybe_save(self, step: int, state: TrainStateLike, loss: float | torch.Tensor | None = None) -> Path | None:
        """Save when `save_every` divides `step` (the number of optimizer steps done). Pass the step's loss to make a
        non-finite one skip the save (the weights are also checked)."""
        if self.save_every <= 0 or step <= 0 or step % self.save_every:
            return None
        return self.save(state, step=step, loss=loss)

    def save_final(self, state: TrainStateLike, loss: float | torch.Tensor | None = None) -> Path | None:
        """The end-of-run (or on-signal) save; a no-op when this step is already saved."""
        return self.save(state, step=int(state.step), loss=loss)

    def save(self, state: TrainStateLike, step: int | None = None,
             loss: float | torch.Tensor | None = None) -> Path | None:
        """Write checkpoint `step` (default `state.step`). Returns its directory, or None when nothing was written
        (non-finite loss or weights: the last good checkpoint stays the newest; or the step already saved)."""
        step = int(state.step if step is None else step)
        if loss is not None:
            loss_val = float(loss.detach().float().item() if isinstance(loss, torch.Tensor) else loss)
            if not _all_true(math.isfinite(loss_val)):
                log.error("step %d: loss is not finite: no checkpoint written (the last good one is kept)", step)
                return None
        final = self.out_dir / step_dir_name(step)
        if self.last_saved_step == step and final.is_dir():
            return final  # saved (or resumed from) at this very step already, e.g. save_every hit the last step
        if not _trainable_finite(state.model):
            log.error("step %d: trainable weights hold NaN/Inf: no checkpoint written (the last good one is kept)",
                      step)
            return None
        rank, world = _rank(), _world()
        tmp = self.out_dir / (step_dir_name(step) + ".tmp")
        if rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # a killed save's leftover
            (tmp / RNG_DIR).mkdir(parents=True)
        _barrier()

        with_optimizer = bool(state.optimizer.state)  # False before the first optimizer step
        model_sd, optim_sd = self._state_dicts(state, with_optimizer)
        optim_tensors, optim_other = _split_optimizer(optim_sd)
        with _quiet_single_process():
            dcp.save({"model": model_sd, "optim": optim_tensors}, storage_writer=_writer(tmp))
        save_rng(tmp / RNG_DIR / f"rank-{rank:05d}.safetensors", capture_rng())

        if rank == 0:
            meta = {
                "format": FORMAT_VERSION,
                "step": step,
                "world_size": world,
                "scheduler": _jsonable(state.scheduler.state_dict(), "the LR scheduler's state") if
                getattr(state, "scheduler", None) is not None else None,
                "sampler": _jsonable(state.sampler.state_dict(), "the sampler's state") if
                getattr(state, "sampler", None) is not None else None,
                "optimizer_state": with_optimizer,
                "optimizer_hparams": _jsonable(optim_other, "the optimizer's param groups"),
                "torch": torch.__version__,
                # what the weights are, so that `--weights` rebuilds the model from the checkpoint alone
                "model_config": _model_config(state),
                "seed": (getattr(state, "config", None) or {}).get("seed"),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        _barrier()  # every rank's shards and RNG file are written
        if rank == 0:
            for f in (tmp / RNG_DIR).iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if final.exists():  # another run's checkpoint of this step in the same out_dir: superseded
                os.replace(final, final.with_name(final.name + ".deleting"))
            os.replace(tmp, final)  # the commit point
            shutil.rmtree(final.with_name(final.name + ".deleting"), ignore_errors=True)
            _fsync_dir(self.out_dir)
            _write_text_atomic(self.out_dir / LATEST_FILE, final.name + "\n")
            self._prune()
        _barrier()
        self.last_saved_step = step
        log.info("saved checkpoint %s", final)
        return final

    def _state_dicts(self, state: TrainStateLike, with_optimizer: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        if not with_optimizer:
            # (get_state_dict would initialise an empty optimizer's state by stepping it with zero grads and lr 0,
            # which moves Adam's step counters: a checkpoint before the first step must not touch the optimizer)
            model_sd = get_model_state_dict(state.model, options=_OPTIONS)
            return {k: v for k, v in model_sd.items() if not k.startswith(self.exclude)}, {}
        model_sd, optim_sd = get_state_dict(state.model, state.optimizer, options=_OPTIONS)
        return {k: v for k, v in model_sd.items() if not k.startswith(self.exclude)}, optim_sd

    def _prune(self) -> None:
        for leftover in self.out_dir.glob("step-*.deleting"):  # a kill mid-delete
            shutil.rmtree(leftover, ignore_errors=True)
        if self.keep_last <= 0:
            return
        for old in self.checkpoints()[:-self.keep_last]:
            # rename first so that a kill mid-delete never leaves a half directory under a complete-looking name
            doomed = old.with_name(old.name + ".deleting")
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    # ------------------------------------------------------------------ loading
    def load_latest(self, state: TrainStateLike) -> bool:
        """Load the newest complete checkpoint into `state` (model, optimizer, scheduler, sampler, step, this rank's
        RNG). False (and `state` untouched) when there is none."""
        found = self.latest()  # every rank looks (a shared filesystem); they must agree
        names = [found.name if found is not None else ""]
        if _dist():
            gathered: list[Any] = [None] * _world()
            dist.all_gather_object(gathered, names[0])
            if len(set(gathered)) != 1:
                raise CheckpointError(f"ranks see different latest checkpoints in {self.out_dir}: {gathered}")
        if found is None:
            return False
        self.load(state, found)
        return True

    def load(self, state: TrainStateLike, path: str | os.PathLike) -> None:
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {META_FILE})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT_VERSION}")

        # The live state dicts give DCP the layout (and sharding) to read into; a fresh optimizer gets its state
        # initialised by get_state_dict so that there is something to load into (all of it is then overwritten).
        with_optimizer = bool(meta.get("optimizer_state", True))
        model_sd, optim_sd = self._state_dicts(state, with_optimizer)
        optim_tensors, optim_other = _split_optimizer(optim_sd)
        target = {"model": model_sd, "optim": optim_tensors}
        with _quiet_single_process():
            dcp.load(target, storage_reader=dcp.FileSystemReader(str(path)))
        if not with_optimizer:
            set_model_state_dict(state.model, target["model"], options=_LOAD_OPTIONS)
        else:
            self._set_optimizer(state, path, target, optim_other, meta)
        self._load_rest(state, path, meta)

    def _set_optimizer(self, state, path, target, optim_other, meta) -> None:
        saved_other = meta["optimizer_hparams"]
        missing = sorted(set(optim_other) - set(saved_other))
        if missing:
            raise CheckpointError(f"{path}: optimizer hyper-parameters missing for {missing[:3]} ...")
        optim_full = {**target["optim"], **_retuple({k: saved_other[k] for k in optim_other}, optim_other)}
        set_state_dict(state.model, state.optimizer, model_state_dict=target["model"],
                       optim_state_dict=optim_full, options=_LOAD_OPTIONS)

    def _load_rest(self, state, path, meta) -> None:
        if getattr(state, "scheduler", None) is not None and meta.get("scheduler") is not None:
            state.scheduler.load_state_dict(meta["scheduler"])
        if getattr(state, "sampler", None) is not None and meta.get("sampler") is not None:
            state.sampler.load_state_dict(meta["sampler"])
        state.step = int(meta["step"])

        rng_file = path / RNG_DIR / f"rank-{_rank():05d}.safetensors"
        if rng_file.is_file():
            restore_rng(load_rng(rng_file))
        else:
            log.warning("%s has no RNG state for rank %d (saved on %d ranks, now %d): random streams restart from "
                        "the current seed, so this resume is not bit-exact", path, _rank(), meta["world_size"],
                        _world())
        if meta["world_size"] != _world():
            log.warning("resumed %s saved on %d ranks on %d ranks (DCP resharded the weights and optimizer)",
                        path, meta["world_size"], _world())
        self.last_saved_step = state.step
        log.info("resumed from %s (step %d)", path, state.step)


# ----------------------------------------------------------------------------------------------- export
def _clean_fqn(name: str) -> str:
    for w in _WRAPPER_PREFIXES:
        name = name.replace(w, "")
    return name


def full_state_dict(model: torch.nn.Module, exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
                    trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights outside `exclude` as full CPU tensors (FSDP2 DTensor shards gathered one at a time:
    never more than one full tensor on the GPU). With a process group, rank 0 gets them and the others {}.
    Collective: every rank calls it."""
    rank0 = _rank() == 0
    trainable = {_clean_fqn(n) for n, p in model.named_parameters() if p.requires_grad}
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        name = _clean_fqn(name)
        if name.startswith(exclude) or (trainable_only and name not in trainable):
            continue
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()  # collective over the tensor's mesh: all ranks, same order
        if rank0:
            out[name] = t.detach().to("cpu", copy=True)
    return out


class _FullView:
    """What `merv_fast.model.release` needs of a model (`state_dict()`, `config`) over gathered full tensors."""

    def __init__(self, model: torch.nn.Module, sd: dict[str, torch.Tensor]):
        merv = getattr(model, "merv", model)  # the MERV, or the trainer's TrainModule over it
        self.config = getattr(model, "config", None) or merv.config
        self._sd = sd

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._sd


def export_release(model: torch.nn.Module, path: str | os.PathLike, **extra: Any) -> Path | None:
    """Write the trained weights in the MERV release's checkpoint layout (its nested `{"model": {...}}` torch file:
    the release's own format, loadable with `merv_fast.model.release.load_release_checkpoint` and by the release).
    Every rank calls it; rank 0 writes (atomically). Returns the path on rank 0."""
    from merv_fast.model.release import save_release_checkpoint

    sd = full_state_dict(model)
    path = Path(path)
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_release_checkpoint(_FullView(model, sd), tmp, **extra)
        os.replace(tmp, path)
    _barrier()
    return path if _rank() == 0 else None


def export_safetensors(model: torch.nn.Module, path: str | os.PathLike,
                       exclude: tuple[str, ...] = DEFAULT_EXCLUDE, seed: int | None = None) -> Path | None:
    """Our own layout: one safetensors file of the model's weights outside `exclude` (default: all but the frozen
    encoders) under our parameter names (e.g. `llm.model.layers.0.self_attn.q_proj.weight`,
    `visual.projectors.0.weight`), with the preset name, the whole model config (JSON) and the training `seed` in
    the metadata, so that the file alone rebuilds its model (merv_fast.pretrained). Every rank calls it; rank 0
    writes (atomically)."""
    from safetensors.torch import save_file

    sd = full_state_dict(model, exclude)
    path = Path(path)
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        cfg = _FullView(model, sd).config
        meta = {"format": "merv_fast", "preset": str(getattr(cfg, "name", ""))}
        if hasattr(cfg, "to_dict"):
            meta["model_config"] = json.dumps(cfg.to_dict())
        if seed is not None:
            meta["seed"] = str(int(seed))
        save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    _barrier()
    return path if _rank() == 0 else None


def export_release_run(model: torch.nn.Module, directory: str | os.PathLike, seed: int | None = None,
                       **extra: Any) -> Path | None:
    """A release run directory, as the release's `load_vid` reads one: `config.json` (its `model` section from
    model/release_models.py, and our exact model config and seed under `merv_fast`) and
    `checkpoints/latest-checkpoint.pt` (`export_release`). Every rank calls it; rank 0 writes. Returns the
    directory on rank 0."""
    from merv_fast.model.release_models import release_section

    directory = Path(directory)
    written = export_release(model, directory / "checkpoints" / "latest-checkpoint.pt", **extra)
    if written is None:
        return None
    cfg = _FullView(model, {}).config
    config = {"model": release_section(cfg),
              "merv_fast": {"preset": cfg.name, "model_config": cfg.to_dict(), "seed": seed}}
    _write_text_atomic(directory / "config.json", json.dumps(config, indent=1) + "\n")
    return directory


def load_safetensors(model: torch.nn.Module, path: str | os.PathLike,
                     exclude: tuple[str, ...] = DEFAULT_EXCLUDE, trained_as: str | None = None) -> None:
    """Load an `export_safetensors` file into an unsharded model: it must hold exactly the model's weights outside
    `exclude`, with their shapes (merv_fast.model.strict; `trained_as` is named in the error)."""
    from safetensors.torch import load_file

    from merv_fast.model.strict import check_weights

    sd = load_file(str(path))
    ours = model.state_dict()
    expected = {n: tuple(t.shape) for n, t in ours.items() if not n.startswith(exclude)}
    check_weights(expected, {k: tuple(v.shape) for k, v in sd.items()}, str(path),
                  getattr(getattr(model, "config", None), "name", "?"), trained_as)
    model.load_state_dict(sd, strict=False)  # the excluded (encoder) weights stay; every other key was checked
