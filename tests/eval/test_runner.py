"""The run: predictions appended per batch and resumed (exactly the unanswered questions asked again), sharded
over ranks with rank 0 merging, broken videos reported and counted, metrics from known answers."""

import json
import shutil

import pytest

from merv_fast.eval import runner
from merv_fast.eval.metrics import summarize
from merv_fast.eval.runner import EvalSettings, run_eval
from merv_fast.train.parallel import DistInfo


def predictions(out) -> dict:
    return {r["key"]: r["pred"] for r in map(json.loads, (out / "mcq_naive_pred_merge.jsonl").read_text().splitlines())}


def asked_keys(monkeypatch) -> list:
    asked = []
    answer = runner.Answerer.answer

    def spy(self, batch):
        asked.extend(i.key for i in batch)
        return answer(self, batch)

    monkeypatch.setattr(runner.Answerer, "answer", spy)
    return asked


def test_resume_asks_exactly_the_unanswered(answering, eval_sets, tmp_path, monkeypatch):
    model, tokenizer = answering
    def settings(out):
        return EvalSettings("mc", [eval_sets["mcq"]], str(out), batch_size=3, show_progress=False)

    full = run_eval(settings(tmp_path / "full"), model, tokenizer)
    out = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", out)
    for name in ("metrics.json", "mcq_naive_pred_merge.jsonl"):
        (out / name).unlink()
    lines = (out / "predictions.rank-00000.jsonl").read_text().splitlines()
    kept = [json.loads(line)["key"] for line in lines[:5]]
    (out / "predictions.rank-00000.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])  # killed mid-write
    asked = asked_keys(monkeypatch)
    resumed = run_eval(settings(out), model, tokenizer)
    all_keys = [json.loads(line)["key"] for line in lines]
    assert sorted(asked) == sorted(set(all_keys) - set(kept)) and len(asked) == len(all_keys) - 5
    assert resumed == full and predictions(out) == predictions(tmp_path / "full")
    asked.clear()
    run_eval(settings(out), model, tokenizer)  # everything answered: nothing asked
    assert asked == []
    with pytest.raises(ValueError, match="run.json"):  # another mode cannot resume these predictions
        run_eval(EvalSettings("mc", [eval_sets["mcq"]], str(out), generate=True, show_progress=False), model,
                 tokenizer)


def test_ranks_take_whole_videos_and_rank_0_merges(answering, eval_sets, tmp_path, monkeypatch):
    model, tokenizer = answering
    def settings(out):
        return EvalSettings("mc", [eval_sets["mcq"]], str(out), batch_size=4, show_progress=False)

    single = run_eval(settings(tmp_path / "one"), model, tokenizer)
    asked = asked_keys(monkeypatch)
    per_rank = {}
    for rank in (1, 0):  # rank 1 finishes first; rank 0 then merges both ranks' files
        monkeypatch.setattr("merv_fast.train.parallel.init_distributed", lambda device=None, r=rank: DistInfo(r, 2))
        result = run_eval(settings(tmp_path / "two"), model, tokenizer)
        per_rank[rank] = list(asked)
        asked.clear()
        assert (result is None) == (rank == 1)
    assert result == single and predictions(tmp_path / "two") == predictions(tmp_path / "one")
    assert set(per_rank[0]).isdisjoint(per_rank[1]) and per_rank[0] and per_rank[1]
    videos = lambda keys: {json.loads(line)["video_name"]  # noqa: E731
                           for line in (tmp_path / "two" / "mcq_naive_pred_merge.jsonl").read_text().splitlines()
                           if json.loads(line)["key"] in keys}
    assert videos(per_rank[0]).isdisjoint(videos(per_rank[1]))


def test_broken_videos_are_reported_and_counted(answering, eval_sets, tmp_path):
    model, tokenizer = answering
    root = tmp_path / "bench"
    shutil.copytree(eval_sets["mcq"], root)
    questions = json.loads((root / "test_q.json").read_text())
    names = list(dict.fromkeys(q["video_name"] for q in questions))
    missing, corrupt = names[0], names[1]
    for path in (root / "videos").glob(f"{missing}.*"):
        path.unlink()
    for path in (root / "videos").glob(f"{corrupt}.*"):
        path.write_bytes(b"not a video at all" * 10)
    metrics = run_eval(EvalSettings("mc", [str(root)], str(tmp_path / "out"), batch_size=4, show_progress=False),
                       model, tokenizer)
    lost = sum(q["video_name"] in (missing, corrupt) for q in questions)
    assert metrics["broken"]["videos"] == 2 and metrics["broken"]["questions"] == lost
    assert metrics["answered"] == metrics["overall"]["total"] == len(questions) - lost
    reasons = {e["video_name"]: e["reason"] for e in metrics["broken"]["entries"]}
    assert reasons[missing].startswith("no file videos/") and reasons[corrupt]


def test_metrics_on_known_answers():
    rows = [  # benchmark, question type, correct?
        ("NExT-QA", "CW", True), ("NExT-QA", "CW", False), ("NExT-QA", "TN", True), ("NExT-QA", "TN", True),
        ("VLEP", None, False), ("VLEP", None, True), ("VLEP", None, False), ("VLEP", None, False),
    ]
    predictions = [{"benchmark": b, "question_type": t, "acc": a} for b, t, a in rows]
    broken = [{"key": "VLEP/9", "benchmark": "VLEP", "question_id": "9", "video_name": "v9", "path": "p",
               "reason": "zero bytes"}]
    m = summarize("mc", "letters", 9, predictions, broken)
    assert m["overall"] == {"accuracy": 4 / 8, "correct": 4, "total": 8}
    assert m["benchmarks"]["NExT-QA"]["accuracy"] == 3 / 4 and m["benchmarks"]["VLEP"]["accuracy"] == 1 / 4
    assert m["benchmarks"]["NExT-QA"]["question_types"] == {
        "CW": {"accuracy": 0.5, "correct": 1, "total": 2}, "TN": {"accuracy": 1.0, "correct": 2, "total": 2}}
    assert m["benchmarks"]["VLEP"]["question_types"] == {}
    assert (m["questions"], m["answered"], m["broken"]["videos"], m["broken"]["questions"]) == (9, 8, 1, 1)


def test_run_metrics_match_the_prediction_file(answering, eval_sets, tmp_path):
    model, tokenizer = answering
    metrics = run_eval(EvalSettings("mc", [eval_sets["NExT-QA-synth"]], str(tmp_path), show_progress=False),
                       model, tokenizer)
    rows = [json.loads(line) for line in (tmp_path / "NExT-QA-synth_naive_pred_merge.jsonl").read_text().splitlines()]
    assert all(r["acc"] == (r["pred"] == r["answer_char"]) and r["question_type"] == r["question_id"].split("_")[0]
               .replace("TP", "TN") for r in rows)
    bench = metrics["benchmarks"]["NExT-QA-synth"]
    assert bench["correct"] == sum(r["acc"] for r in rows) and bench["total"] == len(rows)
    assert sum(t["total"] for t in bench["question_types"].values()) == len(rows)
