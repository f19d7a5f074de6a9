"""`merv-fast`: thin subcommands that parse arguments and call the package."""

from __future__ import annotations

import argparse
import json
import sys


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="a release model id (merv-base, merv-full, languagebind-single, "
                   "dinov2-single, vivit-single, siglip-single), each also -1b and -tiny; or tiny, single-tiny, "
                   "merv-1b, single-1b, merv-7b, single-7b")
    p.add_argument("--config", default=None, help="YAML file of overrides (may name its own `preset`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set llm.num_layers=4 --set encoders.dinov2.weights=/w")


def cmd_env(args) -> int:
    from merv_fast.env import environment_report, format_report

    report = environment_report()
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


def cmd_info(args) -> int:
    from merv_fast.config import load_config, parse_cli_overrides
    from merv_fast.model.merv import build_model
    from merv_fast.model.summary import format_summary, model_summary

    from merv_fast.train.stages import apply_recipe

    cfg = load_config(args.preset or "merv-7b", args.config, parse_cli_overrides(args.overrides))
    model = build_model(config=cfg, device="meta")
    stage = apply_recipe(model, args.recipe) if args.recipe else None  # e.g. align: the LLM frozen
    summary = model_summary(model, text_tokens=args.text_tokens, recipe=args.recipe, stage=stage)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_plan(args) -> int:
    if args.scaling_table:
        from merv_fast.plan.scaling import scaling_command

        return scaling_command(args.write, check=args.check)
    from merv_fast.plan.planner import PlanRequest, format_plan, run_request

    report = run_request(PlanRequest(
        preset=args.preset or "merv-7b", config=args.config, overrides=args.overrides, recipe=args.recipe,
        gpu=args.gpu, gpus_per_node=args.gpus_per_node, nodes=args.nodes, interconnect=args.interconnect,
        cpu_cores_per_node=args.cpu_cores_per_node, micro_batch=args.micro_batch, text_tokens=args.text_tokens,
        max_text_tokens=args.max_text_tokens, results=args.results))
    print(json.dumps(report, indent=2) if args.json else format_plan(report))
    return 0


def cmd_bench(args) -> int:
    from merv_fast.config import parse_cli_overrides
    from merv_fast.train.bench import BenchSettings, run_bench

    run_bench(BenchSettings(preset=args.preset, baseline=args.baseline, batch_size=args.batch_size,
                            text_tokens=args.text_tokens, steps=args.steps, warmup=args.warmup, seed=args.seed,
                            out=args.out, device=args.device, overrides=parse_cli_overrides(args.overrides)))
    return 0


def cmd_profile(args) -> int:
    from merv_fast.config import parse_cli_overrides
    from merv_fast.measure.profile import ProfileSettings, run_profile

    run_profile(ProfileSettings(preset=args.preset, baseline=args.baseline, steps=args.steps, warmup=args.warmup,
                                batch_size=args.batch_size, text_tokens=args.text_tokens, seed=args.seed,
                                device=args.device, out=args.out, overrides=parse_cli_overrides(args.overrides)))
    return 0


def cmd_results_table(args) -> int:
    from merv_fast.measure.report import readme_table, update_readme

    table = readme_table(args.results_dir)
    if args.check and args.write is None:
        args.write = "README.md"  # --check alone checks the README in the working directory
    if args.write is None:
        print(table, end="")
        return 0
    changed = update_readme(args.write, table, check=args.check)
    if args.check:
        if changed:
            print(f"{args.write}: the performance table is stale; "
                  f"run `merv-fast results-table --write {args.write}`", file=sys.stderr)
            return 1
        print(f"{args.write}: the performance table is up to date")
        return 0
    print(f"{args.write}: performance table {'rewritten' if changed else 'already up to date'}")
    return 0


def cmd_data_check(args) -> int:
    from merv_fast.data.check import run_check

    return run_check(args.json_path, args.media_root, as_json=args.json, timeout_s=args.timeout_s,
                     decoder=args.decoder)


