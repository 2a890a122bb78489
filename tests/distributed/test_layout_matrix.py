"""Every parallel layout resumes a checkpoint written under another one.

One run directory is trained by a chain of layouts, two optimizer steps each: every link resumes the
newest checkpoint, which the previous layout wrote, and writes its own. So each layout reads a
checkpoint of another layout once and has its own checkpoint read once (the last link, one process,
closes the loop by reading DiLoCo x pp's). Every ordered pair of layouts is
`test_every_layout_pair`, which `scripts/repeat-distributed` runs (LAYOUT_PAIRS=all, its default); CI runs the chain.

The links without DiLoCo must continue as one uninterrupted process does: the same losses at every
step and the same parameters at every checkpoint. Tolerance: the same fp32 sums in other orders
(gradients reduced by all-reduce, micro-batches summed in another order, experts on another rank), as
tests/distributed/test_equivalence.py per step; across ten changes of layout AdamW's division by
sqrt(v) can enlarge such a difference on parameters whose gradients are tiny, hence an atol of 1e-4
on parameters whose typical size is 1e-1.

Every link also records the window ids each rank's loader handed out at each step (`record_draws`):
ranks of one data-parallel index (the stages of a pipeline) drew the same ids, and the ranks' parts in
data-parallel order are the global batch one process's `PackedLoader` gives at that step, whatever
the layouts before (`assert_global_batches`). Along the chain the data-parallel size runs
1, 2, 2, 2, 4, 1, 1, 1, 1, 2, 2, 4, 2, 1: it ends 4 -> 2 -> 1 over DiLoCo, DiLoCo x pp and one process.

DiLoCo is another algorithm, so its links are checked against what the trainer documents: entering it
(no DiLoCo replicas in the checkpoint) every replica starts from the checkpoint's parameters with a
fresh optimizer; inside it (2 replicas, each plain, ep 2 or pp 2) the links continue as one
uninterrupted run of plain DiLoCo 2 started from the same checkpoint; leaving it, one process starts
from theta_global (the replicas' common parameters) with a fresh optimizer and continues exactly as a
process given theta_global by hand, with the checkpoint's data position and schedule.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import small_config
from moeforge import checkpoint as ckpt
from moeforge.data import PackedLoader, build_datasets
from moeforge.parallel.spawn import run_on_processes
from moeforge.run import read_metrics, truncate_metrics
from moeforge.train.trainer import Trainer

STEPS_PER_LINK = 2
COMMON = {
    "model__n_layers": "4",  # 4 stages for the schedules with two stages per rank
    "model__mtp_depth": "1",
    "train__global_batch_size": "8",
    "train__micro_batch_size": "1",  # enough micro-batches for DualPipeV under pp 2 x ep 2
    "train__checkpoint_every": str(STEPS_PER_LINK),
    "train__keep_checkpoints": "100",
    "diloco__sync_every": "4",
    "diloco__fragments": "2",
    "diloco__overlap_steps": "1",  # exchanges in flight at some checkpoints
    "diloco__quantize": "none",  # fp32 outer gradients: layouts that shard them alike agree to 1e-5
}

LAYOUTS: dict[str, tuple[int, dict[str, str]]] = {
    # name: (processes, options)
    "one process": (1, {}),
    "dp-shard 2": (2, {"parallel__dp_shard": "2"}),
    "dp-replicate 2": (2, {"parallel__dp_replicate": "2"}),
    "ep 2": (2, {"parallel__ep": "2"}),
    "dp-replicate 2 x ep 2": (4, {"parallel__dp_replicate": "2", "parallel__ep": "2"}),
    "pp 2 1f1b": (2, {"parallel__pp": "2", "parallel__pp_schedule": "1f1b"}),
    "pp 2 interleaved": (2, {"parallel__pp": "2", "parallel__pp_schedule": "interleaved-1f1b"}),
    "pp 2 zbv": (2, {"parallel__pp": "2", "parallel__pp_schedule": "zbv"}),
    "pp 2 dualpipev": (2, {"parallel__pp": "2", "parallel__pp_schedule": "dualpipev"}),
    "pp 2 x ep 2 dualpipev": (4, {"parallel__pp": "2", "parallel__ep": "2", "parallel__pp_schedule": "dualpipev"}),
    "diloco 2": (2, {"diloco__replicas": "2"}),
    "diloco 2 x ep 2": (4, {"diloco__replicas": "2", "parallel__ep": "2"}),
    "diloco 2 x pp 2": (4, {"diloco__replicas": "2", "parallel__pp": "2"}),
}
DATA_INDEX: dict[str, tuple[int, ...]] = {
    # name: each rank's data-parallel index, written out from the mesh's order (diloco, pp, dp...)
    # outermost first: the stages of one pipeline share an index, DiLoCo replicas and ep ranks do not
    "one process": (0,),
    "dp-shard 2": (0, 1),
    "dp-replicate 2": (0, 1),
    "ep 2": (0, 1),
    "dp-replicate 2 x ep 2": (0, 1, 2, 3),
    "pp 2 1f1b": (0, 0),
    "pp 2 interleaved": (0, 0),
    "pp 2 zbv": (0, 0),
    "pp 2 dualpipev": (0, 0),
    "pp 2 x ep 2 dualpipev": (0, 1, 0, 1),
    "diloco 2": (0, 1),
    "diloco 2 x ep 2": (0, 1, 2, 3),
    "diloco 2 x pp 2": (0, 0, 1, 1),
}
PLAIN = [name for name, (_, options) in LAYOUTS.items() if "diloco__replicas" not in options]
DILOCO = [name for name in LAYOUTS if name not in PLAIN]
CHAIN = [*PLAIN, *DILOCO, "one process"]
TOTAL_STEPS = STEPS_PER_LINK * len(CHAIN)


def options(layout: str) -> dict[str, str]:
    return {**COMMON, "train__steps": str(TOTAL_STEPS), **LAYOUTS[layout][1]}


def train_link(
    rank: int, world: int, opts: dict, out: str, until: int, theta: dict | None, draws: str
) -> None:
    """One link on one rank: resume `out`'s newest checkpoint if there is one, train to step `until`,
    save; the window ids this rank drew at each step go to `draws`/rank{rank}.json. With `theta`,
    first check the resumed model holds exactly those parameters and a fresh optimizer."""
    trainer = Trainer(small_config(world_size=world, **opts), out)
    resumed = trainer.resume_if_possible()
    assert resumed == (ckpt.latest_checkpoint(out) is not None)
    if theta is not None:
        assert_holds(trainer, theta)
    drawn = record_draws(trainer)
    trainer.fit(until_step=until)
    Path(draws, f"rank{rank}.json").write_text(json.dumps(drawn))


def record_draws(trainer: Trainer) -> dict[int, list]:
    """{step: the window ids `trainer`'s loader hands out for it}, filled as it trains: its
    `next_batch_ids` wrapped on the instance, which `next_batch` calls."""
    drawn: dict[int, list] = {}
    draw = trainer.loader.next_batch_ids

    def recording_draw() -> torch.Tensor:
        ids = draw()
        assert trainer.step + 1 not in drawn, f"a second batch drawn for step {trainer.step + 1}"
        drawn[trainer.step + 1] = ids.tolist()
        return ids

    trainer.loader.next_batch_ids = recording_draw
    return drawn


def assert_holds(trainer: Trainer, theta: dict[str, torch.Tensor]) -> None:
    """`trainer`'s model (a plain one: DiLoCo's replicas without a mesh) equals `theta` exactly, and
    its optimizer holds no state: a fresh one."""
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, theta[name]), name
    assert not trainer.optimizer.state, "the optimizer kept state from somewhere"


def run_link(layout: str, out: Path, until: int, theta: dict | None = None) -> list[dict[int, list]]:
    """Train `layout`'s link of `out` to step `until`; each rank's {step: window ids drawn}."""
    processes = LAYOUTS[layout][0]
    with tempfile.TemporaryDirectory() as draws:
        if processes == 1:
            train_link(0, 1, options(layout), str(out), until, theta, draws)
        else:
            run_on_processes(processes, train_link, processes, options(layout), str(out), until, theta, draws)
        by_rank = [json.loads(Path(draws, f"rank{rank}.json").read_text()) for rank in range(processes)]
    return [{int(step): ids for step, ids in drawn.items()} for drawn in by_rank]


def one_process_batches(steps: int) -> list[list[int]]:
    """The window ids of the global batches of steps 1..`steps` in one process: a `PackedLoader` over
    the training tokens the trainer reads (`build_datasets`), with the run's seed, seq_len and batch."""
    cfg = small_config(**options("one process"))
    _, train_tokens, _ = build_datasets(cfg.data, cfg.train.seq_len, progress=False)
    loader = PackedLoader(train_tokens, cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.seed)
    return [loader.next_batch_ids().tolist() for _ in range(steps)]


