"""`moeforge bench moe`: forward+backward of one MoE layer against three baselines of the same FLOPs.

Timed in one run, interleaved so that background load hits every case alike:
- gemm ("plain GEMMs", the roofline): the six matmuls of a SwiGLU's forward and backward over all
  N*k routed rows, as `torch.mm` into preallocated outputs: the experts' FLOPs and nothing else;
- gemm/experts ("per-expert GEMMs", the grouping's floor): the same six matmuls split into the
  routed groups, each group with its own expert's weights: what the grouped experts cost with no
  pointwise work, no autograd and no copies, so that no expert code can be faster on this machine;
- gemm/shared ("per-expert GEMMs, one weight"): the same groups all with one weight, which splits the
  floor's gap to plain GEMMs into the small GEMMs' own cost and the traffic of E distinct weights;
- dense ("dense SwiGLU"): a dense SwiGLU module over the same N*k rows (matmuls + pointwise +
  autograd, one big GEMM per projection);
- experts/<backend> ("grouped experts alone"): the routed experts on the dispatched rows of a real
  router's routing;
- layer/<backend>: the whole MoE layer (router, dispatch, experts, combine, balance loss);
- peer/<name> (with `peers`): a peer's MoE layer at the same shape (bench/moe_peers.py);
- dense/compiled, experts/compiled, layer/compiled (with `compile`): the dense SwiGLU under
  `torch.compile`, and the layer as `--train.compile` compiles it (`parallel.regional.compile_moe`:
  router, dispatch and combine traced; fp32 grouped GEMMs eager with their SwiGLU compiled between
  them), and its experts alone as they then run.
Ratios use the best of the repeats and are a baseline's time over the case's time (= ratio of
GFLOP/s): "vs_gemm", "vs_dense", and "vs_experts" against the grouped experts alone (the first
backend's); a compiled case's "vs_dense" and "vs_experts" are against the compiled dense SwiGLU and
the compiled layer's experts; "grouped_vs_loop" is the loop time over the grouped time.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from moeforge.bench.moe_peers import peer_layers
from moeforge.config import ConfigError, MoEConfig
from moeforge.model.mlp import SwiGLU
from moeforge.model.moe.balance import load_stats
from moeforge.model.moe.experts import grouped_mm_unsupported_reason
from moeforge.model.moe.layer import MoE
from moeforge.parallel.regional import compile_moe

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

SHAPES = {
    "coarse": {"ffn_dim": 256, "n_experts": 32, "top_k": 4},
    "fine": {"ffn_dim": 128, "n_experts": 64, "top_k": 6},
}
"""the two shapes `bench moe` runs by default (dim 512, 4096 tokens): 32 experts of ffn 256, top-4, and
the fine-grained 64 experts of ffn 128, top-6 (the same active expert width, 1024 vs 768)"""

CASE_LABELS = {
    "gemm": "plain GEMMs (roofline)",
    "gemm/experts": "per-expert GEMMs (floor)",
    "gemm/shared": "per-expert GEMMs, one weight",
    "dense": "dense SwiGLU, same rows",
}


def swiglu_expert_flops(rows: int, dim: int, ffn_dim: int) -> int:
    """Forward+backward FLOPs of SwiGLU over `rows` rows: 3 matmuls of 2*rows*dim*ffn, x3 for backward."""
    return 3 * (3 * 2 * rows * dim * ffn_dim)


def run_moe_bench(
    dim: int = 512,
    ffn_dim: int = 256,
    n_experts: int = 32,
    top_k: int = 4,
    tokens: int = 4096,
    backends: Sequence[str] = ("grouped",),
    repeats: int = 5,
    warmup: int = 2,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    peers: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """Time plain GEMMs / dense SwiGLU / experts / layer (/ peers) forward+backward; a JSON-ready
    dict of the results."""
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

    group_sizes = tokens_per_expert.tolist()
    steps = {
        "gemm": swiglu_gemms_step([rows], dim, ffn_dim, torch_device, torch_dtype),
        "gemm/experts": swiglu_gemms_step(group_sizes, dim, ffn_dim, torch_device, torch_dtype, n_weights=n_experts),
        "gemm/shared": swiglu_gemms_step(group_sizes, dim, ffn_dim, torch_device, torch_dtype),
        "dense": forward_backward_step(dense, (x_sorted,)),
    }
    for backend, layer in layers.items():
        steps[f"experts/{backend}"] = forward_backward_step(layer.experts, (x_sorted, tokens_per_expert))
    for backend, layer in layers.items():
        steps[f"layer/{backend}"] = forward_backward_step(layer, (x,))
    peer_notes: list[str] = []
    if peers:
        peer_modules, peer_notes = peer_layers(any_layer)
        for name, module in peer_modules.items():
            steps[f"peer/{name}"] = forward_backward_step(module, (x,))
    if compile:
        steps |= compiled_steps(dense, configs[backends[0]], seed, x, x_sorted, tokens_per_expert)
    times = time_interleaved(steps, repeats, warmup, torch_device)

    baselines = {"gemm": min(times["gemm"]), "dense": min(times["dense"])}
    baselines["experts"] = min(times[f"experts/{backends[0]}"])
    compiled_baselines = baselines | {part: min(times[f"{part}/compiled"]) for part in ("dense", "experts") if compile}
    cases = {
        name: case_figures(ts, flops, compiled_baselines if name.endswith("/compiled") else baselines)
        for name, ts in times.items()
    }
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
            "peers": peers,
            "compile": compile,
        },
        "expert_gflop": flops / 1e9,
        "routing_load": load_stats(tokens_per_expert),
        "grouped_fallback": grouped_mm_unsupported_reason(
            x_sorted, any_layer.experts.w13, any_layer.experts.w2
        ),
        "cases": cases,
        "peer_notes": peer_notes,
    }
    if "grouped" in layers and "loop" in layers:
        result["grouped_vs_loop"] = {
            part: min(times[f"{part}/loop"]) / min(times[f"{part}/grouped"]) for part in ("experts", "layer")
        }
    return result


def compiled_steps(
    dense: torch.nn.Module,
    cfg: MoEConfig,
    seed: int,
    x: torch.Tensor,
    x_sorted: torch.Tensor,
    tokens_per_expert: torch.Tensor,
) -> dict[str, Callable[[], None]]:
    """The compiled cases: a compiled copy of `dense`, and a copy of the layer (same seed, same
    weights) compiled as `--train.compile` compiles it, timed whole and its experts alone."""
    dense = copy.deepcopy(dense)
    dense.compile()
    layer = seeded_layer(cfg, seed, x.device, x.dtype)
    compile_moe(layer)
    return {
        "dense/compiled": forward_backward_step(dense, (x_sorted,)),
        "experts/compiled": forward_backward_step(layer.experts, (x_sorted, tokens_per_expert)),
        "layer/compiled": forward_backward_step(layer, (x,)),
    }


def bench_shapes(
    shape: str, ffn_dim: int | None = None, n_experts: int | None = None, top_k: int | None = None
) -> list[dict[str, int]]:
    """The shapes to run: `shape` ('coarse', 'fine' or 'both'), or the one shape the explicit
    sizes give (the coarse shape's value for any left out)."""
    explicit = {"ffn_dim": ffn_dim, "n_experts": n_experts, "top_k": top_k}
    if any(v is not None for v in explicit.values()):
        return [SHAPES["coarse"] | {k: v for k, v in explicit.items() if v is not None}]
    if shape == "both":
        return list(SHAPES.values())
    if shape not in SHAPES:
        raise ConfigError(f"--shape: got {shape!r}; allowed: 'coarse' | 'fine' | 'both'")
    return [SHAPES[shape]]


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


def swiglu_gemms_step(
    group_sizes: Sequence[int],
    dim: int,
    ffn_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    n_weights: int = 1,
) -> Callable[[], None]:
    """A closure running the six matmuls of a SwiGLU's forward and backward over sum(group_sizes)
    rows, per group, as `torch.mm` into preallocated outputs (the same FLOPs as
    `swiglu_expert_flops`, nothing else):

        forward   gate_up = x @ w13 [R, 2F]      out = h @ w2 [R, D]
        backward  dw2 = h^T @ dout   dh = dout @ w2^T   dw13 = x^T @ dgate_up   dx = dgate_up @ w13^T

    One group is the plain GEMMs; with `n_weights` = the number of groups, group g uses weights g
    (as the experts do), with 1 every group uses the same weights.
    """
    if n_weights not in (1, len(group_sizes)):
        raise ValueError(f"n_weights: got {n_weights}; allowed: 1 or the number of groups ({len(group_sizes)})")
    rows = sum(group_sizes)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    x, h, grad_out, grad_gate_up = randn(rows, dim), randn(rows, ffn_dim), randn(rows, dim), randn(rows, 2 * ffn_dim)
    gate_up, out, grad_h, grad_x = (torch.empty_like(t) for t in (grad_gate_up, x, h, x))
    w13, w2 = randn(n_weights, dim, 2 * ffn_dim), randn(n_weights, ffn_dim, dim)
    grad_w13, grad_w2 = torch.empty_like(w13), torch.empty_like(w2)
    sizes = list(group_sizes)
    weight = [g % n_weights for g in range(len(sizes))]
    x, h, grad_out, grad_gate_up, gate_up, out, grad_h, grad_x = (
        t.split(sizes) for t in (x, h, grad_out, grad_gate_up, gate_up, out, grad_h, grad_x)
    )
    # (left operand, right operand, output) of each product, per group; run product by product over
    # all groups, in the order the grouped experts' forward and backward run them
    products = [
        [(x[g], w13[weight[g]], gate_up[g]) for g in range(len(sizes))],
        [(h[g], w2[weight[g]], out[g]) for g in range(len(sizes))],
        [(h[g].t(), grad_out[g], grad_w2[weight[g]]) for g in range(len(sizes))],
        [(grad_out[g], w2[weight[g]].t(), grad_h[g]) for g in range(len(sizes))],
        [(x[g].t(), grad_gate_up[g], grad_w13[weight[g]]) for g in range(len(sizes))],
        [(grad_gate_up[g], w13[weight[g]].t(), grad_x[g]) for g in range(len(sizes))],
    ]

    def step() -> None:
        for product in products:
            for left, right, result in product:
                torch.mm(left, right, out=result)

    return step


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


def case_figures(seconds: list[float], flops: int, baselines: dict[str, float]) -> dict[str, float]:
    """Best and median ms, GFLOP/s of the experts' FLOPs, and the ratio to each baseline's best time."""
    best = min(seconds)
    figures = {
        "best_ms": best * 1e3,
        "median_ms": statistics.median(seconds) * 1e3,
        "expert_gflops": flops / best / 1e9,
    }
    return figures | {f"vs_{name}": baseline / best for name, baseline in baselines.items()}


def case_label(name: str) -> str:
    """The plain name of a case in the table."""
    if name in CASE_LABELS:
        return CASE_LABELS[name]
    part, _, detail = name.partition("/")
    labels = {"dense": f"dense SwiGLU ({detail})", "experts": f"grouped experts alone ({detail})",
              "layer": f"whole MoE layer ({detail})"}
    return labels.get(part, detail)


def format_table(result: dict[str, Any]) -> str:
    """The result of one shape as a human-readable table."""
    cfg = result["config"]
    load = result["routing_load"]
    lines = [
        (
            f"MoE forward+backward: {cfg['tokens']} tokens, top-{cfg['top_k']} of {cfg['n_experts']} experts, "
            f"dim {cfg['dim']}, ffn {cfg['ffn_dim']}, {cfg['dtype']} on {cfg['device']} ({cfg['threads']} threads)"
        ),
        (
            f"expert FLOPs {result['expert_gflop']:.1f} GFLOP per step; routing max/mean {load['max_over_mean']:.2f}, "
            f"best of {cfg['repeats']} repeats; ratios = baseline time / case time"
        ),
        "",
        f"{'case':<34}{'best ms':>9}{'median ms':>11}{'GFLOP/s':>9}{'vs GEMMs':>10}{'vs dense':>10}{'vs experts':>12}",
    ]
    for name, fig in result["cases"].items():
        lines.append(
            f"{case_label(name):<34}{fig['best_ms']:>9.1f}{fig['median_ms']:>11.1f}{fig['expert_gflops']:>9.1f}"
            f"{fig['vs_gemm']:>10.2f}{fig['vs_dense']:>10.2f}{fig['vs_experts']:>12.2f}"
        )
    if "gemm/experts" in result["cases"]:
        lines += ["", "per-expert GEMMs (floor): the experts' matmuls alone on the routed groups, each with its own weights;",
                  "no expert code is faster here, so its 'vs GEMMs' and 'vs dense' bound the experts' and the layer's"]
    if "grouped_vs_loop" in result:
        ratio = result["grouped_vs_loop"]
        lines += ["", f"grouped vs loop: {ratio['experts']:.2f}x experts, {ratio['layer']:.2f}x layer"]
    if result["grouped_fallback"]:
        lines.append(f"note: grouped ran as loop: {result['grouped_fallback']}")
    lines += [f"note: {note}" for note in result["peer_notes"]]
    return "\n".join(lines)