def cmd_data_synth(args) -> int:
    from merv_fast.data.synth import synthesize

    if args.eval is not None:
        from merv_fast.eval.synth import synthesize_eval, synthesize_layouts

        written = {**synthesize_eval(args.eval, videos=args.eval_videos, seed=args.seed),
                   **synthesize_layouts(args.eval, seed=args.seed)}
        for directory, count in written.items():
            print(f"wrote {count} questions and their videos to {directory} (test_q.json, test_a.json, videos/)")
    if args.out is None:
        if args.eval is None:
            raise ValueError("give --out DIR (training data) and/or --eval DIR (evaluation sets)")
        return 0
    result = synthesize(args.out, videos=args.videos, images=args.images, texts=args.texts, seed=args.seed)
    print(f"wrote {len(result['videos'])} videos, {len(result['images'])} images and {result['entries']} entries "
          f"to {result['json']} (media root {result['media_root']})")
    return 0


def cmd_eval(args) -> int:
    from merv_fast.config import parse_cli_overrides
    from merv_fast.eval.runner import EvalSettings, run_eval

    metrics = run_eval(EvalSettings(
        task=args.task, data=args.data, out=args.out, weights=args.weights, weights_roots=args.weights_root,
        hub_cache=args.hf_cache, preset=args.preset, config=args.config,
        overrides=parse_cli_overrides(args.overrides), batch_size=args.batch_size, generate=args.generate,
        max_new_tokens=args.max_new_tokens, seed=args.seed, device=args.device, dtype=args.dtype,
        decoder=args.decoder, timeout_s=args.timeout_s))
    if metrics is not None:
        overall = metrics.get("overall")
        score = f"accuracy {overall['accuracy']:.4f} ({overall['correct']}/{overall['total']}); " if overall else ""
        print(f"{metrics['answered']} of {metrics['questions']} questions answered; {score}"
              f"broken videos {metrics['broken']['videos']}; metrics in {args.out}/metrics.json")
    return 0


def _weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights-root", action="append", default=[], metavar="DIR",
                   help="where a release model's pretrained parts are (DIR/<release id>, DIR/<org>/<name>, "
                        "DIR/<name>, or DIR as a Hugging Face hub cache); repeatable")
    p.add_argument("--hf-cache", default=None, metavar="DIR",
                   help="a local Hugging Face hub cache (default $HF_HUB_CACHE or ~/.cache/huggingface/hub); "
                        "nothing is downloaded")


