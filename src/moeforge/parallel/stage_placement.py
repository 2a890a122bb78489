"""Which blocks form each pipeline stage, and which pp rank runs each stage.

Placement of stages on ranks (DualPipeV / ZBV paper figures):
    loop  (1F1B, interleaved 1F1B)  stage s on rank s % pp; rank r holds r, r+pp, r+2pp, ...
    V     (ZBV, DualPipeV)          rank r holds stages r and 2pp-1-r: the first and the last stage
                                    share rank 0.
"""

from __future__ import annotations


def stage_rank(stage: int, pp: int, style: str) -> int:
    """The pp rank that runs `stage` (module docstring: loop or V placement)."""
    if style == "v":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def rank_stages(rank: int, pp: int, n_stages: int, style: str) -> list[int]:
    """The stages of pp rank `rank`, in increasing order (the order torch's schedules expect)."""
    return [s for s in range(n_stages) if stage_rank(s, pp, style) == rank]


def block_ranges(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous block ranges, one per stage, sizes differing by at most one (earlier stages get
    fewer: they also hold the embedding)."""
    if n_stages > n_layers:
        raise ValueError(f"parallel.pp: {n_stages} stages need at least as many blocks, got {n_layers}")
    return [range(s * n_layers // n_stages, (s + 1) * n_layers // n_stages) for s in range(n_stages)]


def ranges_of_counts(counts: list[int]) -> list[range]:
    """[2, 3, 1] -> [range(0, 2), range(2, 5), range(5, 6)]: each stage's blocks."""
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return [range(start, start + count) for start, count in zip(starts, counts)]
