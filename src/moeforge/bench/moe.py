"""`moeforge bench moe`: forward+backward of one MoE layer per expert backend vs a dense matmul.

Timed in one run, interleaved so that background load hits every case alike:
- dense: a dense SwiGLU over all N*k routed rows (same dim/ffn, hence exactly the experts' FLOPs);
- experts/<backend>: the routed experts alone on the dispatched rows of a real router's routing;
- layer/<backend>: the whole MoE layer (router, dispatch, experts, combine, balance loss).
Ratios use the best of the repeats: "vs_dense" is the dense time over the case's time (= ratio of
GFLOP/s), "grouped_vs_loop" the loop time over the grouped time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from moeforge.config import ConfigError, MoEConfig
from moeforge.model.mlp import SwiGLU
from moeforge.model.moe.balance import load_stats
from moeforge.model.moe.experts import grouped_mm_unsupported_reason
from moeforge.model.moe.layer import MoE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def swiglu_expert_flops(rows: int, dim: int, ffn_dim: int) -> int:
    """Forward+backward FLOPs of SwiGLU over `rows` rows: 3 matmuls of 2*rows*dim*ffn, x3 for backward."""
    return 3 * (3 * 2 * rows * dim * ffn_dim)


def run_moe_bench(
    dim: int = 512,
    ffn_dim: int = 256,
    n_experts: int = 32,
    top_k: int = 4,
    tokens: int = 4096,
    backends: Sequence[str] = ("grouped", "loop"),
    repeats: int = 5,
    warmup: int = 2,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Time dense / experts / layer forward+backward per backend; a JSON-ready dict of the results."""
    torch_dtype = resolve_dtype(dtype)
    torch_device = torch.device(device)
    check_bench_sizes(tokens=tokens, repeats=repeats, backends=len(backends))
    configs = {
        b: MoEConfig(
            dim=dim, n_experts=n_experts, top_k=top_k, expert_ffn_dim=ffn_dim, n_shared_experts=0, backend=b
        )
        for b in backends
    }
    rows = tokens * top_k
    flops = swiglu_expert_flops(rows, dim, ffn_dim)

    torch.manual_seed(seed)
    x = torch.randn(1, tokens, dim, device=torch_device, dtype=torch_dtype)
    layers = {b: seeded_layer(cfg, seed, torch_device, torch_dtype) for b, cfg in configs.items()}
    any_layer = next(iter(layers.values()))
    with torch.no_grad():
        routing = any_layer.router(x.view(tokens, dim))
        x_sorted, tokens_per_expert, _ = any_layer.dispatcher.dispatch(
            x.view(tokens, dim), routing.expert_indices, routing.gates
        )
    dense = SwiGLU(dim, ffn_dim).to(torch_device, torch_dtype)
    dense.init_weights(0.02)

    steps = {"dense": forward_backward_step(dense, (x_sorted,))}
    for backend, layer in layers.items():
        steps[f"experts/{backend}"] = forward_backward_step(layer.experts, (x_sorted, tokens_per_expert))
    for backend, layer in layers.items():
        steps[f"layer/{backend}"] = forward_backward_step(layer, (x,))
    times = time_interleaved(steps, repeats, warmup, torch_device)

    cases = {name: case_figures(ts, flops, min(times["dense"])) for name, ts in times.items()}
    result: dict[str, Any] = {
        "config": {
            "dim": dim,
            "ffn_dim": ffn_dim,
            "n_experts": n_experts,
            "top_k": top_k,
            "tokens": tokens,
            "rows": rows,
            "dtype": str(torch_dtype).removeprefix("torch."),
            "device": str(torch_device),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "warmup": warmup,
            "seed": seed,
        },
        "expert_gflop": flops / 1e9,
        "routing_load": load_stats(tokens_per_expert),
        "grouped_fallback": grouped_mm_unsupported_reason(
            x_sorted, any_layer.experts.w13, any_layer.experts.w2
        ),
        "cases": cases,
    }
    if "grouped" in layers and "loop" in layers:
        result["grouped_vs_loop"] = {
            part: min(times[f"{part}/loop"]) / min(times[f"{part}/grouped"]) for part in ("experts", "layer")
        }
    return result


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: got {dtype!r}; allowed: {' | '.join(map(repr, DTYPES))}")
    return DTYPES[dtype]


def check_bench_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ConfigError(f"--{name}: got {value}; allowed: at least 1")


def seeded_layer(cfg: MoEConfig, seed: int, device: torch.device, dtype: torch.dtype) -> MoE:
    """A routed-experts-only layer (default routing and balance loss), the same weights for every backend;
    MoE validates the config."""
    torch.manual_seed(seed)
    return MoE(cfg).to(device, dtype).train()


def forward_backward_step(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """A closure running module(*inputs) forward and backward (incl. any aux loss) with a fixed grad."""
    leaf = inputs[0].detach().requires_grad_()
    args = (leaf, *inputs[1:])
    with torch.no_grad():
        grad_out = torch.randn_like(_output_and_balance_loss(module, args)[0])

    def step() -> None:
        leaf.grad = None
        module.zero_grad(set_to_none=True)
        out, aux = _output_and_balance_loss(module, args)
        if aux is not None and aux.requires_grad:
            torch.autograd.backward((out, aux), (grad_out, torch.ones_like(aux)))
        else:
            out.backward(grad_out)

    return step


def _output_and_balance_loss(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The module's output, and its balance loss when it is an MoE layer (which returns both)."""
    out = module(*args)
    if isinstance(module, MoE):
        out, stats = out
        return out, stats.balance_loss
    return out, None


def time_interleaved(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each step; one round runs every step once, `warmup` rounds are discarded."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def case_figures(seconds: list[float], flops: int, dense_best: float) -> dict[str, float]:
    best = min(seconds)
    return {
        "best_ms": best * 1e3,
        "median_ms": statistics.median(seconds) * 1e3,
        "expert_gflops": flops / best / 1e9,
        "vs_dense": dense_best / best,
    }


def format_table(result: dict[str, Any]) -> str:
    """The result as a human-readable table."""
    cfg = result["config"]
    load = result["routing_load"]
    lines = [
        (
            f"MoE forward+backward: {cfg['tokens']} tokens, top-{cfg['top_k']} of {cfg['n_experts']} experts, "
            f"dim {cfg['dim']}, ffn {cfg['ffn_dim']}, {cfg['dtype']} on {cfg['device']} ({cfg['threads']} threads)"
        ),
        (
            f"expert FLOPs {result['expert_gflop']:.1f} GFLOP per step; routing max/mean {load['max_over_mean']:.2f}, "
            f"best of {cfg['repeats']} repeats"
        ),
        "",
        f"{'case':<18}{'best ms':>10}{'median ms':>12}{'GFLOP/s':>10}{'vs dense':>10}",
    ]
    for name, fig in result["cases"].items():
        lines.append(
            f"{name:<18}{fig['best_ms']:>10.1f}{fig['median_ms']:>12.1f}"
            f"{fig['expert_gflops']:>10.1f}{fig['vs_dense']:>10.2f}"
        )
    if "grouped_vs_loop" in result:
        ratio = result["grouped_vs_loop"]
        lines += ["", f"grouped vs loop: {ratio['experts']:.2f}x experts, {ratio['layer']:.2f}x layer"]
    if result["grouped_fallback"]:
        lines.append(f"note: grouped ran as loop: {result['grouped_fallback']}")
    return "\n".join(lines)
