"""`moeforge checkpoint verify`: every checkpoint of a run checked against the sizes and SHA-256 sums
it recorded, as a resume checks them, and which one a resume would continue from."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeforge.cli.arguments import reject_extra
from moeforge.config import ConfigError


def add_parser(commands: argparse._SubParsersAction) -> None:
    checkpoint = commands.add_parser("checkpoint", help="inspect a run's checkpoints")
    checkpoint_commands = checkpoint.add_subparsers(
        dest="checkpoint_command", metavar="ACTION", required=True
    )
    verify = checkpoint_commands.add_parser(
        "verify", help="check every checkpoint of a run against the sizes and SHA-256 sums it recorded"
    )
    verify.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or one checkpoint)")
    verify.set_defaults(handler=run_verify)


def run_verify(args: argparse.Namespace, rest: list[str]) -> int:
    reject_extra(rest)
    from moeforge import checkpoint as ckpt

    path = Path(args.run_dir)
    if not path.is_dir():
        raise ConfigError(f"RUN_DIR: {str(path)!r} is not a directory")
    checkpoints = ckpt.checkpoints_in(path)
    if not checkpoints:
        raise ConfigError(f"RUN_DIR: no complete checkpoint in {str(path)!r}")
    good = []
    for checkpoint in checkpoints:  # the checks a resume makes (newest_good_checkpoint), without its renames
        problems = ckpt.verify_checkpoint(checkpoint)
        good += [] if problems else [checkpoint]
        print(f"{checkpoint.name}: {_verdict(checkpoint, problems)}")
        for problem in problems[1:]:
            print(f"{' ' * len(checkpoint.name)}  {problem}")
    for aside in sorted(ckpt.checkpoint_dir(path).glob(f"*{ckpt.CORRUPT_SUFFIX}*")):
        print(f"{aside.name}: set aside by an earlier resume (not used)")
    if not good:
        print("a resume finds no good checkpoint and starts from step 0")
    elif len(checkpoints) > 1:
        print(f"a resume continues from {good[-1].name}")
    print(f"{len(good)} of {len(checkpoints)} checkpoints good")
    return 0 if len(good) == len(checkpoints) else 1


def _verdict(checkpoint: Path, problems: list[str]) -> str:
    from moeforge import checkpoint as ckpt

    if problems:
        return f"BAD: {problems[0]}"
    meta = ckpt.read_meta(checkpoint)
    unhashed = "" if meta.format >= 2 else f", {ckpt.META_FILE} unhashed (written by an older moeforge)"
    if meta.files is None:
        return f"no checksums recorded (written by an older moeforge); not verified{unhashed}"
    size = sum(entry["bytes"] for entry in meta.files.values())
    return f"ok ({len(meta.files)} files, {size / 1e6:.1f} MB, SHA-256 verified{unhashed})"
