"""2-process gloo FSDP2 training, plain and hybrid-sharded, equals 1-process training (losses, gradient norms, and
every trainable parameter's gradient); a text-only batch on one rank does not hang; FSDP2 never warns that a unit
returned a view tensor."""

import os
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_batch, make_stepper  # noqa: E402

STEPS = 3


def _global_batches(step):
    # rank 0: a video micro-batch; rank 1: a TEXT-ONLY micro-batch (the visual path must still run there)
    return [make_batch("video", 2, 20, 6, seed=10 + step), make_batch("text", 2, 24, 9, seed=20 + step)]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from merv_fast.train.parallel import init_distributed

    info = init_distributed("cpu", timeout_s=120)
    _, module, stepper = make_stepper(info=info, world_size=world)
    from merv_fast.train.parallel import is_fsdp

    assert is_fsdp(module) and is_fsdp(module.visual) and is_fsdp(module.llm.model.layers[0])
    assert not any(type(p).__name__ == "DTensor" for p in module.merv.encoders.parameters())
    losses = {"fsdp": [], "hybrid": []}
    grads = _record_first_gradients(module, stepper)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            result = stepper.step([_global_batches(step)[rank]])
            losses["fsdp"].append((result.loss, result.grad_norm))
    losses["grads"] = grads
    losses["warnings"] = [str(w.message) for w in caught]
    # Hybrid sharding: the 2 ranks as 2 "nodes" of one rank each (replicate across nodes x shard within a node).
    import dataclasses

    from merv_fast.train.parallel import build_mesh

    one_per_node = dataclasses.replace(info, local_world_size=1)
    mesh = build_mesh(one_per_node, hybrid=True)
    assert mesh.shape == (2, 1) and mesh.mesh_dim_names == ("dp_replicate", "dp_shard")
    _, module, stepper = make_stepper(info=one_per_node, world_size=world, hybrid=True)
    assert module.llm.model.layers[0].self_attn.q_proj.weight.device_mesh.mesh_dim_names == ("dp_replicate",
                                                                                          "dp_shard")
    for step in range(STEPS):
        result = stepper.step([_global_batches(step)[rank]])
        losses["hybrid"].append((result.loss, result.grad_norm))
    torch.save(losses, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _record_first_gradients(module, stepper) -> dict:
    """Every trainable parameter's full gradient of the first step, as the optimizer is about to use it (after the
    reduce-scatter and clipping; a sharded gradient is gathered: a collective, every rank runs the hook)."""
    grads: dict = {}

    def hook(optimizer, args, kwargs):
        if grads:
            return
        for name, p in module.named_parameters():
            if p.requires_grad:
                g = p.grad
                grads[name] = None if g is None else (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()

    stepper.optimizer.register_step_pre_hook(hook)
    return grads


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_fsdp_matches_one_process(tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung (collectives out of step: the text-only rank skipped an FSDP unit?)"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["fsdp"] == r1["fsdp"] and r0["hybrid"] == r1["hybrid"]  # every rank logs the same global values

    # One process, the same global batch as two micro-batches: the "tokens" normalisation makes them equal.
    _, module, stepper = make_stepper()
    single_grads = _record_first_gradients(module, stepper)
    single = [(r.loss, r.grad_norm) for r in (stepper.step(_global_batches(s)) for s in range(STEPS))]
    assert not [w for w in r0["warnings"] + r1["warnings"] if "view tensor" in w]
    assert r0["grads"].keys() == single_grads.keys() and len(single_grads) > 10
    for name, want in single_grads.items():
        got = r0["grads"][name]
        assert want is not None and got is not None, name
        # fp32 on both sides, summed in another order: about 1e-7 of the largest entry apart (measured)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=name)
    for mode in ("fsdp", "hybrid"):
        assert len(r0[mode]) == STEPS
        for (l2, g2), (l1, g1) in zip(r0[mode], single):
            assert l2 == pytest.approx(l1, rel=1e-4), mode
            assert g2 == pytest.approx(g1, rel=1e-3), mode
