"""Where training numbers go: metrics.jsonl, TensorBoard event files and the progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from moeforge.run import METRICS_FILE, TENSORBOARD_DIR

class MetricsLogger:
    """Appends one JSON object per logged step and mirrors the scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self._file = None
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = (run_dir / METRICS_FILE).open("a")
            self._writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        for key, value in _flatten(record).items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._writer.close()


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
