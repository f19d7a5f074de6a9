"""`merv-fast judge`: the open-ended benchmarks' LLM judge, one command after `merv-fast eval --task open`.

Each line of a run's `{benchmark}_pred_merge.jsonl` (question, answer, pred) goes to an OpenAI-compatible chat
endpoint the user names (`--endpoint URL --model NAME`; there is no default host), with the judge prompt of the
release's GPT evaluation (scripts/eval_gpt_batch.py:33-55, the Video-ChatGPT protocol: the judge's words are the
protocol, so they are kept verbatim). Its reply, a Python dict literal `{'pred': 'yes'|'no', 'score': 0..5}`, is read
with `ast.literal_eval` (never `eval`).

Verdicts are cached on disk as they arrive (OUT/judge/<model>/<benchmark>.jsonl, keyed by question id and a hash
of the request), so a rerun asks only what is not cached: an interrupted run resumes, and a new prediction or
another judge model asks again. A reply that never parses (after `max_tries`) and a request that keeps failing are
not cached (a rerun asks again); this run counts them as the release's batch script does, `no` with score 0
(eval_gpt_batch.py:134-147). Per benchmark, as eval_gpt_batch.py:151-176 reports: accuracy = yes / all judged
(`'yes' in pred.lower()`), mean score = sum of scores / all judged. Written to OUT/judge.json and, in the release's
format, OUT/{benchmark}_gpt.json ({question_id: [verdict, {"q", "a", "pred"}]}).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from merv_fast.progress import progress

PRED_SUFFIX = "_pred_merge.jsonl"
MC_SUFFIX = "_naive_pred_merge.jsonl"  # multiple choice: scored by letter, never judged
FAILED = {"pred": "no", "score": 0}

SYSTEM = ("You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
          "question-answer pairs. Your task is to compare the predicted answer with the correct answer and determine "
          "if they match meaningfully. Here's how you can accomplish the task:------##INSTRUCTIONS: - Focus on the "
          "meaningful match between the predicted answer and the correct answer.\n- Consider synonyms or "
          "paraphrases as valid matches.\n- Evaluate the correctness of the prediction compared to the answer.")
USER = ("Please evaluate the following video-based question-answer pair:\n\nQuestion: {q}\nCorrect Answer: {a}\n"
        "Predicted Answer: {pred}\n\nProvide your evaluation only as a yes/no and score where the score is an integer "
        "value between 0 and 5, with 5 indicating the highest meaningful match. Please generate the response in the "
        "form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  a string of "
        "'yes' or 'no' and value of 'score' is in INTEGER, not STRING.DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR "
        "EXPLANATION. Only provide the Python dictionary string. For example, your response should look like this: "
        "{{'pred': 'yes', 'score': 4}}.")


@dataclass
class JudgeSettings:
    run: str  # a `merv-fast eval --task open` output directory
    endpoint: str  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (POST {endpoint}/chat/completions)
    model: str
    benchmarks: list[str] = field(default_factory=list)  # default: every {benchmark}_pred_merge.jsonl in run
    api_key_env: str | None = "OPENAI_API_KEY"  # the key is read from this environment variable, if set
    workers: int = 8
    max_tries: int = 3  # per question: a failed request or an unreadable reply is asked again this many times
    timeout_s: float = 60.0
    max_tokens: int = 500
    show_progress: bool = True

    def validate(self) -> None:
        if not re.match(r"^https?://", self.endpoint or ""):
            raise ValueError(f"--endpoint {self.endpoint!r}: give the judge's base URL, e.g. http://HOST:PORT/v1")
        if not self.model:
            raise ValueError("--model: name the judge model the endpoint serves")
        if self.workers < 1 or self.max_tries < 1:
            raise ValueError("--workers and --max-tries must be >= 1")


def messages_for(row: dict) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER.format(q=row["question"], a=row["answer"], pred=row["pred"])}]


def parse_verdict(text: str) -> dict | None:
    """{'pred': 'yes'|'no', 'score': number} from the judge's reply, or None (the release's checks,
    eval_gpt.py:26-31)."""
    if not isinstance(text, str):
        return None
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(value, dict) or value.get("pred") not in ("yes", "no"):
        return None
    score = value.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return None
    return {"pred": value["pred"], "score": score}


def request_key(model: str, messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()[:16]


class Endpoint:
    """POST {base}/chat/completions (the OpenAI chat API), stdlib only."""

    def __init__(self, base: str, model: str, api_key: str | None, timeout_s: float, max_tokens: int):
        self.url = base.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout_s, self.max_tokens = model, api_key, timeout_s, max_tokens

    def ask(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            reply = json.loads(response.read().decode())
        return reply["choices"][0]["message"]["content"]


FATAL_HTTP = (401, 403, 404)  # a wrong key or URL fails every question alike: stop at once


def judge_one(endpoint: Endpoint, messages: list[dict], max_tries: int) -> tuple[dict | None, str]:
    """(verdict or None, the last reply or error): asked up to `max_tries` times, with a growing pause after a
    failed request. An HTTP 401/403/404 raises ValueError: no question would get through."""
    last = ""
    for attempt in range(max_tries):
        try:
            last = endpoint.ask(messages)
        except urllib.error.HTTPError as err:
            if err.code in FATAL_HTTP:
                raise ValueError(f"{endpoint.url}: HTTP {err.code} {err.reason} (check --endpoint, --model and the "
                                 "API key's environment variable)") from err
            last = f"request failed: HTTP {err.code} {err.reason}"
            time.sleep(min(2.0 ** attempt * 0.5, 8.0))
            continue
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as err:
            last = f"request failed: {type(err).__name__}: {err}"[:300]
            time.sleep(min(2.0 ** attempt * 0.5, 8.0))
            continue
        verdict = parse_verdict(last)
        if verdict is not None:
            return verdict, last
    return None, last


class VerdictCache:
    """Verdicts of one benchmark, appended one JSON line each as they arrive; a line cut short by a kill is skipped."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.rows: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "key" in row:
                    self.rows[row["key"]] = row
        path.parent.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes() if path.is_file() else b""
        if data and not data.endswith(b"\n"):  # new lines must not be glued onto a killed write's tail
            path.write_bytes(data[:data.rfind(b"\n") + 1])

    def add(self, row: dict) -> None:
        with self.lock:
            self.rows[row["key"]] = row
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())