def assert_global_batches(
    layout: str, draws: list[dict[int, list]], first: int, last: int, reference: list[list[int]]
) -> None:
    """Every rank of `layout`'s link drew a batch at each of the steps first..last; ranks of one
    data-parallel index (`DATA_INDEX`) drew the same ids; and the parts in data-parallel order are
    `reference`'s global batch of that step."""
    index = DATA_INDEX[layout]
    assert len(draws) == len(index), layout
    for rank, drawn in enumerate(draws):
        assert sorted(drawn) == list(range(first, last + 1)), f"{layout}, rank {rank}"
    for step in range(first, last + 1):
        parts: dict[int, list] = {}
        for rank, data_rank in enumerate(index):
            ids = parts.setdefault(data_rank, draws[rank][step])
            assert draws[rank][step] == ids, f"{layout}, step {step}: rank {rank} differs from its index"
        global_batch = [i for data_rank in sorted(parts) for i in parts[data_rank]]
        assert global_batch == reference[step - 1], f"{layout}, step {step}"


def model_at(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The parameters (theta_global under DiLoCo) of `run`'s checkpoint at `step`, in one process."""
    return ckpt.load_model(ckpt.step_path(run, step)).model.state_dict()


def losses(run: Path, first: int, last: int) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if first <= r["step"] <= last]


