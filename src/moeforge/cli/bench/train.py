"""`moeforge bench train`: training steps of a preset eager, compiled and with activation
checkpointing, each in a fresh process; `--peers` against transformers on the same weights."""

from __future__ import annotations

import argparse
import json

from moeforge.cli.arguments import comma_separated, parse_overrides
from moeforge.config import available_presets


def add_parser(benches: argparse._SubParsersAction) -> None:
    train_bench = benches.add_parser(
        "train",
        help="training steps of a preset (with --model.* / --train.* overrides) eager, compiled and with "
        "activation checkpointing, each in a fresh process: tokens/s, peak memory (RSS on CPU, max allocated "
        "on CUDA) and MFU (CPU: against a GEMM measured in the same run); --peers: vs transformers",
    )
    train_bench.add_argument("--preset", help=f"{', '.join(available_presets())} (default: tiny)")
    train_bench.add_argument(
        "--variants",
        default="eager,compile,ac-experts,ac-block",
        help="comma-separated: eager, compile, ac-experts, ac-block, compile+ac-block, bf16, compile+bf16 "
        "(default: the first four)",
    )
    train_bench.add_argument("--steps", type=int, default=4, help="timed steps per run (default: 4)")
    train_bench.add_argument(
        "--warmup", type=int, default=2, help="untimed steps before them, compilation included (default: 2)"
    )
    train_bench.add_argument(
        "--repeats", type=int, default=2, help="interleaved rounds of fresh processes (default: 2)"
    )
    train_bench.add_argument(
        "--peers",
        action="store_true",
        help="also a 4-layer DeepSeek-V3-like and Qwen3-MoE-like model built with transformers (batch 8 x 256): "
        "moeforge (eager, compiled) vs transformers' eager training step on the same weights",
    )
    train_bench.add_argument("--json", action="store_true")
    train_bench.set_defaults(handler=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from moeforge.bench.train import TrainBenchSettings, format_table, run_train_bench

    settings = TrainBenchSettings(
        preset=args.preset,
        overrides=tuple(parse_overrides(rest).items()),
        variants=comma_separated(args.variants),
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        peers=args.peers,
    )
    result = run_train_bench(settings)
    print(json.dumps(result) if args.json else format_table(result))
    return 0
