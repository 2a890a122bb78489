"""The outer algorithms with error feedback on a lossy wire, on 2 and 3 gloo processes, against a float64
reference loop written here from the papers: DiLoCo's Nesterov outer with error feedback, and
SparseLoCo's (Sarfi et al. 2025, Algorithm 1): per replica e = beta*e + delta, send
Q(top-k(e)), e -= what was sent, theta -= lr * mean. The replicas' inner steps are stand-ins (seeded
noise with a drift), so that only the outer loop is under test; top-k and the int2 quantiser are
re-implemented here in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moeforge.config import DiLoCoConfig
from moeforge.diloco import StreamingDiLoCo
from moeforge.parallel.spawn import run_on_processes

STEPS = 8


class Toy(nn.Module):
    """Named as a Transformer's parts, so that the fragment rules apply: fragment 0 holds the
    embedding and layer 0 (184 values), fragment 1 layer 1 and the final norm (172 values)."""

    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(6, 4)
        self.layers = nn.ModuleList([nn.Linear(4, 40, bias=False), nn.Linear(40, 4)])
        self.norm = nn.LayerNorm(4)


def fresh_toy() -> Toy:
    torch.manual_seed(0)
    return Toy()


def inner_noise(replica: int, step: int, name: str, shape: torch.Size) -> torch.Tensor:
    """What replica `replica`'s stand-in inner step subtracts from `name` at `step` (fp32)."""
    seed = 1000 * replica + 10 * step + sorted(dict(fresh_toy().named_parameters())).index(name)
    return 0.01 * (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) + 0.3)


def drive_replica(rank: int, options: dict, out: str) -> None:
    model = fresh_toy()
    cfg = DiLoCoConfig(**options)
    cfg.validate()
    outer = StreamingDiLoCo(model, cfg, rank, dist.group.WORLD, torch.device("cpu"))
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.sub_(inner_noise(rank, step, name, param.shape))
        outer.after_inner_step(step)
    residual = outer.feedback.residual if outer.feedback is not None else {}
    local = {name: param.detach().clone() for name, param in model.named_parameters()}
    torch.save({"global": outer.global_params, "residual": residual, "local": local}, Path(out, f"rank{rank}.pt"))


# ----------------------------------------------------------------------------------------------
# The reference, float64


def fragment_names(fragment: int, names: list[str]) -> list[str]:
    if fragment == 0:
        return [n for n in names if n.startswith(("tok_embeddings.", "layers.0."))]
    return [n for n in names if n.startswith(("layers.1.", "norm."))]


def top_k(values: torch.Tensor, fraction: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, values) of each chunk's round(fraction * length) largest magnitudes, chunk by
    chunk, ascending inside a chunk (the order the kept values travel in)."""
    if fraction == 1:
        return torch.arange(len(values)), values
    where = []
    for start in range(0, len(values), chunk):
        part = values[start : start + chunk]
        k = min(len(part), max(1, round(fraction * len(part))))
        where.append(start + part.abs().argsort(descending=True)[:k].sort().values)
    where = torch.cat(where)
    return where, values[where]


def int2(values: torch.Tensor, block: int) -> torch.Tensor:
    """+-0.5 or +-1.5 times the block's rms (fp32, as the wire carries it), nearest, ties toward zero."""
    out = []
    for start in range(0, len(values), block):
        part = values[start : start + block]
        scale = part.square().mean().sqrt().float().double()
        magnitude = torch.where(part.abs() > scale, 1.5 * scale, 0.5 * scale)
        out.append(torch.where(part < 0, -magnitude, magnitude))
    return torch.cat(out)


def transmitted(x: torch.Tensor, options: dict) -> torch.Tensor:
    where, kept = top_k(x, options.get("topk_fraction", 1.0), options.get("topk_chunk", 4096))
    dense = torch.zeros_like(x)
    dense[where] = int2(kept, options["quantize_block"])
    return dense


def reference(options: dict) -> tuple[dict, list[dict], list[dict]]:
    """(theta_global, residuals per replica, local parameters per replica) after STEPS steps; no
    overlap, so a landed fragment replaces the local one."""
    h, p, lr, m = options["sync_every"], options["fragments"], options["outer_lr"], options["replicas"]
    sparseloco = options["outer"] == "sparseloco"
    beta, mu = (options["ef_decay"], 0.0) if sparseloco else (1.0, options["outer_momentum"])
    theta = {n: q.detach().double() for n, q in fresh_toy().named_parameters()}
    names = list(theta)
    local = [{n: t.clone() for n, t in theta.items()} for _ in range(m)]
    residual = [{n: torch.zeros_like(t) for n, t in theta.items()} for _ in range(m)]
    momentum = {n: torch.zeros_like(t) for n, t in theta.items()}
    for step in range(1, STEPS + 1):
        for r in range(m):
            for n in names:
                local[r][n] -= inner_noise(r, step, n, theta[n].shape).double()
        for fragment in range(p):
            if step % h != fragment * h // p:
                continue
            frag = fragment_names(fragment, names)
            flat = lambda tree: torch.cat([tree[n].flatten() for n in frag])  # noqa: E731
            sent = []
            for r in range(m):
                x = beta * flat(residual[r]) + flat(theta) - flat(local[r])
                q = transmitted(x, options)
                unflatten(residual[r], frag, x - q)
                sent.append(q)
            mean = sum(sent) / m  # replica order, as every receiver sums
            step_dir = mean
            if mu:
                unflatten(momentum, frag, mu * flat(momentum) + mean)
                step_dir = mean + mu * flat(momentum)
            unflatten(theta, frag, flat(theta) - lr * step_dir)
            for r in range(m):
                unflatten(local[r], frag, flat(theta))
    return theta, residual, local


def unflatten(tree: dict, names: list[str], flat: torch.Tensor) -> None:
    offset = 0
    for n in names:
        tree[n] = flat[offset : offset + tree[n].numel()].view_as(tree[n]).clone()
        offset += tree[n].numel()


SPARSELOCO = {
    "replicas": 2,
    "sync_every": 2,
    "fragments": 2,
    "outer": "sparseloco",
    "outer_lr": 1.0,
    "ef_decay": 0.9,
    "quantize": "int2",
    "quantize_block": 8,
    "topk_fraction": 0.25,
    "topk_chunk": 16,
}
NESTEROV_EF = {
    "replicas": 2,
    "sync_every": 2,
    "fragments": 2,
    "outer": "nesterov",
    "outer_lr": 0.7,
    "outer_momentum": 0.9,
    "quantize": "int2",
    "quantize_block": 8,
}


@pytest.mark.parametrize(
    "options",
    [SPARSELOCO, NESTEROV_EF, {**SPARSELOCO, "replicas": 3}],
    ids=["sparseloco", "nesterov+ef", "sparseloco, 3 replicas"],
)
def test_outer_algorithm_with_error_feedback_equals_a_float64_loop(tmp_path, options):
    run_on_processes(options["replicas"], drive_replica, options, str(tmp_path))
    theta, residual, local = reference(options)
    for rank in range(options["replicas"]):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(state["residual"]) == set(theta)
        for name, expected in theta.items():
            torch.testing.assert_close(state["global"][name].double(), expected, rtol=0, atol=2e-6, msg=name)
            torch.testing.assert_close(state["local"][name].double(), local[rank][name], rtol=0, atol=2e-6)
            got = state["residual"][name].double()
            torch.testing.assert_close(got, residual[rank][name], rtol=0, atol=2e-6, msg=f"residual {name}")
        assert any(state["residual"][n].abs().max() > 1e-3 for n in theta)  # the residuals carry something
