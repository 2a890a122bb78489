"""`moeforge bench pp`: each pipeline schedule on pp (x ep) spawned gloo processes, against one
process without a pipeline."""

from __future__ import annotations

import argparse
import json

from moeforge.cli.arguments import comma_separated, reject_extra


def add_parser(benches: argparse._SubParsersAction) -> None:
    pp_bench = benches.add_parser(
        "pp",
        help="each pipeline schedule (1f1b, interleaved-1f1b, zbv, dualpipev) on pp (x ep) spawned gloo processes: "
        "step time, idle fraction per rank from timestamps next to the formula's bubble, saved activations, "
        "and efficiency against one process without pipeline; pp > CPUs measures the OS scheduler too",
    )
    pp_bench.add_argument("--pp", type=int, default=2, help="pipeline ranks (default: 2)")
    pp_bench.add_argument(
        "--ep",
        type=int,
        default=1,
        help="expert-parallel ranks per pipeline rank, pp x ep processes; > 1 adds the exposed expert "
        "all-to-all time per rank, and dualpipev runs with its F&B overlap off and on (default: 1)",
    )
    pp_bench.add_argument(
        "--schedules",
        default="1f1b,interleaved-1f1b,zbv,dualpipev",
        help="comma-separated: 1f1b, interleaved-1f1b, zbv, dualpipev (default: all)",
    )
    pp_bench.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (default: 8)")
    pp_bench.add_argument(
        "--micro-batch-size", type=int, default=2, help="sequences per micro-batch (default: 2)"
    )
    pp_bench.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    pp_bench.add_argument("--dim", type=int, default=256, help="model width (default: 256)")
    pp_bench.add_argument("--layers", type=int, default=8, help="transformer blocks (default: 8)")
    pp_bench.add_argument("--repeats", type=int, default=4, help="timed steps per schedule (default: 4)")
    pp_bench.add_argument(
        "--warmup", type=int, default=1, help="untimed steps before them, after one memory step (default: 1)"
    )
    pp_bench.add_argument("--json", action="store_true")
    pp_bench.set_defaults(handler=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    reject_extra(rest)
    from moeforge.bench.pp import PpBenchSettings, run_pp_bench
    from moeforge.bench.pp_results import format_table

    settings = PpBenchSettings(
        pp=args.pp,
        ep=args.ep,
        schedules=comma_separated(args.schedules),
        microbatches=args.microbatches,
        micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len,
        dim=args.dim,
        layers=args.layers,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    result = run_pp_bench(settings)
    print(json.dumps(result) if args.json else format_table(result))
    return 0
