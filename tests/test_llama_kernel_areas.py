"""The GPU suite's `llama-kernels` area, run through the suite on the CPU at the tiny LLM's shapes."""

import importlib
import json

import merv_fast.measure.llama_kernel_areas as llama_kernel_areas
from merv_fast.measure import suite


def test_llama_kernels_area_writes_a_row_per_op_and_direction(tmp_path):
    importlib.reload(llama_kernel_areas)  # registers the area again if an earlier test restored the registry
    statuses = suite.run_suite(tmp_path, only=["llama-kernels"], allow_cpu=True)
    assert statuses == {"ceilings": "done", "llama-kernels": "done"}, statuses
    [path] = tmp_path.glob("*_gpu-suite.json")
    rows = {r["name"]: r for r in json.loads(path.read_text())["results"] if r["area"] == "llama-kernels"}
    assert set(rows) == {f"{op} {d} tiny" for op in ("rms_norm", "swiglu", "rope") for d in ("fwd", "fwd+bwd")}
    for name, r in rows.items():
        assert r["speedup"] > 0 and r["share_of_ceiling"] > 0, name
        assert r["reference"]["name"].startswith("transformers"), name
        assert r["config"]["fused_backend"] == "torch", name  # CPU tensors, no interpreter: the reference runs
    assert rows["rope fwd tiny"]["config"]["head_dim"] == 16
