"""`moeforge bench diloco`: data parallelism vs DiLoCo vs Streaming DiLoCo (fp32 and quantised),
training the same model on the same tokens on 2 processes; `--section.field VALUE` applies to all."""

from __future__ import annotations

import argparse
import json
import sys

from moeforge.cli.arguments import comma_separated, output_dir, parse_overrides
from moeforge.config import available_presets


def add_parser(benches: argparse._SubParsersAction) -> None:
    diloco = benches.add_parser(
        "diloco",
        help="data parallelism vs DiLoCo vs Streaming DiLoCo (fp32, FP4): validation loss, bytes exchanged and "
        "the bandwidth each needs, training the same model on the same tokens on 2 spawned gloo processes "
        "(or a torchrun launch of 2); --section.field VALUE options apply to every method",
    )
    diloco.add_argument("--preset", default="tiny", help=f"{', '.join(available_presets())} (default: tiny)")
    diloco.add_argument("--steps", type=int, default=300, help="steps of every method (default: 300)")
    diloco.add_argument("--sync-every", type=int, default=20, help="H of (Streaming) DiLoCo (default: 20)")
    diloco.add_argument("--fragments", type=int, default=2, help="P of Streaming DiLoCo (default: 2)")
    diloco.add_argument("--overlap-steps", type=int, default=1, help="tau of Streaming DiLoCo (default: 1)")
    diloco.add_argument("--mix", type=float, default=0.5, help="alpha of Streaming DiLoCo (default: 0.5)")
    diloco.add_argument(
        "--codecs",
        default="fp4-e3m0",
        help="comma-separated quantised Streaming DiLoCo rows besides fp32: fp4-e3m0, fp4-e2m1, int2, fp8, bf16 "
        "(default: fp4-e3m0)",
    )
    diloco.add_argument("--eval-every", type=int, default=50, help="steps between validations (default: 50)")
    diloco.add_argument(
        "--utilisation", type=float, default=0.9, help="compute share the bandwidths allow (default: 0.9)"
    )
    diloco.add_argument(
        "--ref-params", type=float, default=1e9, help="parameters of the reference model (default: 1e9)"
    )
    diloco.add_argument(
        "--ref-step-s", type=float, default=1.0, help="assumed step time of the reference model (default: 1)"
    )
    diloco.add_argument("--out", help="where the runs go (default: a temporary directory, removed after)")
    diloco.add_argument("--plot", metavar="PNG", help="write the loss-vs-tokens plot here")
    diloco.add_argument("--json", action="store_true")
    diloco.set_defaults(handler=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from moeforge.bench.diloco import DilocoBenchSettings, format_table, run_diloco_bench, write_plot

    settings = DilocoBenchSettings(
        preset=args.preset,
        steps=args.steps,
        sync_every=args.sync_every,
        fragments=args.fragments,
        overlap_steps=args.overlap_steps,
        mix=args.mix,
        codecs=comma_separated(args.codecs),
        eval_every=args.eval_every,
        utilisation=args.utilisation,
        ref_params=args.ref_params,
        ref_step_s=args.ref_step_s,
        overrides=tuple(parse_overrides(rest).items()),
    )
    out = output_dir(args.out, "--out") if args.out else None
    result = run_diloco_bench(settings, out)
    if result is None:
        return 0
    print(json.dumps(result) if args.json else format_table(result))
    if args.plot:
        print(f"wrote {write_plot(result, args.plot)}", file=sys.stderr)
    return 0
