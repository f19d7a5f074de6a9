"""Sharded, atomic, exactly-resumable training checkpoints (torch.distributed.checkpoint), and weight export.

Layout of `out_dir` (every name below is ours; DCP owns the files inside a step directory except `meta.json`,
`manifest.json` and `rng/`):

    out_dir/
      latest                       text: the name of the newest complete checkpoint ("step-00000012"), atomically
                                   replaced after the rename; it never names a missing checkpoint (pruning spares
                                   the one just written); a convenience for people and tools, loading does not need it
      step-00000008/               a complete checkpoint (a directory is only ever renamed into this name after
        .metadata, *.distcp        every rank has finished writing into `step-00000008.tmp`)
        meta.json                  step, world size, LR scheduler, sampler position, optimizer hyper-parameters
        rng/rank-00000.safetensors per-rank RNG states (python and numpy in the safetensors metadata as JSON)
        manifest.json              written last (the completion marker): every file's size and CRC-32
      step-00000012/
      step-00000016.tmp/           a save in progress, or the leftover of a killed one: never loaded, removed at the
                                   next start (`clean_leftovers`) and by the next save of that step
      step-00000004.damaged/       a checkpoint that failed its checks on resume (or `.incomplete`: no manifest):
                                   set aside by `resumable`, never loaded, never deleted

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
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from merv_fast.train.manifest import (MANIFEST_FILE, ManifestError, check, describe, list_files, read_manifest,
                                     write_manifest)

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: with manifest.json (1: without; still loaded, unverified)
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


def all_true(flag: bool) -> bool:
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
    return all_true(ok)


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


# What a killed save or export leaves behind: removed at the next start, never taken for a checkpoint.
_LEFTOVER_DIR = re.compile(r"^step-\d{8}\.(tmp|deleting)$")
_LEFTOVER_FILE = re.compile(r"^\..+\.tmp-\d+$")  # `_write_text_atomic`'s and the weight exports' temporaries


def _shared(items: list, fn: Callable[[list], Any]) -> Any:
    """`fn` over this rank's share of `items` (every world-th one), the answers (lists or dicts) merged on every
    rank: the ranks split file checks between them. Collective."""
    mine = fn(items[_rank()::_world()])
    if not _dist():
        return mine
    gathered: list[Any] = [None] * _world()
    dist.all_gather_object(gathered, mine)
    if isinstance(mine, dict):
        return {k: v for part in gathered for k, v in part.items()}
    return [x for part in gathered for x in part]


def _from_rank0(obj: Any) -> Any:
    if not _dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first_error(local: str | None) -> str | None:
    """The first rank's error message (rank order), on every rank; None when no rank has one. Collective."""
    if not _dist():
        return local
    gathered: list[Any] = [None] * _world()
    dist.all_gather_object(gathered, local)
    return next((e for e in gathered if e), None)


def _causes(err: BaseException) -> list[BaseException]:
    """`err` and what it wraps: its cause/context chain and DCP's per-rank failures."""
    from torch.distributed.checkpoint.api import CheckpointException

    seen, todo, out = set(), [err], []
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            todo += [exc for exc, _ in e.failures.values()]
    return out


def _one_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def _set_aside(path: Path, kind: str) -> Path:
    """Rename a damaged or incomplete checkpoint out of the way (never deleted): `step-N.damaged`, `-2`, ..."""
    target = path.with_name(f"{path.name}.{kind}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{kind}-{n}")
    os.replace(path, target)
    return target


