"""`moeforge bench moe`: one MoE layer forward+backward against plain GEMMs, a dense SwiGLU and its
experts alone of the same FLOPs; and the layer flags it shares with `bench ep`."""

from __future__ import annotations

import argparse
import json

from moeforge.cli.arguments import comma_separated, reject_extra


def layer_flags() -> argparse.ArgumentParser:
    """The flags `bench moe` and `bench ep` share, as a parent parser; a new one per bench, since
    argparse shares a parent's actions and each bench sets its own --tokens default."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--dim", type=int, default=512)
    flags.add_argument("--ffn-dim", type=int, default=256)
    flags.add_argument("--experts", type=int, default=32)
    flags.add_argument("--top-k", type=int, default=4)
    flags.add_argument("--tokens", type=int, help="tokens through the layer (bench ep: per rank)")
    flags.add_argument("--repeats", type=int, default=5)
    flags.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    flags.add_argument("--json", action="store_true")
    return flags


def add_parser(benches: argparse._SubParsersAction) -> None:
    moe = benches.add_parser(
        "moe",
        parents=[layer_flags()],
        help="one MoE layer forward+backward vs plain GEMMs, a dense SwiGLU and its experts alone (same FLOPs)",
    )
    moe.add_argument("--backends", default="grouped", help="comma-separated: grouped, loop")
    moe.add_argument("--device", default="cpu")
    moe.add_argument(
        "--shape",
        default="both",
        help="coarse (32 experts of ffn 256, top-4), fine (64 of ffn 128, top-6) or both (default); "
        "--experts/--ffn-dim/--top-k give one shape of their own instead",
    )
    moe.add_argument(
        "--peers", action="store_true", help="also time the peers' MoE layers that are installed (transformers)"
    )
    moe.add_argument(
        "--compile",
        action="store_true",
        help="also time the dense SwiGLU compiled and the layer as --train.compile compiles it (slow to compile)",
    )
    moe.set_defaults(handler=run, tokens=4096, experts=None, ffn_dim=None, top_k=None)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    reject_extra(rest)
    from moeforge.bench.moe import bench_shapes, format_table, run_moe_bench

    results = [
        run_moe_bench(
            dim=args.dim,
            **shape,
            tokens=args.tokens,
            backends=comma_separated(args.backends),
            repeats=args.repeats,
            device=args.device,
            dtype=args.dtype,
            peers=args.peers,
            compile=args.compile,
        )
        for shape in bench_shapes(args.shape, args.ffn_dim, args.experts, args.top_k)
    ]
    print(json.dumps(results) if args.json else "\n\n".join(map(format_table, results)))
    return 0
