"""Sharded checkpoints: DCP state written atomically with a checksum of every file (store.py,
checksums.py) and of meta.json itself (meta.py), found and verified before a resume (discovery.py),
read without running code or leaving the checkpoint directory (safe_load.py), and a trained model
rebuilt from one (model_loading.py)."""

from moeforge.checkpoint.discovery import (
    CORRUPT_SUFFIX,
    checkpoint_dir,
    checkpoints_in,
    latest_checkpoint,
    list_checkpoints,
    newest_good_checkpoint,
    resolve_checkpoint,
    set_aside,
    step_path,
    verify_checkpoint,
)
from moeforge.checkpoint.meta import META_FILE, META_HASH_FILE, CheckpointError, CheckpointMeta, read_meta
from moeforge.checkpoint.model_loading import LoadedModel, load_model
from moeforge.checkpoint.store import LoadStats, ReplicaCheckpoint, load_checkpoint, save_checkpoint

__all__ = [
    "CORRUPT_SUFFIX",
    "META_FILE",
    "META_HASH_FILE",
    "CheckpointError",
    "CheckpointMeta",
    "LoadStats",
    "LoadedModel",
    "ReplicaCheckpoint",
    "checkpoint_dir",
    "checkpoints_in",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "newest_good_checkpoint",
    "read_meta",
    "resolve_checkpoint",
    "save_checkpoint",
    "set_aside",
    "step_path",
    "verify_checkpoint",
]
