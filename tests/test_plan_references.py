"""The planner against published runs (issue 15, item 3). Each test states the figure, its source,
the layout the source gives and the tolerance, +-25 %. The achievable fractions are the cluster
presets' (src/moeforge/plan/clusters/*.toml), fixed from hardware facts before any comparison; a
reference that misses is an xfail(strict) whose reason says which assumption explains it (README,
"Planning a run")."""

from __future__ import annotations

import pytest

from moeforge.config import load_config
from moeforge.diloco.wire import WireFormat
from moeforge.plan import Layout, TrainingShape, load_cluster, plan_layout
from moeforge.plan.comm import all_gather_bytes, bandwidth_for_utilisation, diloco_message_bytes, ring_bytes

TOLERANCE = 0.25


def within(planned: float, published: float) -> bool:
    return abs(planned / published - 1) <= TOLERANCE


def deepseek_v3_layout() -> Layout:
    """DeepSeek-V3 technical report §3.2 and §3.3: PP16 with DualPipe, EP64 over 8 nodes, ZeRO-1
    data parallelism, no TP; FP8 matmuls (attention scores stay BF16); BF16 parameters with FP32
    master weights and gradients, BF16 AdamW moments; FP8 dispatch (one fp32 scale per 128 values),
    BF16 combine; a token crosses to each of its <= 4 nodes once (node-limited routing, then NVLink);
    recomputation of RMSNorm and MLA up-projections ('selective'); fused attention. The micro-batch
    size is not published: one sequence."""
    return Layout(
        pp=16,
        pp_schedule="dualpipe",
        ep=64,
        data_sharding="zero1",
        compute_dtype="fp8",
        param_bytes=2,
        grad_bytes=4,
        master_bytes=4,
        moment_bytes=2,
        dispatch_bytes=1 + 4 / 128,
        combine_bytes=2,
        dispatch_dedup="node",
        recompute="selective",
        attention_kernel="fused",
        micro_batch_size=1,
    )


DEEPSEEK_MISS = (
    "planned 131K (-27 %): the FP8 fraction is assumed equal to the BF16 one (FP8 matmuls twice as "
    "fast), while DeepSeek-V3's fine-grained FP8 (1x128/128x128 scales, promotion to CUDA cores every "
    "128 products, §3.3) and its 20 of 132 SMs reserved for communication (§3.2.2) take part of that "
    "away; with the stage split as even as possible instead of balanced by FLOPs (the split is not "
    "published) the plan is 144K (-20 %)"
)


@pytest.mark.xfail(strict=True, reason=DEEPSEEK_MISS)
def test_deepseek_v3_gpu_hours_per_trillion_tokens():
    """Published: 180K H800 GPU-hours per trillion pre-training tokens (DeepSeek-V3 technical report,
    §1 and table 1: 2664K GPU-hours for 14.8T tokens), on 2048 H800 with batch 15360 x 4096 tokens."""
    cfg = load_config("deepseek-v3-671b")
    layout = deepseek_v3_layout().validate(2048, 8)
    plan = plan_layout(cfg.model, layout, load_cluster("h800"), TrainingShape(15360, 4096))
    assert within(plan.gpu_hours_per_trillion_tokens, 180e3), plan.gpu_hours_per_trillion_tokens


def torchtitan_b200_layout(**formats) -> Layout:
    """The PyTorch/Nebius blog's layout could not be read from the material available when this test
    was written; assumed, and declared before planning: torchtitan's shipped DeepSeek-V3-671B config
    (local batch 4 x 4096 tokens, full activation checkpointing, FSDP over every GPU with a BF16
    MixedPrecisionPolicy: BF16 all-gathers, FP32 reduce-scatters, fused attention) with EP32 (4 nodes)."""
    return Layout(
        ep=32,
        micro_batch_size=4,
        recompute="full",
        attention_kernel="fused",
        activation_bytes=2,
        gather_bytes=2,
        **formats,
    )


B200_MISS = (
    "planned ~1010 and ~1580 tokens/s per GPU: the B200 preset carries Hopper's measured 40 % BF16 "
    "fraction (no B200 figure was found) and the blog's layout is assumed; MXFP8 is applied to every "
    "matmul, the blog to the routed experts' grouped GEMMs only"
)