def cmd_ask(args) -> int:
    from merv_fast.config import parse_cli_overrides
    from merv_fast.eval.ask import run_ask
    from merv_fast.eval.videolm import VideoLM

    videolm = VideoLM.from_pretrained(args.weights, overrides=parse_cli_overrides(args.overrides),
                                      weights_roots=args.weights_root, hub_cache=args.hf_cache, device=args.device,
                                      dtype=args.dtype, decoder=args.decoder, seed=args.seed)
    run_ask(videolm, args.video, args.questions, args.start, args.end, args.end_frame,
            max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
            top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
    return 0


def cmd_judge(args) -> int:
    from merv_fast.eval.judge import JudgeSettings, run_judge

    result = run_judge(JudgeSettings(run=args.run, endpoint=args.endpoint, model=args.model,
                                     benchmarks=args.benchmark, api_key_env=args.api_key_env, workers=args.workers,
                                     max_tries=args.max_tries, timeout_s=args.timeout_s))
    for name, r in result["benchmarks"].items():
        unjudged = f", {r['unjudged']} unjudged (counted no, 0; a rerun asks again)" if r["unjudged"] else ""
        print(f"{name}: accuracy {r['accuracy']:.4f} ({r['yes']}/{r['judged']}), mean score "
              f"{r['mean_score']:.3f}{unjudged}")
    print(f"verdicts in {args.run}/judge.json and {args.run}/<benchmark>_gpt.json")
    return 0


def cmd_train(args) -> int:
    from merv_fast.train.signals import install_signal_handlers

    signals = install_signal_handlers()  # first: a SIGTERM during the slow imports below also stops cleanly
    try:
        return _train(args, signals)
    finally:
        signals.restore()


def _train(args, signals) -> int:
    from merv_fast.config import load_config, parse_cli_overrides
    from merv_fast.train.checkpoint import CheckpointError
    from merv_fast.train.config import make_train_config, split_overrides
    from merv_fast.train.loop import train
    from merv_fast.train.step import NonFiniteLossError

    train_over, model_over = split_overrides(parse_cli_overrides(args.overrides))
    model_cfg = load_config(args.preset or "tiny", args.model_config, model_over)
    cfg = make_train_config(args.recipe, args.config, train_over, preset=model_cfg.name, data=args.data,
                            media_root=args.media_root, out=args.out, seed=args.seed, max_steps=args.max_steps,
                            total_steps=args.total_steps, resume=True if args.resume else None,
                            init_from=args.init_from, device=args.device, save_every=args.save_every,
                            overwrite=True if args.overwrite else None)
    try:
        summary = train(cfg, model_cfg, signals=signals)
    except (CheckpointError, NonFiniteLossError) as err:  # a failed save (full disk, ...), a NaN step: one line
        print(f"merv-fast train: error: {err}", file=sys.stderr)
        return 1
    if summary.get("rank", 0) != 0:  # under torchrun: rank 0 speaks for the run
        return 0
    if summary.get("finished_before"):
        print(f"{cfg.out} is finished (step {summary['steps']} of {summary['total_steps']}): nothing to do")
        return 0
    if summary.get("final_loss") is not None:
        print(f"trained {summary['steps']} steps (of {summary['total_steps']}); "
              f"final loss {summary['final_loss']:.4f}; bad samples {summary['bad_samples']['failures']}; "
              f"metrics in {cfg.out}/metrics.jsonl")
    return 0


def cmd_cache_features(args) -> int:
    from merv_fast.config import load_config, parse_cli_overrides
    from merv_fast.runtime.feature_cache import cache_dataset

    model_cfg = load_config(args.preset or "tiny", args.config, parse_cli_overrides(args.overrides))
    index = cache_dataset(args.data, args.media_root, args.out, model_cfg, seed=args.seed, device=args.device,
                          storage_dtype=args.dtype, shard_size=args.shard_size, batch_size=args.batch_size,
                          decoder=args.decoder)
    failed = index["failed"]
    for key, reason in list(failed.items())[:5]:
        print(f"  failed: {key}: {reason}", file=sys.stderr)
    if len(failed) > 5:
        print(f"  ... and {len(failed) - 5} more (all in {args.out}/index.json, key `failed`)", file=sys.stderr)
    if not index["entries"]:
        print(f"cache-features: nothing was cached: all {len(failed)} media items failed to load "
              f"(is --media-root right?)", file=sys.stderr)
        return 1
    print(f"cached {len(index['entries'])} media items in {len(index['shards'])} shard(s) under {args.out} "
          f"({len(failed)} failed to load); train from it with --set feature_cache={args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="merv-fast", description="Fast, exact MERV training.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="versions, devices and which optional backends are usable, and why")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_env)

    p = sub.add_parser("info", help="parameters, visual tokens and FLOPs per module of a preset (built on meta)")
    _model_args(p)
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--recipe", default=None, help="count trainable parameters and FLOPs as this recipe trains")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("plan", help="memory per GPU and time per step of a preset on a cluster, itemised, and the "
                                    "settings to run (built on meta); --set takes training and model keys")
    _model_args(p)
    p.add_argument("--recipe", default="merv-frozen", help="the training recipe (global batch, ...)")
    p.add_argument("--gpu", default="h100", help="h100 | h200 | a100 | l40s | cpu (rates from a results file)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default 8 (1 for --gpu cpu)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--interconnect", default="ib-400", help="between nodes: nvlink | ib-400 | ib-200 | eth-100")
    p.add_argument("--cpu-cores-per-node", type=int, default=None, help="default: the GPU's reference server")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the trainer's choice")
    p.add_argument("--text-tokens", type=float, default=128, help="mean text tokens per sample (time)")
    p.add_argument("--max-text-tokens", type=int, default=None,
                   help="the longest sample, planned for in memory (default: llm.max_text_tokens)")
    p.add_argument("--results", action="append", default=[], metavar="FILE",
                   help="results file(s) whose measured ceilings replace the device table's figures "
                        "(default: bench/results files of the same GPU)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--scaling-table", action="store_true",
                   help="the README's table of merv-7b on 8, 64 and 512 H100s (with --write README.md [--check])")
    p.add_argument("--write", default=None, metavar="README.md")
    p.add_argument("--check", action="store_true")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("bench", help="training steps of MERV and its single-encoder baseline, side by side")
    p.add_argument("--preset", default=None, help="default: tiny on CPU, merv-1b on a GPU")
    p.add_argument("--baseline", default=None, help="default: the preset's single-encoder twin")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("profile", help="torch.profiler over training steps of MERV and its baseline: "
                                       "trace, per-phase table, PNG plots")
    p.add_argument("--preset", default=None, help="default: tiny on CPU, merv-1b on a GPU")
    p.add_argument("--baseline", default=None, help="default: the preset's single-encoder twin")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--warmup", type=int, default=2, help="unprofiled warm-up steps first")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/profile")
    p.set_defaults(fn=cmd_profile)

    p = sub.add_parser("results-table", help="the README's performance table, generated from bench/results/")
    p.add_argument("--results-dir", default="bench/results")
    p.add_argument("--write", default=None, metavar="README.md",
                   help="rewrite the table between its markers in this file (default: print it)")
    p.add_argument("--check", action="store_true", help="change nothing, exit 1 if the table in the --write file (default README.md) is stale")
    p.set_defaults(fn=cmd_results_table)

    p = sub.add_parser("train", help="train MERV (one process, or under torchrun: FSDP2 over the ranks)")
    p.add_argument("--recipe", default="merv-frozen", help="merv-frozen | merv-full-stage1 | merv-full-stage2 | "
                                                            "align | full-align | finetune | second_finetune")
    p.add_argument("--preset", default=None, help="model preset (default tiny)")
    p.add_argument("--config", default=None, help="YAML of training settings (may name its own `recipe`)")
    p.add_argument("--model-config", default=None, help="YAML of model-config overrides (may name its own `preset`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a training setting (lr=1e-4, loss_norm=release, ...) or a model-config key (llm.num_layers=4)")
    p.add_argument("--data", default=None, help="LLaVA-format JSON (default: synthetic data, generated once)")
    p.add_argument("--media-root", default=None, help="directory the JSON's media paths are relative to")
    p.add_argument("--out", default=None, help="run directory (metrics.jsonl, checkpoints; default runs/train)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (the schedule is unchanged)")
    p.add_argument("--save-every", type=int, default=None, help="also checkpoint every N steps (always at the end)")
    p.add_argument("--total-steps", type=int, default=None, help="the schedule's length (default: from epochs)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="--out holds a run: move it aside, start anew")
    p.add_argument("--init-from", default=None, help="initial weights: a release checkpoint or our exported weights")
    p.add_argument("--device", default=None)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("cache-features", help="run the encoders and pooling once over a dataset's media; store the "
                                              "pooled features for training (--set feature_cache=DIR)")
    _model_args(p)
    p.add_argument("--data", required=True, help="LLaVA-format JSON")
    p.add_argument("--media-root", default=None, help="directory the JSON's media paths are relative to")
    p.add_argument("--out", required=True, help="cache directory (shards + index.json)")
    p.add_argument("--dtype", default="bfloat16", help="storage dtype: bfloat16 | float32")
    p.add_argument("--shard-size", type=int, default=64, help="media items per shard")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--decoder", default="auto", help="auto | torchcodec | pyav")
    p.add_argument("--seed", type=int, default=0, help="the training seed (random-init encoders depend on it)")
    p.add_argument("--device", default=None)
    p.set_defaults(fn=cmd_cache_features)

    data = sub.add_parser("data", help="datasets: synthesise one, check one").add_subparsers(dest="data_command",
                                                                                          required=True)
    p = data.add_parser("synth", help="write real encoded clips, images and a LLaVA-format JSON (deterministic)")
    p.add_argument("--out", default=None, help="directory to write (media root; data.json inside)")
    p.add_argument("--eval", default=None, metavar="DIR",
                   help="also/instead write evaluation sets in the release's layout (mcq, NExT-QA-synth, openended)")
    p.add_argument("--eval-videos", type=int, default=6, help="videos per evaluation set")
    p.add_argument("--videos", type=int, default=11)
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--texts", type=int, default=2, help="text-only entries")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_data_synth)

    # `data check` (merv_fast/data/check.py), in the `data` group above
    q = data.add_parser("check", help="scan a LLaVA-format dataset; list every bad entry (exit 1 if any)")
    q.add_argument("json_path", metavar="DATA.json")
    q.add_argument("--media-root", required=True, help="directory the entries' image/video paths are relative to")
    q.add_argument("--json", action="store_true", help="print the bad entries as a JSON list")
    q.add_argument("--timeout-s", type=float, default=None, help="per-file decode time limit")
    q.add_argument("--decoder", default="auto", help="auto | dali | torchcodec | pyav")
    q.set_defaults(fn=cmd_data_check)

    p = sub.add_parser("eval", help="evaluate on benchmarks in the release's layout: multiple choice from the "
                                    "option letters' logits (or --generate), open-ended by batched generation")
    _model_args(p)
    p.add_argument("--task", required=True, choices=["mc", "open"])
    p.add_argument("--data", required=True, nargs="+", metavar="DIR",
                   help="benchmark directories (test_q.json, test_a.json, videos/); the name is the benchmark's")
    p.add_argument("--weights", default=None,
                   help="trained weights: a training run directory (newest checkpoint) or step directory, our "
                        ".safetensors export, a release run directory (config.json + checkpoints/) or checkpoint, "
                        "or a directory with one such file; its own model unless --preset/--config is given")
    _weights_args(p)
    p.add_argument("--out", required=True, help="run directory (predictions, metrics.json); a rerun resumes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--generate", action="store_true",
                   help="mc: the release's decision (greedy generation, first character of the answer)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--decoder", default="auto", help="auto | torchcodec | pyav")
    p.add_argument("--timeout-s", type=float, default=None, help="per-video decode time limit")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("ask", help="ask a trained MERV about videos; the answer streams to the terminal")
    p.add_argument("questions", nargs="+", metavar="QUESTION")
    p.add_argument("--weights", required=True, help="trained weights (as `eval --weights`): the model they describe")
    p.add_argument("--video", action="append", required=True, metavar="PATH",
                   help="a video file, GIF or JPEG frame folder; repeat for several (each question goes to each "
                        "video when one side has one entry, else they pair up in order)")
    p.add_argument("--start", type=float, default=None, help="window start, seconds")
    p.add_argument("--end", type=float, default=None, help="window end, seconds")
    p.add_argument("--end-frame", type=int, default=None, help="look at frames 0..N instead (Perception Test)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="sampling draws, and LanguageBind's per-video flip")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _weights_args(p)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--decoder", default="auto", help="auto | torchcodec | pyav")
    p.set_defaults(fn=cmd_ask)

    p = sub.add_parser("judge", help="send `eval --task open` predictions to an OpenAI-compatible LLM judge; "
                                     "cached, resumable; the release's yes/no accuracy and mean score")
    p.add_argument("--run", required=True, help="the `merv-fast eval --task open` output directory")
    p.add_argument("--endpoint", required=True, help="the judge's base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="the judge model's name at that endpoint")
    p.add_argument("--benchmark", action="append", default=[], help="only these (default: every prediction file)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the endpoint's key, if it needs one")
    p.add_argument("--workers", type=int, default=8, help="requests in flight")
    p.add_argument("--max-tries", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.set_defaults(fn=cmd_judge)

    sub.add_parser("gpu-suite", help="every GPU check and benchmark, area by area, resumable "
                                     "(options: merv-fast gpu-suite --help)")
    sub.add_parser("kernels", help="every Triton kernel compiled ahead of time for sm_90/sm_80, no GPU needed: "
                                   "registers, spills, tensor cores, TMA (options: merv-fast kernels --help)")

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu-suite"]:  # the suite parses its own options
        from merv_fast.measure.suite import main as suite_main

        return suite_main(argv[1:])
    if argv[:1] == ["kernels"]:  # so does the kernels check
        from merv_fast.measure.kernel_check import main as kernels_main

        return kernels_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"merv-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
