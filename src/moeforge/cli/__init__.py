"""`moeforge` command line: parse, call into the library, print. Nothing else lives here.

One module per command declares its flags (`add_parser`) beside the call they feed (`run`); this
one assembles them, runs the command chosen and turns its failure into one line on stderr."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

from moeforge.cli import bench, checkpoint, convert, data, evaluate, generate, plan, report, serve, train
from moeforge.errors import MoeforgeError, print_line
from moeforge.runtime import keep_freed_memory

COMMANDS = (train, generate, serve, evaluate, bench, convert, checkpoint, data, plan, report)
"""the command modules, in the order `moeforge --help` lists them"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    args, rest = parser.parse_known_args(argv)
    keep_freed_memory()
    code = _run_command(args, rest)
    if _joined_process_group():  # under torchrun: leave so that no peer, and no exit, can fail
        from moeforge.parallel import leave_process_group

        leave_process_group(code)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeforge", description="Train and serve dropless Mixture-of-Experts models."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def _run_command(args: argparse.Namespace, rest: list[str]) -> int:
    """The command's exit code. A `MoeforgeError` (a user error, a checkpoint or training failure)
    and a lost peer are one line on stderr (naming the rank under torchrun); a bug keeps its traceback."""
    where = f"moeforge {args.command}: " + (f"rank {os.environ.get('RANK', '?')}: " if _launched() else "")
    try:
        return args.handler(args, rest)
    except MoeforgeError as err:
        _ignore_sigterm()
        print_line(f"{where}error: {err}")
        if _launched() and not _joined_process_group():  # a mistake found before joining: the peers make it too
            from moeforge.parallel.process_group import wait_for_peers_to_report

            wait_for_peers_to_report()
        return err.exit_code
    except Exception as err:
        _ignore_sigterm()
        failure = _peer_failure(err)
        if failure is None and not _joined_process_group():
            raise
        if failure is None:  # a bug: its traceback, then leave the group like every rank
            traceback.print_exc()
            return 1
        print_line(f"{where}error: {failure}; {_AFTER_PEER_FAILURE}")
        return 1


def _ignore_sigterm() -> None:
    """On the way out of a distributed run after a failure: torchrun's agent SIGTERMs the survivors of
    a dead peer, which must not cut the one line that says what happened (the process then leaves
    through `leave_process_group`, so nothing else needs the signal)."""
    if _joined_process_group():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


_AFTER_PEER_FAILURE = (
    "not saving (a collective cannot finish without the peer); torchrun --max-restarts restarts the group "
    "from the newest checkpoint, or rerun with the same --out"
)


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _peer_failure(err: Exception) -> str | None:
    if "torch.distributed" not in sys.modules:
        return None
    from moeforge.parallel.process_group import peer_failure

    return peer_failure(err)


def _joined_process_group() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()
