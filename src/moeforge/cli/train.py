"""`moeforge train`: train a model from a preset, a TOML file and dotted overrides; rerunning with the
same --out resumes. Its `--help` lists every configuration option."""

from __future__ import annotations

import argparse
import os

from moeforge.cli.arguments import output_dir, parse_overrides
from moeforge.config import available_presets, format_choices, iter_options, load_config


def add_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a model (no arguments: the tiny default on the embedded corpus)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=options_help(),
    )
    train.add_argument(
        "--config", help="a TOML file with [model], [model.moe], [train], [data], [parallel], [diloco] tables"
    )
    train.add_argument(
        "--preset", help=f"start from a preset: {', '.join(available_presets())} (default: tiny)"
    )
    train.add_argument(
        "--out", default="runs/tiny", help="run directory; rerunning with it resumes (default: runs/tiny)"
    )
    train.add_argument(
        "--init-from-hf",
        metavar="DIR",
        help="start from a local Hugging Face model (= --train.init-from-hf DIR)",
    )
    train.set_defaults(handler=run)


def options_help() -> str:
    lines = ["configuration options (--section.field-name VALUE; default shown is before any preset):"]
    for option in iter_options():
        allowed = f" (allowed: {format_choices(option.choices)})" if option.choices else ""
        lines.append(f"  --{option.flag} {option.default!r}{allowed}\n      {option.doc}")
    return "\n".join(lines)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from moeforge.interop import apply_hf_model, hf_weights_loader
    from moeforge.run_plots import report_after_training
    from moeforge.train.trainer import Trainer

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    overrides = parse_overrides(rest)
    if args.init_from_hf:
        overrides["train.init-from-hf"] = args.init_from_hf
    cfg = load_config(args.preset, args.config, overrides, world_size=world_size, apply_init_from=apply_hf_model)
    out = output_dir(args.out, "--out")
    trainer = Trainer(cfg, out, init_weights=hf_weights_loader(cfg) if cfg.train.init_from_hf else None)
    result = trainer.fit()
    if not trainer.is_main:  # under torchrun the summary and the report come once, from rank 0
        return 0
    if cfg.train.report and not result.interrupted:  # a signalled run exits promptly
        report_after_training(out)
    state = "interrupted" if result.interrupted else "done"
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"{state} at step {result.step}: loss {result.final_loss:.4f}{val}; checkpoint {result.checkpoint}")
    if result.exchange is not None:
        sent, plain = result.exchange["bytes_per_replica"], result.exchange["data_parallel_bytes_per_replica"]
        fewer = f" ({plain / sent:,.0f}x fewer)" if sent else ""
        print(
            f"diloco: {sent / 1e6:,.1f} MB sent per replica; data parallelism would have sent "
            f"{plain / 1e6:,.1f} MB for these steps{fewer}"
        )
    return 0
