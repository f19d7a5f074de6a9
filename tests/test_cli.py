"""The `merv-fast` subcommands, through their real entry function."""

import json

from merv_fast.cli import main


def test_info_full_preset_on_meta(capsys):
    assert main(["info", "--preset", "merv-7b", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["visual_tokens"] == 1024
    enc = s["modules"]["encoder.languagebind"]
    assert enc["trainable"] == 0 and enc["frozen"] > 250e6 and enc["layers_run"] == 23
    assert 3.2e12 < enc["flops_per_sample"] < 3.4e12  # the spec's ~3.3 TFLOP per video
    assert 6.5e9 < s["modules"]["llm"]["trainable"] < 7.0e9


def test_info_counts_as_a_recipe_trains_and_names_the_llm(capsys):
    assert main(["info", "--preset", "merv-7b", "--set", "llm=qwen2.5-7b-instruct", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["llm"] == {"backbone": "qwen2.5-7b-instruct", "prompt_format": "qwen25-chat", "has_bos": False}
    assert main(["info", "--preset", "merv-7b", "--set", "llm=qwen2.5-7b-instruct", "--recipe", "align",
                 "--json"]) == 0
    align = json.loads(capsys.readouterr().out)
    assert (align["recipe"], align["stage"]) == ("align", "align")
    llm, llm_full = align["modules"]["llm"], full["modules"]["llm"]
    assert llm["trainable"] == 0 and llm["frozen"] == llm_full["trainable"] > 7.6e9  # frozen in align
    assert align["modules"]["visual (poolers, projectors, fusion)"]["trainable"] > 0
    assert llm["flops_per_sample"] < llm_full["flops_per_sample"]  # no weight gradients
    assert main(["info", "--preset", "tiny", "--recipe", "pretrain"]) == 2
    assert "unknown recipe 'pretrain'" in capsys.readouterr().err


def test_bad_preset_is_a_clear_error(capsys):
    assert main(["info", "--preset", "merv-70b"]) == 2
    assert "merv-70b" in capsys.readouterr().err


def test_bench_writes_the_trainer_schema(tmp_path, capsys):
    assert main(["bench", "--steps", "1", "--warmup", "0", "--text-tokens", "16", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    for side in ("merv", "baseline"):
        r = report[side]
        assert {"samples_per_s", "tokens_per_s", "step_time_s", "mfu", "peak_mem_bytes", "phases"} <= set(r)
        assert r["step_time_s"] > 0 and set(r["phases"]) >= {"encoders", "visual", "backward", "optimizer"}
    assert report["merv"]["preset"] == "tiny" and report["baseline"]["preset"] == "single-tiny"
    assert report["ratio_step_time"] == report["merv"]["step_time_s"] / report["baseline"]["step_time_s"]
    assert {"device", "versions", "config"} <= set(report)
    assert "step-time ratio" in capsys.readouterr().out


def test_gpu_suite_options_pass_through(tmp_path, capsys):
    assert main(["gpu-suite", "--allow-cpu", "--only", "env", "--out", str(tmp_path)]) == 0
    assert list(tmp_path.glob("*_gpu-suite.json"))


def test_bench_step_with_activation_checkpointing_matches_without():
    """The GPU default (checkpointed LLM layers) computes the same losses as the CPU default."""
    from merv_fast.config import get_preset
    from merv_fast.data.synthetic import synthetic_batches
    from merv_fast.train.bench import BenchSettings, train_steps

    settings = BenchSettings(steps=2, warmup=0, text_tokens=16).resolve()
    batches = synthetic_batches(get_preset("tiny"), settings.batch_size, 16, count=2, seed=5)
    plain = train_steps("tiny", settings, batches)
    settings.activation_checkpointing = True
    checkpointed = train_steps("tiny", settings, batches)
    assert plain["losses"] == checkpointed["losses"]
