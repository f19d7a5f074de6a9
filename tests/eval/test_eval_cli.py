"""`merv-fast data synth --eval` and `merv-fast eval` end to end, reading the weights the trainer exports."""

import json

import torch

from merv_fast.cli import main
from merv_fast.config import get_preset
from merv_fast.data.decode import decode_video
from merv_fast.eval.layout import BENCHMARKS
from merv_fast.eval.runner import EvalSettings, run_eval
from merv_fast.pretrained.weights import build_eval_model, eval_tokenizer
from merv_fast.train.checkpoint import export_safetensors, load_safetensors


def test_synth_eval_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert main(["data", "synth", "--eval", str(tmp_path / name), "--eval-videos", "2", "--seed", "3"]) == 0
    benchmarks = ["mcq", "NExT-QA-synth", "openended"] + [f"layouts/{b.name}" for b in BENCHMARKS]
    for benchmark in benchmarks:
        a, b = tmp_path / "a" / benchmark, tmp_path / "b" / benchmark
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        for f in files:  # the same JSON, the same pixels (a container may stamp its own metadata)
            if f.suffix in (".json", ".jpg", ".gif"):
                assert (a / f).read_bytes() == (b / f).read_bytes()
            else:
                assert torch.equal(decode_video(a / f, [0, 5]), decode_video(b / f, [0, 5]))
    questions = json.loads((tmp_path / "a" / "mcq" / "test_q.json").read_text())
    assert {len(q["options"]) for q in questions} <= {3, 4, 5} and any("time" in q for q in questions)


def test_eval_cli_reads_exported_weights(tmp_path, capsys):
    sets = tmp_path / "sets"
    assert main(["data", "synth", "--eval", str(sets), "--eval-videos", "2"]) == 0
    cfg = get_preset("tiny")
    torch.manual_seed(0)  # the trainer's seed (--seed 0): random-init encoders, which no weights file holds
    trained, _ = build_eval_model(cfg, None, torch.device("cpu"), torch.float32)
    with torch.no_grad():  # "training": the exported weights differ from a fresh build's
        for name, p in trained.named_parameters():
            if not name.startswith("encoders."):
                p.add_(torch.randn_like(p) * 0.05)
    weights = export_safetensors(trained, tmp_path / "weights" / "model.safetensors")
    out = tmp_path / "out"
    argv = ["eval", "--task", "open", "--data", str(sets / "openended"), "--weights", str(weights.parent),
            "--out", str(out), "--batch-size", "3", "--max-new-tokens", "4"]
    assert main(argv) == 0
    assert "questions answered" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "openended_pred_merge.jsonl").read_text().splitlines()]
    assert metrics["answered"] == len(rows) == metrics["questions"] and all("pred" in r and "answer" in r for r in rows)
    # the same answers as the exported model evaluated in-process
    torch.manual_seed(0)
    fresh, _ = build_eval_model(cfg, None, torch.device("cpu"), torch.float32)
    answers = {}
    for name in ("untrained", "loaded"):
        if name == "loaded":
            load_safetensors(fresh, weights)
        run_eval(EvalSettings("open", [str(sets / "openended")], str(tmp_path / name), batch_size=3,
                              max_new_tokens=4, show_progress=False), fresh, eval_tokenizer(cfg))
        lines = (tmp_path / name / "openended_pred_merge.jsonl").read_text().splitlines()
        answers[name] = [json.loads(line)["pred"] for line in lines]
    assert [r["pred"] for r in rows] == answers["loaded"] != answers["untrained"]
    assert main(["eval", "--task", "mc", "--data", str(sets / "nope"), "--out", str(out)]) == 2


def test_weights_from_a_training_run_directory(tmp_path):
    from types import SimpleNamespace

    from merv_fast.pretrained.weights import load_weights
    from merv_fast.train.checkpoint import Checkpointer
    from merv_fast.train.parallel import TrainModule

    cfg = get_preset("tiny")
    trained, _ = build_eval_model(cfg, None, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for p in trained.llm.parameters():
            p.add_(0.01)
    module = TrainModule(trained)
    state = SimpleNamespace(model=module, optimizer=torch.optim.AdamW(module.parameters()), step=4,
                            scheduler=None, sampler=None)
    Checkpointer(tmp_path / "run").save(state)
    fresh, _ = build_eval_model(cfg, None, torch.device("cpu"), torch.float32)
    assert load_weights(fresh, tmp_path / "run").path == tmp_path / "run" / "step-00000004"
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        if not name.startswith("encoders."):
            assert torch.equal(a, b), name
