"""`Config`: a whole run's configuration, one field per section.

Each section is a dataclass of its own module (model.py, train.py, data.py, parallel.py, diloco.py)
that validates its own fields; `Config.validate` runs them, then the checks between sections
(cross_section.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moeforge.config.cross_section import check_cross_sections, replica_world_size
from moeforge.config.data import DataConfig
from moeforge.config.diloco import DiLoCoConfig
from moeforge.config.model import ModelConfig
from moeforge.config.parallel import ParallelConfig
from moeforge.config.train import TrainConfig


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)

    def validate(self, world_size: int = 1) -> Config:
        self.model.validate()
        self.train.validate()
        self.data.validate()
        self.diloco.validate()
        self.parallel.validate(replica_world_size(self, world_size))
        check_cross_sections(self, world_size)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
