"""Fault injection against `merv-fast train` (issue 16): what clusters do to a run, through real processes.

One small real dataset for the module (4 clips, one of them truncated; 4 images, one a symlink out of the media
root; 4 text-only entries: 3 steps an epoch at the tiny preset's global batch of 4, 2 epochs), and one uninterrupted
reference run of it that saves after every step. "Bit for bit" compares the metrics rows (loss, gradient norm, lr,
epoch as float hex), the exported weights, and checkpoints file by file (the manifests' CRC-32 of the DCP shards,
meta.json, and every rank's RNG states; only DCP's `.metadata`, which records its own path, is left out).

  issue point                                   test
  1 resume at an epoch boundary                 test_stopped_after_every_step_resumes_bit_for_bit
  2 SIGTERM/SIGINT to the process group         test_process_group_signal_saves_at_a_step_boundary,
                                                test_signal_during_start_up_stops_cleanly, test_torchrun_* (ranks)
  3 corrupt / incomplete newest checkpoint      test_damaged_newest_checkpoint_is_set_aside_and_the_one_before_resumes,
                                                test_every_damage_is_named (+ toy-state unit tests)
  4 full disk, leftovers                        test_full_device_*, test_file_size_limit_*, test_sigkill_*
  5 metrics rows once                           every comparison of metrics rows (test_sigkill_* kills after a row)
  6 periodic checkpoints by default             test_time_cadence_saves_and_is_the_default
  7 NaN injection from the CLI                  test_nan_injection_through_the_cli
  8 an existing run directory                   test_existing_run_directory_*, test_pruning_spares_the_newest_save
  9 FSDP2 view-tensor warning                   tests/train/test_fsdp.py (gradients), test_torchrun_* (no warning)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from merv_fast.cli import main

EPOCH_STEPS = 3
STEPS = 2 * EPOCH_STEPS
STEP_1 = "step-00000001"


# ------------------------------------------------------------------------------------------------- shared data
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str]:
    """(data.json, media root)."""
    from merv_fast.data.synth import synthesize

    root = tmp_path_factory.mktemp("faults-data")
    made = synthesize(root, videos=4, images=4, texts=4, seed=0)
    clip = root / made["videos"][2]
    clip.write_bytes(clip.read_bytes()[: clip.stat().st_size // 3])  # bad media: replaced deterministically
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    image = root / made["images"][1]
    shutil.move(image, outside)
    image.symlink_to(outside)  # out of the media root: refused, replaced
    return str(made["json"]), str(made["media_root"])


def cli(data, out, *extra: str) -> list[str]:
    json_path, root = data
    return ["train", "--preset", "tiny", "--data", json_path, "--media-root", root, "--out", str(out),
            "--set", "epochs=2", "--set", "kernels=torch", "--set", "activation_checkpointing=off",
            "--set", "num_workers=0", "--set", "save_every_minutes=0", "--set", "keep_last=0", *extra]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run, a checkpoint after every step."""
    out = tmp_path_factory.mktemp("faults-ref") / "run"
    assert main(cli(data, out, "--save-every", "1")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["steps_per_epoch"] == EPOCH_STEPS
    assert summary["bad_samples"]["failures"] > 0  # the broken clip and the escaping symlink were met
    return out


# ------------------------------------------------------------------------------------------------- comparisons
def rows(out: Path) -> list[tuple]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["epoch"], float(r["loss"]).hex(), float(r["grad_norm"]).hex(), float(r["lr"]).hex(),
             r["skipped"]) for r in map(json.loads, lines)]


def manifest(step_dir: Path) -> dict:
    """The checksums of the DCP shards and meta.json (`.metadata` records its own path; the RNG files' safetensors
    headers list their metadata in no fixed order: compared by content)."""
    files = json.loads((step_dir / "manifest.json").read_text())["files"]
    return {name: entry for name, entry in files.items() if name != ".metadata" and not name.startswith("rng/")}


