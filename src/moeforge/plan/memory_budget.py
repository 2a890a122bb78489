"""What a command may allocate, and the one check it makes before it builds a model.

The budget of one process, the first that applies:
- `MOEFORGE_MEMORY_LIMIT_BYTES`, when set: bytes per process (e.g. `2e9`; `inf` = no limit), for tests
  and for a user who knows better than the estimate;
- on CUDA, the device's free memory (`torch.cuda.mem_get_info`: what other processes hold is gone);
- on the CPU, `MemAvailable` of /proc/meminfo shared evenly among the ranks of this host
  (`LOCAL_WORLD_SIZE` under torchrun); no budget where /proc/meminfo cannot be read.

Sizes are closed-form counts (`moeforge.model.flops`) of a config whose bounds are checked first
(`ModelConfig.validate`): nothing is allocated, and an absurd config costs microseconds. The trainer
checks its whole run (`estimate_run`); generate, convert and the Hugging Face import check the model
they build (`check_model_fits`, `check_checkpoint_fits`). `moeforge plan` never refuses.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moeforge import checkpoint as ckpt
from moeforge.config import ConfigError, ModelConfig, TrainConfig, config_from_dict
from moeforge.config.checks import _flag
from moeforge.model.flops import kv_cache_bytes_per_token, moe_parameters, parameter_counts

ENV_LIMIT = "MOEFORGE_MEMORY_LIMIT_BYTES"
"""the environment variable that replaces every budget: bytes per process, 'inf' = no limit"""
MEMINFO = Path("/proc/meminfo")
FP32 = 4
"""bytes per element of the parameters and buffers a model is built with"""
SHARE_OF_LARGEST = 0.25
"""a part of a model named among the drivers of its size when it holds this share of the largest part"""


class MemoryLimitError(ConfigError):
    """A command that would allocate more than its process may: one line with the estimate, the
    budget and the flags that drive the estimate."""


@dataclass(frozen=True)
class MemoryBudget:
    """The bytes one process may allocate on a device, and where that figure comes from."""

    bytes: float
    source: str
    """e.g. 'MemAvailable of this host / 2 local ranks', 'free memory of cuda:0'"""

    def __str__(self) -> str:
        return f"{format_bytes(self.bytes)} ({self.source})"


def format_bytes(nbytes: float) -> str:
    """1.5e9 -> '1.5 GB', 3.2e7 -> '32 MB', 2e3 -> '2,000 bytes' (decimal units); past a petabyte
    in powers of ten, e.g. '1.2e+18 bytes'."""
    if nbytes >= 1e15:
        return f"{nbytes:.1e} bytes"
    if nbytes >= 1e12:
        return f"{nbytes / 1e12:,.1f} TB"
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:,.1f} GB"
    return f"{nbytes / 1e6:,.0f} MB" if nbytes >= 1e6 else f"{nbytes:,.0f} bytes"


def memory_budget(device: torch.device | str) -> MemoryBudget | None:
    """The budget of this process on `device` (see the module's docstring); None = no limit known."""
    device = torch.device(device)
    if _overridden():
        return _env_budget()
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return MemoryBudget(float(free), f"free memory of {device}")
    return host_budget()


def host_budget() -> MemoryBudget | None:
    """The host memory of this process: `MOEFORGE_MEMORY_LIMIT_BYTES`, else MemAvailable shared among
    the ranks of this host (LOCAL_WORLD_SIZE); None where neither is known."""
    if _overridden():
        return _env_budget()
    available = _mem_available()
    if available is None:
        return None
    ranks = _local_ranks()
    share = "" if ranks == 1 else f" / {ranks} local ranks"
    return MemoryBudget(available / ranks, f"MemAvailable of this host{share}")


def _overridden() -> bool:
    return bool(os.environ.get(ENV_LIMIT, "").strip())


def _env_budget() -> MemoryBudget | None:
    """`MOEFORGE_MEMORY_LIMIT_BYTES` as a budget (None for 'inf'); a one-line error for anything but a
    number of bytes."""
    text = os.environ.get(ENV_LIMIT, "").strip()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise ConfigError(f"{ENV_LIMIT}: got {text!r}; allowed: a number of bytes >= 0 (inf = no limit)")
    return None if math.isinf(value) else MemoryBudget(value, ENV_LIMIT)


def _mem_available() -> float | None:
    """MemAvailable of /proc/meminfo in bytes (the kernel's estimate of what can be allocated without
    swapping); None where the file is missing or has no such line."""
    try:
        with MEMINFO.open() as file:
            text = file.read(1 << 16)
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if name == "MemAvailable" and parts and parts[0].isdigit():
            return float(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return None


def _local_ranks() -> int:
    """Processes of this run on this host: LOCAL_WORLD_SIZE under torchrun, else 1."""
    text = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return int(text) if text.isdigit() and int(text) >= 1 else 1


def agreed_budgets(budgets: list[MemoryBudget | None], device: torch.device) -> list[MemoryBudget | None]:
    """The smallest of each budget over the ranks of a launched run (one all-reduce), so that every rank
    reaches the same verdict: a rank that refused alone would leave its peers waiting in their first
    collective. Unchanged in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return budgets
    where = device if device.type == "cuda" else torch.device("cpu")
    values = torch.tensor([b.bytes if b is not None else math.inf for b in budgets], dtype=torch.float64)
    values = values.to(where)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    agreed = []
    for budget, value in zip(budgets, values.tolist()):
        if math.isinf(value):
            agreed.append(None)
        elif budget is not None and value == budget.bytes:
            agreed.append(budget)
        else:
            source = budget.source if budget is not None else "a peer's"
            agreed.append(MemoryBudget(value, f"{source}, the smallest over the ranks"))
    return agreed


@dataclass(frozen=True)
class ModelMemory:
    """Bytes building `Transformer(cfg)` takes (fp32), counted in closed form."""

    parameters: float
    """every parameter, the MTP modules' included (a tied head counted once)"""
    buffers: float
    """the RoPE cos and sin tables [max_seq_len, rope width] and the routers' balancing biases"""
    transient: float
    """the float64 angles, cosines and sines the RoPE tables are computed from, freed after the build"""

    @property
    def resident(self) -> float:
        """What the built model holds: parameters and buffers."""
        return self.parameters + self.buffers

    @property
    def peak(self) -> float:
        """What the build needs at its peak: the model and the RoPE tables' temporaries."""
        return self.resident + self.transient


def model_memory(cfg: ModelConfig) -> ModelMemory:
    """Bytes of `Transformer(cfg)` in fp32, without building it; `cfg` must be validated (its bounds
    keep the per-layer count short). The RoPE temporaries (model/attention.py `rope_tables`): float64
    angles [S, D] and the float64 cosines or sines of one table at a time beside them."""
    counts = parameter_counts(cfg)
    table = cfg.max_seq_len * cfg.rope_head_dim
    biases = _moe_blocks(cfg) * cfg.moe.n_experts
    return ModelMemory(
        parameters=FP32 * (counts.total + counts.mtp_total),
        buffers=FP32 * (2 * table + biases),
        transient=8 * 2 * table,
    )


def _moe_blocks(cfg: ModelConfig) -> int:
    """Blocks with an MoE layer: the main model's after the dense ones, and the MTP modules' when the
    last block (which they copy) is one."""
    main = cfg.n_layers - cfg.n_dense_layers
    return main + (cfg.mtp_depth if cfg.is_moe_layer(cfg.n_layers - 1) else 0)


def model_flags(cfg: ModelConfig) -> list[str]:
    """The flags, with their values, of the parts of the model that hold most of its bytes: the
    routed and shared experts, the embedding and head, the other block weights, the RoPE tables."""
    counts = parameter_counts(cfg)
    experts = _moe_blocks(cfg) * moe_parameters(cfg)[0]
    embedding = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    parts = [
        (experts, ("n_layers", "moe.n_experts", "moe.expert_ffn_dim", "dim")),
        (embedding, ("vocab_size", "dim")),
        (counts.total + counts.mtp_total - experts - embedding, ("n_layers", "dim", "ffn_dim")),
        # in fp32 elements: the 2 fp32 tables and their 2 float64 temporaries
        (cfg.max_seq_len * cfg.rope_head_dim * 6, ("max_seq_len",)),
    ]
    largest = max(size for size, _ in parts)
    by_size = sorted(parts, key=lambda part: -part[0])
    names = [name for size, group in by_size if size >= SHARE_OF_LARGEST * largest for name in group]
    return [f"model.{_flag(name)}={_value(cfg, name)}" for name in dict.fromkeys(names)]


def batch_flags(train: TrainConfig) -> list[str]:
    """The flags, with their values, that set the tokens of one micro-batch (the activations)."""
    return [
        f"train.global-batch-size={train.global_batch_size}",
        f"train.micro-batch-size={train.micro_batch_size}",
        f"train.seq-len={train.seq_len}",
    ]


def _value(cfg: ModelConfig, dotted: str) -> int:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def shortfall(
    what: str, parts: dict[str, float], budget: MemoryBudget | None, flags: list[str], need: float | None = None
) -> str | None:
    """'<what> needs ~X (part a, part b) but the limit is Y (source); driven by flags' when the parts
    (or `need`, when the parts overlap) exceed `budget`; None when they fit or no budget is known."""
    need = sum(parts.values()) if need is None else need
    if budget is None or need <= budget.bytes:
        return None
    listed = ", ".join(f"{name} {format_bytes(size)}" for name, size in parts.items() if size)
    return f"{what} needs ~{format_bytes(need)} ({listed}) but the limit is {budget}; driven by {', '.join(flags)}"


def check_model_fits(
    cfg: ModelConfig, device: torch.device | str, what: str, extra: dict[str, float] | None = None
) -> None:
    """Refuse, in one line (`MemoryLimitError`), to build `cfg`'s model on `device` when it, or what
    the command allocates beside it there (`extra`, e.g. a KV cache), exceeds the process's budget.
    The model is built on the host first (with its RoPE temporaries), then moved: a model for a GPU
    needs the host's memory for its build and the GPU's for itself and `extra`. `cfg` is validated
    here: its bounds come before any count."""
    cfg.validate()
    device = torch.device(device)
    memory = model_memory(cfg)
    extra = extra or {}
    resident = {"parameters": memory.parameters, "buffers": memory.buffers}
    build = {**resident, "RoPE temporaries": memory.transient}
    flags = model_flags(cfg)
    after_build = memory.resident + sum(extra.values())
    if device.type == "cpu":
        _refuse(shortfall(what, {**build, **extra}, host_budget(), flags, max(memory.peak, after_build)))
    else:
        _refuse(shortfall(what, {**resident, **extra}, memory_budget(device), flags))
        _refuse(shortfall(f"{what}, built on the host first,", build, host_budget(), flags))


def _refuse(problem: str | None) -> None:
    if problem is not None:
        raise MemoryLimitError(
            f"{problem}; choose a smaller model or a device with more memory, or set {ENV_LIMIT}=BYTES "
            "to try anyway"
        )


def check_checkpoint_fits(path: Path | str, device: torch.device | str, tokens: int = 0) -> None:
    """`check_model_fits` for the model of a checkpoint (a run directory's newest, or one checkpoint),
    read from its meta.json before anything is built; with `tokens` positions of KV cache (generate).
    A config the checkpoint records that does not validate is a one-line `CheckpointError`."""
    checkpoint = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_meta(checkpoint)
    try:
        cfg = config_from_dict(meta.config).model
        cfg.validate()
    except ConfigError as err:
        raise ckpt.CheckpointError(f"{checkpoint}: the model it records is not valid: {err}") from None
    extra = {}
    if tokens:
        extra["KV cache"] = kv_cache_bytes_per_token(cfg, FP32) * min(tokens, cfg.max_seq_len)
    check_model_fits(cfg, device, f"the model of {checkpoint}", extra)
