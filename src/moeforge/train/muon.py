"""Muon (Keller Jordan 2024; Moonshot, "Muon is Scalable for LLM Training", arXiv 2502.16982) for the
hidden matrices, AdamW for the rest, as one optimizer: one lr schedule, one state dict.

For a weight matrix W [A, B] with gradient G_t, Muon keeps one momentum buffer and steps

    M_t = mu M_{t-1} + G_t                       (momentum)
    U_t = G_t + mu M_t                           (Nesterov; U_t = M_t without it)
    O_t = NS_5(U_t) ~ U V^T  for U_t = U S V^T   (orthogonalised: every singular value ~1)
    W_t = W_{t-1} - lr (0.2 sqrt(max(A, B)) O_t + wd W_{t-1})        (Moonshot eq. 4)

NS_k is k steps of the quintic Newton-Schulz iteration on X_0 = U_t / ||U_t||_F (singular values
in (0, 1]), on the smaller Gram matrix (X transposed when A > B):

    X_{j+1} = a X_j + (b X_j X_j^T + c (X_j X_j^T)^2) X_j,  (a, b, c) = (3.4445, -4.7750, 2.0315)

Each step maps every singular value s to p(s) = a s + b s^3 + c s^5; the coefficients trade exactness
for speed: p'(0) = a is large, so small singular values grow fast, and after 5 steps every singular
value that started above 2e-3 (of ||U_t||_F) ends in the band [0.68, 1.21] around 1 rather than
at 1 exactly. O_t has RMS ~ 1/sqrt(max(A, B)), so the factor 0.2 sqrt(max(A, B)) gives the update
the RMS ~0.2 of a typical AdamW update: Muon then reuses AdamW's lr and weight decay (Moonshot §2.2).

Precision: NS runs in bf16 where the run computes in bf16 (`TrainConfig.computes_in_bf16`: CUDA by
default), as Keller Jordan's and torch.optim.Muon do: the iteration only has to land in the band
above, which bf16's rounding (2^-8 relative) leaves by less than 0.01 (tested), and bf16 matmuls
run at the GPU's tensor-core rate. Elsewhere (the CPU by default) it runs in fp32, which the tests
compare with float64.

Matrices: a 3-D expert weight [E, A, B] is E matrices, each orthogonalised on its own (batched);
a fused gate/up projection (`w13`) is two, its halves orthogonalised apart (`halves`). A sharded
DTensor is orthogonalised on whole matrices (`moeforge.parallel.whole_matrices`). Which parameters
take Muon and which AdamW: `moeforge.model.hidden_matrices` (`train.optim.muon_parameter_groups`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch.optim.adamw import adamw

from moeforge.model.hidden_matrices import Halves
from moeforge.parallel.whole_matrices import on_whole_matrices

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""(a, b, c) of the quintic Newton-Schulz step (Keller Jordan's, also Moonshot's and torch's)"""
NS_EPS = 1e-7
"""the smallest Frobenius norm the iteration divides by (a zero update stays zero)"""
RMS_MATCH = 0.2
"""Moonshot's factor: the update's RMS 0.2, about AdamW's"""