def assert_same_checkpoint(a: Path, b: Path) -> None:
    from merv_fast.train.checkpoint import load_rng

    assert manifest(a) == manifest(b), f"{a} differs from {b}"
    rng_files = sorted(p.name for p in (b / "rng").iterdir())
    assert sorted(p.name for p in (a / "rng").iterdir()) == rng_files
    for name in rng_files:
        x, y = load_rng(a / "rng" / name), load_rng(b / "rng" / name)
        assert x["python"] == y["python"] and x["numpy"] == y["numpy"] and torch.equal(x["torch"], y["torch"]), name


def assert_same_run(out: Path, ref: Path) -> None:
    from safetensors.torch import load_file

    assert rows(out) == rows(ref)  # every step exactly once, the same numbers
    got, want = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def disturb_rngs(seed: int) -> None:
    """What a fresh process would have: nothing restored may come from the previous in-process run's RNG state."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def copy_run(ref: Path, dest: Path, steps: list[int]) -> Path:
    """A run directory holding the reference's checkpoints `steps` and its metrics."""
    dest.mkdir(parents=True)
    for s in steps:
        shutil.copytree(ref / f"step-{s:08d}", dest / f"step-{s:08d}")
    shutil.copy(ref / "metrics.jsonl", dest / "metrics.jsonl")
    (dest / "latest").write_text(f"step-{max(steps):08d}\n")
    return dest


# ------------------------------------------------------------------------------------------------- processes
def launch(args: list[str], log: Path, torchrun: bool = False, **kw) -> subprocess.Popen:
    """A real `merv-fast train` (or torchrun of it on 2 gloo ranks) in its own process group."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun \
        else [sys.executable]
    return subprocess.Popen([*head, "-m", "merv_fast.cli", *args], env=env, cwd=log.parent, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True, **kw)


def wait_for(proc: subprocess.Popen, log: Path, ready, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"never saw {what} (exit {proc.returncode}): {log.read_text()[-3000:]}")
        time.sleep(0.05)


def finished(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"did not stop: {log.read_text()[-3000:]}") from None
    return log.read_text()


def row_count(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def newest_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []
    return max(steps, default=0)


def group_members(pgid: int) -> list[int]:
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
            members.append(int(pid))
    return members


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")


# ------------------------------------------------------------------------------------------------- 1, 5
def test_stopped_after_every_step_resumes_bit_for_bit(data, reference, tmp_path):
    """Stop after step 1, resume to 2, ... to 6 (epoch boundaries included) == the uninterrupted run."""
    out = tmp_path / "run"
    for stop in range(1, STEPS + 1):
        disturb_rngs(1000 + stop)
        assert main(cli(data, out, "--max-steps", str(stop), *(["--resume"] if stop > 1 else []))) == 0
        assert [r[0] for r in rows(out)] == list(range(1, stop + 1))
        assert_same_checkpoint(out / f"step-{stop:08d}", reference / f"step-{stop:08d}")
    assert_same_run(out, reference)
    assert [r[1] for r in rows(out)] == [0] * EPOCH_STEPS + [1] * EPOCH_STEPS
    at_boundary = json.loads((out / f"step-{EPOCH_STEPS:08d}" / "meta.json").read_text())["sampler"]
    assert (at_boundary["epoch"], at_boundary["position"]) == (1, 0)  # the epoch's end is the next one's start


# ------------------------------------------------------------------------------------------------- 2
@needs_proc
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_process_group_signal_saves_at_a_step_boundary(data, reference, tmp_path, sig):
    """The whole process group (DataLoader workers included) is signalled mid-run: the run saves the state of the
    uninterrupted run at that step, exits 0, and leaves nothing half-written."""
    out, log = tmp_path / "run", tmp_path / "train.log"
    proc = launch(cli(data, out, "--set", "num_workers=2"), log)
    wait_for(proc, log, lambda: row_count(out) >= 1, "the first step")
    assert len(group_members(proc.pid)) >= 3  # the trainer and its 2 DataLoader workers get the signal
    os.killpg(proc.pid, sig)
    text = finished(proc, log)
    assert proc.returncode == 0, text[-3000:]
    assert "DataLoader worker" not in text and "Traceback" not in text
    summary = json.loads((out / "summary.json").read_text())
    step = summary["steps"]
    assert summary["stopped_by_signal"] and 1 <= step < STEPS
    assert f"signal received: saving at step {step}" in text
    assert (out / "latest").read_text().strip() == f"step-{step:08d}"
    assert_same_checkpoint(out / f"step-{step:08d}", reference / f"step-{step:08d}")
    assert rows(out) == rows(reference)[:step]
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


@needs_proc
def test_signal_during_start_up_stops_cleanly(data, tmp_path):
    out, log = tmp_path / "run", tmp_path / "train.log"
    proc = launch(cli(data, out, "--set", "num_workers=2"), log)
    wait_for(proc, log, out.is_dir, "the run directory")  # the trainer is building the model and the data
    os.killpg(proc.pid, signal.SIGTERM)
    text = finished(proc, log)
    assert proc.returncode == 0, text[-3000:]
    assert "signal received during start-up: stopping at step 0" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by_signal"] and summary["steps"] == 0 and not summary["exported"]
    assert not list(out.glob("step-*")) and row_count(out) == 0


# ------------------------------------------------------------------------------------------------- SIGKILL, 4, 5
@needs_proc
def test_sigkill_after_a_step_resumes_bit_for_bit(data, reference, tmp_path):
    """SIGKILL the group just as step 2's metrics row is written (its save starting, or done); plant what killed
    saves leave. The resume removes the leftovers, drops metrics rows past its checkpoint and reaches the
    uninterrupted run's state (which, as the test above shows, it then continues exactly)."""
    out, log = tmp_path / "run", tmp_path / "train.log"
    proc = launch(cli(data, out, "--save-every", "1"), log)
    wait_for(proc, log, lambda: row_count(out) >= 2, "step 2")
    os.killpg(proc.pid, signal.SIGKILL)
    finished(proc, log)
    leftovers = [out / "step-00000009.tmp", out / ".latest.tmp-424242", out / ".model.safetensors.tmp-424242"]
    leftovers[0].mkdir()
    (leftovers[0] / "__0_0.distcp").write_bytes(b"\0" * 64)
    for f in leftovers[1:]:
        f.write_text("step-00000009\n")
    disturb_rngs(7)
    assert main(cli(data, out, "--save-every", "1", "--resume", "--max-steps", str(EPOCH_STEPS))) == 0
    assert not any(p.exists() for p in leftovers)
    assert rows(out) == rows(reference)[:EPOCH_STEPS]  # each step once
    assert_same_checkpoint(out / f"step-{EPOCH_STEPS:08d}", reference / f"step-{EPOCH_STEPS:08d}")


