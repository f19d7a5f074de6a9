"""`merv-fast judge` against a stub OpenAI-compatible server on 127.0.0.1 (stdlib http.server in a thread): the
release's prompt and scoring, verdicts cached on disk, a rerun asks nothing, an unreadable reply is asked again and
counted as the release's batch script counts it."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from merv_fast.cli import main
from merv_fast.eval.judge import parse_verdict


class Judge(BaseHTTPRequestHandler):
    """Says yes (score 4) when the prediction contains the answer, else no (score 1); for questions holding
    "garbled" it replies with prose, which never parses."""

    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if self.headers.get("Authorization") == "Bearer wrong":
            self.send_error(401, "invalid key")
            return
        user = body["messages"][1]["content"]
        question = user.split("Question: ")[1].split("\n")[0]
        answer = user.split("Correct Answer: ")[1].split("\n")[0]
        pred = user.split("Predicted Answer: ")[1].split("\n")[0]
        if "garbled" in question:
            content = "I think the prediction is mostly right."
        else:
            content = "{'pred': 'yes', 'score': 4}" if answer in pred else "{'pred': 'no', 'score': 1}"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Judge.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def write_run(run, name, rows):
    run.mkdir(parents=True, exist_ok=True)
    (run / f"{name}_pred_merge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_judge_scores_caches_and_resumes(tmp_path, endpoint, monkeypatch, capsys):
    run = tmp_path / "run"
    msvd = [{"question_id": f"q{i}", "question": f"what is shown {i}?", "answer": "dog",
             "pred": "a dog runs" if i % 2 == 0 else "a cat"} for i in range(6)]
    write_run(run, "MSVD-QA", msvd)
    write_run(run, "TGIF-QA", [{"question_id": 0, "question": "garbled one?", "answer": "x", "pred": "x"},
                               {"question_id": 1, "question": "fine?", "answer": "jump", "pred": "jump"}])
    (run / "mcq_naive_pred_merge.jsonl").write_text("{}\n")  # multiple choice: never sent to the judge
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    argv = ["judge", "--run", str(run), "--endpoint", endpoint, "--model", "judge-1", "--api-key-env", "JUDGE_KEY",
            "--max-tries", "2", "--workers", "3"]
    assert main(argv) == 0
    assert "MSVD-QA: accuracy 0.5000 (3/6), mean score 2.500" in capsys.readouterr().out
    result = json.loads((run / "judge.json").read_text())["benchmarks"]
    assert result["TGIF-QA"]["unjudged"] == 1 and result["TGIF-QA"]["accuracy"] == 0.5  # garbled: no, score 0
    assert result["TGIF-QA"]["mean_score"] == 2.0
    assert len(Judge.requests) == 6 + 1 + 2  # the garbled question asked max-tries times
    first = Judge.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "judge-1" and first["body"]["messages"][0]["role"] == "system"
    release = json.loads((run / "MSVD-QA_gpt.json").read_text())  # the release's own result file layout
    assert release["q0"] == [{"pred": "yes", "score": 4}, {"q": "what is shown 0?", "a": "dog", "pred": "a dog runs"}]

    Judge.requests = []
    assert main(argv) == 0  # everything judged is cached: only the garbled question is asked again
    assert len(Judge.requests) == 2 and json.loads((run / "judge.json").read_text())["benchmarks"] == result
    msvd[1]["pred"] = "a dog"  # a new prediction is a new request
    write_run(run, "MSVD-QA", msvd)
    Judge.requests = []
    assert main(argv + ["--benchmark", "MSVD-QA"]) == 0
    assert len(Judge.requests) == 1
    assert json.loads((run / "judge.json").read_text())["benchmarks"]["MSVD-QA"]["yes"] == 4
    assert main(argv[:-4] + ["--benchmark", "nope"]) == 2
    monkeypatch.setenv("JUDGE_KEY", "wrong")
    Judge.requests = []
    (run / "TGIF-QA_pred_merge.jsonl").write_text((run / "TGIF-QA_pred_merge.jsonl").read_text().replace("x", "y"))
    assert main(argv + ["--benchmark", "TGIF-QA"]) == 2  # a refused key stops at the first answer, not per question
    assert "HTTP 401" in capsys.readouterr().err and len(Judge.requests) <= 3
    assert main(["judge", "--run", str(run), "--endpoint", "127.0.0.1:1", "--model", "m"]) == 2  # no scheme: no guess


def test_verdicts_are_read_as_literals_never_run():
    assert parse_verdict("{'pred': 'yes', 'score': 4.8}") == {"pred": "yes", "score": 4.8}
    assert parse_verdict(" {'pred': 'no', 'score': 0} ") == {"pred": "no", "score": 0}
    for reply in ["{'pred': 'maybe', 'score': 3}", "{'pred': 'yes', 'score': '4'}", "yes, 4",
                  "__import__('os').system('echo hi')", "{'pred': 'yes'}", "[1, 2]", None]:
        assert parse_verdict(reply) is None, reply
