"""Routed SwiGLU experts computed as one grouped GEMM over variable-sized token groups (dropless).

Weights are 3-D, one slice per expert, laid out [in, out] so a group computes `x @ w[e]`:
`w13` [E, dim, 2*hidden] fuses the gate (columns [:hidden]) and up (columns [hidden:]) projections,
`w2` [E, hidden, dim] is the down projection. The fused [in, out] layout makes the gate and up
projections one GEMM, and spares the copies that separate [out, in] weights used transposed would
need: their weight gradients come out transposed (docs/benchmarks/source-figures.md).

Backends:
- 'grouped': `torch._grouped_mm`, one call per projection with `offs` = int32 cumulative counts and
  no device-to-host sync. On CUDA (bf16) it is one grouped kernel; on CPU torch runs it as a loop of
  GEMMs over the groups, so there it is about as fast as 'loop' (`moeforge bench moe` measures both).
- 'loop': a plain matmul per expert (needs the counts on the host); the reference, and the fallback
  when grouped cannot run (see `grouped_mm_unsupported_reason`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor
from torch import nn

from moeforge.config import ConfigError
from moeforge.model.mlp import swiglu

BACKENDS = ("grouped", "loop")

# CUDA grouped GEMM kernels want every group to start on a multiple of 16 rows.
CUDA_ROW_ALIGN = 16

CPU_BF16_ROW_ALIGN = 64
"""Rows each group is padded to a multiple of in bf16 on the CPU. There `torch._grouped_mm` runs one
oneDNN GEMM per group, and oneDNN compiles a kernel for every new GEMM shape (bf16 matrix units):
with the expert loads changing every step, nearly every group's GEMM would be a new shape and pay
that compilation. Padded to a multiple of 64 rows the shapes repeat and the kernels are reused;
64 was the fastest alignment tried (docs/benchmarks/train.md, "bf16 on a CPU with AMX")."""


class RoutedExperts(nn.Module):
    """`RoutedExperts(E, dim, hidden)(x_sorted [N, dim], tokens_per_expert [E], row_gates [N] | None)
    -> [N, dim]`.

    Rows of `x_sorted` are grouped by expert in expert order: the first `tokens_per_expert[0]` rows
    go to expert 0, and so on. Any count may be zero. With `row_gates`, each output row is scaled by
    its gate, applied on the hidden activations: g * w2(silu(a) * b) = w2(g * silu(a) * b).
    """

    def __init__(self, n_experts: int, dim: int, hidden: int, backend: str = "grouped"):
        super().__init__()
        if backend not in BACKENDS:
            raise ConfigError(f"backend: got {backend!r}; allowed: {' | '.join(map(repr, BACKENDS))}")
        self.backend = backend
        self.activation: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] = swiglu
        """the gated SwiGLU between the two grouped GEMMs (`model.mlp.swiglu`); `--train.compile`
        puts a compiled one here when the fp32 grouped GEMMs around it have to stay eager"""
        self.w13 = nn.Parameter(torch.empty(n_experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def init_weights(self, std: float, out_std: float | None = None) -> None:
        nn.init.normal_(self.w13, std=std)
        nn.init.normal_(self.w2, std=std if out_std is None else out_std)

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13, w2) of the experts on this device: all of them, or this rank's block of an
        expert-parallel DTensor."""
        return local_weight(self.w13), local_weight(self.w2)

    def forward(
        self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, row_gates: torch.Tensor | None = None
    ) -> torch.Tensor:
        w13, w2 = self.local_weights()
        if self.backend == "grouped":
            reason = grouped_mm_unsupported_reason(x_sorted, w13, w2)
            if reason is None:
                row_align = group_row_align(x_sorted)
                return grouped_swiglu(x_sorted, w13, w2, tokens_per_expert, row_align, row_gates, self.activation)
            warnings.warn(f"grouped experts fall back to the loop backend: {reason}", stacklevel=2)
        return looped_swiglu(x_sorted, w13, w2, tokens_per_expert, row_gates)


