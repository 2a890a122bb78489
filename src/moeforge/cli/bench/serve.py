"""`moeforge bench serve`: N concurrent streaming clients against `moeforge serve` (plain and with MTP
speculation) and `transformers serve --continuous-batching` on the same exported weights."""

from __future__ import annotations

import argparse
import json

from moeforge.cli.arguments import comma_separated, reject_extra


def add_parser(benches: argparse._SubParsersAction) -> None:
    serve_bench = benches.add_parser(
        "serve",
        help="output tokens/s, time to first token and inter-token latency of moeforge serve (plain, "
        "--speculative) vs transformers serve --continuous-batching on the same weights, N streaming "
        "clients over loopback (needs moeforge[serve,bench])",
    )
    serve_bench.add_argument(
        "--checkpoint",
        help="a run directory (newest checkpoint) or one checkpoint (default: a fresh --preset model)",
    )
    serve_bench.add_argument(
        "--preset", help="the fresh model's preset (default: deepseek-v3-tiny, which has MTP)"
    )
    serve_bench.add_argument(
        "--clients", type=int, default=16, help="concurrent streaming clients (default: 16)"
    )
    serve_bench.add_argument(
        "--requests", type=int, default=None, help="requests per server and repeat (default: 8 per client)"
    )
    serve_bench.add_argument(
        "--prompt-tokens", type=int, default=64, help="tokens in every prompt (default: 64)"
    )
    serve_bench.add_argument(
        "--output-tokens",
        type=int,
        default=64,
        help="tokens every request generates, end token ignored (default: 64)",
    )
    serve_bench.add_argument("--repeats", type=int, default=3, help="timed runs of each server (default: 3)")
    serve_bench.add_argument(
        "--threads", type=int, default=1, help="torch threads of every server, the same for each (default: 1)"
    )
    serve_bench.add_argument(
        "--seed", type=int, default=0, help="seeds the prompts and a fresh model (default: 0)"
    )
    serve_bench.add_argument(
        "--cases",
        default="moeforge,speculative,transformers",
        help="comma-separated servers: moeforge, speculative (moeforge --speculative), transformers",
    )
    serve_bench.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="the longest one server's timed requests may take; unfinished ones are counted (default: 600)",
    )
    serve_bench.add_argument(
        "--compile",
        action="store_true",
        help="moeforge's servers run serve --compile (compiled while starting)",
    )
    serve_bench.add_argument(
        "--engine-process",
        action="store_true",
        help="moeforge's servers run serve --engine-process (the engine in a process of its own)",
    )
    serve_bench.add_argument("--json", action="store_true")
    serve_bench.set_defaults(handler=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    reject_extra(rest)
    from moeforge.bench.serve import ServeBenchSettings, format_table, run_serve_bench

    settings = ServeBenchSettings(
        checkpoint=args.checkpoint,
        preset=args.preset,
        clients=args.clients,
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        repeats=args.repeats,
        threads=args.threads,
        seed=args.seed,
        cases=comma_separated(args.cases),
        max_seconds=args.max_seconds,
        compile=args.compile,
        engine_process=args.engine_process,
    )
    result = run_serve_bench(settings)
    print(json.dumps(result) if args.json else format_table(result))
    return 0
