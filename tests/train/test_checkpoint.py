"""Checkpoints: exact resume, pruning, crash safety, DCP resharding from 2 gloo ranks, signals, export.

The training loop here is a stand-in (the real trainer lives in merv_fast.train.loop): the tiny MERV on synthetic
videos, AdamW, a LambdaLR warmup, the real ModalityLengthGroupedSampler for the order, and random ops drawing from
torch's, numpy's and python's RNGs every step (dropout, frame flips, noise), so that an RNG state that is not restored
changes the losses. This file is also a script (`python test_checkpoint.py MODE OUT ...`) for the subprocesses.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve()
N_SAMPLES = 16
GLOBAL_BATCH = 2
TEXT_TOKENS = 24


@dataclass
class State:
    model: Any
    optimizer: Any
    scheduler: Any
    sampler: Any
    step: int
    samples: Any  # one SyntheticBatch of N_SAMPLES samples: the "dataset"
    trainable: Any  # visual path + LLM as one module (the FSDP2 root when sharded); `model` stays the checkpointed one


class Trainable(torch.nn.Module):
    def __init__(self, merv):
        super().__init__()
        self.visual, self.llm = merv.visual, merv.llm
        object.__setattr__(self, "merv", merv)  # not a submodule: the frozen encoders stay out of FSDP

    def forward(self, features, input_ids, attention_mask, labels):
        visual = F.dropout(self.visual(features), p=0.1, training=True)  # torch RNG
        return self.merv.language_model_forward(input_ids, attention_mask, labels, visual).loss


def make_state(world_size: int = 1, rank: int = 0, shard: bool = False) -> State:
    from merv_fast import build_model
    from merv_fast.data.sampler import ModalityLengthGroupedSampler
    from merv_fast.data.synthetic import synthetic_batches

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = build_model("tiny")
    model.train()
    trainable = Trainable(model)
    if shard:
        from torch.distributed.fsdp import fully_shard

        # as the trainer shards: each decoder layer, the visual path, and a root over visual path + LLM (MERV calls the
        # LLM's embedding outside llm.forward, so the root unit must wrap the whole trainable forward)
        for layer in model.llm.model.layers:
            fully_shard(layer)
        fully_shard(trainable.visual)
        fully_shard(trainable)
    samples = synthetic_batches(model.config, N_SAMPLES, TEXT_TOKENS, 1, seed=3)[0]
    g = torch.Generator().manual_seed(5)
    lengths = [("video", int(n)) for n in torch.randint(10, 100, (N_SAMPLES,), generator=g)]
    sampler = ModalityLengthGroupedSampler(lengths, GLOBAL_BATCH, world_size=world_size, rank=rank, seed=7)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    return State(model, optimizer, scheduler, sampler, 0, samples, trainable)


def train(state: State, steps: int, on_step=None) -> list[float]:
    """`steps` more optimizer steps from `state.step`; returns their losses. `on_step(state, loss)` after each; it
    returns True to stop."""
    from merv_fast.data.preprocess import preprocess_all

    cfg = state.model.config
    it = iter(state.sampler)
    losses = []
    for _ in range(steps):
        idx = next(it)
        s = state.samples
        frames = s.frames[idx]
        flip = torch.tensor([random.random() < 0.5 for _ in idx])  # python RNG
        noise_scale = float(np.random.uniform(0.0, 0.05))  # numpy RNG
        pixels = preprocess_all(frames, cfg.encoders, cfg.frames_sampled, flip, torch.float32)
        pixels = [p + noise_scale * torch.randn_like(p) for p in pixels]  # torch RNG
        features = state.model.encode(pixels)
        loss = state.trainable(features, s.input_ids[idx], s.attention_mask[idx], s.labels[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.model.trainable_parameters(), 1.0)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
        state.step += 1
        losses.append(loss.item())
        if on_step is not None and on_step(state, loss):
            break
    return losses


def bits(xs: list[float]) -> list[str]:
    return [float(x).hex() for x in xs]


# ------------------------------------------------------------------------------------------------- tests
def test_resume_is_bitwise_exact(tmp_path):
    from merv_fast.train.checkpoint import Checkpointer

    full = train(make_state(), 6)

    first = make_state()
    ck = Checkpointer(tmp_path, keep_last=2, save_every=3)
    head = train(first, 3, on_step=lambda st, loss: ck.maybe_save(st.step, st, loss) and False)
    assert (tmp_path / "step-00000003" / "meta.json").is_file()
    assert (tmp_path / "latest").read_text().strip() == "step-00000003"
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(tmp_path / "step-00000003")).read_metadata().state_dict_metadata
    assert not [k for k in saved if "encoders." in k]  # frozen encoders come from their weights, not checkpoints
    assert "model.visual.fusion.attention.out_proj.weight" in saved  # frozen but random: saved
    del first

    # a "fresh process": disturb every RNG and rebuild everything before loading
    torch.manual_seed(1234)
    random.seed(99)
    np.random.seed(77)
    second = make_state()
    torch.manual_seed(4321)
    random.seed(1)
    np.random.seed(2)
    assert Checkpointer(tmp_path, keep_last=2, save_every=3).load_latest(second)
    assert second.step == 3 and second.sampler.position == 3
    tail = train(second, 3)
    assert bits(head + tail) == bits(full)


def test_keep_last_pruning_and_nan_never_saves(tmp_path):
    from merv_fast.train.checkpoint import Checkpointer

    st = make_state()
    ck = Checkpointer(tmp_path, keep_last=2, save_every=1)
    train(st, 4, on_step=lambda s, loss: ck.maybe_save(s.step, s, loss) and False)
    assert [p.name for p in ck.checkpoints()] == ["step-00000003", "step-00000004"]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.deleting"))
    # a NaN loss never saves, nor do NaN weights; the last good checkpoint stays the newest
    st.step = 5
    assert ck.maybe_save(5, st, loss=float("nan")) is None
    with torch.no_grad():
        st.model.trainable_parameters()[0].view(-1)[0] = float("inf")
    assert ck.save_final(st) is None
    assert ck.latest().name == "step-00000004"
    assert (tmp_path / "latest").read_text().strip() == "step-00000004"
    # the same step twice is a no-op
    st2 = make_state()
    assert ck.load_latest(st2) and st2.step == 4
    assert ck.save_final(st2) == tmp_path / "step-00000004"


def test_save_before_first_step_leaves_optimizer_alone(tmp_path):
    from merv_fast.train.checkpoint import Checkpointer

    st = make_state()
    ck = Checkpointer(tmp_path)
    ck.save_final(st)
    assert not st.optimizer.state  # DCP's state-dict helpers would have stepped it with zero grads
    fresh = make_state()
    torch.nn.init.zeros_(fresh.model.llm.model.embed_tokens.weight)
    assert ck.load_latest(fresh) and fresh.step == 0 and not fresh.optimizer.state
    assert torch.equal(fresh.model.llm.model.embed_tokens.weight, st.model.llm.model.embed_tokens.weight)


def test_partial_tmp_is_ignored(tmp_path):
    from merv_fast.train.checkpoint import Checkpointer

    st = make_state()
    ck = Checkpointer(tmp_path, keep_last=3, save_every=2)
    train(st, 2, on_step=lambda s, loss: ck.maybe_save(s.step, s, loss) and False)
    junk = tmp_path / "step-00000004.tmp"
    junk.mkdir()
    (junk / "__0_0.distcp").write_bytes(b"\0" * 100)  # a save cut short: shards, no metadata
    fresh = make_state()
    assert ck.load_latest(fresh) and fresh.step == 2
    # the next save of that step replaces the leftover
    train(fresh, 2, on_step=lambda s, loss: ck.maybe_save(s.step, s, loss) and False)
    assert ck.latest().name == "step-00000004" and not junk.exists()


def _run_script(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.update(kw.pop("env", {}))
    return subprocess.Popen([sys.executable, str(HERE), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for_line(proc: subprocess.Popen, marker: str, timeout: float = 60) -> list[str]:
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return seen
    proc.kill()
    raise AssertionError(f"never saw {marker!r}: {''.join(seen)[-3000:]}")


def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path):
    from merv_fast.train.checkpoint import Checkpointer

    proc = _run_script("kill-mid-save", str(tmp_path))
    _wait_for_line(proc, "SAVING 2")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (tmp_path / "step-00000002.tmp").is_dir()  # the interrupted save, its DCP shards written
    assert any((tmp_path / "step-00000002.tmp").iterdir())
    ck = Checkpointer(tmp_path)
    assert [p.name for p in ck.checkpoints()] == ["step-00000001"]
    fresh = make_state()
    assert ck.load_latest(fresh) and fresh.step == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_exits_zero(tmp_path, sig):
    from merv_fast.train.checkpoint import Checkpointer

    proc = _run_script("until-signal", str(tmp_path))
    _wait_for_line(proc, "STEP 1")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    saved = json.loads(out.strip().splitlines()[-1])
    assert 1 <= saved["step"] < 200
    ck = Checkpointer(tmp_path)
    assert ck.latest().name == f"step-{saved['step']:08d}"
    fresh = make_state()
    assert ck.load_latest(fresh) and fresh.step == saved["step"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_fsdp2_checkpoint_resumes_on_one_process(tmp_path):
    from safetensors.torch import load_file

    from merv_fast.train.checkpoint import Checkpointer

    port = str(_free_port())
    procs = [_run_script("fsdp-save", str(tmp_path),
                         env={"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": port}) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    ckpt = tmp_path / "ckpt"
    meta = json.loads((ckpt / "step-00000002" / "meta.json").read_text())
    assert meta["world_size"] == 2 and len(list((ckpt / "step-00000002" / "rng").iterdir())) == 2

    torch.manual_seed(11)  # frozen non-encoder weights (fusion v/out projections) must come from the checkpoint
    st = make_state()  # one process, unsharded: DCP reshards
    torch.nn.init.normal_(st.model.visual.fusion.attention.out_proj.weight)
    assert Checkpointer(ckpt).load_latest(st)
    assert st.step == 2 and st.sampler.position == 2  # 2 global batches of 2 consumed: 2 micro-batches here
    want = load_file(str(tmp_path / "full.safetensors"))
    got = {n: p for n, p in st.model.state_dict().items() if not n.startswith("encoders.")}
    assert set(want) == set(got)
    for n in want:
        assert torch.equal(want[n], got[n].detach()), n
    assert st.scheduler.last_epoch == 2
    state = st.optimizer.state[dict(st.model.named_parameters())["llm.model.layers.0.mlp.up_proj.weight"]]
    assert float(state["step"]) == 2.0 and state["exp_avg"].abs().sum() > 0
    train(st, 1)  # and it trains on


def test_export_release_and_safetensors_round_trip(tmp_path):
    from merv_fast import build_model
    from merv_fast.model.release import load_release_checkpoint
    from merv_fast.train.checkpoint import export_release, export_safetensors, load_safetensors

    st = make_state()
    train(st, 1)
    export_release(st.model, tmp_path / "release.pt", global_step=1)
    export_safetensors(st.model, tmp_path / "weights.safetensors")
    for load in (lambda m: load_release_checkpoint(m, tmp_path / "release.pt"),
                 lambda m: load_safetensors(m, tmp_path / "weights.safetensors")):
        torch.manual_seed(42)
        other = build_model("tiny")
        load(other)
        mine = dict(st.model.named_parameters())
        for n, p in other.named_parameters():
            if not n.startswith("encoders."):  # trainable, and the visual path's frozen-but-random weights
                assert torch.equal(p, mine[n]), n
    assert load_release_checkpoint(build_model("tiny"), tmp_path / "release.pt") == {"global_step": 1}


# ------------------------------------------------------------------------------------------------- subprocess modes
def _main(argv: list[str]) -> int:
    import merv_fast.train.checkpoint as ckm
    from merv_fast.train.checkpoint import Checkpointer, export_safetensors
    from merv_fast.train.signals import install_signal_handlers

    mode, out = argv[0], Path(argv[1])
    torch.set_num_threads(1)
    if mode == "kill-mid-save":
        st = make_state()
        ck = Checkpointer(out, keep_last=3, save_every=1)
        real_save_rng = ckm.save_rng

        def slow_save_rng(path, state):  # after the DCP shards, before the rename: the worst moment to die
            real_save_rng(path, state)
            if st.step == 2:
                print("SAVING 2", flush=True)
                time.sleep(60)

        ckm.save_rng = slow_save_rng
        train(st, 2, on_step=lambda s, loss: ck.maybe_save(s.step, s, loss) and False)
        return 1  # never reached: killed
    if mode == "until-signal":
        st = make_state()
        ck = Checkpointer(out, keep_last=2, save_every=0)
        sig = install_signal_handlers()

        def on_step(s, loss):
            print(f"STEP {s.step}", flush=True)
            time.sleep(0.05)
            return sig.should_stop()

        train(st, 200, on_step=on_step)
        path = ck.save_final(st)
        print(json.dumps({"step": st.step, "path": str(path)}), flush=True)
        return 0
    if mode == "fsdp-save":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        st = make_state(world_size=world, rank=rank, shard=True)
        assert all(hasattr(p, "to_local") for p in st.model.trainable_parameters())  # all sharded: DTensors
        train(st, 2)
        Checkpointer(out / "ckpt", keep_last=2).save_final(st)
        export_safetensors(st.model, out / "full.safetensors")
        dist.destroy_process_group()
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[2]))
    sys.exit(_main(sys.argv[1:]))
