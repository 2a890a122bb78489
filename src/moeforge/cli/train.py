"""`moeforge train`: train a model from a preset, a TOML file and dotted overrides; rerunning with the
same --out resumes. Its `--help` lists every configuration option with the value the --preset gives."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import NoReturn

from moeforge.cli.arguments import output_dir, parse_overrides
from moeforge.errors import print_line
from moeforge.config import DEFAULT_PRESET, available_presets, format_choices, iter_options, load_config


def add_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a model (no arguments: the tiny default on the embedded corpus)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    train.add_argument("-h", "--help", action=_HelpOfPreset, help="show this help message and exit")
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


class _HelpOfPreset(argparse.Action):
    """`-h/--help`: shown once every flag is parsed, wherever it stands, so that the options list the
    values of the --preset given (argparse's own help action would stop at it)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.handler = functools.partial(_print_help, parser)


def _print_help(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> NoReturn:
    parser.epilog = options_help(args.preset)
    parser.print_help()
    parser.exit()


def options_help(preset: str | None) -> str:
    """Every configuration option with its value under `preset` (None: the default preset)."""
    name = preset or DEFAULT_PRESET
    lines = [f"configuration options (--section.field-name VALUE; default shown is preset {name}'s):"]
    for option in iter_options(load_config(name)):
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
    # one write a line: the other ranks may still be writing theirs to the same stream
    print_line(f"{state} at step {result.step}: loss {result.final_loss:.4f}{val}; checkpoint {result.checkpoint}", sys.stdout)
    if result.exchange is not None:
        print_line(_exchange_line(result.exchange, cfg.diloco.replicas), sys.stdout)
    return 0


def _exchange_line(exchange: dict, replicas: int) -> str:
    """'diloco (fp4-e3m0): 22.7 MB sent per replica; data parallelism would have sent 3,340.5 MB for
    these steps (147x fewer)', and past 2 replicas what the links carried (all-gather vs all-reduce)."""
    sent, plain = exchange["bytes_per_replica"], exchange["data_parallel_bytes_per_replica"]
    fewer = f" ({plain / sent:,.0f}x fewer)" if sent else ""
    line = (
        f"diloco ({exchange['wire_format']}): {sent / 1e6:,.1f} MB sent per replica; data parallelism "
        f"would have sent {plain / 1e6:,.1f} MB for these steps{fewer}"
    )
    if replicas > 2 and exchange["wire_bytes_per_replica"]:
        wire, plain_wire = exchange["wire_bytes_per_replica"], exchange["data_parallel_wire_bytes_per_replica"]
        line += (
            f"; on each replica's links {wire / 1e6:,.1f} MB out and in by all-gather, against "
            f"{plain_wire / 1e6:,.1f} MB by all-reduce ({plain_wire / wire:,.0f}x fewer)"
        )
    return line
