"""The checks that tie one config section to another, in one place.

Each section validates its own fields (`TrainConfig.validate`, `ParallelConfig.validate`, ...);
what no section can check alone is here: the mesh inside a DiLoCo replica, the layout against the
model's experts, a pipeline against the model's blocks and the step's micro-batches, and the
combinations of schedule, overlap, compilation and checkpointing that cannot run together.
`Config.validate` runs them in a fixed order, so that a config with several mistakes always
names the same one first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moeforge.config.checks import _check
from moeforge.config.model import MoEConfig
from moeforge.config.parallel import ParallelConfig, parse_stage_blocks

if TYPE_CHECKING:
    from moeforge.config.run_config import Config


def replica_world_size(cfg: Config, world_size: int) -> int:
    """The ranks of one DiLoCo replica, inside which `parallel` lays out its mesh."""
    replicas = cfg.diloco.replicas
    _check(
        world_size % replicas == 0,
        "diloco.replicas",
        replicas,
        f"a divisor of the world size {world_size}",
    )
    _check(
        replicas == 1 or cfg.parallel.dp_replicate == 1,
        "parallel.dp-replicate",
        cfg.parallel.dp_replicate,
        "1 with diloco.replicas > 1 (DiLoCo replicas take the place of HSDP's every-step all-reduce)",
    )
    return world_size // replicas


def check_layout_fits_experts(parallel: ParallelConfig, moe: MoEConfig) -> None:
    """The checks that tie the layout to a model's experts and routing groups."""
    _check(
        moe.n_experts % parallel.ep == 0,
        "parallel.ep",
        parallel.ep,
        f"a divisor of model.moe.n-experts={moe.n_experts}",
    )
    _check(
        moe.n_groups % parallel.ep_nodes == 0,
        "model.moe.n-groups",
        moe.n_groups,
        f"a multiple of parallel.ep-nodes={parallel.ep_nodes}, so that every expert group lives on one node",
    )


def check_pipeline_fits(parallel: ParallelConfig, n_layers: int, micro_batches: int) -> None:
    """The checks that tie the pipeline to the model's blocks and the step's micro-batches."""
    if parallel.pp == 1:
        return
    stages = parallel.pp_stages()
    if parallel.pp_stage_blocks:
        parse_stage_blocks(parallel.pp_stage_blocks, stages, n_layers, "parallel.pp-stage-blocks")
        _check(
            stages % parallel.pp == 0,
            "parallel.pp-stage-blocks",
            parallel.pp_stage_blocks,
            f"a multiple of pp={parallel.pp} counts (whole stages per rank)",
        )
    else:
        _check(
            stages <= n_layers,
            "parallel.pp",
            parallel.pp,
            f"at most {n_layers // (stages // parallel.pp)} for pp-schedule={parallel.pp_schedule!r} "
            f"({stages} stages of model.n-layers={n_layers} blocks)",
        )
    needed = 2 * parallel.pp if parallel.pp_schedule == "dualpipev" else parallel.pp
    interleaved = parallel.pp_schedule == "interleaved-1f1b"
    ok = micro_batches >= needed and (not interleaved or micro_batches % parallel.pp == 0)
    _check(
        ok,
        "train.micro-batch-size",
        f"{micro_batches} micro-batches per step",
        f"at least {needed} micro-batches for pp-schedule={parallel.pp_schedule!r} with pp={parallel.pp}"
        + (f", a multiple of {parallel.pp}" if interleaved else "")
        + " (a smaller micro-batch-size, or a larger global-batch-size)",
    )


def check_cross_sections(cfg: Config, world_size: int) -> None:
    """Every check between sections after the layout's own (`ParallelConfig.validate`), in order."""
    check_layout_fits_experts(cfg.parallel, cfg.model.moe)
    check_pipeline_fits(cfg.parallel, cfg.model.n_layers, micro_batches_per_step(cfg, world_size))
    _check(
        cfg.parallel.pp == 1
        or cfg.parallel.pp_schedule not in ("zbv", "dualpipev")
        or not (cfg.model.tie_embeddings and cfg.model.mtp_depth),
        "parallel.pp-schedule",
        cfg.parallel.pp_schedule,
        "'1f1b' or 'interleaved-1f1b' with model.tie-embeddings and MTP modules (the V schedules' split "
        "weight backward cannot use one tied weight as the last stage's embedding and head)",
    )
    check_overlap(cfg, world_size)
    # the document ids reach the blocks through Transformer.forward (or the overlapped forward); the
    # pipeline's stages run their blocks themselves and do not pass them
    _check(
        not cfg.data.document_mask or cfg.parallel.pp == 1,
        "data.document-mask",
        True,
        f"false with parallel.pp={cfg.parallel.pp} (pipeline stages do not carry document ids yet)",
    )
    _check(
        not (cfg.train.compile and cfg.parallel.pp > 1 and cfg.parallel.pp_schedule in ("zbv", "dualpipev")),
        "train.compile",
        True,
        f"false with parallel.pp-schedule={cfg.parallel.pp_schedule!r} (torch's split input/weight backward "
        "cannot run compiled stages; '1f1b' and 'interleaved-1f1b' can)",
    )
    _check(
        cfg.diloco.fragments <= cfg.model.n_layers,
        "diloco.fragments",
        cfg.diloco.fragments,
        f"at most model.n-layers={cfg.model.n_layers} (a fragment holds whole blocks)",
    )
    _check(
        cfg.train.seq_len <= cfg.model.max_seq_len,
        "train.seq-len",
        cfg.train.seq_len,
        f"at most model.max-seq-len={cfg.model.max_seq_len}",
    )
    _check(
        cfg.train.seq_len > cfg.model.mtp_depth,
        "train.seq-len",
        cfg.train.seq_len,
        f"more than model.mtp-depth={cfg.model.mtp_depth} (each MTP depth predicts one token further)",
    )


def check_overlap(cfg: Config, world_size: int) -> None:
    """parallel.ep-overlap splits each micro-batch in two halves, or under a pipeline pairs the
    forward of one micro-batch with the backward of another (DualPipeV's overlapped chunks)."""
    par = cfg.parallel
    if not par.ep_overlap:
        return
    _check(
        not cfg.train.compile,
        "train.compile",
        True,
        "false with parallel.ep-overlap (the overlap runs each block's phases itself, outside its compiled call)",
    )
    _check(
        cfg.train.activation_checkpoint != "block",
        "train.activation-checkpoint",
        "block",
        "'none' or 'experts' with parallel.ep-overlap (the overlap runs each block's phases itself)",
    )
    if par.pp > 1:
        _check(
            par.pp_schedule == "dualpipev",
            "parallel.ep-overlap",
            True,
            "false unless pp-schedule='dualpipev' (a pipeline overlaps a forward with a backward there)",
        )
        return
    per_rank = cfg.train.global_batch_size // max(1, world_size)
    micro = cfg.train.micro_batch_size or per_rank
    _check(
        micro >= 2,
        "train.micro-batch-size",
        micro,
        "at least 2 sequences per micro-batch with parallel.ep-overlap (each runs as two halves)",
    )


def micro_batches_per_step(cfg: Config, world_size: int) -> int:
    """Micro-batches per step on one rank (the data-parallel ranks are the world over pp)."""
    per_rank = cfg.train.global_batch_size // max(1, world_size // cfg.parallel.pp)
    return per_rank // cfg.train.micro_batch_size if cfg.train.micro_batch_size else 1
