"""`moeforge bench data`: `data prepare` against the tokenizer's encode_batch, the loader against what
a training step consumes, time to the first step and peak RSS on generated corpora."""

from __future__ import annotations

import argparse
import json

from moeforge.cli.arguments import parse_overrides
from moeforge.config import ConfigError


def add_parser(benches: argparse._SubParsersAction) -> None:
    data_bench = benches.add_parser(
        "data",
        help="the data path: `data prepare` vs the tokenizer's encode_batch, the loader vs what a training step "
        "consumes, time to the first step and peak RSS on a small and a large prepared corpus (generated)",
    )
    data_bench.add_argument("--size-mb", type=float, default=4.0, help="corpus of the prepare and loader figures (default: 4)")
    data_bench.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json (default: byte)")
    data_bench.add_argument("--workers", type=int, default=1, help="prepare's worker processes (default: 1)")
    data_bench.add_argument("--chunk-mb", type=float, default=1.0, help="prepare's chunk, the baseline's batch (default: 1)")
    data_bench.add_argument("--repeats", type=int, default=3, help="rounds of every measurement (default: 3)")
    data_bench.add_argument("--loader-batches", type=int, default=200, help="timed next_batch calls a round (default: 200)")
    data_bench.add_argument("--train-steps", type=int, default=3, help="timed training steps a round (default: 3)")
    data_bench.add_argument(
        "--startup-mb", default="2,50", help="SMALL,LARGE corpora of the start-up figures; 'none' skips them (default: 2,50)"
    )
    data_bench.add_argument("--two-processes", action="store_true", help="also the start-up on 2 gloo processes")
    data_bench.add_argument("--work-dir", default="", help="where corpora are written (default: the temporary directory)")
    data_bench.add_argument("--json", action="store_true")
    data_bench.set_defaults(handler=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from moeforge.bench.data import DataBenchSettings, format_table, run_data_bench

    settings = DataBenchSettings(
        size_mb=args.size_mb,
        tokenizer=args.tokenizer,
        workers=args.workers,
        chunk_mb=args.chunk_mb,
        repeats=args.repeats,
        loader_batches=args.loader_batches,
        train_steps=args.train_steps,
        startup_mb=_numbers(args.startup_mb, "--startup-mb"),
        processes=(1, 2) if args.two_processes else (1,),
        overrides=tuple(parse_overrides(rest).items()),
        work_dir=args.work_dir,
    )
    result = run_data_bench(settings)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _numbers(text: str, flag: str) -> tuple[float, ...]:
    """'2,50' -> (2.0, 50.0); 'none' -> ()."""
    if text == "none":
        return ()
    try:
        return tuple(float(item) for item in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag}: got {text!r}; allowed: comma-separated numbers, or 'none'") from None
