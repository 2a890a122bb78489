"""`moeforge report`: PNG plots of a run from its metrics.jsonl."""

from __future__ import annotations

import argparse

from moeforge.cli.arguments import output_dir, reject_extra


def add_parser(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report", help="PNG plots of a run: losses, expert load heatmaps, max violation"
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with metrics.jsonl")
    report.add_argument("--out", help="where the PNGs go (default: RUN_DIR/report)")
    report.set_defaults(handler=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    reject_extra(rest)
    from moeforge.run_plots import write_report

    out = output_dir(args.out, "--out") if args.out else None
    for path in write_report(args.run_dir, out):
        print(path)
    return 0
