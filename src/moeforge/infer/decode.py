"""The decoding step: one forward of a few new tokens over the static KV caches, built for the compiler.

`decode_forward` is `Transformer.forward` for decoding. It runs the same blocks over the same caches,
with two differences that keep every shape static and the graph free of host syncs, so that
`torch.compile` takes the whole step as one graph (and, on CUDA, replays it as a CUDA graph):

- an MoE layer computes its few tokens without dispatch (`moe_output`): the chosen experts' weights
  are gathered per token and applied as batched matmuls, instead of sorting and counting the tokens
  per expert (a `bincount` has a data-dependent shape);
- nothing is measured: no balance losses, no tokens per expert.

Its logits equal the full forward's up to float rounding (tests/test_generate.py checks the tokens).
`decode_step(compile=...)` returns the eager function or the compiled one, compiled once per process.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

from moeforge.model.attention import cache_slots
from moeforge.model.mlp import swiglu
from moeforge.model.moe import MoE
from moeforge.model.moe.experts import (
    grouped_mm_unsupported_reason,
    grouped_swiglu,
    group_row_align,
    looped_swiglu,
)
from moeforge.model.transformer import Transformer

DecodeStep = Callable[
    [Transformer, torch.Tensor, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]
]


def decode_forward(
    model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor, pad: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, S, vocab] and the final normalised hidden state [B, S, dim] of tokens [B, S] at
    cache slots `input_pos` [S], rows left-padded by `pad` [B] (None: no padding). Writes their keys
    and values into the caches (`model.setup_caches` first)."""
    slots = cache_slots(input_pos, model.cache_len, pad)
    cos, sin = model.rope_at(model.positions(input_pos, pad))
    h = model.tok_embeddings(tokens)
    for block in model.layers:
        h = block.attend(h, cos, sin, slots)
        x = block.ffn_norm(h)
        h = h + (moe_output(block.ffn, x) if isinstance(block.ffn, MoE) else block.ffn(x))
    hidden = model.norm(h)
    return model.output(hidden), hidden


