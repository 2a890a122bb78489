"""Tables for people and dicts for `--json`: one plan in detail, or a search's ranking."""

from __future__ import annotations

from moeforge.plan.step_time import Plan

GB = 1e9


def _gb(value: float) -> str:
    return f"{value / GB:8.2f} GB"


def _seconds(value: float) -> str:
    return f"{value:9.3f} s"


def format_plan(plan: Plan) -> str:
    """A readable report of one plan: layout, memory per GPU, traffic per step, time."""
    mem, comm = plan.memory, plan.communication
    peak = "FP32" if plan.layout.compute_dtype == "fp32" else "BF16"
    fit = "fits" if plan.fits else "DOES NOT FIT"
    lines = [
        f"layout      {plan.layout.describe()}",
        f"cluster     {plan.cluster}, {plan.world_size} GPUs; {plan.micro_batches} micro-batches per step, "
        f"{plan.tokens_per_step:,} tokens per step",
        f"runnable    {'yes, by moeforge today' if plan.runnable_now else 'no (beyond what moeforge runs today)'}",
        "",
        "memory per GPU (busiest rank)",
        f"  parameters            {_gb(mem.parameters)}",
        f"  gradients             {_gb(mem.gradients)}",
        f"  optimizer states      {_gb(mem.optimizer)}",
        f"  activations           {_gb(mem.activations)}",
        f"  communication buffers {_gb(mem.communication_buffers)}",
        f"  DiLoCo state          {_gb(mem.diloco_state)}",
        f"  total                 {_gb(mem.total)}  of {plan.hbm_bytes / GB:.0f} GB: {fit}",
        "",
        "per step, per GPU",
        f"  FLOPs per token                {plan.flops_per_token:.3e}",
        f"  all-to-all rows per token/layer {comm.all_to_all_rows_per_token:.2f} "
        f"({comm.all_to_all_network_rows_per_token:.2f} leave the node)",
        f"  all-to-all bytes: NVLink {_gb(comm.all_to_all_nvlink_bytes)}, network {_gb(comm.all_to_all_network_bytes)}",
        f"  {plan.layout.data_sharding} bytes {_gb(comm.data_parallel_bytes)} "
        f"({'network' if comm.data_parallel_over_network else 'NVLink'})",
        f"  pipeline sends {_gb(comm.pipeline_bytes)}",
    ]
    if plan.diloco is not None:
        d = plan.diloco
        lines.append(
            f"  DiLoCo: {_gb(d.bytes_per_sync)} per fragment exchange per replica, {d.syncs_per_step:.3f} per step; "
            f"{d.bandwidth_to_hide_bits / 1e9:.2f} Gbit/s per replica for 95 % compute"
        )
    lines += [
        "",
        "time per step",
        f"  compute                 {_seconds(plan.compute_s)}",
        *_overhead_lines(plan),
        f"  all-to-all (exposed)    {_seconds(plan.exposed_all_to_all_s)}",
        f"  data-parallel (exposed) {_seconds(plan.exposed_data_parallel_s)}",
        f"  pipeline bubble         {_seconds(plan.bubble_s)}",
        f"  DiLoCo (exposed)        {_seconds(plan.exposed_diloco_s)}",
        f"  step                    {_seconds(plan.step_s)}   bound by {plan.bound_by}",
        f"  tokens/s {plan.tokens_per_s:,.0f} ({plan.tokens_per_s_per_gpu:,.1f} per GPU), MFU {plan.mfu:.1%} of {peak} peak, "
        f"{plan.gpu_hours_per_trillion_tokens / 1e3:,.1f}K GPU-hours per trillion tokens",
    ]
    return "\n".join(lines)


def _overhead_lines(plan: Plan) -> list[str]:
    """The step's memory-bound work, operator launches, optimizer and unhidden all-reduces, where the
    cluster gives their constants (none on the GPU presets: folded into their efficiency)."""
    if not (
        plan.memory_bound_s or plan.operator_launch_s or plan.optimizer_s or plan.communication.step_calls_s
    ):
        return []
    return [
        f"  memory-bound work       {_seconds(plan.memory_bound_s)}",
        f"  operator launches       {_seconds(plan.operator_launch_s)}   {plan.operators_per_step:,.0f} operators",
        f"  optimizer               {_seconds(plan.optimizer_s)}",
        f"  step all-reduces        {_seconds(plan.communication.step_calls_s)}",
    ]


def format_search(shown: list[tuple[int, Plan]], fitting: int, considered: int) -> str:
    """The ranked table of a search: `shown` (rank among the `fitting` layouts, plan), e.g. from
    `search.best_per_shape`."""
    if not shown:
        return f"no layout of the {considered} considered fits in memory"
    header = f"{'#':>4}  {'layout':<64} {'memory':>8} {'step':>8} {'tok/s/GPU':>10} {'MFU':>6}  {'bound by':<18} now"
    rows = [header, "-" * len(header)]
    for rank, plan in shown:
        rows.append(
            f"{rank:>4}  {plan.layout.describe():<64} {plan.memory.total / GB:6.1f}GB {plan.step_s:7.2f}s "
            f"{plan.tokens_per_s_per_gpu:10.1f} {plan.mfu:6.1%}  {plan.bound_by:<18} {'yes' if plan.runnable_now else ''}"
        )
    if not any(plan.runnable_now for _, plan in shown):
        rows.append("no layout that fits is one moeforge runs today (pp 1, FSDP/HSDP, BF16)")
    rows.append(
        f"the fastest layout of each pipeline shape; # = rank among the {fitting} of {considered} layouts that fit; "
        "now = moeforge runs it today (FSDP/HSDP + EP + DiLoCo)"
    )
    return "\n".join(rows)