def assert_same_parameters(actual: dict, expected: dict, where: str) -> None:
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-4, atol=1e-4, msg=f"{where}: {name}")


def fork_run(run: Path, at_step: int, dst: Path) -> Path:
    """A copy of `run` as it stood at checkpoint `at_step`: later checkpoints and metrics dropped."""
    shutil.copytree(run, dst)
    for path in ckpt.list_checkpoints(dst):
        if ckpt.read_meta(path).step > at_step:
            shutil.rmtree(path)
    truncate_metrics(dst, at_step)
    return dst


def by_hand_from(run: Path, step: int, dst: Path) -> list[float]:
    """One process given theta_global of `run`'s checkpoint `step` by hand (no resume: a fresh
    optimizer, the checkpoint's data position and schedule), trained to the end; its losses."""
    meta = ckpt.read_meta(ckpt.step_path(run, step))
    trainer = Trainer(small_config(**options("one process")), dst)
    trainer.model.load_state_dict(model_at(run, step))
    trainer.step = step
    trainer.loader.load_state_dict(meta.extra["data"])
    trainer.scheduler.load_state_dict(meta.extra["scheduler"])
    trainer.fit()
    return losses(dst, step + 1, TOTAL_STEPS)


@pytest.mark.slow
def test_each_layout_resumes_the_checkpoint_of_another(tmp_path):
    chain, reference = tmp_path / "chain", tmp_path / "one_process"
    Trainer(small_config(**options("one process")), reference).fit(until_step=STEPS_PER_LINK * len(PLAIN))
    batches = one_process_batches(TOTAL_STEPS)
    sizes = [len(set(DATA_INDEX[layout])) for layout in CHAIN]
    assert any(sizes[i : i + 3] == [4, 2, 1] for i in range(len(sizes))), f"no 4 -> 2 -> 1 in {sizes}"

    def link_of(layout: str, until: int, theta: dict | None = None) -> None:
        """`layout` trains the chain's next STEPS_PER_LINK steps, drawing the one-process batches."""
        draws = run_link(layout, chain, until, theta)
        assert_global_batches(layout, draws, until - STEPS_PER_LINK + 1, until, batches)

    # the layouts without DiLoCo, each from the previous one's checkpoint
    for link, layout in enumerate(PLAIN):
        link_of(layout, until=(link + 1) * STEPS_PER_LINK)
        step = (link + 1) * STEPS_PER_LINK
        assert losses(chain, 1, step) == pytest.approx(losses(reference, 1, step), rel=1e-5), layout
        assert_same_parameters(model_at(chain, step), model_at(reference, step), f"after {layout}")

    # into DiLoCo: each replica starts from the checkpoint's parameters, fresh optimizer
    entered = STEPS_PER_LINK * len(PLAIN)
    diloco_reference = fork_run(chain, entered, tmp_path / "diloco_reference")
    for link, layout in enumerate(DILOCO):
        theta = model_at(chain, entered) if link == 0 else None
        link_of(layout, until=entered + (link + 1) * STEPS_PER_LINK, theta=theta)
    left = entered + STEPS_PER_LINK * len(DILOCO)
    draws = run_link("diloco 2", diloco_reference, until=left)
    assert_global_batches("diloco 2", draws, entered + 1, left, batches)
    assert losses(chain, entered + 1, left) == pytest.approx(losses(diloco_reference, entered + 1, left), rel=1e-5)
    assert_same_parameters(model_at(chain, left), model_at(diloco_reference, left), "theta_global after DiLoCo")

    # out of DiLoCo: theta_global, fresh optimizer, the same data position and schedule
    by_hand = by_hand_from(chain, left, tmp_path / "by_hand")
    link_of("one process", until=TOTAL_STEPS, theta=model_at(chain, left))
    assert losses(chain, left + 1, TOTAL_STEPS) == pytest.approx(by_hand, rel=1e-6)