def newton_schulz(matrices: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NS_steps of each matrix of `matrices` [*batch, A, B] (module docstring), computed in `dtype`
    and returned in it: U V^T with singular values in the quintic's band."""
    a, b, c = NS_COEFFICIENTS
    wide = matrices.shape[-2] <= matrices.shape[-1]
    x = matrices.to(dtype) if wide else matrices.to(dtype).mT  # iterate on the smaller Gram matrix X X^T
    # one contiguous batch [*, A, B]: CPU batched matmuls of a strided view (the halves, a transpose)
    # are ~100x slower; baddbmm fuses each step's scaled sums into its matmuls (as torch.optim.Muon)
    x = x.reshape(-1, *x.shape[-2:]).contiguous()
    x = x / torch.linalg.matrix_norm(x, keepdim=True).clamp(min=NS_EPS)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b X X^T + c (X X^T)^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + poly X
    x = x.reshape(matrices.shape if wide else matrices.mT.shape)
    return x if wide else x.mT


def split_halves(stack: torch.Tensor, halves: Halves) -> torch.Tensor:
    """The matrices of `stack` [*batch, A, B] as [*batch, 2, A/2, B] ('rows'), [*batch, 2, A, B/2]
    ('columns') or unchanged ('none')."""
    if halves == "rows":
        return stack.unflatten(-2, (2, -1))
    if halves == "columns":
        return stack.unflatten(-1, (2, -1)).movedim(-2, -3)
    return stack


def join_halves(matrices: torch.Tensor, halves: Halves) -> torch.Tensor:
    """The inverse of `split_halves`."""
    if halves == "rows":
        return matrices.flatten(-3, -2)
    if halves == "columns":
        return matrices.movedim(-3, -2).flatten(-2)
    return matrices


def orthogonalise(stack: torch.Tensor, halves: Halves, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """NS_steps of each matrix of `stack` [*batch, A, B] (its halves apart), in `stack`'s dtype."""
    return join_halves(newton_schulz(split_halves(stack, halves), steps, dtype), halves).to(stack.dtype)


def update_scale(shape: torch.Size, halves: Halves) -> float:
    """0.2 sqrt(max(A, B)) for the matrices [A, B] a parameter of `shape` holds (Moonshot eq. 4)."""
    rows, cols = shape[-2], shape[-1]
    if halves == "rows":
        rows //= 2
    elif halves == "columns":
        cols //= 2
    return RMS_MATCH * math.sqrt(max(rows, cols))


class Muon(torch.optim.Optimizer):
    """Muon on the groups whose "algorithm" is "muon" (each with its "halves"), AdamW (torch's
    kernel, fused where `fused_adamw`) on those whose "algorithm" is "adamw".

    Per parameter, the state is a "momentum_buffer" (Muon) or AdamW's "step", "exp_avg" and
    "exp_avg_sq"; the group settings are plain numbers and strings, so checkpoints save and resume
    them as they do AdamW's."""

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        ns_dtype: torch.dtype = torch.float32,
        fused_adamw: bool = False,
    ):
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "betas": betas,
            "eps": eps,
            "algorithm": "muon",
            "halves": "none",
        }
        super().__init__(groups, defaults)
        for group in self.param_groups:
            assert group["algorithm"] in ("muon", "adamw"), group["algorithm"]
            assert group["algorithm"] == "adamw" or all(p.ndim >= 2 for p in group["params"])
        self.ns_dtype = ns_dtype
        """the precision Newton-Schulz runs in (module docstring)"""
        self.fused_adamw = fused_adamw

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["algorithm"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        """The module docstring's update for each parameter of a Muon group that has a gradient."""
        mu, lr = group["momentum"], group["lr"]
        orthogonal = functools.partial(
            orthogonalise, halves=group["halves"], steps=group["ns_steps"], dtype=self.ns_dtype
        )
        for param in group["params"]:
            if param.grad is None:
                continue
            grad = param.grad
            state = self.state[param]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            buffer = state["momentum_buffer"]
            buffer.mul_(mu).add_(grad)  # M_t = mu M_{t-1} + G_t
            update = grad.add(buffer, alpha=mu) if group["nesterov"] else buffer
            direction = on_whole_matrices(orthogonal, update)  # O_t, each whole matrix
            param.mul_(1 - lr * group["weight_decay"])
            param.add_(direction, alpha=-lr * update_scale(param.shape, group["halves"]))

    def _adamw_step(self, group: dict) -> None:
        """torch's AdamW (Loshchilov & Hutter) on the group's parameters that have a gradient, with
        the state `torch.optim.AdamW` keeps."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                step_device = param.device if self.fused_adamw else None
                state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            params.append(param)
            grads.append(param.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            fused=self.fused_adamw or None,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
