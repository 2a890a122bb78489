"""Where training numbers go: metrics.jsonl, TensorBoard event files, optionally Weights & Biases,
and the progress bar."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from moeforge.config import ConfigError
from moeforge.run import METRICS_FILE, TENSORBOARD_DIR

class MetricsLogger:
    """Appends one JSON object per logged step and mirrors the scalars to TensorBoard, and to a
    Weights & Biases run when `wandb_project` is given."""

    def __init__(
        self, run_dir: Path, enabled: bool = True, wandb_project: str = "", run_config: dict[str, Any] | None = None
    ):
        self.enabled = enabled
        self._file = None
        self._writer = None
        self._wandb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = (run_dir / METRICS_FILE).open("a")
            self._writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
            if wandb_project:
                self._wandb = WandbRun(wandb_project, run_dir, run_config or {})

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        scalars = {k: v for k, v in _flatten(record).items() if k != "step" and isinstance(v, (int, float))}
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._writer.close()
            if self._wandb is not None:
                self._wandb.close()


class WandbRun:
    """One Weights & Biases run per run directory: its id is a hash of the directory's path, so a
    resumed run (or a torchrun restart) continues the same W&B run. Steps logged again after a
    resume (metrics.jsonl drops those past the checkpoint) are dropped by W&B with a warning, since
    it only accepts growing steps. WANDB_MODE=offline writes the run under RUN_DIR/wandb/ instead."""

    def __init__(self, project: str, run_dir: Path, run_config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                f"train.wandb-project: got {project!r}, but wandb is not installed; allowed: '' or "
                "pip install wandb"
            ) from None
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self._run = wandb.init(
            project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir), config=run_config
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'load': [{'max_violation': 0.1}]} -> {'load/0/max_violation': 0.1}; lists of numbers are skipped."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, item in enumerate(value):
                flat.update(_flatten(item, f"{name}/{i}/"))
        elif not isinstance(value, list):
            flat[name] = value
    return flat


class ProgressBar:
    """A tqdm bar showing loss, tokens/s and load imbalance; ETA comes from tqdm."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)

    def update(self, loss: float, tokens_per_s: float, imbalance: float | None) -> None:
        postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if imbalance is not None:
            postfix["imbalance"] = f"{imbalance:.2f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def write(self, text: str) -> None:
        """One line past the bar, in a single write (ranks of a torchrun share the stream)."""
        self._bar.write(text + "\n", end="")

    def close(self) -> None:
        self._bar.close()
