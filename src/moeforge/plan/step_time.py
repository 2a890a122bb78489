"""One training step of a layout on a cluster: FLOPs, bytes, and the seconds each costs, combined
into a step time, tokens/s, MFU and the resource that bounds the step.

Compute: each block's matmul FLOPs (6 x its active parameters per token, `moeforge.model.flops`) at
the achieved FLOP/s of the compute format, the attention scores (6 x heads x (qk + v) x seq) at the
achieved BF16 rate (FP32 in an fp32 layout); backward = 2 x forward, split evenly between inputs (B)
and weights (W); full recomputation adds a forward to B. Under EP a rank computes as many expert rows as its tokens send
out (balanced routing). Communication overlaps compute where the schedule allows: FSDP prefetches
and ZeRO-1/HSDP reductions run under compute (what exceeds it is exposed), the all-to-all is hidden
only by DualPipe(V)'s paired micro-batches, DiLoCo's exchange by its overlap steps; on a gloo cluster
(CPU processes) nothing of the data-parallel traffic hides: the collectives run on the compute's cores.

Where the cluster gives the constants (a measured CPU does; the GPU presets leave them 0, since their
bf16-efficiency is a published whole-step MFU that already contains these costs), a step also pays:
the memory-bound work of forward and backward (`plan.memory_traffic`; backward 2 x forward but for
RMSNorm and written-out attention scores, counted from the kernels torch runs) at
`elementwise-bandwidth`, split between B and W like the matmuls; launching each operator the
micro-batch dispatches (`plan.op_counts`) at `operator-overhead`; the optimizer step (clipping and
AdamW over the rank's shard: bytes and operators), not overlapped; and a latency per collective
(`collective-latency` for FSDP/HSDP/ZeRO and the step's all-reduces, `all-to-all-latency` for the
dispatcher's exchanges), on top of its bytes over the link; at each such collective the wait
for the group's slowest device (`sync-wait`, plus `sync-skew` of the work since the previous one);
and FSDP2's and the EP dispatcher's host work around their collectives (`fsdp-unit-overhead` per
unit, `ep-dispatch-overhead` per MoE layer, each per micro-batch). What a step sends, and the
seconds and calls of it, are counted in `plan.step_communication`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from moeforge.config import ConfigError, ModelConfig
from moeforge.model.flops import attention_head_dims, training_flops_per_token
from moeforge.plan.cluster import Cluster
from moeforge.plan.block_flops import flops_per_token_by_block
from moeforge.plan.comm import expected_rows
from moeforge.plan.layout import Layout, attended_head_dims, resolved_attention_kernel
from moeforge.plan.memory import MemoryEstimate, blocks_of_rank, memory_estimate, sharded_state
from moeforge.plan.memory_traffic import (
    backward_elements_by_block,
    forward_elements_by_block,
    optimizer_elements_per_parameter,
)
from moeforge.plan.op_counts import step_operators
from moeforge.plan.pipeline import bubble_time, min_micro_batches
from moeforge.plan.step_communication import (
    Communication,
    DiLoCoTraffic,
    diloco_traffic,
    host_work_seconds,
    moe_layers,
    step_communication,
)
from moeforge.plan.tensors import parameter_tensors


@dataclass(frozen=True)
class TrainingShape:
    global_batch_size: int
    """sequences per optimizer step over all GPUs"""
    seq_len: int


@dataclass(frozen=True)
class Plan:
    """Everything the planner says about one layout."""

    layout: Layout
    cluster: str
    world_size: int
    micro_batches: int
    tokens_per_step: int
    flops_per_token: float
    memory: MemoryEstimate
    fits: bool
    hbm_bytes: float
    compute_s: float
    bubble_s: float
    exposed_all_to_all_s: float
    exposed_data_parallel_s: float
    exposed_diloco_s: float
    step_s: float
    tokens_per_s: float
    mfu: float
    bound_by: str
    communication: Communication
    diloco: DiLoCoTraffic | None = None
    notes: list[str] = field(default_factory=list)
    memory_bound_s: float = 0.0
    """seconds of the step's non-matmul memory traffic at `cluster.elementwise_bandwidth`
    (forward and backward of every micro-batch, not the optimizer's)"""
    operator_launch_s: float = 0.0
    """seconds of launching the micro-batches' operators at `cluster.operator_overhead`"""
    optimizer_s: float = 0.0
    """seconds of the clipping and the AdamW step over the rank's shard: bytes and launches"""
    waiting_s: float = 0.0
    """seconds per step a device waits at its blocking collectives for the slowest of its group:
    per collective `cluster.sync_wait`, plus `cluster.sync_skew` of the work between collectives"""
    host_work_s: float = 0.0
    """seconds per step of FSDP2's host work around its collectives (`cluster.fsdp_unit_overhead`
    per communicating unit and micro-batch) and, under EP, of the all-to-all dispatcher's
    (`cluster.ep_dispatch_overhead` per MoE layer and micro-batch)"""
    operators_per_step: float = 0.0
    """operators the busiest rank dispatches per step (0 when the cluster has no operator overhead)"""

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.world_size

    @property
    def gpu_hours_per_trillion_tokens(self) -> float:
        return 1e12 / self.tokens_per_s * self.world_size / 3600

    @property
    def runnable_now(self) -> bool:
        return self.layout.runnable_now

    def to_dict(self) -> dict:
        data = asdict(self)
        data["memory"]["total"] = self.memory.total
        data.update(
            tokens_per_s_per_gpu=self.tokens_per_s_per_gpu,
            gpu_hours_per_trillion_tokens=self.gpu_hours_per_trillion_tokens,
            runnable_now=self.runnable_now,
            layout_text=self.layout.describe(),
        )
        return data


def micro_batches(layout: Layout, shape: TrainingShape) -> int:
    """Micro-batches per step on each data-parallel rank; a one-line error when the batch does not
    split evenly or is too small for the schedule."""
    per_rank, rest = divmod(shape.global_batch_size, layout.diloco_replicas * layout.data_parallel)
    if rest or per_rank % layout.micro_batch_size or per_rank == 0:
        raise ConfigError(
            f"train.global-batch-size: got {shape.global_batch_size}; allowed: a multiple of "
            f"replicas*dp*micro-batch = {layout.diloco_replicas * layout.data_parallel * layout.micro_batch_size}"
        )
    n_micro = per_rank // layout.micro_batch_size
    needed = min_micro_batches(layout)
    if n_micro < needed:
        raise ConfigError(
            f"layout.micro-batch-size: {n_micro} micro-batches per step; pp-schedule={layout.pp_schedule!r} "
            f"with pp={layout.pp} needs at least {needed}"
        )
    return n_micro


def plan_layout(cfg: ModelConfig, layout: Layout, cluster: Cluster, shape: TrainingShape) -> Plan:
    """The plan of `layout` (validated, dp_shard resolved) for the model `cfg` on `cluster`."""
    n_micro = micro_batches(layout, shape)
    tokens_mb = layout.micro_batch_size * shape.seq_len
    rows = expected_rows(cfg, layout, cluster.gpus_per_node)
    memory = memory_estimate(cfg, layout, shape.seq_len, n_micro, rows.total)
    mb = _busiest_micro_batch(cfg, layout, cluster, shape.seq_len, tokens_mb)
    recompute = layout.recompute == "full"
    # the backward: twice the forward's matmuls, split evenly between inputs (B) and weights (W),
    # and so are its memory traffic and operator launches; full recomputation repeats the forward
    # in B (selective recomputes only elementwise work and a few small projections, counted as free)
    forward = mb.forward
    half_backward = (mb.memory_backward + mb.launch_backward) / 2
    backward_input = mb.matmul + half_backward + (forward if recompute else 0.0)
    backward_weight = mb.matmul + half_backward
    compute = n_micro * mb.matmul * (4 if recompute else 3)
    busy = n_micro * (forward + backward_input + backward_weight)
    forwards = 2 if recompute else 1
    memory_bound = n_micro * (forwards * mb.memory_forward + mb.memory_backward)
    launches = n_micro * (forwards * mb.launch_forward + mb.launch_backward)
    comm = step_communication(cfg, layout, cluster, rows, n_micro, tokens_mb, mb.moe_layers, mb.blocks)
    overlapped = layout.pp > 1 and layout.pp_schedule in ("dualpipe", "dualpipev")
    exposed_a2a = max(0.0, comm.all_to_all_s - busy) if overlapped else comm.all_to_all_s
    hidden = busy if cluster.overlaps_collectives else 0.0
    exposed_dp = max(0.0, comm.data_parallel_s + comm.pipeline_s - hidden)
    stretch = (busy + exposed_a2a) / busy if busy else 1.0
    bubble = bubble_time(layout, forward, backward_input, backward_weight) * stretch
    optimizer = _optimizer_seconds(cfg, layout, cluster, mb.pp_rank)
    waiting = _waiting_for_peers(layout, cluster, comm, busy)
    host_work = host_work_seconds(cfg, layout, cluster, n_micro, mb.blocks)
    base_step = busy + exposed_a2a + exposed_dp + bubble + optimizer + comm.step_calls_s + waiting + host_work
    diloco = diloco_traffic(cfg, layout, cluster, base_step, busy)
    exposed_diloco = diloco.exposed_per_step_s if diloco else 0.0
    step = base_step + exposed_diloco
    tokens_step = shape.global_batch_size * shape.seq_len
    flops_token = training_flops_per_token(cfg, shape.seq_len)
    world = layout.world_size()
    tokens_per_s = tokens_step / step
    parts = {
        "compute": compute,
        "memory-bound work": memory_bound,
        "operator launches": launches,
        "optimizer": optimizer,
        "all-to-all": exposed_a2a,
        "data-parallel comm": exposed_dp + comm.step_calls_s,
        "pipeline bubble": bubble,
        "DiLoCo exchange": exposed_diloco,
        "waiting for peers": waiting,
        "FSDP and dispatcher host work": host_work,
    }
    return Plan(
        layout=layout,
        cluster=cluster.name,
        world_size=world,
        micro_batches=n_micro,
        tokens_per_step=tokens_step,
        flops_per_token=flops_token,
        memory=memory,
        fits=memory.total <= cluster.require("hbm_bytes"),
        hbm_bytes=cluster.hbm_bytes,
        compute_s=compute,
        bubble_s=bubble,
        exposed_all_to_all_s=exposed_a2a,
        exposed_data_parallel_s=exposed_dp,
        exposed_diloco_s=exposed_diloco,
        step_s=step,
        tokens_per_s=tokens_per_s,
        mfu=flops_token * tokens_per_s / (world * cluster.require(_mfu_peak(layout))),
        bound_by=max(parts, key=lambda name: parts[name]),
        communication=comm,
        diloco=diloco,
        memory_bound_s=memory_bound,
        operator_launch_s=launches,
        optimizer_s=optimizer,
        waiting_s=waiting,
        host_work_s=host_work,
        operators_per_step=n_micro * (mb.operators + mb.operators_forward * (forwards - 1))
        + mb.optimizer_operators,
    )


def _waiting_for_peers(layout: Layout, cluster: Cluster, comm: Communication, busy: float) -> float:
    """Seconds per step the busiest rank waits for its peers at the collectives that make it wait
    (all-to-alls, FSDP/HSDP/ZeRO collectives, the step's all-reduces): `sync_wait` each, and
    `sync_skew` of the work between consecutive ones, i.e. of the step's busy time. One device
    waits for nobody."""
    calls = comm.all_to_all_calls + comm.data_parallel_calls + comm.step_calls
    if layout.world_size() == 1 or not calls:
        return 0.0
    return calls * cluster.sync_wait + cluster.sync_skew * busy


def _mfu_peak(layout: Layout) -> str:
    """The cluster field MFU is a fraction of: the BF16 peak (also for FP8 runs, as published MFUs
    are), the FP32 peak for an fp32 layout."""
    return "peak_fp32_flops" if layout.compute_dtype == "fp32" else "peak_bf16_flops"


@dataclass(frozen=True)
class MicroBatchSeconds:
    """What one micro-batch costs the busiest pipeline rank, forward and backward apart."""

    pp_rank: int
    blocks: list[int]
    moe_layers: float
    """MoE layers a micro-batch passes on that rank"""
    matmul: float
    """forward matmul and attention seconds (the backward's are twice these)"""
    memory_forward: float = 0.0
    """forward seconds of the memory-bound work (`plan.memory_traffic`) at the elementwise bandwidth"""
    memory_backward: float = 0.0
    """the same for the backward (`memory_traffic.backward_elements_by_block`)"""
    launch_forward: float = 0.0
    """forward seconds of launching operators (`plan.op_counts`) at the operator overhead"""
    launch_backward: float = 0.0
    """the same for the backward's operators"""
    operators_forward: float = 0.0
    """operators of the forward"""
    operators: float = 0.0
    """operators of the forward and the backward"""
    optimizer_operators: float = 0.0
    """operators of one optimizer step over the rank's parameter tensors"""

    @property
    def forward(self) -> float:
        return self.matmul + self.memory_forward + self.launch_forward

    @property
    def total(self) -> float:
        """Forward and backward seconds (without recomputation)."""
        return self.forward + 2 * self.matmul + self.memory_backward + self.launch_backward


def padded_attention_factor(cfg: ModelConfig, kernel: str) -> float:
    """The attention FLOPs the kernel computes over the model's: (qk + qk) / (qk + v) when MLA's
    values are padded to the query width ('padded'), 1 otherwise."""
    qk, v = attention_head_dims(cfg)
    _, attended = attended_head_dims(cfg, kernel)
    return (qk + attended) / (qk + v)


def _busiest_micro_batch(
    cfg: ModelConfig, layout: Layout, cluster: Cluster, seq_len: int, tokens_mb: int
) -> MicroBatchSeconds:
    """The seconds of one micro-batch through the busiest pipeline rank's chunks: its matmul and
    attention FLOPs at the achieved rate, and, where the cluster gives them, its memory traffic at
    the elementwise bandwidth and its operators at the launch overhead. Under DualPipe a
    micro-batch passes one of the rank's two stages (half of them, on average)."""
    flops = flops_per_token_by_block(cfg, seq_len)
    matmul_rate = cluster.achieved_flops(layout.compute_dtype)
    # attention scores stay BF16 under FP8 matmuls; an fp32 layout computes them in fp32
    attention_rate = cluster.achieved_flops("fp32" if layout.compute_dtype == "fp32" else "bf16")
    share = 0.5 if layout.pp > 1 and layout.pp_schedule == "dualpipe" else 1.0
    kernel = resolved_attention_kernel(layout, cfg)
    attention_rate /= padded_attention_factor(cfg, kernel)
    elements = backward_elements = {}
    if cluster.elementwise_bandwidth:
        elements = forward_elements_by_block(cfg, seq_len, kernel)
        backward_elements = backward_elements_by_block(cfg, seq_len, kernel)
    ops = step_operators(cfg) if cluster.operator_overhead else None
    ops_by_block = ops.by_block(cfg) if ops else {}
    best: MicroBatchSeconds | None = None
    for pp_rank in range(layout.pp):
        blocks = blocks_of_rank(layout, cfg, pp_rank)
        per_token = sum(
            flops[b].matmul / 3 / matmul_rate + flops[b].attention / 3 / attention_rate for b in blocks
        )
        record = MicroBatchSeconds(
            pp_rank, blocks, share * moe_layers(cfg, blocks), share * tokens_mb * per_token
        )
        if elements:
            per_element = share * tokens_mb * layout.activation_bytes / cluster.elementwise_bandwidth
            record = replace(
                record,
                memory_forward=per_element * sum(elements[b] for b in blocks),
                memory_backward=per_element * sum(backward_elements[b] for b in blocks),
            )
        if ops:
            fwd = share * sum(ops_by_block[b].forward for b in blocks)
            bwd = share * sum(ops_by_block[b].backward for b in blocks)
            tensors = sum(1 for t in parameter_tensors(cfg) if t.block in blocks)
            record = replace(
                record,
                launch_forward=fwd * cluster.operator_overhead,
                launch_backward=bwd * cluster.operator_overhead,
                operators_forward=fwd,
                operators=fwd + bwd,
                optimizer_operators=tensors * ops.optimizer_per_tensor,
            )
        if best is None or record.total > best.total:
            best = record
    assert best is not None
    return best


def _optimizer_seconds(cfg: ModelConfig, layout: Layout, cluster: Cluster, pp_rank: int) -> float:
    """Seconds of one optimizer step on the first rank of pipeline rank `pp_rank`: the clipping's and
    AdamW's bytes over its parameter shard at the elementwise bandwidth, and their operators (per
    parameter tensor) at the launch overhead; 0 where the cluster gives neither."""
    if not (cluster.elementwise_bandwidth or cluster.operator_overhead):
        return 0.0
    rank = pp_rank * layout.dp_replicate * layout.dp_shard
    state = sharded_state(cfg, layout, rank)
    seconds = 0.0
    if cluster.elementwise_bandwidth:
        # the optimizer works on the fp32 master copy, or on the parameters where they are the master
        width = layout.master_bytes or layout.param_bytes
        moved = state.param_elements * optimizer_elements_per_parameter() * width
        seconds += moved / cluster.elementwise_bandwidth
    if cluster.operator_overhead:
        seconds += state.param_tensors * step_operators(cfg).optimizer_per_tensor * cluster.operator_overhead
    return seconds


def sharded_bytes(cfg: ModelConfig, layout: Layout, rank: int) -> dict[str, float]:
    """Parameter, gradient and optimizer-moment bytes of global rank `rank` (exact)."""
    state = sharded_state(cfg, layout, rank)
    return {
        "parameters": state.param_elements * layout.param_bytes,
        "gradients": state.param_elements * layout.grad_bytes,
        "optimizer": state.optimizer_bytes(layout),
    }
