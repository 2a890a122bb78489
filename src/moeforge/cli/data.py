"""`moeforge data prepare`: text files tokenized into memory-mapped Megatron-LM indexed datasets."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeforge.cli.arguments import reject_extra


def add_parser(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="prepare text into memory-mapped token datasets")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prepare = data_commands.add_parser(
        "prepare",
        help="tokenize .txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet files into Megatron-LM indexed datasets",
    )
    prepare.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories of documents")
    prepare.add_argument("--out", required=True, help="the prepared dataset's directory")
    prepare.add_argument("--tokenizer", default="byte", help="'byte' (default) or a tokenizer.json")
    prepare.add_argument("--text-field", default="text", help="the text's key or column in .jsonl/.parquet")
    prepare.add_argument(
        "--val-fraction", type=float, default=0.0, help="share of documents held out (by their text's hash)"
    )
    prepare.add_argument("--val", nargs="+", default=[], metavar="INPUT", help="inputs held out whole instead")
    prepare.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    prepare.add_argument("--chunk-mb", type=float, default=16.0, help="input read per task (default 16)")
    prepare.set_defaults(handler=run_prepare)


def run_prepare(args: argparse.Namespace, rest: list[str]) -> int:
    reject_extra(rest)
    from moeforge.data.prepare import PrepareOptions, prepare

    options = PrepareOptions(
        tuple(args.inputs),
        Path(args.out),
        args.tokenizer,
        args.text_field,
        args.val_fraction,
        tuple(args.val),
        args.workers,
        int(args.chunk_mb * 2**20),
    )
    manifest = prepare(options)
    counts = ", ".join(
        f"{split} {info['documents']:,} documents / {info['tokens']:,} tokens" for split, info in manifest["splits"].items()
    )
    print(f"prepared {args.out}: {counts}")
    return 0
