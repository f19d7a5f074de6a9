"""`merv-fast`: thin subcommands that parse arguments and call the package."""

from __future__ import annotations

import argparse
import json
import sys


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="tiny | single-tiny | merv-1b | single-1b | merv-7b | single-7b")
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

    cfg = load_config(args.preset or "merv-7b", args.config, parse_cli_overrides(args.overrides))
    summary = model_summary(build_model(config=cfg, device="meta"), text_tokens=args.text_tokens)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_bench(args) -> int:
    from merv_fast.config import parse_cli_overrides
    from merv_fast.train.bench import BenchSettings, run_bench

    run_bench(BenchSettings(preset=args.preset, baseline=args.baseline, batch_size=args.batch_size,
                            text_tokens=args.text_tokens, steps=args.steps, warmup=args.warmup, seed=args.seed,
                            out=args.out, device=args.device, overrides=parse_cli_overrides(args.overrides)))
    return 0


def cmd_data_check(args) -> int:
    from merv_fast.data.check import run_check

    return run_check(args.json_path, args.media_root, as_json=args.json, timeout_s=args.timeout_s,
                     decoder=args.decoder)


def cmd_data_synth(args) -> int:
    from merv_fast.data.synth import synthesize

    result = synthesize(args.out, videos=args.videos, images=args.images, texts=args.texts, seed=args.seed)
    print(f"wrote {len(result['videos'])} videos, {len(result['images'])} images and {result['entries']} entries "
          f"to {result['json']} (media root {result['media_root']})")
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
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)

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

    data = sub.add_parser("data", help="datasets: synthesise one, check one").add_subparsers(dest="data_command",
                                                                                          required=True)
    p = data.add_parser("synth", help="write real encoded clips, images and a LLaVA-format JSON (deterministic)")
    p.add_argument("--out", required=True, help="directory to write (media root; data.json inside)")
    p.add_argument("--videos", type=int, default=10)
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

    sub.add_parser("gpu-suite", help="every GPU check and benchmark, area by area, resumable "
                                     "(options: merv-fast gpu-suite --help)")

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu-suite"]:  # the suite parses its own options
        from merv_fast.measure.suite import main as suite_main

        return suite_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"merv-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
