"""The matrix multiplications of one micro-batch, by shape: what a device's matmul rate must be
measured on.

A device does not multiply at one rate: on a CPU the model's GEMMs (a few hundred rows, widths of
64-512) run well below the rate of a 2048^3 GEMM, and per-expert GEMMs of a few dozen rows lower
still (docs/benchmarks/plan.md). `fp32-efficiency` ("the fraction of the FP32 peak that FP32 matmuls reach in a
training step") is therefore a property of the shapes as much as of the device: `moeforge bench
plan` times these shapes (forward and both backward products) on the machine and sets it from them,
a microbenchmark like the 2048^3 one, not a fit to any step time.

The shapes come from the model's own parameter tensors (`plan.tensors`): every 2-D weight [out, in]
outside the embedding is one GEMM [rows, in] x [in, out] (the head once more per MTP module); a routed expert's stacked weights give one
GEMM per local expert over the rows it receives under uniform routing (all ranks of the ep group
send it theirs); attention adds its two batched products per sequence and head.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.config import ModelConfig
from moeforge.plan.layout import attended_head_dims
from moeforge.plan.tensors import parameter_tensors, transformer_blocks


HEAD = "output.weight"


@dataclass(frozen=True)
class Gemm:
    """`calls` products [m, k] x [k, n] of one micro-batch's forward."""

    m: int
    k: int
    n: int
    calls: int = 1

    @property
    def training_flops(self) -> int:
        """Forward and backward (input and weight gradients): 3 products of 2*m*k*n each."""
        return 6 * self.m * self.k * self.n * self.calls


def micro_batch_gemms(
    cfg: ModelConfig, blocks: list[int], tokens: int, seq_len: int, ep: int = 1, attention_kernel: str = "fused"
) -> list[Gemm]:
    """The GEMMs of one micro-batch of `tokens` tokens through `blocks` (a rank's, as
    `plan.memory.blocks_of_rank` lists them), with the routed experts split over `ep` ranks; under
    the 'padded' attention kernel the weighted sum of the values runs query-wide."""
    gemms: list[Gemm] = []
    held = set(blocks)
    moe = cfg.moe
    for tensor in parameter_tensors(cfg):
        if tensor.block not in held or tensor.block == -1 or len(tensor.shape) < 2 or tensor.name == HEAD:
            continue
        if tensor.is_expert:  # [E, in, out], E/ep local experts each receiving ep*tokens*k/E rows
            n_experts, inner, outer = tensor.shape
            rows = max(1, round(ep * tokens * moe.top_k / n_experts))
            gemms.append(Gemm(rows, inner, outer, calls=n_experts // ep))
        else:  # nn.Linear [out, in]
            outer, inner = tensor.shape
            gemms.append(Gemm(tokens, inner, outer))
    if cfg.n_layers in held:  # the head, shared by the MTP modules (also when tied to the embedding)
        gemms.append(Gemm(tokens, cfg.dim, cfg.vocab_size, calls=1 + cfg.mtp_depth))
    qk, v = attended_head_dims(cfg, attention_kernel)
    sequences = max(1, tokens // seq_len)
    attending = transformer_blocks(cfg, blocks)
    if attending:
        calls = attending * sequences * cfg.n_heads
        gemms += [Gemm(seq_len, qk, seq_len, calls), Gemm(seq_len, seq_len, v, calls)]
    return _merged(gemms)


def _merged(gemms: list[Gemm]) -> list[Gemm]:
    """Equal shapes as one entry with their calls added, in first-seen order."""
    calls: dict[tuple[int, int, int], int] = {}
    for g in gemms:
        calls[(g.m, g.k, g.n)] = calls.get((g.m, g.k, g.n), 0) + g.calls
    return [Gemm(m, k, n, c) for (m, k, n), c in calls.items()]
