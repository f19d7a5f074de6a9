"""`merv-fast train --preset tiny --max-steps 2` on synthesized data writes metrics.jsonl with the required keys."""

import json

from merv_fast.cli import main
from merv_fast.train.loop import METRIC_KEYS


def test_train_cli_writes_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MERV_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--max-steps", "2", "--out", str(out),
                 "--set", "num_workers=0", "--set", "kernels=torch", "--set", "apex_adam=true"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert set(METRIC_KEYS) <= set(r)
        assert r["loss"] > 0 and r["mfu"] is None and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0
        assert {"data", "llm_forward", "backward", "optimizer"} <= set(r["phases"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["total_steps"] > 2  # --max-steps never shortens the schedule
    assert summary["bad_samples"]["failures"] == 0
    err = capsys.readouterr().err
    assert "step 2/2" in err
    assert "FusedAdam is not usable here" in err  # no real NVIDIA apex on a CPU machine: torch's AdamW, said once


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """The loop's checkpoint hooks: 4 steps straight == 2 steps, then --resume for 2 more (bitwise on CPU, fp32)."""
    monkeypatch.setenv("MERV_FAST_CACHE", str(tmp_path / "cache"))
    common = ["train", "--preset", "tiny", "--set", "num_workers=0", "--set", "kernels=torch",
              "--set", "activation_checkpointing=off", "--total-steps", "6"]

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert main(common + ["--max-steps", "4", "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--max-steps", "2", "--out", str(tmp_path / "b")]) == 0
    assert main(common + ["--max-steps", "4", "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    """A real `merv-fast train` process: SIGTERM mid-run -> the step finishes, a checkpoint is saved, exit 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    env = dict(os.environ, MERV_FAST_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "merv_fast.cli", "train", "--preset", "tiny", "--max-steps", "200",
                             "--out", str(out), "--set", "num_workers=0", "--set", "kernels=torch"],
                            env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by_signal"] and summary["steps"] < 200
    assert (out / "latest").exists() and "signal received" in err


def test_finished_run_exports_weights_that_equal_its_last_checkpoint(tmp_path, monkeypatch):
    """export=both: `model.safetensors` and the release run directory hold the weights of the run's final
    checkpoint."""
    import torch

    from merv_fast.model.merv import build_model
    from merv_fast.pretrained.weights import load_weights

    monkeypatch.setenv("MERV_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--max-steps", "2", "--out", str(out), "--set", "num_workers=0",
                 "--set", "kernels=torch", "--set", "export=both"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["exported"]) == {"safetensors", "release"}

    def trained(weights):
        torch.manual_seed(123)  # another init than training's: every compared weight must come from the file
        model = build_model("tiny")
        load_weights(model, weights)
        return {k: v for k, v in model.state_dict().items() if not k.startswith("encoders.")}

    from_checkpoint = trained(out)  # the run directory: its newest DCP checkpoint
    release_file = out / "release" / "checkpoints" / "latest-checkpoint.pt"
    assert (out / "release" / "config.json").is_file() and release_file.is_file()
    for exported in (out / "model.safetensors", out / "release", release_file):
        weights = trained(exported)
        assert weights.keys() == from_checkpoint.keys()
        different = [k for k in weights if not torch.equal(weights[k], from_checkpoint[k])]
        assert not different, f"{exported.name}: {different[:5]}"
    torch.manual_seed(123)
    unloaded = build_model("tiny").state_dict()
    assert all(not torch.equal(unloaded[k], from_checkpoint[k]) for k in
               ("visual.projectors.0.weight", "llm.lm_head.weight", "llm.model.layers.0.mlp.up_proj.weight"))


def test_init_from_starts_from_the_given_weights(tmp_path, monkeypatch):
    """--init-from a release-layout export: a run with lr 0 changes nothing, so it exports exactly those weights; the
    run records what it read."""
    import torch
    from safetensors.torch import load_file

    monkeypatch.setenv("MERV_FAST_CACHE", str(tmp_path / "cache"))
    common = ["train", "--preset", "tiny", "--max-steps", "1", "--set", "num_workers=0", "--set", "kernels=torch"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(common + ["--out", str(first), "--seed", "1", "--set", "export=both"]) == 0
    assert main(common + ["--out", str(second), "--seed", "2", "--init-from", str(first / "release"),
                          "--set", "lr=0.0", "--set", "weight_decay=0.0"]) == 0
    read = json.loads((second / "summary.json").read_text())["weights_read"]["init_from"]
    assert read["path"] == str((first / "release" / "checkpoints" / "latest-checkpoint.pt").resolve())
    assert read["kind"] == "release checkpoint" and read["trained_as"] == "tiny"
    given, kept = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert given.keys() == kept.keys()
    assert all(torch.equal(given[k], kept[k]) for k in given)
    assert main(common + ["--out", str(tmp_path / "third"), "--seed", "2", "--set", "lr=0.0"]) == 0
    fresh = load_file(str(tmp_path / "third" / "model.safetensors"))  # seed 2 without --init-from: other weights
    assert not torch.equal(fresh["visual.projectors.0.weight"], given["visual.projectors.0.weight"])


def test_a_wrong_media_root_stops_before_training_with_one_line(tmp_path, capsys):
    from merv_fast.data.synth import synthesize

    info = synthesize(tmp_path / "media", videos=3, images=2, texts=1, seed=0)
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--max-steps", "1", "--data", info["json"], "--media-root",
                 str(tmp_path), "--out", str(out), "--set", "num_workers=0", "--set", "kernels=torch"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"media root {str(tmp_path)!r} looks wrong: 5 of 5 media files checked do not exist" in err
    assert str(tmp_path) in err and not (out / "metrics.jsonl").exists()


def test_torchrun_from_the_checkout_root_two_ranks_one_summary(tmp_path):
    """The README's form: `torchrun --nproc-per-node 2 -m merv_fast.cli train ...` with the checkout's root as the
    working directory (on sys.path: it must not shadow installed packages), FSDP2 over gloo; the final summary line
    is printed by rank 0 only."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, MERV_FAST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "merv_fast.cli", "train", "--preset", "tiny", "--max-steps", "1",
                             "--out", str(tmp_path / "run"), "--set", "num_workers=0", "--set", "kernels=torch",
                             "--set", "global_batch_size=4"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:  # never leave ranks behind
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    assert stdout.count("trained 1 steps") == 1, stdout
