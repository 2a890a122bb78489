"""Shared helpers: a small, fast configuration of the default model; a data cache of the session's own."""

import os

# OpenMP threads that finish a parallel region sleep instead of spinning (libgomp spins for milliseconds
# by default). The tests run many small ops and many processes on two cores: there the spinning thread
# takes the core from the thread with work, which made single-process tests several times slower
# whenever anything else ran. Read when torch loads its OpenMP runtime, so set before anything imports
# torch; processes the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

from moeforge.config import Config, load_config  # noqa: E402
from moeforge.data.cache import CACHE_ENV  # noqa: E402

if not os.environ.get(CACHE_ENV):  # processes the tests spawn inherit it, and keep it
    os.environ[CACHE_ENV] = _SESSION_CACHE = tempfile.mkdtemp(prefix="moeforge-test-cache-")
else:
    _SESSION_CACHE = None


def pytest_sessionfinish(session, exitstatus):
    """Remove the data cache this session made (the embedded corpus and raw text prepared by tests)."""
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)

SMALL = {
    "model.dim": "64",
    "model.n-layers": "3",
    "model.n-heads": "4",
    "model.n-kv-heads": "2",
    "model.ffn-dim": "128",
    "model.max-seq-len": "128",
    "model.moe.n-experts": "8",
    "model.moe.top-k": "2",
    "model.moe.expert-ffn-dim": "32",
    "model.moe.n-groups": "4",
    "model.moe.topk-groups": "2",
    "train.seq-len": "32",
    "train.global-batch-size": "4",
    "train.warmup-steps": "2",
    "train.log-every": "1",
    "train.eval-every": "0",
    "train.eval-batches": "1",
    "train.progress": "false",
    "train.report": "false",
}


def small_config(world_size: int = 1, **overrides: str) -> Config:
    """The tiny preset shrunk for tests; keyword overrides use underscores for dots and dashes:
    small_config(train__steps="4") sets train.steps."""
    values = dict(SMALL)
    values.update({key.replace("__", ".").replace("_", "-"): value for key, value in overrides.items()})
    return load_config(overrides=values, world_size=world_size)


@pytest.fixture
def small_cfg() -> Config:
    return small_config()


def trainer_documents(cfg) -> list[str]:
    """The documents the trainer reads for the raw-text `cfg` (a DataConfig), decoded from the
    prepared cache it makes of them (byte tokenizer; none held out, so no document is cut)."""
    import dataclasses

    from moeforge.data.cache import prepared_cache
    from moeforge.data.indexed import IndexedDataset

    root = prepared_cache(dataclasses.replace(cfg, val_fraction=1e-12), progress=False)
    train = IndexedDataset(root / "train")
    return [bytes(train[i][:-1].tolist()).decode() for i in range(len(train))]


TRAINING_THREADS = 2
"""the trained fixtures' thread count: a long run amplifies the last-bit differences of another count
into another model, so a figure measured on it would depend on the machine's cores"""


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A small MLA + MTP model trained briefly (150 steps of 16 x 64 bytes, ~12 s here) on the embedded
    corpus, saved as a checkpoint, once per session (speculative decoding and the serving engine use
    it). Fewer steps leave a model that answers every prompt with spaces, which any draft predicts."""
    out = tmp_path_factory.mktemp("mtp_run")
    cfg = small_config(
        train__steps="150",
        train__global_batch_size="16",
        train__seq_len="64",
        train__lr="1e-2",
        train__checkpoint_every="1000",
        model__attention="mla",
        model__q_lora_rank="48",
        model__mtp_depth="1",
        model__moe__bias_update_rate="1e-2",
    )
    import torch

    from moeforge.train.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    try:
        Trainer(cfg, out).fit()
    finally:
        torch.set_num_threads(threads)
    return out
