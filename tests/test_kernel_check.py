"""`merv-fast kernels check`: every Triton kernel compiled for sm_90 and sm_80 with the ptxas in the triton wheel,
no GPU needed. The full check runs once per module (results cached on disk by triton version and kernel source, so
a second run compiles nothing); a few compilations are redone without the cache and must agree with it."""

import json
import textwrap

import pytest

pytest.importorskip("triton")

from merv_fast.kernels import aot  # noqa: E402
from merv_fast.measure import kernel_check  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return kernel_check.run_check((90, 80), cache_dir=kernel_check.default_cache_dir())


def test_every_kernel_compiles_for_sm90_and_sm80_without_spills(report):
    found = aot.discover_kernels(kernel_check.kernels_dir())
    assert len(found) >= 11
    assert {r["kernel"] for r in report["rows"]} == set(found)
    assert {r["target"] for r in report["rows"]} == {"sm_90", "sm_80"}
    failing = kernel_check.failures(report)
    assert not failing, "\n".join(f"{r['kernel']} {r['config']} {r['target']}: {r['problems']}" for r in failing)
    # Every bf16/fp16 product of the visual path runs on tensor cores: wgmma on sm_90, mma on sm_80.
    for r in report["rows"]:
        if r["kernel"].split(".")[0] in ("pooling", "project_fuse_triton"):
            assert r["tensor_core"] == {"sm_90": "wgmma", "sm_80": "mma"}[r["target"]] or (
                r["target"] == "sm_90" and r["tensor_core"] == "mma"), r
    # The projection's GEMMs copy their tiles with TMA on sm_90 (the PTX has cp.async.bulk.tensor), not on sm_80.
    fuse_rows = [r for r in report["rows"] if r["kernel"].startswith("project_fuse_triton.")]
    assert {r["kernel"] for r in fuse_rows} == {f"project_fuse_triton._{name}_kernel"
                                                for name in ("forward", "weight_mix_grad", "pooled_grad")}
    assert all(r["tma"] == (r["target"] == "sm_90") for r in fuse_rows), [
        (r["kernel"], r["config"], r["target"], r["tma"]) for r in fuse_rows]


def test_a_compilation_redone_without_the_cache_agrees(report):
    compilations, _ = kernel_check.plan((90,), only="_rms_norm_backward")
    fresh, compiled = kernel_check.compile_all(compilations[:1], workers=1, cache_dir=None)
    assert compiled == 1 and "error" not in fresh[0], fresh
    [row] = [r for r in report["rows"] if r["kernel"] == compilations[0].kernel and r["target"] == "sm_90"
             and r["config"] == compilations[0].config]
    assert fresh[0]["registers"] <= row["registers"] and fresh[0]["spill_stores"] == 0
    assert fresh[0]["shared_bytes"] <= row["shared_bytes"]


def test_readme_table_is_the_current_one(report):
    from pathlib import Path

    readme = Path(kernel_check.__file__).resolve().parents[2] / "README.md"
    if not readme.exists():
        pytest.skip("no README.md beside the package (an installed copy)")
    block = kernel_check.readme_block(readme.read_text())
    if f"Triton {report['triton']}," not in block:
        pytest.skip(f"the README's table was made with another triton than {report['triton']}")
    assert block == kernel_check.table_markdown(report), \
        "README.md's kernels table is stale: run `merv-fast kernels table --write README.md`"


def test_kernels_are_found_in_both_forms_and_one_without_a_spec_fails(tmp_path):
    (tmp_path / "extra.py").write_text(textwrap.dedent('''
        import triton

        @triton.jit
        def _decorated(x_ptr, BLOCK: tl.constexpr):
            pass

        def _lazy(x_ptr, BLOCK: tl.constexpr):
            pass

        def _not_a_kernel():
            return triton.jit(_lazy)
    '''))
    assert aot.discover_kernels(tmp_path) == {"extra._decorated": "extra.py", "extra._lazy": "extra.py"}
    [row] = kernel_check.rows([], [], ["extra._lazy"])
    assert row["problems"] and "no launch spec" in row["problems"][0]
    module = type(textwrap)("no_spec")
    with pytest.raises(LookupError, match="aot_launches"):
        aot.record_module(module, kernel_check.model_shapes("merv-1b", kernel_check.DTYPES[0]), 90)


def test_recording_sees_the_gpu_launches_and_every_autotune_config():
    from merv_fast.kernels import pooling

    shapes = kernel_check.model_shapes("merv-7b", kernel_check.DTYPES[0])
    launches = aot.record_module(pooling, shapes, 90)
    forward = [launch for launch in launches if launch.kernel == "pooling._pool_forward_kernel"]
    assert len(forward) == len(shapes.encoders) == 4
    assert len(forward[0].configs) == len(pooling._FORWARD_CONFIGS)
    assert forward[0].args[0].device.type == "meta" and forward[0].kwargs["DOT_IN_FP32"] is False


def test_cli_json_and_target_errors(capsys, monkeypatch):
    monkeypatch.setattr(kernel_check, "run_check", lambda *a, **k: {
        "triton": "x", "targets": ["sm_90"], "presets": ["p"], "dtypes": ["bf16"], "seconds": 0,
        "rows": [{"kernel": "m.k", "config": "-", "target": "sm_90", "registers": 32, "spill_stores": 0,
                  "spill_loads": 0, "shared_bytes": 0, "tensor_core": "", "tma": False, "problems": []}]})
    assert kernel_check.main(["check", "--targets", "90", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["kernel"] == "m.k"
    with pytest.raises(SystemExit):
        kernel_check.main(["check", "--targets", "75"])
    assert "no limits known" in capsys.readouterr().err