PAIRS = list(itertools.permutations(LAYOUTS, 2))
PLAIN_MODELS = ("one process", "diloco 2")
"""the layouts whose model is plain on every rank, where `assert_holds` can look at it"""


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LAYOUT_PAIRS") != "all", reason="every ordered pair: LAYOUT_PAIRS=all")
@pytest.mark.parametrize("saved, resumed", PAIRS, ids=[f"{a} -> {b}" for a, b in PAIRS])
def test_every_layout_pair(saved, resumed, tmp_path):
    """`saved` trains two steps, `resumed` two more from its checkpoint. Both draw the one-process
    global batches; without DiLoCo on either side the losses continue as one process does; across
    DiLoCo's edge the resumed model is the checkpoint's (theta_global) with a fresh optimizer, where
    the model is plain enough to look at."""
    run, batches = tmp_path / "run", one_process_batches(2 * STEPS_PER_LINK)
    draws = run_link(saved, run, until=STEPS_PER_LINK)
    assert_global_batches(saved, draws, 1, STEPS_PER_LINK, batches)
    crosses_diloco = (saved in DILOCO) != (resumed in DILOCO)
    theta = model_at(run, STEPS_PER_LINK) if crosses_diloco and resumed in PLAIN_MODELS else None
    draws = run_link(resumed, run, until=2 * STEPS_PER_LINK, theta=theta)
    assert_global_batches(resumed, draws, STEPS_PER_LINK + 1, 2 * STEPS_PER_LINK, batches)
    if saved in PLAIN and resumed in PLAIN:
        reference = tmp_path / "reference"
        Trainer(small_config(**options("one process")), reference).fit(until_step=2 * STEPS_PER_LINK)
        assert losses(run, 1, 4) == pytest.approx(losses(reference, 1, 4), rel=1e-5)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
