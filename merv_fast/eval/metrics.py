"""The metrics JSON of a run: accuracy overall, per benchmark and per question type (multiple choice), question
counts, and the broken videos (each with its questions, path and reason). Questions whose video is broken are
counted apart and left out of the accuracy, as the release's runs (which never wrote a line for them) did."""

from __future__ import annotations

from collections import defaultdict


def _accuracy(rows: list[dict]) -> dict:
    correct = sum(1 for r in rows if r["acc"])
    return {"accuracy": correct / len(rows) if rows else None, "correct": correct, "total": len(rows)}


def broken_summary(broken: list[dict]) -> dict:
    videos: dict[tuple, dict] = {}
    for b in broken:
        v = videos.setdefault((b["benchmark"], b["video_name"]),
                              {"benchmark": b["benchmark"], "video_name": b["video_name"], "path": b["path"],
                               "reason": b["reason"], "question_ids": []})
        v["question_ids"].append(b["question_id"])
    return {"videos": len(videos), "questions": len(broken), "entries": list(videos.values())}


def summarize(task: str, mode: str, questions: int, predictions: list[dict], broken: list[dict]) -> dict:
    """`predictions`: the run's prediction lines (each with benchmark, question_type and, for "mc", acc)."""
    out = {"task": task, "mode": mode, "questions": questions, "answered": len(predictions),
           "broken": broken_summary(broken)}
    by_benchmark: dict[str, list[dict]] = defaultdict(list)
    for p in predictions:
        by_benchmark[p["benchmark"]].append(p)
    if task != "mc":
        out["benchmarks"] = {name: {"answered": len(rows)} for name, rows in sorted(by_benchmark.items())}
        return out
    out["overall"] = _accuracy(predictions)
    out["benchmarks"] = {}
    for name, rows in sorted(by_benchmark.items()):
        types: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            if r.get("question_type") is not None:
                types[r["question_type"]].append(r)
        out["benchmarks"][name] = {**_accuracy(rows),
                                   "question_types": {t: _accuracy(v) for t, v in sorted(types.items())}}
    return out
