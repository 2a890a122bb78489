"""The planner's per-rank parameter, gradient and optimizer-state bytes equal the real tensors'.

Tiny presets: trained for one real step (forward, backward, AdamW) on 4 gloo processes under several
layouts. DeepSeek-V3-671B: built on the meta device and parallelized on torch's fake process group,
one process standing for rank r of 2048 (issue 15, item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from torch.distributed.device_mesh import init_device_mesh

from forked import call_in_fork
from moeforge.config import ModelConfig, MoEConfig, ParallelConfig, load_config
from moeforge.parallel import build_mesh, parallelize
from moeforge.parallel.spawn import run_on_processes
from moeforge.plan import Layout, layout_from_config, sharded_bytes
from moeforge.plan.comm import all_to_all_bytes, rows_from_counts
from moeforge.plan.memory import chunk_rows, sharded_state

WORLD = 4
LAYOUTS = [(1, 1), (1, 2), (1, 4), (2, 2)]
"""(dp_replicate, ep) on 4 ranks; dp_shard is what remains"""
PRESETS = ["tiny", "deepseek-v3-tiny"]


def measure_real_bytes(rank: int, out: str) -> None:
    """One AdamW step of each preset under each layout; this rank's bytes of parameter shards,
    gradients and AdamW moments, written to OUT/rank.json; then the all-to-all of one MoE layer."""
    from moeforge.model.transformer import Transformer

    measure_all_to_all(rank, out)
    measure_pipeline_bytes(rank, out)
    results = {}
    for preset in PRESETS:
        cfg = load_config(preset, world_size=WORLD, overrides={"train.seq-len": "16"})
        for replicate, ep in LAYOUTS:
            torch.manual_seed(0)
            model = Transformer(cfg.model)
            pcfg = ParallelConfig(dp_replicate=replicate, ep=ep)
            parallelize(model, build_mesh(pcfg, WORLD, "cpu"), pcfg)
            tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
            out_ = model(tokens, mtp_targets=tokens if cfg.model.mtp_depth else None)
            loss = out_.logits.float().square().mean() + sum(
                m.float().square().mean() for m in out_.mtp_logits
            )
            loss.backward()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            optimizer.step()
            local = [p.to_local() for p in model.parameters()]
            results[f"{preset}/{replicate}/{ep}"] = {
                "parameters": sum(t.numel() * t.element_size() for t in local),
                "gradients": sum(
                    p.grad.to_local().numel() * p.grad.element_size() for p in model.parameters()
                ),
                "optimizer": sum(
                    state[key].to_local().numel() * state[key].element_size()
                    for state in optimizer.state.values()
                    for key in ("exp_avg", "exp_avg_sq")
                ),
            }
    Path(out, f"{rank}.json").write_text(json.dumps(results))


PIPELINES = [("1f1b", 1), ("dualpipev", 2)]
"""(schedule, ep) with pp = 2 on 4 ranks: loop placement over FSDP2, V placement over EP2"""


def pipeline_overrides(schedule: str, ep: int) -> dict[str, str]:
    return {
        "parallel.pp": "2",
        "parallel.pp-schedule": schedule,
        "parallel.ep": str(ep),
        "train.seq-len": "16",
        "train.global-batch-size": "8",
        "train.micro-batch-size": "1",
        "train.progress": "false",
    }


def measure_pipeline_bytes(rank: int, out: str) -> None:
    """One real `Trainer` step of each preset under each pipeline layout: this rank's bytes of every
    parameter its stage chunks hold (the last stage's embedding copy included), of their gradients
    as the optimizer step finds them, and of the AdamW moments, written to OUT/pp<rank>.json."""
    import tempfile

    from moeforge.train.trainer import Trainer

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    results = {}
    for preset in PRESETS:
        for schedule, ep in PIPELINES:
            cfg = load_config(preset, world_size=WORLD, overrides=pipeline_overrides(schedule, ep))
            with tempfile.TemporaryDirectory() as run_dir:
                trainer = Trainer(cfg, run_dir)
                held = trainer.pipeline.parameters()
                gradients = []
                trainer.optimizer.register_step_pre_hook(
                    lambda *_: gradients.append(sum(local(p.grad).numel() * p.grad.element_size() for p in held))
                )
                trainer.train_step()
                results[f"{preset}/{schedule}/{ep}"] = {
                    "parameters": sum(local(p).numel() * p.element_size() for p in held),
                    "gradients": gradients[0],
                    "optimizer": sum(
                        local(state[key]).numel() * state[key].element_size()
                        for state in trainer.optimizer.state.values()
                        for key in ("exp_avg", "exp_avg_sq")
                    ),
                }
    Path(out, f"pp{rank}.json").write_text(json.dumps(results))


MOE = MoEConfig(dim=16, n_experts=8, top_k=3, expert_ffn_dim=8, n_groups=1, topk_groups=1)
RANKS_PER_NODE = 2
"""the all-to-all check treats ranks 0-1 and 2-3 as two nodes"""


def measure_all_to_all(rank: int, out: str) -> None:
    """One MoE layer's forward over ep = 4 ranks: the bytes its all-to-alls send to ranks of the same
    and of the other 'node' (counted at the collective), and which ranks own each token's experts."""
    import moeforge.parallel.expert_parallel as expert_parallel
    from moeforge.model.moe import MoE
    from moeforge.parallel.parallelize import apply_expert_parallel

    sent = {"intra": 0, "inter": 0}
    real = expert_parallel.start_all_to_all

    def counting(rows, output_splits, input_splits, group, grad_group=None):
        row_bytes = rows[0].numel() * rows.element_size() if rows.shape[0] else 0
        for dest, n in enumerate(input_splits):
            if dest != rank:
                sent["intra" if dest // RANKS_PER_NODE == rank // RANKS_PER_NODE else "inter"] += (
                    n * row_bytes
                )
        return real(rows, output_splits, input_splits, group, grad_group)

    expert_parallel.start_all_to_all = counting
    torch.manual_seed(0)
    layer = MoE(MOE)
    apply_expert_parallel(layer, init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))["ep"])
    torch.manual_seed(1 + rank)
    x = torch.randn(3, 10, MOE.dim)
    layer(x)
    experts = layer.route(x.reshape(-1, MOE.dim)).expert_indices
    owners = torch.zeros(30, WORLD, dtype=torch.bool)
    owners.scatter_(1, experts // (MOE.n_experts // WORLD), True)
    Path(out, f"a2a{rank}.json").write_text(json.dumps({"sent": sent, "owners": owners.tolist()}))


@pytest.fixture(scope="module")
def real_step(tmp_path_factory) -> Path:
    """A directory with each rank's measurements of `measure_real_bytes` (4 gloo processes, ~30 s)."""
    out = tmp_path_factory.mktemp("real-step")
    run_on_processes(WORLD, measure_real_bytes, str(out))
    return out


def test_all_to_all_bytes_equal_the_collectives_for_a_given_routing(real_step):
    """The planner's rows for the measured routing (each token once to each other rank that owns one
    of its experts), times its bytes per row (the hidden vector out with its k gates and expert ids,
    the expert output back), equal the bytes moeforge's dispatcher hands to all_to_all, by link."""
    measured = [json.loads((real_step / f"a2a{rank}.json").read_text()) for rank in range(WORLD)]
    owners = torch.tensor([m["owners"] for m in measured])
    intra, inter = rows_from_counts(owners, WORLD, RANKS_PER_NODE)
    cfg = ModelConfig(dim=MOE.dim, moe=MOE)
    layout = Layout(ep=WORLD, dispatch_bytes=4, combine_bytes=4, routing_bytes=8 * MOE.top_k)
    assert sum(m["sent"]["intra"] for m in measured) == all_to_all_bytes(intra, cfg, layout)
    assert sum(m["sent"]["inter"] for m in measured) == all_to_all_bytes(inter, cfg, layout)


def test_tiny_presets_bytes_per_rank_equal_a_real_step(real_step):
    """Every rank, every layout, both tiny presets: planner bytes == bytes of the real shards after a
    real step (fp32 parameters, gradients and moments; AdamW's step counters live on the host)."""
    for rank in range(WORLD):
        measured = json.loads((real_step / f"{rank}.json").read_text())
        for preset in PRESETS:
            cfg = load_config(preset)
            for replicate, ep in LAYOUTS:
                layout = Layout(dp_replicate=replicate, ep=ep).validate(WORLD, 8)
                assert sharded_bytes(cfg.model, layout, rank) == measured[f"{preset}/{replicate}/{ep}"], (
                    preset,
                    replicate,
                    ep,
                    rank,
                )


def test_pipeline_bytes_per_rank_equal_a_real_trainer_step(real_step):
    """Pipelines as the trainer builds them (stages balanced by the planner's own split): every
    rank's parameters, gradients and moments equal the planner's, the last stage's copy of the
    embedding (MTP modules) included: on the last stage's rank with its moments (loop placement),
    on the first stage's rank as a mirror without (V placement)."""
    for rank in range(WORLD):
        measured = json.loads((real_step / f"pp{rank}.json").read_text())
        for preset in PRESETS:
            for schedule, ep in PIPELINES:
                cfg = load_config(preset, world_size=WORLD, overrides=pipeline_overrides(schedule, ep))
                layout = layout_from_config(cfg).validate(WORLD, 8)
                planned = sharded_bytes(cfg.model, layout, rank)
                assert planned == measured[f"{preset}/{schedule}/{ep}"], (preset, schedule, ep, rank)


def fake_rank_elements(world: int, rank: int, replicate: int, ep: int, out: str) -> None:
    """In a process of its own (the fake process group is global): deepseek-v3-671b on the meta device,
    parallelized as rank `rank` of `world` and stepped by AdamW once; its parameter and AdamW-moment
    elements written to `out` as JSON."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moeforge.model.transformer import Transformer

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    cfg = load_config("deepseek-v3-671b")
    pcfg = ParallelConfig(dp_replicate=replicate, ep=ep)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    parallelize(model, build_mesh(pcfg, world, "cpu"), pcfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.step()
    moments = [s[k].to_local().numel() for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    elements = {"params": sum(p.to_local().numel() for p in model.parameters()), "moments": sum(moments)}
    Path(out).write_text(json.dumps(elements))


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, rank, replicate, ep",
    [(2048, 5, 1, 64), (2048, 2047, 8, 64)],
)
def test_deepseek_v3_671b_shards_on_fake_process_group(world, rank, replicate, ep, tmp_path):
    """deepseek-v3-671b on the meta device, parallelized as rank `rank` of `world` (fake backend):
    the planner's parameter and AdamW-moment elements equal the shards FSDP2 + EP produce (~10 s each)."""
    out = tmp_path / "elements.json"
    assert call_in_fork(fake_rank_elements, world, rank, replicate, ep, str(out)) == 0
    real = json.loads(out.read_text())
    cfg = load_config("deepseek-v3-671b")
    state = sharded_state(cfg.model, Layout(dp_replicate=replicate, ep=ep).validate(world, 8), rank)
    assert (state.param_elements, state.moment_elements) == (real["params"], real["moments"])


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "sgd"])
@pytest.mark.parametrize("preset", ["tiny", "deepseek-v3-tiny"])
def test_the_planned_optimizer_state_is_the_trainers(preset, optimizer):
    """The planner's optimizer moments for the run's `train.optimizer` equal the state the trainer's
    optimizer (`train.optim.build_optimizer`) holds after a step: AdamW's two moments per element,
    Muon's one momentum per element of the hidden matrices and AdamW's two for the rest, none for SGD."""
    from moeforge.model.transformer import Transformer
    from moeforge.train.optim import build_optimizer

    cfg = load_config(preset, overrides={"train.optimizer": optimizer})
    model = Transformer(cfg.model)
    optimizer_ = build_optimizer(model, cfg.train)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer_.step()
    held = sum(t.numel() for state in optimizer_.state.values() for key, t in state.items() if key != "step")
    layout = layout_from_config(cfg).validate(1, 8)
    state = sharded_state(cfg.model, layout, 0)
    assert layout.optimizer == optimizer and state.moment_elements == held
    assert sharded_bytes(cfg.model, layout, 0)["optimizer"] == 4 * held  # fp32 moments, no master copy


@pytest.mark.parametrize("rows, parts", [(7, 3), (8, 4), (3, 8), (129280, 2048), (1, 5)])
def test_chunk_rows_is_torch_chunk(rows, parts):
    """FSDP2's dim-0 pieces are torch.chunk's; ranks past the last piece get none."""
    pieces = [len(piece) for piece in torch.arange(rows).chunk(parts)]
    pieces += [0] * (parts - len(pieces))
    assert [chunk_rows(rows, parts, i) for i in range(parts)] == pieces
