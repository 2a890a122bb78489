"""A parallel layout as the planner sees it: wider than what moeforge runs today (pipeline stages and
schedules, ZeRO-1, uneven stages, FP8), so that published runs can be planned too.

Ranks are laid out, outermost first, as (diloco replicas, pp, dp_replicate, dp_shard), with
dp_shard = efsdp x ep as in `moeforge.parallel.mesh` (ep innermost, so an ep group of up to
gpus-per-node ranks stays inside one node). World size = replicas x pp x dp_replicate x dp_shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

from moeforge.config import Config, ModelConfig, apply_mapping
from moeforge.config.checks import _check, _check_choices
from moeforge.config.diloco import TOPK_CHUNK_MAX, Codec, DiLoCoConfig, Outer
from moeforge.config.parallel import parse_stage_blocks
from moeforge.plan.block_flops import flops_per_token_by_block
from moeforge.model.attention import pads_mla_values
from moeforge.model.flops import attention_head_dims

Schedule = Literal["1f1b", "interleaved", "zbv", "dualpipe", "dualpipev"]
DataSharding = Literal["fsdp", "zero1"]
Recompute = Literal["none", "selective", "full"]
ComputeDtype = Literal["bf16", "fp8", "fp32"]
Dedup = Literal["rank", "node"]
AttentionKernel = Literal["auto", "fused", "padded", "eager"]
Optimizer = Literal["adamw", "muon", "sgd"]


@dataclass
class Layout:
    """How a run is spread over the cluster, and the number formats it keeps."""

    pp: int = 1
    """pipeline ranks per replica (1 = no pipeline)"""
    pp_schedule: Schedule = "1f1b"
    """'1f1b', 'interleaved' (pp-virtual chunks per rank), 'zbv' (zero-bubble V: 2 chunks per rank),
    'dualpipe' (two stages per rank: i and pp-1-i, parameters twice) or 'dualpipev' (2 chunks per
    rank in a V, no duplicated parameters)"""
    pp_virtual: int = 2
    """'interleaved': model chunks per pipeline rank"""
    stage_blocks: str = ""
    """transformer blocks per pipeline stage, comma-separated (e.g. '3,4,4,...'); '' = balanced by
    training FLOPs, the head and MTP modules counted on the last stage"""
    dp_replicate: int = 1
    """HSDP replica groups (parameters replicated across them)"""
    dp_shard: int = -1
    """data-parallel ranks that shard the model (FSDP) or the optimizer (ZeRO-1); -1 = what the
    world leaves"""
    data_sharding: DataSharding = "fsdp"
    """'fsdp' (ZeRO-3: parameters, gradients and optimizer sharded over dp-shard) or 'zero1'
    (parameters and gradients replicated, optimizer states sharded over all data-parallel ranks)"""
    ep: int = 1
    """expert-parallel degree, taken from dp-shard (divides it and the routed experts)"""
    ep_nodes: int = 0
    """nodes the ep group spans; 0 = ceil(ep / gpus-per-node)"""
    dispatch_dedup: Dedup = "rank"
    """a token crosses to each destination 'rank' once (moeforge's all-to-all) or to each 'node'
    once, then fans out over NVLink (DeepSeek-V3 / DeepEP)"""
    micro_batch_size: int = 1
    """sequences per micro-batch on one rank"""
    recompute: Recompute = "none"
    """activation recomputation: 'none', 'selective' (norms, SwiGLU products and MLA up-projections
    recomputed in the backward, as DeepSeek-V3 §3.2.3) or 'full' (each block keeps only its input)"""
    attention_kernel: AttentionKernel = "auto"
    """'fused' (FlashAttention-style: only a log-sum-exp per head is kept), 'padded' (fused, with
    MLA's values zero-padded to the query width for a kernel that needs equal widths: moeforge on the
    CPU, FlashAttention-2), 'eager' (the softmax probabilities are kept, heads x seq per token) or
    'auto': moeforge's own on CUDA, fused (SDPA) for GQA and MLA"""
    compute_dtype: ComputeDtype = "bf16"
    """number format of the matmuls: 'bf16', 'fp8' (attention scores stay BF16) or 'fp32'"""
    activation_bytes: int = 2
    """bytes per saved activation element (2 under BF16 autocast, 4 in fp32)"""
    param_bytes: int = 4
    """bytes per parameter as the model holds it (moeforge: fp32 with BF16 autocast)"""
    grad_bytes: int = 4
    """bytes per gradient element (and per element FSDP reduce-scatters)"""
    gather_bytes: int = 0
    """bytes per element FSDP/ZeRO-1 all-gather; 0 = param-bytes (2 with a BF16 MixedPrecisionPolicy)"""
    master_bytes: int = 0
    """bytes per parameter of an optimizer-held master copy (e.g. 4 with BF16 parameters); 0 = none"""
    moment_bytes: int = 4
    """bytes per element of each optimizer moment (AdamW's two, Muon's momentum)"""
    optimizer: Optimizer = "adamw"
    """the trainer's optimizer (`train.optimizer`), for its state: 'adamw' two moments per element,
    'muon' one momentum per element of the hidden matrices and AdamW's two for the rest, 'sgd' none
    (the step time's optimizer term is AdamW's elementwise pass in every case)"""
    dispatch_bytes: float = 2.0
    """bytes per element of a token sent to its experts (2 = BF16, ~1.03 = FP8 with its scales)"""
    combine_bytes: float = 2.0
    """bytes per element of an expert output sent back"""
    routing_bytes: float = 0.0
    """bytes of routing data travelling with each dispatched row (moeforge's dispatcher: the k gates
    and k local expert ids in fp32, 8 x top-k, set from the run config); 0 = none"""
    diloco_replicas: int = 1
    """DiLoCo replicas (the outermost dimension); 1 = off"""
    diloco_sync_every: int = 100
    """inner steps H between two synchronisations of a fragment"""
    diloco_fragments: int = 1
    """streaming fragments P"""
    diloco_overlap_steps: int = 0
    """tau: inner steps a fragment's exchange overlaps"""
    diloco_quantize: Codec = DiLoCoConfig.quantize
    """format of the outer gradients on the wire (the trainer's default, `DiLoCoConfig.quantize`)"""
    diloco_quantize_block: int = 128
    """values sharing one fp32 scale in the fp8/fp4/int2 formats"""
    diloco_topk_fraction: float = 1.0
    """the fraction of each top-k chunk's values sent (with their offsets); 1 = dense"""
    diloco_topk_chunk: int = 4096
    """values per top-k chunk"""
    diloco_outer: Outer = "nesterov"
    """the outer optimizer: 'nesterov' keeps a momentum, 'sparseloco' none"""
    diloco_error_feedback: bool = True
    """residuals of error feedback kept (on a lossy wire only)"""
    diloco_global_on_cpu: bool = False
    """theta_global, the outer momentum and the residuals kept in host memory"""

    def diloco_state_copies(self) -> int:
        """fp32 copies of the parameters DiLoCo's outer loop keeps per rank: theta_global, the
        Nesterov momentum, error feedback's residuals (when the wire is lossy)."""
        lossy = self.diloco_quantize != "none" or self.diloco_topk_fraction < 1
        return 1 + (self.diloco_outer == "nesterov") + (self.diloco_error_feedback and lossy)

    def chunks_per_rank(self) -> int:
        """Model chunks one pipeline rank runs: v for interleaved, 2 for zbv/dualpipev, 1 otherwise."""
        if self.pp == 1:
            return 1
        return {"interleaved": self.pp_virtual, "zbv": 2, "dualpipev": 2}.get(self.pp_schedule, 1)

    def n_stages(self) -> int:
        """Pipeline stages the model is cut into."""
        if self.pp == 1:
            return 1
        return self.pp * self.chunks_per_rank()

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        """The stages pipeline rank `pp_rank` holds: interleaved round-robin, a V for zbv/dualpipev,
        stages i and pp-1-i for dualpipe (each stage on two ranks)."""
        pp = self.pp
        if pp == 1:
            return [0]
        if self.pp_schedule == "interleaved":
            return [pp_rank + j * pp for j in range(self.pp_virtual)]
        if self.pp_schedule in ("zbv", "dualpipev"):
            return [pp_rank, 2 * pp - 1 - pp_rank]
        if self.pp_schedule == "dualpipe":
            return [pp_rank, pp - 1 - pp_rank]
        return [pp_rank]

    def resolved_dp_shard(self, world_size: int) -> int:
        if self.dp_shard != -1:
            return self.dp_shard
        return world_size // (self.diloco_replicas * self.pp * self.dp_replicate)

    def world_size(self) -> int:
        return self.diloco_replicas * self.pp * self.dp_replicate * self.dp_shard

    @property
    def data_parallel(self) -> int:
        """Data-parallel ranks of one replica (each with its own micro-batches)."""
        return self.dp_replicate * self.dp_shard

    def resolved_ep_nodes(self, gpus_per_node: int) -> int:
        return self.ep_nodes or -(-self.ep // gpus_per_node)

    @property
    def runnable_now(self) -> bool:
        """Whether moeforge runs this layout today: pipelines (not DualPipe's two copies: DualPipeV)
        of FSDP/HSDP + EP, DiLoCo; no ZeRO-1, no FP8, no node-level dispatch, no optimizer-held
        master copy."""
        return (
            self.pp_schedule != "dualpipe"
            and self.data_sharding == "fsdp"
            and self.compute_dtype != "fp8"
            and self.dispatch_dedup == "rank"
            and self.master_bytes == 0
        )

    def describe(self) -> str:
        """e.g. 'PP16 dualpipe x DP128 zero1 x EP64 | mb 1, recompute none'."""
        parts = []
        if self.diloco_replicas > 1:
            parts.append(f"DiLoCo{self.diloco_replicas}")
        if self.pp > 1:
            parts.append(f"PP{self.pp} {self.pp_schedule}")
        dp = f"DP{self.dp_replicate}x{self.dp_shard}" if self.dp_replicate > 1 else f"DP{self.dp_shard}"
        parts.append(f"{dp} {self.data_sharding}")
        if self.ep > 1:
            parts.append(f"EP{self.ep}")
        return (
            " x ".join(parts)
            + f" | mb {self.micro_batch_size}, recompute {self.recompute}, {self.compute_dtype}"
        )

    def validate(self, world_size: int, gpus_per_node: int) -> Layout:
        """Resolve dp-shard and check the layout against the world; one-line errors."""
        _check_choices(self, "layout")
        for name in ("pp", "pp_virtual", "dp_replicate", "ep", "micro_batch_size", "diloco_replicas"):
            value = getattr(self, name)
            _check(value >= 1, f"layout.{name.replace('_', '-')}", value, "an integer >= 1")
        outer = self.diloco_replicas * self.pp * self.dp_replicate
        _check(
            world_size % outer == 0,
            "layout.pp",
            self.pp,
            f"a value with diloco-replicas*pp*dp-replicate dividing the {world_size} GPUs",
        )
        self.dp_shard = self.resolved_dp_shard(world_size)
        _check(
            self.dp_shard >= 1 and self.world_size() == world_size,
            "layout.dp-shard",
            self.dp_shard,
            f"a value with diloco-replicas*pp*dp-replicate*dp-shard = {world_size} GPUs",
        )
        _check(self.dp_shard % self.ep == 0, "layout.ep", self.ep, f"a divisor of dp-shard={self.dp_shard}")
        _check(
            self.pp_schedule not in ("dualpipe", "dualpipev") or self.pp % 2 == 0 or self.pp == 1,
            "layout.pp",
            self.pp,
            f"an even number for pp-schedule={self.pp_schedule!r}",
        )
        _check(
            0 < self.diloco_topk_fraction <= 1,
            "layout.diloco-topk-fraction",
            self.diloco_topk_fraction,
            "a number in (0, 1]",
        )
        _check(
            1 <= self.diloco_topk_chunk <= TOPK_CHUNK_MAX,
            "layout.diloco-topk-chunk",
            self.diloco_topk_chunk,
            f"an integer in [1, {TOPK_CHUNK_MAX}]",
        )
        ep_nodes = self.resolved_ep_nodes(gpus_per_node)
        _check(
            self.ep % ep_nodes == 0 and self.ep // ep_nodes <= gpus_per_node,
            "layout.ep-nodes",
            self.ep_nodes,
            f"a divisor of ep={self.ep} leaving at most {gpus_per_node} ranks per node",
        )
        return self


def resolved_attention_kernel(layout: Layout, cfg: ModelConfig) -> str:
    """'fused', 'padded' or 'eager': `layout.attention_kernel`, with 'auto' as moeforge runs it on
    CUDA (`moeforge_attention_kernel`)."""
    if layout.attention_kernel != "auto":
        return layout.attention_kernel
    return moeforge_attention_kernel(cfg, "cuda")


def moeforge_attention_kernel(cfg: ModelConfig, device_type: str) -> str:
    """The attention kernel moeforge's training forward takes on `device_type`: 'padded' for MLA
    with values narrower than its queries where it pads them (`model.attention.pads_mla_values`),
    'fused' otherwise (SDPA's fused kernels)."""
    qk, v = attention_head_dims(cfg)
    narrower = cfg.attention == "mla" and v < qk
    return "padded" if narrower and pads_mla_values(device_type) else "fused"


def attended_head_dims(cfg: ModelConfig, kernel: str) -> tuple[int, int]:
    """(query/key width, value width) of one head as the attention kernel computes them: under
    'padded' the values are as wide as the queries (`attention_head_dims` otherwise)."""
    qk, v = attention_head_dims(cfg)
    return (qk, max(v, qk)) if kernel == "padded" else (qk, v)


def layout_from_config(cfg: Config, overrides: dict[str, str] | None = None) -> Layout:
    """The layout a moeforge run of `cfg` uses (its `parallel.*`, `diloco.*` and micro-batch size,
    fp32 parameters with BF16 autocast), then the `{field-name: text}` overrides."""
    par, dil = cfg.parallel, cfg.diloco
    stages = par.pp_stages()
    layout = Layout(
        pp=par.pp,
        pp_schedule="interleaved" if par.pp_schedule == "interleaved-1f1b" else par.pp_schedule,
        pp_virtual=max(1, stages // par.pp) if par.pp_schedule == "interleaved-1f1b" else 2,
        stage_blocks=par.pp_stage_blocks,
        dp_replicate=par.dp_replicate,
        dp_shard=par.dp_shard,
        ep=par.ep,
        ep_nodes=par.ep_nodes if par.ep_nodes > 1 else 0,
        micro_batch_size=cfg.train.micro_batch_size or 1,
        optimizer=cfg.train.optimizer,
        diloco_replicas=dil.replicas,
        diloco_sync_every=dil.sync_every,
        diloco_fragments=dil.fragments,
        diloco_overlap_steps=dil.overlap_steps,
        diloco_quantize=dil.quantize,
        diloco_quantize_block=dil.quantize_block,
        diloco_topk_fraction=dil.topk_fraction,
        diloco_topk_chunk=dil.topk_chunk,
        diloco_outer=dil.outer,
        diloco_error_feedback=dil.error_feedback,
        diloco_global_on_cpu=dil.global_on_cpu,
        routing_bytes=8.0 * cfg.model.moe.top_k,
    )
    apply_mapping(layout, dict(overrides or {}), "layout.")
    return layout


def balanced_stage_blocks(layout: Layout, costs: tuple[float, ...], first: float, last: float) -> list[int]:
    """Blocks per stage (contiguous runs; only the first and last stages, which also hold the
    embedding and the head, may hold no block) that keep the busiest pipeline rank as light as
    possible: `costs` per block, `first` added to the first stage, `last` to the last. The costliest
    single stage is minimised exactly (dynamic programming over runs of >= 1 block); then single
    blocks move between neighbouring stages while that lowers the busiest rank's load (several
    stages per rank: interleaved, V shapes, DualPipe) or, at equal peak, the spread of the loads."""
    n_stages = layout.n_stages()
    ranks = tuple(tuple(layout.stages_of_rank(r)) for r in range(layout.pp))
    return list(_balanced(costs, first, last, n_stages, ranks))


@cache
def _balanced(
    costs: tuple[float, ...], first: float, last: float, n_stages: int, ranks: tuple[tuple[int, ...], ...]
) -> tuple[int, ...]:
    counts = _min_max_stages(costs, first, last, n_stages)

    def loads(counts: list[int]) -> tuple[float, float]:
        starts = [sum(counts[:s]) for s in range(n_stages)]
        stage = [
            sum(costs[starts[s] : starts[s] + counts[s]])
            + (first if s == 0 else 0)
            + (last if s == n_stages - 1 else 0)
            for s in range(n_stages)
        ]
        per_rank = [sum(stage[s] for s in held) for held in ranks]
        return max(per_rank), sum(x * x for x in per_rank)

    score = loads(counts)
    while True:
        moves = []
        for s in range(n_stages - 1):
            for give, take in ((s, s + 1), (s + 1, s)):
                if counts[give] > (0 if give in (0, n_stages - 1) else 1):
                    moved = list(counts)
                    moved[give] -= 1
                    moved[take] += 1
                    moves.append((loads(moved), moved))
        better = min(moves, default=None)
        if better is None or better[0] >= score:
            return tuple(counts)
        score, counts = better


def _min_max_stages(costs: tuple[float, ...], first: float, last: float, n_stages: int) -> list[int]:
    """Contiguous runs of >= 1 blocks minimising the costliest stage (linear partition DP)."""
    n = len(costs)
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)

    def segment(j: int, i: int) -> float:
        return prefix[i] - prefix[j] + (first if j == 0 else 0.0) + (last if i == n else 0.0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(s, n - (n_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], segment(j, i))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    counts, i = [], n
    for s in range(n_stages, 0, -1):
        counts.append(i - cut[s][i])
        i = cut[s][i]
    return list(reversed(counts))


def stage_block_counts(layout: Layout, cfg: ModelConfig) -> list[int]:
    """Blocks of each stage, from `stage-blocks`, or balanced by training FLOPs per token at
    model.max-seq-len (the head and MTP modules weigh on the last stage); checked to cover the model."""
    n_blocks, n_stages = cfg.n_layers, layout.n_stages()
    if not layout.stage_blocks:
        _check(
            n_blocks >= n_stages,
            "layout.pp",
            layout.pp,
            f"a pipeline of at most model.n-layers={n_blocks} stages",
        )
        flops = flops_per_token_by_block(cfg, cfg.max_seq_len)
        costs = tuple(flops[b].total for b in range(n_blocks))
        return balanced_stage_blocks(layout, costs, flops[-1].total, flops[n_blocks].total)
    return parse_stage_blocks(layout.stage_blocks, n_stages, n_blocks, "layout.stage-blocks")