# ------------------------------------------------------------------------------------------------- 3
def test_damaged_newest_checkpoint_is_set_aside_and_the_one_before_resumes(data, reference, tmp_path, caplog):
    """The newest checkpoint's shard is truncated: --resume says so (naming the file), keeps it aside as
    step-N.damaged and resumes from the one before, a periodic save at the epoch boundary."""
    out = copy_run(reference, tmp_path / "run", [EPOCH_STEPS, EPOCH_STEPS + 1])
    shard = out / f"step-{EPOCH_STEPS + 1:08d}" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    disturb_rngs(3)
    assert main(cli(data, out, "--save-every", "1", "--resume")) == 0
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert f"step-{EPOCH_STEPS + 1:08d} is damaged" in warned and str(shard) in warned
    aside = out / f"step-{EPOCH_STEPS + 1:08d}.damaged"
    assert (aside / "__0_0.distcp").stat().st_size == 1000  # kept as it was
    assert_same_run(out, reference)


@pytest.mark.parametrize("damage, words", [
    ("shard", "__0_0.distcp is 100 bytes, the manifest says"),
    ("rng", "rank-00000.safetensors is 10 bytes"),
    ("meta", "meta.json is 4 bytes"),
    ("flip", ".metadata does not match its checksum"),
    ("missing", "rng/rank-00000.safetensors is missing"),
    ("manifest", "manifest.json is missing: the checkpoint is incomplete"),
])
def test_every_damage_is_named(reference, tmp_path, damage, words):
    from merv_fast.train.checkpoint import Checkpointer

    out = copy_run(reference, tmp_path / "run", [1, 2])
    ck = out / "step-00000002"
    if damage == "shard":
        (ck / "__0_0.distcp").write_bytes((ck / "__0_0.distcp").read_bytes()[:100])
    elif damage == "rng":
        (ck / "rng" / "rank-00000.safetensors").write_bytes(b"\x00" * 10)
    elif damage == "meta":
        (ck / "meta.json").write_text('{"st')
    elif damage == "flip":
        raw = bytearray((ck / ".metadata").read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (ck / ".metadata").write_bytes(bytes(raw))
    elif damage == "missing":
        (ck / "rng" / "rank-00000.safetensors").unlink()
    else:
        (ck / "manifest.json").unlink()
    checkpointer = Checkpointer(out)
    problem = checkpointer.verify(ck)
    assert problem is not None and words in problem and str(ck) in problem
    assert checkpointer.verify(out / STEP_1) is None
    assert checkpointer.resumable() == out / STEP_1
    kind = "incomplete" if damage == "manifest" else "damaged"
    assert (out / f"step-00000002.{kind}").is_dir() and not ck.exists()
    assert (out / "latest").read_text().strip() == STEP_1


# ------------------------------------------------------------------------------------------------- 4
def _assert_failed_save_kept_the_previous(text: str, out: Path, words: str, on_disk: Path | None = None) -> None:
    """`text`: the run's output; `out`: its --out as the run saw it; `on_disk`: where it is now (default `out`)."""
    from merv_fast.train.checkpoint import Checkpointer

    on_disk = on_disk or out
    error = [line for line in text.splitlines() if line.startswith("merv-fast train: error:")]
    assert len(error) == 1, text[-3000:]
    assert "checkpoint step-00000002: writing" in error[0] and str(out / "step-00000002.tmp") in error[0]
    assert words in error[0] and "the previous checkpoint (step-00000001) and `latest` are unchanged" in error[0]
    assert (on_disk / "latest").read_text().strip() == STEP_1
    assert sorted(p.name for p in on_disk.glob("step-*")) == [STEP_1]
    assert Checkpointer(on_disk).verify(on_disk / STEP_1) is None


def test_file_size_limit_fails_the_save_clearly(data, reference, tmp_path):
    """RLIMIT_FSIZE (`ulimit -f`): the shard write gets EFBIG. The error names the write, the path and the limit;
    the previous checkpoint and `latest` stay; nothing partial is left."""
    import resource

    out, log = copy_run(reference, tmp_path / "run", [1]), tmp_path / "train.log"
    limit = (reference / STEP_1 / "__0_0.distcp").stat().st_size // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = launch(cli(data, out, "--save-every", "1", "--resume"), log, preexec_fn=small_files)
    text = finished(proc, log)
    assert proc.returncode == 1, text[-3000:]
    _assert_failed_save_kept_the_previous(text, out, f"[Errno 27] File too large (this process may write files of "
                                                     f"at most {limit} bytes")


def _tmpfs_works() -> bool:
    if not shutil.which("unshare"):
        return False
    try:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                               capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not _tmpfs_works(), reason="needs unprivileged user and mount namespaces (`unshare -rm`) to "
                                               "mount a small tmpfs")