def moe_output(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE layer's output for the few tokens x [B, S, dim] of a decoding step, [B, S, dim].

    The layer's own router; then, instead of its dispatch (sort, `bincount`, grouped GEMM), each
    token's k chosen experts' weights are gathered and applied as batched matmuls, gate-weighted and
    summed: static shapes, and only the active experts are read. (The grouped GEMM does not compile
    in fp32 on CPU, and on CPU it runs one GEMM per expert, empty or not.) Gathering copies N*k
    experts, which suits the few tokens of decoding, not a large batch.
    """
    tokens = x.reshape(-1, x.shape[-1])
    routing = moe.route(tokens)
    w13, w2 = moe.experts.local_weights()
    chosen = routing.expert_indices  # [N, k]
    hidden = swiglu(torch.matmul(tokens[:, None, None, :], _rows(w13, chosen)))  # [N, k, 1, hidden]
    per_expert = torch.matmul(hidden, _rows(w2, chosen)).squeeze(2)  # [N, k, dim]
    routed = torch.bmm(routing.gates.to(x.dtype).unsqueeze(1), per_expert).squeeze(1)
    return moe.add_shared_output(routed, moe.shared_output(tokens)).view_as(x)


def grouped_moe_output(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE layer's output for many tokens x [B, S, dim] (a prefill, a large batch), [B, S, dim],
    with static shapes so that a compiled step takes it in one graph.

    The layer's own router; the N*k (token, expert) rows sorted by expert and counted into a
    fixed-size [E] tensor (where the training dispatch's `bincount` has a data-dependent size);
    each expert's rows through `expert_swiglu` (the grouped GEMM, an opaque call to the compiler);
    then each token's k outputs gate-weighted and summed, in slot order (deterministic). The same
    numbers as the layer's forward up to float rounding, without its load statistics.
    """
    tokens = x.reshape(-1, x.shape[-1])
    routing = moe.route(tokens)
    n_tokens, top_k = routing.expert_indices.shape
    chosen = routing.expert_indices.reshape(-1)  # assignment a = token * k + slot
    order = torch.argsort(chosen, stable=True)  # row r of the grouped rows is assignment order[r]
    counts = torch.zeros(moe.router.n_experts, dtype=torch.long, device=x.device).index_add_(
        0, chosen, torch.ones_like(chosen)
    )
    w13, w2 = moe.experts.local_weights()
    grouped = expert_swiglu(tokens.index_select(0, order // top_k), w13, w2, counts)  # [N*k, dim]
    per_slot = torch.empty_like(grouped).index_copy_(0, order, grouped).view(n_tokens, top_k, -1)
    routed = torch.bmm(routing.gates.to(x.dtype).unsqueeze(1), per_slot).squeeze(1)
    return moe.add_shared_output(routed, moe.shared_output(tokens)).view_as(x)


@torch.library.custom_op("moeforge::expert_swiglu", mutates_args=())
def expert_swiglu(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, tokens_per_expert: torch.Tensor
) -> torch.Tensor:
    """Each expert's SwiGLU on its group of the rows x [R, dim] grouped by expert, [R, dim]: the
    grouped GEMM where torch supports the operands, else a loop over the experts. An opaque call to
    the compiler: torch 2.13's `_grouped_mm` has no fp32 meta kernel, and the loop reads the group
    sizes on the host."""
    if grouped_mm_unsupported_reason(x, w13, w2) is None:
        return grouped_swiglu(x, w13, w2, tokens_per_expert, group_row_align(x))
    return looped_swiglu(x, w13, w2, tokens_per_expert)


@expert_swiglu.register_fake
def _(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w2.shape[-1])


def _rows(weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """weights[chosen], [N, k, ...]: by `index_select`, a plain copy per expert, which runs at copy
    speed on CPU where advanced indexing takes longer (eager; compiled, both fuse the same;
    docs/benchmarks/source-figures.md)."""
    return weights.index_select(0, chosen.reshape(-1)).view(*chosen.shape, *weights.shape[1:])


CPU_COMPILE_OPTIONS = {"cpp_wrapper": True}
"""inductor's options for a step compiled on the CPU: its C++ kernels called from a generated C++
wrapper instead of Python. A small model's step calls a hundred small kernels, and calling each from
Python is a sizeable share of the step (docs/benchmarks/serve.md); the wrapper compiles a few seconds
longer."""


def compile_settings(device_type: str) -> dict:
    """`torch.compile`'s mode or options for a decoding step on this device type: on CUDA
    "reduce-overhead", the step recorded once as a CUDA graph and replayed, so no kernel launch costs
    host time; on the CPU `CPU_COMPILE_OPTIONS`."""
    return {"mode": "reduce-overhead"} if device_type == "cuda" else {"options": CPU_COMPILE_OPTIONS}


@functools.cache
def _compiled(device_type: str) -> DecodeStep:
    # fullgraph: a graph break would be a host round trip inside the step; better an error.
    # dynamic=False: one specialised graph per batch size and cache length (a run has one of each).
    return torch.compile(decode_forward, fullgraph=True, dynamic=False, **compile_settings(device_type))


def decode_step(compile: bool, device: torch.device) -> DecodeStep:
    """`decode_forward`, or its compiled form for `device` (compiled at its first call, then cached)."""
    return _compiled(device.type) if compile else decode_forward


def steady_state(compile: bool) -> contextlib.AbstractContextManager:
    """Around a decoding loop of a compiled step: skip the guards dynamo checks at every call that
    cannot tell its graphs apart (a sizeable share of a small model's step: docs/decoding.md).
    Safe inside one loop: the same model, caches and shapes at every step."""
    return torch.compiler.set_stance(skip_guard_eval_unsafe=True) if compile else contextlib.nullcontext()
