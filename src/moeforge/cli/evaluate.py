"""`moeforge eval`: loss and perplexity of a trained model on the splits of prepared datasets."""

from __future__ import annotations

import argparse
import json

from moeforge.cli.arguments import reject_extra


def add_parser(commands: argparse._SubParsersAction) -> None:
    ev = commands.add_parser("eval", help="loss and perplexity of a trained model on prepared datasets")
    ev.add_argument(
        "--checkpoint", required=True, help="a run directory (newest checkpoint) or one checkpoint"
    )
    ev.add_argument("data_dirs", nargs="+", metavar="DATA_DIR", help="directories made by `moeforge data prepare`")
    ev.add_argument("--split", choices=("val", "train"), default="val", help="the split scored (default: val)")
    ev.add_argument("--seq-len", type=int, default=0, help="tokens a window (default: the run's train.seq-len)")
    ev.add_argument("--batch-size", type=int, default=8, help="windows a forward (default: 8)")
    ev.add_argument("--max-batches", type=int, default=0, help="batches from the split's start (default 0: all)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(handler=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    reject_extra(rest)
    from moeforge.infer import load_model
    from moeforge.infer.evaluate import check_data_dir, check_eval_flags, check_seq_len, evaluate, open_eval_split
    from moeforge.infer.generate import generation_device
    from moeforge.plan.memory_budget import check_checkpoint_fits
    from moeforge.run import tokenizer_name_for_run

    # flags and directories first, then the checkpoint, then every dataset before any is scored
    check_eval_flags(args.seq_len, args.batch_size, args.max_batches)
    device = generation_device(args.device)
    roots = [check_data_dir(path) for path in args.data_dirs]
    check_checkpoint_fits(args.checkpoint, device)
    loaded = load_model(args.checkpoint, device)
    seq_len = args.seq_len or loaded.config.train.seq_len
    check_seq_len(seq_len, loaded.config.model.max_seq_len)
    tokenizer = tokenizer_name_for_run(loaded.checkpoint.parent.parent)
    vocab_size = loaded.config.model.vocab_size
    splits = [open_eval_split(root, args.split, tokenizer, vocab_size, seq_len) for root in roots]
    datasets = []
    document_mask = loaded.config.data.document_mask  # scored as the run validated
    for path, split in zip(args.data_dirs, splits, strict=True):
        result = evaluate(loaded.model, split, seq_len, args.batch_size, args.max_batches, device, document_mask)
        figures = {"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens}
        datasets.append({"path": path, **figures, "windows": result.windows})
        if not args.json:
            print(
                f"{path} {args.split}: loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.2f} "
                f"over {result.tokens:,} tokens ({result.windows:,} windows of {seq_len})",
                flush=True,
            )
    if args.json:
        checkpoint = {"checkpoint": str(loaded.checkpoint), "step": loaded.step}
        print(json.dumps(checkpoint | {"split": args.split, "seq_len": seq_len, "datasets": datasets}))
    return 0
