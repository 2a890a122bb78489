"""`moeforge bench BENCH`: one module per benchmark, each declaring its flags beside the call into
`moeforge.bench` that they feed."""

from __future__ import annotations

import argparse

from moeforge.cli.bench import data, decode, diloco, ep, moe, plan, pp, serve, train

BENCHES = (moe, ep, diloco, pp, train, plan, decode, serve, data)
"""the benchmark modules, in the order `moeforge bench --help` lists them"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench", help="benchmarks; each prints ratios against a baseline timed in the same run"
    )
    benches = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for module in BENCHES:
        module.add_parser(benches)
