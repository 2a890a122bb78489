"""`moeforge bench diloco`: data parallelism vs DiLoCo vs Streaming DiLoCo (fp32 and quantised),
training the same model on the same tokens on 2 processes; `--section.field VALUE` applies to all."""

from __future__ import annotations

import argparse
import json
import sys

from moeforge.cli.arguments import comma_separated, output_dir, parse_overrides
from moeforge.config import ConfigError, available_presets


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
        default="fp4-e3m0+ef",
        help="comma-separated lossy Streaming DiLoCo rows besides fp32, each [topF+]CODEC[+ef][+sparseloco]: "
        "CODEC one of fp4-e3m0, fp4-e2m1, int2, fp8, bf16 (none after topF), topF keeps the largest fraction F "
        "of each chunk, +ef adds error feedback, +sparseloco uses SparseLoCo's outer step (outer lr 1); e.g. "
        "fp4-e3m0,fp4-e3m0+ef,int2+ef,top0.02+int2+ef (default: fp4-e3m0+ef)",
    )
    diloco.add_argument(
        "--optimizers", default="adamw", help="comma-separated inner optimizers, every method run with each: "
        "adamw, muon (default: adamw)"
    )
    diloco.add_argument(
        "--seeds", default="0", help="comma-separated train.seed values, the whole grid run for each (default: 0)"
    )
    diloco.add_argument(
        "--muon-lr",
        type=float,
        default=1e-2,
        help="train.lr of the Muon runs; 0 keeps the preset's (default: 0.01, Muon's best on tiny where AdamW's "
        "is the preset's 3e-3)",
    )
    diloco.add_argument(
        "--no-plain", dest="plain", action="store_false", help="leave out plain DiLoCo (one fragment, no overlap)"
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
    from moeforge.bench.diloco import DilocoBenchSettings, run_diloco_bench
    from moeforge.bench.diloco_results import format_table, write_plot

    settings = DilocoBenchSettings(
        preset=args.preset,
        steps=args.steps,
        sync_every=args.sync_every,
        fragments=args.fragments,
        overlap_steps=args.overlap_steps,
        mix=args.mix,
        codecs=comma_separated(args.codecs),
        plain=args.plain,
        optimizers=comma_separated(args.optimizers),
        seeds=seeds(args.seeds),
        muon_lr=args.muon_lr or None,
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


def seeds(text: str) -> tuple[int, ...]:
    """'0,1' -> (0, 1); a one-line --seeds error otherwise."""
    try:
        return tuple(int(item) for item in comma_separated(text))
    except ValueError:
        raise ConfigError(f"--seeds: got {text!r}; allowed: comma-separated integers >= 0") from None
