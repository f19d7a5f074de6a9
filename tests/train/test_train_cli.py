"""`merv-fast train --preset tiny --max-steps 2` on synthesized data writes metrics.jsonl with the required keys."""

import json

from merv_fast.cli import main
from merv_fast.train.loop import METRIC_KEYS


def test_train_cli_writes_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MERV_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--max-steps", "2", "--out", str(out),
                 "--set", "num_workers=0", "--set", "kernels=torch"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert set(METRIC_KEYS) <= set(r)
        assert r["loss"] > 0 and r["mfu"] is None and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0
        assert {"data", "llm_forward", "backward", "optimizer"} <= set(r["phases"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["total_steps"] > 2  # --max-steps never shortens the schedule
    assert summary["bad_samples"]["failures"] == 0
    assert "step 2/2" in capsys.readouterr().err


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
