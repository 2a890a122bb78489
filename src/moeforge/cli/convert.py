"""`moeforge convert`: a Hugging Face safetensors model into a moeforge run, or a moeforge checkpoint
into a Hugging Face directory."""

from __future__ import annotations

import argparse

from moeforge.cli.arguments import output_dir, reject_extra
from moeforge.config import ConfigError


def add_parser(commands: argparse._SubParsersAction) -> None:
    convert = commands.add_parser("convert", help="Hugging Face safetensors <-> moeforge checkpoints")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-hf", metavar="DIR", help="a local Hugging Face model directory (config.json, *.safetensors)"
    )
    source.add_argument(
        "--to-hf", metavar="CKPT", help="a moeforge run directory (newest checkpoint) or one checkpoint"
    )
    convert.add_argument(
        "--out", required=True, help="the new run directory (--from-hf) or HF directory (--to-hf)"
    )
    convert.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        help="--to-hf precision (default: as imported, else fp32)",
    )
    convert.set_defaults(handler=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    reject_extra(rest)
    import torch

    from moeforge.interop.convert import checkpoint_to_hf, hf_to_checkpoint
    from moeforge.plan.memory_budget import check_checkpoint_fits

    if args.from_hf:
        if args.dtype:
            raise ConfigError("--dtype: applies to --to-hf only (imported weights are kept in fp32)")
        checkpoint = hf_to_checkpoint(args.from_hf, output_dir(args.out, "--out"))
        print(f"wrote {checkpoint}; try: moeforge generate --checkpoint {args.out}")
        return 0
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    check_checkpoint_fits(args.to_hf, "cpu")  # the model is rebuilt whole on the host to be written
    path = checkpoint_to_hf(args.to_hf, output_dir(args.out, "--out"), dtypes.get(args.dtype))
    print(f"wrote Hugging Face checkpoint {path}")
    return 0
