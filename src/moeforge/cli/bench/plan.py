"""`moeforge bench plan`: the planner's step time against real training steps under several layouts,
on a cluster measured on this CPU; `--clusters-out` keeps the measured clusters as TOML."""

from __future__ import annotations

import argparse
import json

from moeforge.cli.arguments import comma_separated, output_dir, reject_extra


def add_parser(benches: argparse._SubParsersAction) -> None:
    plan_bench = benches.add_parser(
        "plan",
        help="the planner's step time vs real training steps of the tiny presets under several layouts, on "
        "a cluster measured on this CPU (GEMM FLOP/s, copy bandwidth, gloo bandwidth and latency)",
    )
    plan_bench.add_argument(
        "--presets", default="tiny,deepseek-v3-tiny", help="comma-separated model presets"
    )
    plan_bench.add_argument(
        "--layouts",
        default="single,fsdp2,ep2,fsdp4-ep2,hsdp2x2",
        help="comma-separated: single (1 process), fsdp2, ep2 (2 processes), fsdp4-ep2, hsdp2x2 (4 processes)",
    )
    plan_bench.add_argument("--steps", type=int, default=4, help="timed training steps per layout")
    plan_bench.add_argument("--warmup", type=int, default=2, help="untimed training steps before them")
    plan_bench.add_argument(
        "--clusters-out", metavar="DIR", help="also write each measured cluster as DIR/cpu-P.toml"
    )
    plan_bench.add_argument("--json", action="store_true")
    plan_bench.set_defaults(handler=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    reject_extra(rest)
    from moeforge.bench.machine_cluster import cluster_toml
    from moeforge.bench.plan import PlanBenchSettings, format_table, run_plan_bench
    from moeforge.plan import Cluster

    settings = PlanBenchSettings(
        presets=comma_separated(args.presets),
        layouts=comma_separated(args.layouts),
        steps=args.steps,
        warmup=args.warmup,
    )
    out = output_dir(args.clusters_out, "--clusters-out") if args.clusters_out else None
    result = run_plan_bench(settings)
    if out is not None:
        for name, fields in result["clusters"].items():
            (out / f"{name}.toml").write_text(cluster_toml(Cluster(**fields)))
    print(json.dumps(result) if args.json else format_table(result))
    return 0
