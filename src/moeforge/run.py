"""The run directory: one place that knows its layout, for train, infer, interop and report alike.

RUN_DIR/config.json      the run's whole Config (written by rank 0 when the run starts)
RUN_DIR/tokenizer.json   the Hugging Face tokenizer it trained with (absent: the byte tokenizer)
RUN_DIR/checkpoints/     sharded checkpoints (moeforge.checkpoint)
RUN_DIR/metrics.jsonl    one JSON object per logged step
RUN_DIR/tensorboard/     TensorBoard event files
RUN_DIR/report/          PNG plots (moeforge.run_plots)

A tokenizer.json found in a run directory (or a Hugging Face directory) is used only when it is a
regular file inside that directory, symlinks resolved, of at most `MAX_TOKENIZER_BYTES`
(moeforge.safe_paths); anything else is refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from moeforge.config import Config
from moeforge.data.tokenizer import Tokenizer, build_tokenizer
from moeforge.errors import first_line
from moeforge.safe_paths import FileMissing, PathRefused, file_inside, read_inside

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
REPORT_DIR = "report"
MAX_TOKENIZER_BYTES = 512 << 20
"""a bound on tokenizer.json (those of 250k-token vocabularies are ~30 MB)"""
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
MAX_TEMPLATE_BYTES = 16 << 20
"""a bound on tokenizer_config.json and chat_template.jinja (a few kilobytes in practice)"""
MAX_RUN_CONFIG_BYTES = 16 << 20
"""a bound on a run's config.json (a few kilobytes)"""
TOKENIZER_FILES = {
    TOKENIZER_FILE: MAX_TOKENIZER_BYTES,
    TOKENIZER_CONFIG_FILE: MAX_TEMPLATE_BYTES,
    CHAT_TEMPLATE_FILE: MAX_TEMPLATE_BYTES,
}
"""the files of a model's tokenizer a run directory and a Hugging Face directory carry alike"""


def write_run_files(run_dir: Path, cfg: Config) -> None:
    """config.json, and a copy of the tokenizer file the run uses (a run directory is self-contained)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))
    if cfg.data.tokenizer != "byte":
        shutil.copyfile(cfg.data.tokenizer, run_dir / TOKENIZER_FILE)


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's config.json as a dict (a regular file inside the run directory, at most
    MAX_RUN_CONFIG_BYTES), None when it has none; a one-line `PathRefused` when it is not JSON."""
    try:
        data = read_inside(run_dir, CONFIG_FILE, run_dir, MAX_RUN_CONFIG_BYTES)
    except FileMissing:
        return None
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise PathRefused(run_dir, CONFIG_FILE, f"not valid JSON ({first_line(err)})") from None
    if not isinstance(config, dict):
        raise PathRefused(run_dir, CONFIG_FILE, f"a JSON {type(config).__name__}, not an object")
    return config


def tokenizer_for_run(run_dir: Path, cfg: Config) -> Tokenizer:
    """The tokenizer a run trained with: its copied tokenizer.json, or the byte tokenizer."""
    data_cfg = dataclasses.replace(cfg.data, path="", tokenizer=tokenizer_name_for_run(run_dir))
    return build_tokenizer(data_cfg)


def tokenizer_name_for_run(run_dir: Path) -> str:
    """The `data.tokenizer` a run's tokenizer is rebuilt from: its copied tokenizer.json, or 'byte'."""
    copied = tokenizer_file(run_dir)
    return str(copied) if copied else "byte"


def tokenizer_file(directory: Path, home: Path | None = None) -> Path | None:
    """`directory`'s tokenizer.json, checked (module docstring), or None when it has none; `home` is
    the tree it may resolve into (default: `directory`)."""
    try:
        return file_inside(directory, TOKENIZER_FILE, directory, home, MAX_TOKENIZER_BYTES)
    except FileMissing:
        return None


def copy_tokenizer_files(directory: Path, out: Path, home: Path | None = None) -> list[str]:
    """Copy the tokenizer files `directory` has into `out`: tokenizer.json, and tokenizer_config.json
    and chat_template.jinja, where a server finds the chat template and special tokens. Each is
    checked as `tokenizer_file` checks tokenizer.json (inside `home`, default `directory`, and
    bounded in size). Returns the names copied."""
    copied = []
    for name, max_bytes in TOKENIZER_FILES.items():
        try:
            source = file_inside(directory, name, directory, home, max_bytes)
        except FileMissing:
            continue
        shutil.copyfile(source, out / name)
        copied.append(name)
    return copied


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop records logged after `after_step`: on resume they are recomputed, so none appears twice."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))