@pytest.mark.xfail(strict=True, reason=B200_MISS)
@pytest.mark.parametrize(
    "published, formats",
    [
        (651, {}),  # BF16 baseline, all-to-all by torch.distributed
        (918, {"dispatch_dedup": "node", "compute_dtype": "fp8"}),  # DeepEP + MXFP8
    ],
)
def test_torchtitan_deepseek_v3_671b_on_256_b200(published, formats):
    """Published: 651 tokens/s per GPU (BF16 baseline) and 918 with DeepEP + MXFP8, DeepSeek-V3-671B
    with torchtitan on 256 B200 (PyTorch blog, 'Enabling Up to 41% Faster Pre-training: MXFP8 and
    DeepEP for DeepSeek-V3 on B200 with TorchTitan')."""
    cfg = load_config("deepseek-v3-671b")
    layout = torchtitan_b200_layout(**formats).validate(256, 8)
    plan = plan_layout(cfg.model, layout, load_cluster("b200"), TrainingShape(256 * 4, 4096))
    assert within(plan.tokens_per_s_per_gpu, published), plan.tokens_per_s_per_gpu


STREAMING_MODELS = {
    # Chinchilla-style models as the Streaming DiLoCo paper describes its scales; fragments of 3
    # layers each (the paper's choice): 1B has 24 layers -> 8 fragments, 100B 80 layers -> 27.
    "1B": (1e9, 8, 222.3, 2.0),
    "100B": (100e9, 27, 390.7, 1.1),
}


def streaming_diloco_bandwidth(params: float, fragments: int, dp_gbits: float) -> float:
    """Gbit/s Streaming DiLoCo needs for 95 % compute utilisation (H = 100, tau = 1, FP4 E3M0 outer
    gradients with one fp32 scale per 128 values, M = 2 replicas), by the planner's DiLoCo model, at
    the step time implied by the paper's own data-parallel figure (the paper's simulated step times
    are not restated here): data parallelism all-reduces BF16 gradients every step, hidden behind
    the backward (2/3 of the step)."""
    dp_bits = 8 * ring_bytes(2 * params, 2, all_reduce=True)
    step_s = dp_bits / (dp_gbits * 1e9) / (2 / 3 + (1 / 0.95 - 1))
    assert bandwidth_for_utilisation(dp_bits, 1, 2 / 3 * step_s, step_s, 0.95) == pytest.approx(
        dp_gbits * 1e9
    )
    wire = all_gather_bytes(diloco_message_bytes(int(params / fragments), WireFormat("fp4-e3m0", 128)), 2)
    return bandwidth_for_utilisation(8 * wire, fragments / 100, 1 * step_s, step_s, 0.95) / 1e9


DILOCO_MISS = (
    "the planner hides a fragment's exchange behind tau = 1 whole steps only; the paper's simulator "
    "also overlaps the backward pass and its fragment counts and tau per scale are not in the material "
    "available here (planned 3.2 and 2.3 Gbit/s)"
)


@pytest.mark.xfail(strict=True, reason=DILOCO_MISS)
@pytest.mark.parametrize("scale", ["1B", "100B"])
def test_streaming_diloco_bandwidth_for_95_percent_utilisation(scale):
    """Published: 95 % compute utilisation needs 222.3 Gbit/s with data parallelism and 2.0 Gbit/s
    with Streaming DiLoCo (overlap, FP4) at 1B parameters; 390.7 vs 1.1 at 100B (Douillard et al.
    2025, 'Streaming DiLoCo with overlapping communication', arXiv 2501.18512, simulation table)."""
    params, fragments, dp_gbits, published = STREAMING_MODELS[scale]
    assert within(streaming_diloco_bandwidth(params, fragments, dp_gbits), published)


def test_a_pytorch_databricks_shaped_run_fits():
    """The PyTorch/Databricks 'Training MoEs at Scale with PyTorch' post trains on 3,000+ GPUs with
    HSDP + EP but names no model to check a figure against; a layout of that shape for
    DeepSeek-V3-671B on 3072 H100 (HSDP 6 x 512, EP8 inside a node, full recomputation, moeforge's
    fp32 state) fits in 80 GB and is one moeforge runs today."""
    cfg = load_config("deepseek-v3-671b")
    layout = Layout(dp_replicate=6, dp_shard=512, ep=8, recompute="full").validate(3072, 8)
    plan = plan_layout(cfg.model, layout, load_cluster("h100"), TrainingShape(15360, 4096))
    assert plan.fits and plan.runnable_now, plan.memory