def read_predictions(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number}: not JSON ({err})") from err
        missing = [k for k in ("question_id", "question", "answer", "pred") if k not in row]
        if missing:
            raise ValueError(f"{path}: line {number}: missing key(s) {missing} (an open-ended prediction line holds "
                             "question_id, question, answer and pred)")
        rows.append(row)
    return rows


def benchmark_files(settings: JudgeSettings) -> dict[str, Path]:
    run = Path(settings.run)
    if not run.is_dir():
        raise ValueError(f"--run {str(run)!r}: no such directory")
    found = {p.name[:-len(PRED_SUFFIX)]: p for p in sorted(run.glob(f"*{PRED_SUFFIX}"))
             if not p.name.endswith(MC_SUFFIX)}
    if settings.benchmarks:
        absent = [b for b in settings.benchmarks if b not in found]
        if absent:
            raise ValueError(f"--run {str(run)!r}: no {absent[0]}{PRED_SUFFIX} (have: {sorted(found) or 'none'})")
        found = {b: found[b] for b in settings.benchmarks}
    if not found:
        raise ValueError(f"--run {str(run)!r}: no *{PRED_SUFFIX} (open-ended predictions from `merv-fast eval "
                         "--task open`)")
    return found


def summarize(verdicts: list[dict]) -> dict:
    yes = sum(1 for v in verdicts if "yes" in str(v["pred"]).lower())
    return {"judged": len(verdicts), "yes": yes, "no": len(verdicts) - yes,
            "accuracy": yes / len(verdicts) if verdicts else None,
            "mean_score": sum(v["score"] for v in verdicts) / len(verdicts) if verdicts else None}


def run_judge(settings: JudgeSettings, endpoint: Endpoint | None = None) -> dict:
    """Judge every benchmark's predictions; returns (and writes to RUN/judge.json) the per-benchmark figures."""
    settings.validate()
    files = benchmark_files(settings)
    if endpoint is None:
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        endpoint = Endpoint(settings.endpoint, settings.model, key, settings.timeout_s, settings.max_tokens)
    run = Path(settings.run)
    cache_dir = run / "judge" / re.sub(r"[^A-Za-z0-9._-]+", "_", settings.model)
    results: dict[str, dict] = {}
    for benchmark, path in files.items():
        rows = read_predictions(path)
        cache = VerdictCache(cache_dir / f"{benchmark}.jsonl")
        asks = {}
        for row in rows:
            messages = messages_for(row)
            asks[str(row["question_id"])] = (request_key(settings.model, messages), messages)
        todo = [(qid, k, m) for qid, (k, m) in asks.items() if f"{qid}/{k}" not in cache.rows]
        failed: dict[str, str] = {}
        bar = progress(len(todo), f"judge {benchmark}", "answers", settings.show_progress)

        def ask(job):
            qid, key, messages = job
            return qid, key, *judge_one(endpoint, messages, settings.max_tries)

        pool = ThreadPoolExecutor(max_workers=settings.workers)
        try:
            for qid, key, verdict, reply in pool.map(ask, todo):
                if verdict is None:
                    failed[qid] = reply
                else:
                    cache.add({"key": f"{qid}/{key}", "question_id": qid, **verdict, "reply": reply})
                bar.update(1)
        finally:
            pool.shutdown(cancel_futures=True)  # after a fatal error, the questions not yet sent are not sent
            bar.close()
        verdicts, release = [], {}
        for row in rows:
            qid = str(row["question_id"])
            cached = cache.rows.get(f"{qid}/{asks[qid][0]}")
            verdict = {"pred": cached["pred"], "score": cached["score"]} if cached else dict(FAILED)
            verdicts.append(verdict)
            release[qid] = [verdict, {"q": row["question"], "a": row["answer"], "pred": row["pred"]}]
        (run / f"{benchmark}_gpt.json").write_text(json.dumps(release) + "\n")
        results[benchmark] = {**summarize(verdicts), "unjudged": len(failed),
                              "unjudged_examples": dict(list(failed.items())[:3])}
    out = {"endpoint": settings.endpoint, "model": settings.model, "benchmarks": results}
    (run / "judge.json").write_text(json.dumps(out, indent=1) + "\n")
    return out
