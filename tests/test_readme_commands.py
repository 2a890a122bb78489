"""Every `moeforge` command the README shows is one the command line accepts today: its flags parse,
and a training command's configuration loads and validates for the world it names (a torchrun line's
--nproc-per-node). What each command does is tested beside it (test_cli, test_generate, ...); this
test keeps the front page from going stale when a flag is renamed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from moeforge.cli import build_parser
from moeforge.cli.arguments import parse_overrides
from moeforge.config import load_config

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[tuple[list[str], int]]:
    """(moeforge's argv, processes) of every command line in the README's bash blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["moeforge"]:
                commands.append((words[1:], 1))
            elif words[:1] == ["torchrun"]:
                at = words.index("moeforge")
                assert words[at - 1] == "-m", line
                commands.append((words[at + 1 :], int(words[words.index("--nproc-per-node") + 1])))
    return commands


def test_the_readme_shows_the_tour():
    shown = {argv[0] for argv, _ in readme_commands()}
    assert {"train", "generate", "convert", "plan", "bench", "data", "eval"} <= shown


@pytest.mark.parametrize("argv, processes", readme_commands(), ids=lambda value: " ".join(value)[:60] if isinstance(value, list) else str(value))
def test_a_readme_command_parses_and_validates(argv, processes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, rest = build_parser().parse_known_args(argv)
    if args.command != "train":
        assert rest == [], f"unknown arguments {rest} in `moeforge {' '.join(argv)}`"
        return
    overrides = parse_overrides(rest)
    for name, _ in [item.rsplit(":", 1) for item in overrides.get("data.path", "").split(",") if ":" in item]:
        (tmp_path / name).mkdir(parents=True)  # a mixture's directories must exist to validate
    cfg = load_config(args.preset, args.config, overrides, world_size=processes)
    cfg.validate(processes)