def local_weight(weight: torch.Tensor) -> torch.Tensor:
    """This rank's experts of an expert-parallel DTensor weight (the weight itself otherwise)."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


def grouped_mm_unsupported_reason(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> str | None:
    """Why `torch._grouped_mm` cannot run these operands here, or None when it can.

    Its kernels need every stride to be a multiple of 16 bytes (so dim and hidden must be multiples
    of 16 / element size), and on CUDA they take bf16 only (plain or autocast).
    """
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    dtype = compute_dtype(x)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"it takes float32, bfloat16 or float16, got {dtype}"
    per_16_bytes = 16 // dtype.itemsize
    dim, hidden = w2.shape[2], w2.shape[1]
    if dim % per_16_bytes or hidden % per_16_bytes:
        return f"dim={dim} and hidden={hidden} must be multiples of {per_16_bytes} for {dtype}"
    if x.is_cuda and dtype != torch.bfloat16:
        return f"on CUDA it needs bf16 (run under bf16 autocast), got {dtype}"
    return None


def group_row_align(x: torch.Tensor) -> int:
    """Rows each expert's group of `x` is padded to a multiple of before the grouped GEMMs: what the
    CUDA kernels want, and on the CPU in bf16 what lets oneDNN reuse its kernels; 1 (no padding)
    for fp32 on the CPU."""
    if x.is_cuda:
        return CUDA_ROW_ALIGN
    return CPU_BF16_ROW_ALIGN if compute_dtype(x) == torch.bfloat16 else 1


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else x's own dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def grouped_swiglu(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    row_align: int = 1,
    row_gates: torch.Tensor | None = None,
    activation: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] = swiglu,
) -> torch.Tensor:
    """SwiGLU of each group of rows with its expert's weights, as two grouped GEMMs, [N, dim]; each
    row scaled by its gate in `row_gates` [N] when given; `activation` computes the gated SwiGLU
    between the GEMMs.

    With `row_align` > 1 (`group_row_align`) each group is first copied into a zero-padded buffer in
    which it starts on a multiple of `row_align` rows; the buffer size is a static upper bound so
    that no device-to-host sync is needed, and the last group absorbs the slack rows (zeros): its
    size is that bound minus a multiple of `row_align`, so it repeats too.
    """
    dtype = compute_dtype(x)
    x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
    if row_align > 1:
        padded_rows, ends = aligned_group_layout(tokens_per_expert, x.shape[0], row_align)
        x_padded = x.new_zeros(padded_capacity(x.shape[0], ends.shape[0], row_align), x.shape[1])
        x_padded = x_padded.index_copy(0, padded_rows, x)
        if row_gates is not None:
            row_gates = row_gates.new_zeros(x_padded.shape[0]).index_copy(0, padded_rows, row_gates)
        out = _grouped_swiglu(x_padded, w13, w2, ends.to(torch.int32), row_gates, activation)
        return out.index_select(0, padded_rows)
    offs = tokens_per_expert.cumsum(0).to(torch.int32)
    return _grouped_swiglu(x, w13, w2, offs, row_gates, activation)


def _grouped_swiglu(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    offs: torch.Tensor,
    row_gates: torch.Tensor | None,
    activation: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    hidden = torch._grouped_mm(x, w13, offs=offs)
    out = torch._grouped_mm(activation(hidden, row_gates), w2, offs=offs)
    return contiguous_grad(out)


def aligned_group_layout(
    tokens_per_expert: torch.Tensor, n_rows: int, row_align: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row of each input row in the padded buffer [N], group ends in that buffer [E]).

    Group e starts at the sum of the earlier counts each rounded up to `row_align`; the last group
    ends at `padded_capacity`, the same for every routing.
    """
    counts = tokens_per_expert.long()
    n_experts = counts.shape[0]
    padded_counts = (counts + row_align - 1) // row_align * row_align
    padded_starts = padded_counts.cumsum(0) - padded_counts
    starts = counts.cumsum(0) - counts
    expert_of_row = torch.repeat_interleave(
        torch.arange(n_experts, device=counts.device), counts, output_size=n_rows
    )
    rank_in_group = torch.arange(n_rows, device=counts.device) - starts[expert_of_row]
    padded_rows = padded_starts[expert_of_row] + rank_in_group
    ends = padded_starts + padded_counts
    ends[-1] = padded_capacity(n_rows, n_experts, row_align)
    return padded_rows, ends


def padded_capacity(n_rows: int, n_experts: int, row_align: int) -> int:
    """round_up(N + E*(row_align-1), row_align): the most rows any routing of N rows pads to."""
    return -(-(n_rows + n_experts * (row_align - 1)) // row_align) * row_align


def looped_swiglu(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    row_gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference: one plain SwiGLU per expert on its slice of rows (gated by `row_gates` [N]
    when given), [N, dim]."""
    counts = tokens_per_expert.tolist()
    groups = x.split(counts)
    gates = [None] * len(counts) if row_gates is None else row_gates.split(counts)
    outs = [
        swiglu(group @ w13_e, gates_e) @ w2_e
        for group, gates_e, w13_e, w2_e in zip(groups, gates, w13.unbind(0), w2.unbind(0))
    ]
    return torch.cat(outs)


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """`x` itself, whose incoming gradient is made contiguous: `torch._grouped_mm`'s backward rejects
    stride-0 (expanded) gradients such as the one `out.sum().backward()` sends.

    A tensor hook rather than an identity autograd.Function, whose output would be a view: FSDP warns
    that an in-place op on a module's view output would skip its pre-backward hook.
    """
    if x.requires_grad:
        x.register_hook(torch.Tensor.contiguous)
    return x