def test_full_device_fails_the_save_clearly(data, reference, tmp_path):
    """A real full device: a tmpfs (in a user + mount namespace) that holds one checkpoint but not two. Step 2's
    save is warned about first, then fails saying ENOSPC; step 1 and `latest` stay intact."""
    size = 3 * (reference / STEP_1 / "__0_0.distcp").stat().st_size // 2
    mnt, saved = tmp_path / "mnt", tmp_path / "saved"
    mnt.mkdir()
    args = " ".join(f"'{a}'" for a in cli(data, mnt / "run", "--save-every", "1", "--max-steps", "3"))
    script = (f"mount -t tmpfs -o size={size} tmpfs '{mnt}' && '{sys.executable}' -m merv_fast.cli {args}; "
              f"rc=$?; cp -a '{mnt}/run' '{saved}'; exit $rc")  # the tmpfs goes with the namespace: copy it out
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    text = run.stdout + run.stderr
    assert run.returncode == 1, text[-3000:]
    assert "a checkpoint needs about" in text and "this save will likely fail" in text  # warned before the save
    _assert_failed_save_kept_the_previous(text, mnt / "run", "no space left on the device (ENOSPC)", on_disk=saved)
    assert_same_checkpoint(saved / STEP_1, reference / STEP_1)


# ------------------------------------------------------------------------------------------------- 6, 8 (toy state)
class Toy:
    """The smallest state a Checkpointer saves: a linear layer and SGD with momentum (optimizer state to save)."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 3)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.scheduler = self.sampler = None
        self.step = 0

    def train(self) -> "Toy":
        self.model(torch.ones(2, 4)).square().sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.step += 1
        return self


def test_time_cadence_saves_and_is_the_default(tmp_path):
    from merv_fast.train.checkpoint import Checkpointer
    from merv_fast.train.config import TrainConfig, make_train_config

    assert TrainConfig().save_every_minutes == 30.0 and make_train_config().save_every_minutes == 30.0
    assert TrainConfig().keep_last == 2 and TrainConfig().save_every == 0
    now = [0.0]
    ck = Checkpointer(tmp_path, keep_last=0, save_every_minutes=30, clock=lambda: now[0])
    toy = Toy()
    saved = []
    for minute in (10, 29, 31, 45, 60, 62):
        now[0] = minute * 60.0
        saved.append(ck.maybe_save(toy.train().step, toy) is not None)
    assert saved == [False, False, True, False, False, True]  # 30 minutes after the start, then after each save
    assert [p.name for p in ck.checkpoints()] == ["step-00000003", "step-00000006"]


def test_pruning_spares_the_newest_save(tmp_path):
    """Checkpoints of a higher step on disk (another run's): the one just written survives `keep_last`, and
    `latest` names it."""
    from merv_fast.train.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path, keep_last=2)
    toy = Toy()
    for step in (3, 4):
        toy.step = step
        ck.save(toy.train())
    toy.step = 1
    path = ck.save(toy.train())
    assert path.name == "step-00000002" and path.is_dir()
    assert (tmp_path / "latest").read_text().strip() == "step-00000002"
    assert [p.name for p in ck.checkpoints()] == ["step-00000002", "step-00000005"]


@pytest.mark.parametrize("damage, named", [("rng", "rng/rank-00000.safetensors: unreadable RNG state"),
                                           ("meta", "meta.json is unreadable"),
                                           ("index", ".metadata: unreadable DCP index"),
                                           ("shard", "reading the sharded weights and optimizer state (*.distcp)")])
def test_load_errors_name_the_checkpoint_and_the_file(tmp_path, damage, named):
    from merv_fast.train.checkpoint import Checkpointer, CheckpointError

    ck = Checkpointer(tmp_path)
    path = ck.save(Toy().train())
    target = {"rng": "rng/rank-00000.safetensors", "meta": "meta.json", "index": ".metadata",
              "shard": "__0_0.distcp"}[damage]
    (path / target).write_bytes((path / target).read_bytes()[:12])
    with pytest.raises(CheckpointError, match="unreadable|failed") as err:
        ck.load(Toy(), path)
    assert str(path) in str(err.value) and named in str(err.value)
    assert len(str(err.value).splitlines()) == 1


# ------------------------------------------------------------------------------------------------- 7
def test_nan_injection_through_the_cli(data, reference, tmp_path, capsys):
    """debug.nan_at_step=2: nan_policy=stop ends the run with one line and keeps step 1's checkpoint as the newest;
    nan_policy=skip logs the step as skipped, never saves its state, and goes on."""
    stop = tmp_path / "stop"
    assert main(cli(data, stop, "--save-every", "1", "--max-steps", "2", "--set", "debug.nan_at_step=2")) == 1
    err = capsys.readouterr().err
    assert "merv-fast train: error: non-finite training loss nan" in err and "optimizer step 2" in err
    assert rows(stop) == rows(reference)[:1] and (stop / "latest").read_text().strip() == STEP_1
    assert_same_checkpoint(stop / STEP_1, reference / STEP_1)

    skip = tmp_path / "skip"
    assert main(cli(data, skip, "--save-every", "1", "--max-steps", "3", "--set", "debug.nan_at_step=2",
                    "--set", "nan_policy=skip")) == 0
    got = rows(skip)
    assert got[0] == rows(reference)[0] and got[1][2] == "nan" and got[1][5] is True and got[2][5] is False
    assert sorted(p.name for p in skip.glob("step-*")) == [STEP_1, "step-00000003"]


# ------------------------------------------------------------------------------------------------- 8
def test_existing_run_directory_is_refused_moved_aside_or_finished(data, reference, tmp_path, capsys):
    out = copy_run(reference, tmp_path / "run", [STEPS - 1, STEPS])
    shutil.copy(reference / "model.safetensors", out / "model.safetensors")
    before = sorted(p.name for p in out.iterdir()), (out / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert main(cli(data, out, "--max-steps", "1")) == 2  # without --resume: refused, nothing touched
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {out} already holds a training run" in err[0]
    assert "--resume" in err[0] and "--overwrite" in err[0]
    assert (sorted(p.name for p in out.iterdir()), (out / "metrics.jsonl").read_text()) == before

    assert main(cli(data, out, "--resume")) == 0  # a finished run: said, nothing done
    assert f"{out} is finished" in capsys.readouterr().out
    assert (sorted(p.name for p in out.iterdir()), (out / "metrics.jsonl").read_text()) == before

    assert main(cli(data, out, "--max-steps", "1", "--overwrite")) == 0  # the old run moved aside, kept whole
    aside = list(tmp_path.glob("run.replaced-*"))
    assert len(aside) == 1 and (sorted(p.name for p in aside[0].iterdir()), (aside[0] / "metrics.jsonl").read_text()) \
        == before
    assert rows(out) == rows(reference)[:1]
    assert_same_checkpoint(out / STEP_1, reference / STEP_1)


# ------------------------------------------------------------------------------------------------- ranks
@needs_proc
def test_torchrun_killed_rank_then_sigterm_to_every_rank(data, tmp_path):
    """2 gloo ranks under torchrun. A reference run; then a run whose rank 1 is SIGKILLed after step 2; its resume
    on 2 ranks gets SIGTERM on every rank after a step: it saves and exits 0. Up to there, metrics and checkpoint
    equal the reference's bit for bit. No rank warns about FSDP2 view tensors (issue point 9)."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    logs = [tmp_path / f"torchrun{i}.log" for i in range(3)]
    proc = launch(cli(data, ref, "--save-every", "1"), logs[0], torchrun=True)
    assert "view tensor" not in finished(proc, logs[0]) and proc.returncode == 0, logs[0].read_text()[-3000:]

    proc = launch(cli(data, out, "--save-every", "1"), logs[1], torchrun=True)
    wait_for(proc, logs[1], lambda: row_count(out) >= 2, "step 2")
    os.kill(children(proc.pid)[1], signal.SIGKILL)
    finished(proc, logs[1])
    assert proc.returncode != 0

    killed_at = newest_step(out)
    proc = launch(cli(data, out, "--save-every", "1", "--resume"), logs[2], torchrun=True)
    wait_for(proc, logs[2], lambda: newest_step(out) > killed_at, "a step after the resume")
    ranks = children(proc.pid)
    assert len(ranks) == 2
    for pid in ranks:
        os.kill(pid, signal.SIGTERM)
    text = finished(proc, logs[2])
    assert proc.returncode == 0 and "view tensor" not in text, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    step = summary["steps"]
    assert summary["stopped_by_signal"] and summary["world_size"] == 2 and killed_at < step < STEPS
    assert rows(out) == rows(ref)[:step]
    assert_same_checkpoint(out / f"step-{step:08d}", ref / f"step-{step:08d}")
