"""`moeforge bench decode`: greedy decoding, batch 1, of small models made with transformers and
imported: moeforge eager and compiled against transformers' generate on the same weights."""

from __future__ import annotations

import argparse
import json

from moeforge.cli.arguments import comma_separated, reject_extra


def add_parser(benches: argparse._SubParsersAction) -> None:
    decode_bench = benches.add_parser(
        "decode",
        help="greedy decoding, batch 1, of small DeepSeek-V3-like and Qwen3-MoE-like models made with "
        "transformers and imported: moeforge eager and compiled vs transformers' generate on the same "
        "weights, tokens compared, bandwidth vs this machine's copy bandwidth (needs moeforge[hf])",
    )
    decode_bench.add_argument(
        "--models", default="deepseek-v3,qwen3-moe", help="comma-separated: deepseek-v3, qwen3-moe"
    )
    decode_bench.add_argument("--new-tokens", type=int, default=128, help="tokens generated (default: 128)")
    decode_bench.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default: 16)")
    decode_bench.add_argument("--repeats", type=int, default=5, help="timed runs of each case (default: 5)")
    decode_bench.add_argument(
        "--threads", type=int, default=1, help="torch threads, the same for every case (default: 1)"
    )
    decode_bench.add_argument("--no-compile", action="store_true", help="skip the compiled case")
    decode_bench.add_argument("--json", action="store_true")
    decode_bench.set_defaults(handler=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    reject_extra(rest)
    from moeforge.bench.decode import DecodeBenchSettings, format_table, run_decode_bench

    settings = DecodeBenchSettings(
        models=comma_separated(args.models),
        new_tokens=args.new_tokens,
        prompt_len=args.prompt_len,
        repeats=args.repeats,
        threads=args.threads,
        compile=not args.no_compile,
    )
    result = run_decode_bench(settings)
    print(json.dumps(result) if args.json else format_table(result))
    return 0
