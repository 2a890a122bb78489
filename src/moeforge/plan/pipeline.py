"""Pipeline bubbles and in-flight activations of each schedule, by the formulas their papers give.

F, B, W are the times of one model chunk's forward, backward-for-inputs and backward-for-weights on
one micro-batch (B + W is the whole backward; 1F1B does them together). PP = pipeline ranks.

    1F1B          (PP-1)(F+B+W)                      Megatron-LM (Narayanan et al. 2021)
    interleaved   (PP-1)(F+B+W)/v, v chunks per rank  same paper, §2.2
    ZB-V          (PP-1)(F+B-2W), per chunk           Zero Bubble PP (Qi et al. 2024), ZB-V
    DualPipe      (PP/2-1)(F&B + B+W - 3W), per chunk DeepSeek-V3 §3.2.1, table 2, whose B is the
                                                      full backward (here B+W); F&B = F+B+W, the
                                                      overlapped pair's compute
    DualPipeV     the same with DeepSeek's PP = stages = 2 x ranks: (PP-1)(F&B + B+W - 3W) (the
                  DualPipe repository's table: DualPipeV runs PP stages on PP/2 devices)
"""

from __future__ import annotations

from moeforge.plan.layout import Layout


def bubble_time(layout: Layout, forward: float, backward_input: float, backward_weight: float) -> float:
    """Idle seconds per step of one pipeline rank, from the times of one micro-batch through all of
    this rank's chunks (`forward`, `backward_input`, `backward_weight`)."""
    pp = layout.pp
    if pp == 1:
        return 0.0
    chunks = layout.chunks_per_rank()
    f, b, w = forward / chunks, backward_input / chunks, backward_weight / chunks
    schedule = layout.pp_schedule
    if schedule in ("1f1b", "interleaved"):  # interleaved: chunk times are 1/v of the rank's
        return (pp - 1) * (f + b + w)
    if schedule == "zbv":
        return max(0.0, (pp - 1) * (f + b - 2 * w))
    # dualpipe holds one stage per direction: its chunk is one stage, F&B overlaps two of them;
    # dualpipev folds DeepSeek's stages in a V, two per rank
    stages = 2 * pp if schedule == "dualpipev" else pp
    return max(0.0, (stages / 2 - 1) * ((f + b + w) + (b + w) - 3 * w))


def activations_in_flight(layout: Layout, n_micro: int, pp_rank: int = 0) -> float:
    """Micro-batches' worth of activations pipeline rank `pp_rank` holds at its peak, in units of one
    micro-batch through all of the rank's chunks: 1F1B and ZB-V hold PP - rank (the first rank PP);
    interleaved PP - rank + (PP-1)/v (Megatron-LM §2.2); DualPipe PP+1 stages on every rank, each
    half of the rank's two (DeepSeek-V3 table 2), DualPipeV 2PP+1 chunks of two (the DualPipe
    repository's PP+1, its PP counting stages, twice the ranks). Never more than the micro-batches
    there are."""
    pp = layout.pp
    if pp == 1:
        return 1.0
    schedule = layout.pp_schedule
    if schedule == "interleaved":
        held = pp - pp_rank + (pp - 1) / layout.pp_virtual
    elif schedule == "dualpipe":
        held = (pp + 1) / 2
    elif schedule == "dualpipev":
        held = (2 * pp + 1) / 2
    else:
        held = pp - pp_rank
    return min(held, float(n_micro))


def min_micro_batches(layout: Layout) -> int:
    """Micro-batches a step needs for the schedule to fill: PP, or 2 x PP for DualPipe(V)."""
    if layout.pp == 1:
        return 1
    return 2 * layout.pp if layout.pp_schedule in ("dualpipe", "dualpipev") else layout.pp