class Checkpointer:
    """`maybe_save(step, state)` after every step (it saves every `save_every` steps and every `save_every_minutes`
    minutes of training; 0 turns either off), `save_final(state)` at the end (also after a signal),
    `load_latest(state)` (or `resumable()` then `load(state, path)`) at start-up for `--resume`. Keeps the newest
    `keep_last` checkpoints (0: keep all). All ranks must call every method together (they contain collectives).
    Model weights under the `exclude` prefixes (default: the frozen encoders, which come from their weights
    directories) are not saved."""

    def __init__(self, out_dir: str | os.PathLike, keep_last: int = 3, save_every: int = 0,
                 exclude: tuple[str, ...] = DEFAULT_EXCLUDE, save_every_minutes: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        if keep_last < 0 or save_every < 0 or save_every_minutes < 0:
            raise ValueError("keep_last, save_every and save_every_minutes must be >= 0")
        self.out_dir = Path(out_dir)
        self.exclude = tuple(exclude)
        self.keep_last = int(keep_last)
        self.save_every = int(save_every)
        self.save_every_s = float(save_every_minutes) * 60.0
        self.clock = clock
        self.last_saved_step: int | None = None
        self._last_save_time = clock()  # the time cadence counts from the start (or the last save)
        self._last_bytes: int | None = None  # the size of the last checkpoint written or loaded

    # ------------------------------------------------------------------ discovery
    @staticmethod
    def _complete(path: Path) -> bool:
        """Has its completion marker (the manifest), or is a format-1 checkpoint (written before manifests)."""
        if (path / MANIFEST_FILE).is_file():
            return True
        try:
            return json.loads((path / META_FILE).read_text()).get("format") == 1
        except (OSError, ValueError, AttributeError):
            return False

    def _step_dirs(self) -> list[tuple[int, Path]]:
        if not self.out_dir.is_dir():
            return []
        found = []
        for p in self.out_dir.iterdir():
            m = STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (`.tmp` leftovers, set-aside and incomplete ones are never listed)."""
        return [p for _, p in self._step_dirs() if self._complete(p)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the `latest` pointer if it names one, else the highest step on disk."""
        pointer = self.out_dir / LATEST_FILE
        complete = self.checkpoints()
        if pointer.is_file():
            named = self.out_dir / pointer.read_text().strip()
            if named in complete and named == complete[-1]:
                return named
        return complete[-1] if complete else None

    def clean_leftovers(self) -> list[str]:
        """Remove what killed saves and exports left (`step-N.tmp/`, `step-N.deleting/`, `.latest.tmp-<pid>`,
        `.model.safetensors.tmp-<pid>`, ...); returns their names. Call at start-up, before anything is written.
        Collective: rank 0 removes, every rank returns the list."""
        removed: list[str] = []
        if _rank() == 0 and self.out_dir.is_dir():
            for p in sorted(self.out_dir.iterdir()):
                if p.is_dir() and _LEFTOVER_DIR.match(p.name):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
                elif p.is_file() and _LEFTOVER_FILE.match(p.name):
                    p.unlink(missing_ok=True)
                    removed.append(p.name)
            if removed:
                log.warning("%s: removed what interrupted saves left: %s", self.out_dir, ", ".join(removed))
        removed = _from_rank0(removed)
        _barrier()
        return removed

    # ------------------------------------------------------------------ verification
    def verify(self, path: str | os.PathLike) -> str | None:
        """None when the checkpoint at `path` is intact (every file of its manifest there, with its size and
        checksum; meta.json readable), else what is wrong, naming the file. A format-1 checkpoint has no manifest:
        only its meta.json is checked. Collective: the ranks split the files."""
        path = Path(path)
        problem = None
        if (path / MANIFEST_FILE).is_file() or not self._complete(path):
            try:
                files = read_manifest(path)
            except ManifestError as err:
                files, problem = {}, str(err)
            names = sorted(files)
            problems = _shared(names, lambda mine: check(path, files, mine))
            problem = problem or (sorted(problems)[0] if problems else None)
        if problem is None:
            try:
                read_meta(path)
            except CheckpointError as err:
                problem = str(err)
        return problem

    def resumable(self) -> Path | None:
        """The newest intact checkpoint, or None. Damaged ones newer than it are set aside (`step-N.damaged`) and
        incomplete ones (no manifest: a save that never finished) as `step-N.incomplete`, each with a warning that
        says why; nothing is deleted. `latest` is pointed at the checkpoint returned (removed when there is none).
        Collective."""
        chosen = None
        for _, path in reversed(self._step_dirs()):
            problem = self.verify(path)
            if problem is None:
                chosen = path
                break
            kind = "damaged" if self._complete(path) else "incomplete"
            _barrier()  # every rank has finished reading it
            if _rank() == 0:
                aside = _set_aside(path, kind)
                log.warning("checkpoint %s is %s: %s; set aside as %s (kept, never loaded); trying the one before",
                            path, kind, problem, aside.name)
            _barrier()
        if _rank() == 0:
            pointer = self.out_dir / LATEST_FILE
            if chosen is not None:
                if not pointer.is_file() or pointer.read_text().strip() != chosen.name:
                    _write_text_atomic(pointer, chosen.name + "\n")
            elif pointer.is_file():
                pointer.unlink()
        _barrier()
        return chosen

    # ------------------------------------------------------------------ saving
    def due(self, step: int) -> bool:
        """Whether `maybe_save` saves after `step`: every `save_every` steps, or when `save_every_minutes` have
        passed since the last save (or the start). Collective when the time cadence is on (the ranks' clocks
        differ; any rank's decides)."""
        if step <= 0:
            return False
        by_steps = self.save_every > 0 and step % self.save_every == 0
        if self.save_every_s <= 0:
            return by_steps
        late = self.clock() - self._last_save_time >= self.save_every_s
        return by_steps or not all_true(not late)

    def maybe_save(self, step: int, state: TrainStateLike, loss: float | torch.Tensor | None = None) -> Path | None:
        """Save when `due(step)` (step = the number of optimizer steps done). Pass the step's loss to make a
        non-finite one skip the save (the weights are also checked)."""
        if not self.due(step):
            return None
        return self.save(state, step=step, loss=loss)

    def save_final(self, state: TrainStateLike, loss: float | torch.Tensor | None = None) -> Path | None:
        """The end-of-run (or on-signal) save; a no-op when this step is already saved."""
        return self.save(state, step=int(state.step), loss=loss)

    def save(self, state: TrainStateLike, step: int | None = None,
             loss: float | torch.Tensor | None = None) -> Path | None:
        """Write checkpoint `step` (default `state.step`). Returns its directory, or None when nothing was written
        (non-finite loss or weights: the last good checkpoint stays the newest; or the step already saved).
        A failed write raises CheckpointError on every rank, saying which write failed (and when the device is
        full, that it is), after removing the partial directory; the previous checkpoint and `latest` are kept."""
        step = int(state.step if step is None else step)
        if loss is not None:
            loss_val = float(loss.detach().float().item() if isinstance(loss, torch.Tensor) else loss)
            if not all_true(math.isfinite(loss_val)):
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
        with_optimizer = bool(state.optimizer.state)  # False before the first optimizer step
        model_sd, optim_sd = self._state_dicts(state, with_optimizer)
        optim_tensors, optim_other = _split_optimizer(optim_sd)
        need = self._last_bytes or world * sum(_local_bytes(t) for t in (*model_sd.values(), *optim_tensors.values()))

        def prepare():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # a killed save's leftover
            (tmp / RNG_DIR).mkdir(parents=True)
            self._warn_if_short(need)

        def write_rest():
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

        self._write_phase(final, tmp, "the directory", prepare if rank == 0 else None, need)
        self._write_phase(final, tmp, "the sharded weights and optimizer state (.metadata, *.distcp)", lambda: _dcp_save(
            {"model": model_sd, "optim": optim_tensors}, tmp), need)
        self._write_phase(final, tmp, "meta.json and the RNG states (rng/)", write_rest, need)
        names = _from_rank0(list_files(tmp) if rank == 0 else None)
        files = {}
        self._write_phase(final, tmp, "the checksums", lambda: files.update(_shared(names, lambda mine: describe(
            tmp, mine))), need)

        def commit():
            write_manifest(tmp, step, files)  # the completion marker, last
            for f in (tmp / RNG_DIR).iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp / RNG_DIR)
            _fsync_dir(tmp)
            if final.exists():  # another run's checkpoint of this step in the same out_dir: superseded
                os.replace(final, final.with_name(final.name + ".deleting"))
            os.replace(tmp, final)  # the commit point
            shutil.rmtree(final.with_name(final.name + ".deleting"), ignore_errors=True)
            _fsync_dir(self.out_dir)
            _write_text_atomic(self.out_dir / LATEST_FILE, final.name + "\n")
            self._prune(keep=final)

        self._write_phase(final, tmp, "manifest.json, the rename and `latest`", commit if rank == 0 else None, need)
        self.last_saved_step = step
        self._last_save_time = self.clock()
        self._last_bytes = sum(f["size"] for f in files.values())
        log.info("saved checkpoint %s", final)
        return final

    def _write_phase(self, final: Path, tmp: Path, what: str, fn: Callable[[], Any] | None, need: int) -> None:
        """Run one part of a save (`fn`, on the ranks that have one); every rank learns whether any failed, and
        then all raise the same CheckpointError after rank 0 removed the partial directory."""
        from torch.distributed.checkpoint.api import CheckpointException

        error = None
        try:
            if fn is not None:
                fn()
        except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
            error = self._describe_failure(err, tmp, need)
        error = _first_error(error)
        if error is None:
            return
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        previous = self.latest()
        raise CheckpointError(
            f"checkpoint {final.name}: writing {what} in {tmp} failed: {error}. The partial {tmp.name} was removed; "
            f"the previous checkpoint ({previous.name if previous else 'none'}) and `latest` are unchanged")

    def _describe_failure(self, err: BaseException, tmp: Path, need: int) -> str:
        """What went wrong, for people: ENOSPC (or a device that has filled up: torch's zip writer reports only
        'unexpected pos'), the failing file when the error names one, the file size limit for EFBIG."""
        import errno

        oserrors = [e for e in _causes(err) if isinstance(e, OSError) and e.errno]
        try:
            free = shutil.disk_usage(self.out_dir).free
        except OSError:
            free = None
        full = any(e.errno == errno.ENOSPC for e in oserrors) or (free is not None and free < max(need, 1 << 20) / 4)
        if full:
            return (f"no space left on the device (ENOSPC): {_mib(free or 0)} free on the device holding "
                    f"{self.out_dir}, a checkpoint needs about {_mib(need)}")
        if oserrors:
            e = oserrors[0]
            text = f"[Errno {e.errno}] {os.strerror(e.errno)}" + (f": {e.filename}" if e.filename else "")
            if e.errno == errno.EFBIG:
                import resource

                limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
                if limit != resource.RLIM_INFINITY:
                    text += f" (this process may write files of at most {limit} bytes: `ulimit -f`)"
            return text
        return _one_line(err)

    def _warn_if_short(self, need: int) -> None:
        """Warn before a save that will not fit in the free space (the size: the last checkpoint's, or this one's
        tensors for the first)."""
        try:
            free = shutil.disk_usage(self.out_dir).free
        except OSError:
            return
        if free < need:
            log.warning("%s: %s free on its device, a checkpoint needs about %s: this save will likely fail (free "
                        "some space, or train into a larger device)", self.out_dir, _mib(free), _mib(need))

    def _state_dicts(self, state: TrainStateLike, with_optimizer: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        if not with_optimizer:
            # (get_state_dict would initialise an empty optimizer's state by stepping it with zero grads and lr 0,
            # which moves Adam's step counters: a checkpoint before the first step must not touch the optimizer)
            model_sd = get_model_state_dict(state.model, options=_OPTIONS)
            return {k: v for k, v in model_sd.items() if not k.startswith(self.exclude)}, {}
        model_sd, optim_sd = get_state_dict(state.model, state.optimizer, options=_OPTIONS)
        return {k: v for k, v in model_sd.items() if not k.startswith(self.exclude)}, optim_sd

    def _prune(self, keep: Path) -> None:
        """Delete all but the newest `keep_last` checkpoints, never `keep` (the one just written, which `latest`
        names, even when older checkpoints of a higher step are on disk)."""
        for leftover in self.out_dir.glob("step-*.deleting"):  # a kill mid-delete
            shutil.rmtree(leftover, ignore_errors=True)
        if self.keep_last <= 0:
            return
        others = [p for p in self.checkpoints() if p != keep]
        for old in others[:max(0, len(others) - (self.keep_last - 1))]:
            # rename first so that a kill mid-delete never leaves a half directory under a complete-looking name
            doomed = old.with_name(old.name + ".deleting")
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    # ------------------------------------------------------------------ loading
    def load_latest(self, state: TrainStateLike) -> bool:
        """Load the newest intact checkpoint into `state` (model, optimizer, scheduler, sampler, step, this rank's
        RNG), setting damaged ones aside (`resumable`). False (and `state` untouched) when there is none."""
        found = self.resumable()
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
        """Load the checkpoint at `path`; every read error names the checkpoint and the file."""
        from torch.distributed.checkpoint.api import CheckpointException

        path = Path(path)
        meta = read_meta(path)

        # The live state dicts give DCP the layout (and sharding) to read into; a fresh optimizer gets its state
        # initialised by get_state_dict so that there is something to load into (all of it is then overwritten).
        with_optimizer = bool(meta.get("optimizer_state", True))
        model_sd, optim_sd = self._state_dicts(state, with_optimizer)
        optim_tensors, optim_other = _split_optimizer(optim_sd)
        target = {"model": model_sd, "optim": optim_tensors}
        reader = dcp.FileSystemReader(str(path))
        try:
            reader.read_metadata()
        except Exception as err:
            raise CheckpointError(f"{path / '.metadata'}: unreadable DCP index ({_one_line(err)})") from err
        try:
            with _quiet_single_process():
                dcp.load(target, storage_reader=reader)
        except (Exception, CheckpointException) as err:
            inner = [e for e in _causes(err) if not isinstance(e, CheckpointException)]
            raise CheckpointError(f"{path}: reading the sharded weights and optimizer state (*.distcp) failed: "
                                  f"{_one_line(inner[0] if inner else err)}") from None
        if not with_optimizer:
            set_model_state_dict(state.model, target["model"], options=_LOAD_OPTIONS)
        else:
            self._set_optimizer(state, path, target, optim_other, meta)
        self._load_rest(state, path, meta)
        manifest = path / MANIFEST_FILE
        self._last_bytes = sum(f["size"] for f in read_manifest(path).values()) if manifest.is_file() else None

    def _set_optimizer(self, state, path, target, optim_other, meta) -> None:
        saved_other = meta["optimizer_hparams"]
        missing = sorted(set(optim_other) - set(saved_other))
        if missing:
            raise CheckpointError(f"{path / META_FILE}: optimizer hyper-parameters missing for {missing[:3]} ...")
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
            try:
                rng = load_rng(rng_file)
            except Exception as err:
                raise CheckpointError(f"{rng_file}: unreadable RNG state ({_one_line(err)})") from err
            restore_rng(rng)
        else:
            log.warning("%s has no RNG state for rank %d (saved on %d ranks, now %d): random streams restart from "
                        "the current seed, so this resume is not bit-exact", path, _rank(), meta["world_size"],
                        _world())
        if meta["world_size"] != _world():
            log.warning("resumed %s saved on %d ranks on %d ranks (DCP resharded the weights and optimizer)",
                        path, meta["world_size"], _world())
        self.last_saved_step = state.step
        self._last_save_time = self.clock()
        log.info("resumed from %s (step %d)", path, state.step)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's meta.json; CheckpointError naming the file when it is missing, damaged or of another format."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} is missing: {path} is not a complete checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{meta_path} is unreadable ({type(err).__name__}: {err})") from None
    if meta.get("format") not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{meta_path}: checkpoint format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    return meta


def _local_bytes(t: Any) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size()


def _dcp_save(state_dict: dict[str, Any], path: Path) -> None:
    with _quiet_single_process():
        dcp.save(state_dict, storage_writer=_writer(path))


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
