"""The planner's parameter, gradient, optimizer and encoder bytes per rank equal what the real FSDP2-sharded model
holds, byte for byte, under torchrun with 2 gloo ranks: full sharding and hybrid (2 nodes of one rank)."""

import json
import subprocess
import sys
from pathlib import Path

from merv_fast.config import get_preset
from merv_fast.plan.hardware import Cluster
from merv_fast.plan.memory import state_items
from merv_fast.plan.planner import make_workload
from merv_fast.plan.shapes import model_shapes
from merv_fast.train.config import make_train_config

ROOT = Path(__file__).resolve().parents[2]


def test_state_bytes_per_rank_match_the_sharded_model(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(Path(__file__).with_name("fsdp_state_worker.py")), str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    shapes = model_shapes(get_preset("tiny"))
    train = make_train_config("merv-frozen", preset="tiny")
    layouts = {"full": (Cluster("cpu", gpus_per_node=2, nodes=1), False),
               "hybrid": (Cluster("cpu", gpus_per_node=1, nodes=2), True)}
    for layout, (cluster, hybrid) in layouts.items():
        w = make_workload(shapes, cluster, train, micro_batch=2, per_rank=2, text_tokens=20, max_text_tokens=20,
                          checkpointing="off", hybrid=hybrid)
        assert w.world == 2 and w.shard_group == (1 if hybrid else 2)
        for rank in range(2):
            predicted = {k: int(v.bytes) for k, v in state_items(shapes, w, rank).items()}
            assert predicted == measured[rank][layout], (layout, rank)
    # the shards really are shards: rank 0 holds about half of the whole
    whole = measured[0]["hybrid"]["parameters"]
    assert 0.45 * whole < measured[0]["full"]["parameters"] < 0.6 * whole
