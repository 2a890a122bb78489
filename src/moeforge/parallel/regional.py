"""Per-block wrappers applied to a plain `Transformer` from outside: activation checkpointing and
regional `torch.compile` (torchtitan's order: expert parallelism, then these, then FSDP).

Both keep every module where it was, under its own name: checkpointing replaces a module's
`forward` on the instance, compilation is `nn.Module.compile()` (the module's call compiled in
place). State-dict keys, FSDP units, the pipeline's stage chunks and the trainer's per-layer load
rows therefore see the same modules with or without them.

**Activation checkpointing** (`torch.utils.checkpoint`, non-reentrant): 'block' recomputes each
whole block (main and MTP) in the backward, 'experts' only the routed experts' grouped GEMMs and
SwiGLU, the largest activations of an MoE block ([N*k, 2*hidden] and [N*k, hidden] per layer).
What a block *measured* is not recomputed into the step: the load counts and balance losses come
back in the first forward's `MoEStats`, the recomputation's copy is dropped, and `recomputing()`
lets a forward hook (the pipeline's) skip it. The router's jitter is drawn again from the saved RNG
state, so the recomputed routing is the same routing.

**Regional compilation**: one compiled graph per block, so compile time grows with the number of
distinct block shapes (dense, MoE, MTP), not with the depth. Three parts of an MoE block stay eager
on purpose:
  * torch.bincount (the dispatcher's and the stats' tokens per expert) has a data-dependent output
    size for dynamo; `capture_dynamic_output_shape_ops` lets it trace the count on the device
    instead of breaking the graph (the counts never reach the host inside the step);
  * fp32 grouped GEMMs: torch 2.13's meta kernel of `torch._grouped_mm` accepts bf16 only (eager
    CPU runs fp32), so the experts run eagerly unless they compute in bf16 (CUDA autocast); their
    gated SwiGLU between the two GEMMs is then compiled on its own;
  * the all-to-all dispatcher (expert parallelism) needs the split sizes on the host: its exchanges
    run outside the graph.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moeforge.model.moe import MoE
from moeforge.model.moe.dispatch import LocalDispatcher
from moeforge.model.mlp import reference_swiglu
from moeforge.model.moe.experts import compute_dtype
from moeforge.model.transformer import Block

ACTIVATION_CHECKPOINT = ("none", "experts", "block")

_recomputing = contextvars.ContextVar("moeforge_recomputing", default=False)


def recomputing() -> bool:
    """True while activation checkpointing re-runs a forward in the backward (not compiled: a
    compiled block recomputes inside its backward graph, without running Python hooks)."""
    return _recomputing.get()


@contextlib.contextmanager
def _recomputation() -> Iterator[None]:
    token = _recomputing.set(True)
    try:
        yield
    finally:
        _recomputing.reset(token)


def _marked_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`checkpoint`'s context_fn: nothing around the forward, the `recomputing()` flag around the
    recomputation."""
    return contextlib.nullcontext(), _recomputation()


def apply_block_wrappers(model: nn.Module, activation_checkpoint: str = "none", compile: bool = False) -> None:
    """Activation checkpointing ('none' | 'experts' | 'block') and, with `compile`, regional
    compilation, on every block of `model` (a `Transformer` or a pipeline `StageModel`), in place.
    Call after expert parallelism and before FSDP."""
    if activation_checkpoint not in ACTIVATION_CHECKPOINT:
        raise ValueError(f"activation_checkpoint: {activation_checkpoint!r} is not one of {ACTIVATION_CHECKPOINT}")
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    for block in blocks:
        if isinstance(block.ffn, MoE) and activation_checkpoint == "experts":
            checkpoint_forward(block.ffn.experts, marked=not compile)
        if activation_checkpoint == "block":
            checkpoint_forward(block, marked=not compile)
        if compile:
            compile_block(block)


def checkpoint_forward(module: nn.Module, marked: bool = True) -> None:
    """Recompute `module`'s forward in the backward instead of saving its activations (non-reentrant
    checkpointing; the RNG state is restored for the recomputation). `marked`: `recomputing()` is
    True during the recomputation (dynamo traces only checkpoints without such a context)."""
    forward = module.forward
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if marked:
        kwargs["context_fn"] = _marked_contexts

    @functools.wraps(forward)
    def checkpointed(*args: Any, **call_kwargs: Any) -> Any:
        return checkpoint(forward, *args, **kwargs, **call_kwargs)

    module.forward = checkpointed


def compile_block(block: Block) -> None:
    """`torch.compile` the block's call in place, with an MoE layer's non-traceable parts left eager
    (module docstring)."""
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    if isinstance(block.ffn, MoE):
        _eager_parts_of(block.ffn)
    block.compile()


def compile_moe(moe: MoE) -> None:
    """`torch.compile` a lone MoE layer's call in place, exactly as `compile_block` compiles it inside
    a block (for benchmarks, and for users who compile their own models around moeforge's layer)."""
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    _eager_parts_of(moe)
    moe.compile()


def _eager_parts_of(moe: MoE) -> None:
    """The parts of `moe` that stay outside the compiled graph: fp32 grouped GEMMs (with the SwiGLU
    between them compiled on its own) and an all-to-all dispatcher's exchanges."""
    _eager_unless_bf16(moe.experts)
    if not isinstance(moe.dispatcher, LocalDispatcher):
        _run_eagerly(moe.dispatcher, ("dispatch", "combine", "start_dispatch", "start_combine"))


def _eager_unless_bf16(experts: nn.Module) -> None:
    """The experts' forward outside the compiled graph unless its grouped GEMMs run in bf16."""
    forward = experts.forward
    eager = torch.compiler.disable(
        forward, reason="torch._grouped_mm has no fp32 meta kernel: fp32 grouped GEMMs run eagerly"
    )

    @functools.wraps(forward)
    def experts_forward(
        x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, row_gates: torch.Tensor | None = None
    ) -> torch.Tensor:
        traceable = experts.backend == "grouped" and compute_dtype(x_sorted) == torch.bfloat16
        return (forward if traceable else eager)(x_sorted, tokens_per_expert, row_gates)

    experts.forward = experts_forward
    experts.activation = _compiled_swiglu()


@functools.cache
def _compiled_swiglu() -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """The experts' gated SwiGLU compiled on its own (one kernel forward, one backward, where eager
    runs several passes over [rows, hidden]; docs/benchmarks/moe.md), so that it runs compiled
    between the fp32 grouped GEMMs that stay eager; shared by all blocks (one graph per row count)."""
    return torch.compile(reference_swiglu, dynamic=False)


def _run_eagerly(obj: Any, methods: tuple[str, ...]) -> None:
    """Each of `obj`'s `methods` outside any compiled graph (they sync with the host)."""
    for name in methods:
        method: Callable[..., Any] = getattr(obj, name)
        setattr(obj, name, torch.compiler.disable(method, reason="the all-to-all needs split sizes on the host"))
