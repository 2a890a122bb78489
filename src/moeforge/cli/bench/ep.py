"""`moeforge bench ep`: one MoE layer with every expert on each rank against the experts spread over
ep ranks, on spawned gloo processes (or the ranks of a torchrun launch)."""

from __future__ import annotations

import argparse
import json

from moeforge.cli.arguments import reject_extra
from moeforge.cli.bench.moe import layer_flags


def add_parser(benches: argparse._SubParsersAction) -> None:
    ep = benches.add_parser(
        "ep",
        parents=[layer_flags()],
        help="one MoE layer with all experts on every rank (ep=1) vs spread over ep ranks: dispatch / experts / "
        "combine times and off-node traffic, on spawned gloo processes (or the ranks of a torchrun launch)",
    )
    ep.add_argument("--ep", type=int, default=2, help="expert-parallel ranks (processes)")
    ep.add_argument(
        "--ep-nodes", type=int, default=0, help="nodes the ranks are split into; 0 = one per rank"
    )
    ep.add_argument(
        "--topk-nodes", type=int, default=0, help="M, nodes a token's experts may come from; 0 = half"
    )
    ep.set_defaults(handler=run, tokens=2048)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    reject_extra(rest)
    from moeforge.bench.ep import EpBenchSettings, format_table, run_ep_bench

    settings = EpBenchSettings(
        ep=args.ep,
        ep_nodes=args.ep_nodes,
        topk_nodes=args.topk_nodes,
        dim=args.dim,
        ffn_dim=args.ffn_dim,
        n_experts=args.experts,
        top_k=args.top_k,
        tokens=args.tokens,
        repeats=args.repeats,
        dtype=args.dtype,
    )
    result = run_ep_bench(settings)
    if result is not None:
        print(json.dumps(result) if args.json else format_table(result))
    return 0
