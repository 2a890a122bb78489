"""How many operators a training step dispatches, per block: a property of the software, like a
FLOP count. Each operator costs the host a roughly fixed time to launch (the dispatcher, autograd's
recording, the Python around it), `Cluster.operator_overhead`; where kernels are tiny that time is
a large part of the step.

The counts come from running the model: a copy of the config with every width shrunk (op counts do
not depend on widths; they do on the number of layers, experts, top-k and MTP depth, which are
kept) runs one forward, the loss and one backward under a `TorchDispatchMode` that counts every
aten call, forward and backward apart. Per-block counts come from differences between copies
with one more dense block, one more MoE block or one more MTP module. The optimizer's count per
parameter tensor comes from the clipping and a (second, steady-state) AdamW step over the shrunk
model's parameters. Counts are cached per config shape.

What is not counted: the expert-parallel dispatcher's own operators (the local dispatcher stands in
for it), FSDP's copy-in/copy-out around its collectives, and the trainer's per-step bookkeeping.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moeforge.config import ModelConfig
from moeforge.model.transformer import Transformer
from moeforge.parallel.parallelize import clip_grad_norm_


class OperatorCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while it is active (`count`)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_operators(fn: Callable[[], object]) -> int:
    """Aten operators `fn()` dispatches."""
    with OperatorCounter() as counter:
        fn()
    return counter.count


@dataclass(frozen=True)
class PassOperators:
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


@dataclass(frozen=True)
class StepOperators:
    """Operators of one micro-batch by block type, and of the optimizer step per parameter tensor."""

    dense_block: PassOperators
    moe_block: PassOperators
    mtp_module: PassOperators
    """one MTP module: its merge, its block (like the main model's last), norm, head and loss"""
    embedding_head_loss: PassOperators
    """the embedding, the final norm, the head, the loss and the sum of the balance losses"""
    optimizer_per_tensor: float
    """gradient clipping and one AdamW step (fused, as the trainer runs it), per tensor"""

    def by_block(self, cfg: ModelConfig) -> dict[int, PassOperators]:
        """Operators per micro-batch of each block, indexed as `plan.block_flops.flops_per_token_by_block`
        (the embedding's go with the head, at n_layers)."""
        ops = {-1: PassOperators(0.0, 0.0)}
        for b in range(cfg.n_layers):
            ops[b] = self.moe_block if cfg.is_moe_layer(b) else self.dense_block
        head = self.embedding_head_loss
        mtp = self.mtp_module
        ops[cfg.n_layers] = PassOperators(
            head.forward + cfg.mtp_depth * mtp.forward, head.backward + cfg.mtp_depth * mtp.backward
        )
        return ops


def shrunk_config(cfg: ModelConfig, n_dense: int, n_moe: int, mtp_depth: int) -> ModelConfig:
    """`cfg` with `n_dense` dense then `n_moe` MoE blocks and `mtp_depth` MTP modules, every width
    tiny (multiples of 4, as the grouped GEMM's strides need)."""
    moe = dataclasses.replace(cfg.moe, dim=0, expert_ffn_dim=4)
    tiny = dataclasses.replace(
        cfg,
        vocab_size=16,
        dim=16,
        n_layers=n_dense + n_moe,
        n_dense_layers=n_dense,
        head_dim=4,
        ffn_dim=8,
        q_lora_rank=8 if cfg.q_lora_rank else 0,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=4,
        max_seq_len=16,
        mtp_depth=mtp_depth,
        moe=moe,
    )
    tiny.validate()
    return tiny


BATCH, SEQ = 2, 8
"""the shrunk model's micro-batch"""


def _pass_operators(cfg: ModelConfig) -> tuple[PassOperators, float]:
    """(forward and backward operators of one micro-batch through `Transformer(cfg)` and its loss,
    optimizer operators per parameter tensor)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.train()
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    targets = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    losses: list[torch.Tensor] = []

    def forward() -> None:
        out = model(tokens, mtp_targets=targets)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten()) + out.balance_loss
        for depth, logits in enumerate(out.mtp_logits, start=1):
            labels = targets[:, depth:]
            loss = loss + F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        losses.append(loss)

    fwd = count_operators(forward)
    bwd = count_operators(lambda: losses[0].backward())
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2 and p is not model.tok_embeddings.weight]
    no_decay = [p for p in params if not any(p is q for q in decay)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, fused=True
    )  # as train.optim.build_optimizer makes it (plan/ sits below train/)
    optimizer.step()  # the first step creates the moments; count a steady one

    def optimizer_step() -> None:
        clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    per_tensor = count_operators(optimizer_step) / len(params)
    return PassOperators(float(fwd), float(bwd)), per_tensor


def _difference(a: PassOperators, b: PassOperators) -> PassOperators:
    return PassOperators(a.forward - b.forward, a.backward - b.backward)


def step_operators(cfg: ModelConfig) -> StepOperators:
    """Operators per micro-batch of each block type of `cfg`, and the optimizer's per tensor
    (cached per config shape)."""
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if key not in _COUNTED:
        base, per_tensor = _pass_operators(shrunk_config(cfg, 1, 1, 0))
        dense = _difference(_pass_operators(shrunk_config(cfg, 2, 1, 0))[0], base)
        moe = _difference(_pass_operators(shrunk_config(cfg, 1, 2, 0))[0], base)
        # an MTP module's block is like the main model's last one: add it to a model ending alike
        if cfg.is_moe_layer(cfg.n_layers - 1):
            with_mtp, without = shrunk_config(cfg, 1, 1, 1), base
        else:
            with_mtp, without = shrunk_config(cfg, 2, 0, 1), _pass_operators(shrunk_config(cfg, 2, 0, 0))[0]
        mtp = _difference(_pass_operators(with_mtp)[0], without)
        head = _difference(_difference(base, dense), moe)
        _COUNTED[key] = StepOperators(dense, moe, mtp, head, per_tensor)
    return _COUNTED[key]


_COUNTED: dict[str, StepOperators] = {}
