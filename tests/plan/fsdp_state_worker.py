"""One rank of tests/plan/test_fsdp_state.py (run under torchrun): the tiny model sharded by the trainer's
`shard_model` over gloo, fully (2 ranks) and hybrid (2 nodes of 1 rank), after one optimizer step and one more
backward; writes what the rank holds to OUT/rank<R>.json."""

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from helpers import make_batch  # noqa: E402

from merv_fast.measure.step_memory import state_bytes  # noqa: E402
from merv_fast.model.merv import build_model  # noqa: E402
from merv_fast.train.optim import build_optimizer  # noqa: E402
from merv_fast.train.parallel import TrainModule, init_distributed, shard_model  # noqa: E402
from merv_fast.train.step import Stepper  # noqa: E402


def measure(info, hybrid: bool) -> dict:
    torch.manual_seed(0)
    model = build_model("tiny", kernels="torch")
    module = shard_model(TrainModule(model), info, hybrid=hybrid)
    optimizer = build_optimizer(module, lr=1e-3)
    stepper = Stepper(module, optimizer, None, device=torch.device("cpu"), world_size=info.world_size)
    batch = make_batch("video", 2, 20, 6, seed=10 + info.rank)
    stepper.step([batch])  # creates the optimizer state; the step ends with the gradients set to None
    prepared = stepper.prepare(batch)
    loss, _ = module(batch.input_ids, batch.attention_mask, batch.labels, model.encode(prepared.pixels))
    loss.backward()  # the reduce-scattered gradient shards
    return state_bytes(module, optimizer, model.encoders)


def main(out: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu", timeout_s=120)
    result = {"full": measure(info, hybrid=False),
              "hybrid": measure(dataclasses.replace(info, local_world_size=1), hybrid=True)}
    Path(out, f"rank{info.rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
