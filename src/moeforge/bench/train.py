"""`moeforge bench train`: training steps of one configuration under each variant (eager,
`--train.compile`, activation checkpointing of the experts or of whole blocks), with tokens/s, peak
memory and MFU, so that a user can choose; with `--peers`, the same training step of transformers
(eager, as users run it by default) on the same weights.

- **Each measurement in a fresh process** (spawned): peak memory is then the variant's own, not the
  largest of all so far. On the CPU it is the peak resident set (VmHWM), reset after the warm-up
  steps (`/proc/self/clear_refs`) so that compilation and first-touch allocations do not count
  where the kernel allows it; on CUDA, `torch.cuda.max_memory_allocated` after the warm-up.
- **Interleaved repeats**: the variants take turns, `repeats` rounds, and the table gives each
  figure's range over the rounds (the machine may be shared: look at the spread before the ratio).
- **MFU** = model FLOPs per token (`training_flops_per_token`: 6 x active parameters + attention)
  x tokens/s over the peak: on CUDA the device's dense bf16 peak, on the CPU this machine's GEMM
  rate in the case's precision (fp32, or bf16 for the bf16 cases: with AMX many times the fp32
  one) measured in the same run (a large square matmul, best of a few, with torch's threads).
- **bf16 on the CPU** warms up at least `CPU_BF16_WARMUP` steps: oneDNN compiles a kernel for each
  new GEMM shape it meets.
- **Peers** (`--peers`, needs `transformers`): a 4-layer DeepSeek-V3-like and Qwen3-MoE-like model
  are built with transformers from small configs and saved; moeforge imports them
  (`train.init-from-hf`) and trains them with its trainer (eager and compiled), transformers with
  its model's forward, cross-entropy on the same batches from moeforge's loader, gradient clipping
  at 1 and AdamW with the same hyper-parameters (fused, like moeforge's and like transformers'
  `Trainer` by default), in fp32 as users run it by default and under bf16 autocast. The ratio is
  moeforge's tokens/s over transformers' in fp32, and for a bf16 variant also over transformers'
  in bf16.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moeforge.config import Config, ConfigError, load_config
from moeforge.data import PackedLoader, build_datasets
from moeforge.model.flops import training_flops_per_token
from moeforge.interop import apply_hf_model, hf_weights_loader
from moeforge.plan import device_peak_flops
from moeforge.train.trainer import Trainer


VARIANTS: dict[str, dict[str, str]] = {
    "eager": {},
    "compile": {"train.compile": "true"},
    "ac-experts": {"train.activation-checkpoint": "experts"},
    "ac-block": {"train.activation-checkpoint": "block"},
    "compile+ac-block": {"train.compile": "true", "train.activation-checkpoint": "block"},
    "bf16": {"train.dtype": "bf16"},
    "compile+bf16": {"train.compile": "true", "train.dtype": "bf16"},
}
"""variant name -> the dotted overrides it adds to the configuration"""

PEER_VARIANTS = ("eager", "compile", "compile+bf16")
"""the moeforge variants timed against transformers (bf16 ones also against transformers under
bf16 autocast, like for like)"""

CPU_BF16_WARMUP = 10
"""untimed steps before a bf16 measurement on the CPU at least: oneDNN compiles a kernel for each new
GEMM shape, and the experts' shapes (rows per expert, padded to 64) take several steps to have all
been seen; what a long run pays once, like compilation"""

HF_PEERS: dict[str, dict[str, Any]] = {
    "deepseek-v3": {
        "class": "DeepseekV3Config", "vocab_size": 256, "hidden_size": 256, "intermediate_size": 768,
        "moe_intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "n_routed_experts": 16,
        "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1,
        "q_lora_rank": 128, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "max_position_embeddings": 512, "initializer_range": 0.02,
    },
    "qwen3-moe": {
        "class": "Qwen3MoeConfig", "vocab_size": 256, "hidden_size": 256, "intermediate_size": 768,
        "moe_intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "num_experts": 16, "num_experts_per_tok": 4, "norm_topk_prob": True, "mlp_only_layers": [0],
        "max_position_embeddings": 512, "initializer_range": 0.02,
    },
}  # fmt: skip
"""the peers' small configs (transformers config class and fields); byte vocabulary, so that
moeforge's embedded corpus feeds both"""


@dataclasses.dataclass(frozen=True)
class TrainBenchSettings:
    preset: str | None = None
    """the model preset (default: tiny); ignored for the peers"""
    overrides: tuple[tuple[str, str], ...] = ()
    """dotted --model.* / --train.* overrides, as `moeforge train` takes them"""
    variants: tuple[str, ...] = ("eager", "compile", "ac-experts", "ac-block")
    steps: int = 4
    """timed steps per measurement"""
    warmup: int = 2
    """untimed steps before them (compilation happens here)"""
    repeats: int = 2
    """rounds of all measurements, each in fresh processes"""
    peers: bool = False
    """also time transformers' training step on imported models"""
    peer_batch: tuple[int, int] = (8, 256)
    """(sequences, tokens per sequence) of the peer comparison"""
    gemm_size: int = 2048

    def validate(self) -> None:
        for name in ("steps", "repeats", "gemm_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: got {getattr(self, name)}; allowed: an integer >= 1")
        if self.warmup < 0:
            raise ConfigError(f"--warmup: got {self.warmup}; allowed: an integer >= 0")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ConfigError(f"--variants: got {','.join(self.variants)!r}; allowed: a comma-separated subset of "
                              f"{', '.join(VARIANTS)}")


def bench_config(settings: TrainBenchSettings, variant: str, init_from_hf: str = "") -> Config:
    """The run configuration of one variant: preset <- overrides <- the variant's flags, quiet."""
    values = dict(settings.overrides)
    if init_from_hf:
        batch, seq = settings.peer_batch
        values.update({"train.init-from-hf": init_from_hf, "train.global-batch-size": str(batch),
                       "train.seq-len": str(seq), "train.micro-batch-size": "0"})
    values.update(VARIANTS[variant])
    values.update({"train.progress": "false", "train.report": "false", "train.eval-every": "0",
                   "train.steps": str(max(settings.warmup, CPU_BF16_WARMUP) + settings.steps + 1000)})
    preset = None if init_from_hf else settings.preset
    return load_config(preset, overrides=values, apply_init_from=apply_hf_model)


def run_train_bench(settings: TrainBenchSettings) -> dict[str, Any]:
    """Measure the machine's peak, then every variant (and peer) `repeats` times in fresh processes,
    interleaved; a JSON-ready dict."""
    settings.validate()
    configs = {v: bench_config(settings, v) for v in settings.variants}  # errors first
    device = _device(next(iter(configs.values())))
    peak, peak_source = measured_peak(device, settings.gemm_size)
    peaks = {"fp32": peak, "bf16": peak}
    bf16_on_cpu = device == "cpu" and (
        settings.peers or any(cfg.train.computes_in_bf16(device) for cfg in configs.values())
    )
    if bf16_on_cpu:
        peaks["bf16"], bf16_source = measured_peak(device, settings.gemm_size, torch.bfloat16)
    result: dict[str, Any] = {
        "preset": settings.preset or "tiny",
        "overrides": dict(settings.overrides),
        "device": device,
        "threads": torch.get_num_threads(),
        "peak_flops": peak,
        "peak_source": peak_source,
        **({"peak_flops_bf16": peaks["bf16"], "peak_source_bf16": bf16_source} if bf16_on_cpu else {}),
        "steps": settings.steps,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
    }
    jobs: list[tuple[str, Callable[..., dict[str, Any]], tuple]] = [
        (v, _moeforge_run, (cfg, warmup_steps(settings, cfg, device), settings.steps))
        for v, cfg in configs.items()
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if settings.peers:
            for name, job in _peer_jobs(settings, Path(tmp)):
                jobs.append((name, *job))
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in jobs}
        for round_ in range(settings.repeats):
            for name, fn, args in jobs:
                runs[name].append(_in_fresh_process(fn, args))
                _say_done(name, round_, runs[name][-1])
    result["cases"] = {name: summarise(r, peaks[_dtype_of(r)]) for name, r in runs.items()}
    if settings.peers:
        result["peers"] = peer_ratios(result["cases"])
    return result


def _say_done(name: str, round_: int, run: dict[str, Any]) -> None:
    """One line on stderr per finished measurement: the bench takes minutes (compilation)."""
    if "error" in run:
        figure = run["error"]
    else:
        figure = f"{run['tokens_per_step'] / statistics.median(run['step_s']):,.0f} tokens/s"
    print(f"bench train: round {round_ + 1}, {name}: {figure}", file=sys.stderr, flush=True)


def _device(cfg: Config) -> str:
    name = cfg.train.device
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def measured_peak(device: str, size: int, dtype: torch.dtype = torch.float32, repeats: int = 5) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from): the device's bf16 figure on CUDA, else this CPU's GEMM rate
    in `dtype`, best of `repeats` n x n x n matmuls."""
    if device == "cuda":
        return device_peak_flops("cuda"), f"bf16 peak of {torch.cuda.get_device_name()}"
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    name = str(dtype).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16")
    return 2 * size**3 / best, f"{name} {size}^3 matmul on this CPU, {torch.get_num_threads()} threads"


def warmup_steps(settings: TrainBenchSettings, cfg: Config, device: str) -> int:
    """Untimed steps before a measurement: `settings.warmup`, at least `CPU_BF16_WARMUP` for bf16 on
    the CPU."""
    if device == "cpu" and cfg.train.computes_in_bf16(device):
        return max(settings.warmup, CPU_BF16_WARMUP)
    return settings.warmup


def _dtype_of(runs: list[dict[str, Any]]) -> str:
    """'bf16' or 'fp32': what a case's runs computed in (the peak its MFU is taken against)."""
    return next((r["compute_dtype"] for r in runs if "compute_dtype" in r), "fp32")


def _in_fresh_process(fn: Callable[..., dict[str, Any]], args: tuple) -> dict[str, Any]:
    """fn(*args) in a new spawned process (its own memory peak); its result dict."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(send, fn, args))
    process.start()
    send.close()
    try:
        outcome = receive.recv()
    except EOFError:
        outcome = {"error": "the process died (out of memory?)"}
    process.join()
    return outcome


def _child(send: Any, fn: Callable[..., dict[str, Any]], args: tuple) -> None:
    try:
        outcome = fn(*args)
    except Exception as err:  # reported in the table, the other measurements go on
        outcome = {"error": f"{type(err).__name__}: {err}"}
    send.send(outcome)
    send.close()


def _moeforge_run(cfg: Config, warmup: int, steps: int) -> dict[str, Any]:
    """`moeforge train`'s trainer, with the weights of train.init-from-hf when set: its step times."""
    with tempfile.TemporaryDirectory() as out:
        run = Trainer(cfg, out, init_weights=hf_weights_loader(cfg) if cfg.train.init_from_hf else None)
        for _ in range(warmup):
            run.train_step()
        times = _timed(run.train_step, steps, cfg.train.device)
    tokens = cfg.train.global_batch_size * cfg.train.seq_len
    return {"step_s": times, "tokens_per_step": tokens, "peak_memory": peak_memory(),
            "flops_per_token": training_flops_per_token(cfg.model, cfg.train.seq_len),
            "compute_dtype": "bf16" if cfg.train.computes_in_bf16(_device(cfg)) else "fp32"}


def _timed(step: Callable[[], Any], steps: int, device: str) -> list[float]:
    """Each step's seconds, after the warm-up's memory peak is forgotten."""
    reset_peak_memory()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def reset_peak_memory() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # "5" resets the peak resident set size (Linux proc(5), clear_refs)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory() -> dict[str, Any]:
    """{'bytes': peak, 'kind': what was measured}: max allocated on CUDA, else the peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"bytes": torch.cuda.max_memory_allocated(), "kind": "CUDA max allocated"}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"bytes": int(line.split()[1]) * 1024, "kind": "peak RSS"}
    except OSError:
        pass
    import resource

    return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "kind": "peak RSS (getrusage)"}


def summarise(runs: list[dict[str, Any]], peak: float | None) -> dict[str, Any]:
    """Per-case figures over the repeats: tokens/s (median step of each run) and their range,
    peak memory and MFU."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0]["error"]}
    rates = [r["tokens_per_step"] / statistics.median(r["step_s"]) for r in good]
    mfu = [rate * good[0]["flops_per_token"] / peak for rate in rates] if peak else None
    memory = [r["peak_memory"]["bytes"] for r in good]
    return {
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_range": [min(rates), max(rates)],
        "peak_memory_bytes": statistics.median(memory),
        "peak_memory_range": [min(memory), max(memory)],
        "memory_kind": good[0]["peak_memory"]["kind"],
        "mfu": statistics.median(mfu) if mfu else None,
        "mfu_range": [min(mfu), max(mfu)] if mfu else None,
        "runs": len(good),
    }


# ----------------------------------------------------------------------------------------------
# transformers as a peer


def _peer_jobs(settings: TrainBenchSettings, tmp: Path) -> list[tuple[str, tuple[Callable[..., dict[str, Any]], tuple]]]:
    try:
        import transformers
    except ImportError:
        raise ConfigError("--peers: needs transformers (pip install 'moeforge[hf]')") from None
    jobs = []
    for name, fields in HF_PEERS.items():
        fields = dict(fields)
        config = getattr(transformers, fields.pop("class"))(**fields)
        torch.manual_seed(0)
        path = tmp / name
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
        for variant in PEER_VARIANTS:
            cfg = bench_config(settings, variant, init_from_hf=str(path))
            warmup = warmup_steps(settings, cfg, _device(cfg))
            jobs.append((f"{name}/moeforge-{variant}", (_moeforge_run, (cfg, warmup, settings.steps))))
        for peer_case, variant in (("transformers", "eager"), ("transformers-bf16", "bf16")):
            cfg = bench_config(settings, variant, init_from_hf=str(path))
            warmup = warmup_steps(settings, cfg, _device(cfg))
            jobs.append((f"{name}/{peer_case}", (_transformers_run, (str(path), cfg, warmup, settings.steps))))
    return jobs


def _transformers_run(path: str, cfg: Config, warmup: int, steps: int) -> dict[str, Any]:
    """transformers' model from `path`, trained as a user would: forward, cross-entropy on the same
    batches as moeforge's run, clip, AdamW (same hyper-parameters, decay on every weight; fused, as
    transformers' `Trainer` runs it by default: `optim="adamw_torch_fused"`); under bf16 autocast
    where `cfg` computes in bf16 (fp32 weights, as `Trainer(bf16=True)` runs it)."""
    import transformers

    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2),
                                  weight_decay=tcfg.weight_decay, fused=True)
    _, train_tokens, _ = build_datasets(cfg.data, tcfg.seq_len)
    loader = PackedLoader(train_tokens, tcfg.seq_len, tcfg.global_batch_size, tcfg.seed, 0, 1)

    device = _device(cfg)
    bf16 = cfg.train.computes_in_bf16(device)

    def step() -> None:
        inputs, targets = loader.next_batch()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=inputs).logits
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = _timed(step, steps, "cpu")
    return {"step_s": times, "tokens_per_step": tcfg.global_batch_size * tcfg.seq_len, "peak_memory": peak_memory(),
            "flops_per_token": training_flops_per_token(cfg.model, tcfg.seq_len),
            "compute_dtype": "bf16" if bf16 else "fp32",
            "experts_implementation": getattr(model.config, "_experts_implementation", None)}


def peer_ratios(cases: dict[str, Any]) -> dict[str, Any]:
    """moeforge's tokens/s over transformers' for each peer model and moeforge variant (against
    transformers as users run it by default: fp32 eager), with the range of the ratio over the
    repeats' extremes; a bf16 variant also against transformers under bf16 autocast ('... vs bf16')."""
    ratios: dict[str, Any] = {}
    for name in HF_PEERS:
        for variant in PEER_VARIANTS:
            case = cases.get(f"{name}/moeforge-{variant}", {})
            baselines = [("", "transformers")] + ([(" vs bf16", "transformers-bf16")] if "bf16" in variant else [])
            for suffix, peer_case in baselines:
                base = cases.get(f"{name}/{peer_case}", {})
                if "tokens_per_s" in case and "tokens_per_s" in base:
                    low, high = case["tokens_per_s_range"]
                    ratios[f"{name}/{variant}{suffix}"] = {
                        "ratio": case["tokens_per_s"] / base["tokens_per_s"],
                        "range": [low / base["tokens_per_s_range"][1], high / base["tokens_per_s_range"][0]],
                        "baseline": peer_case,
                    }
    return ratios


def format_table(result: dict[str, Any]) -> str:
    peak = result["peak_flops"]
    peak_text = f"{peak / 1e9:,.0f} GFLOP/s ({result['peak_source']})" if peak else "unknown"
    if result.get("peak_flops_bf16"):
        peak_text += f"; bf16 cases' MFU against {result['peak_flops_bf16'] / 1e9:,.0f} GFLOP/s ({result['peak_source_bf16']})"
    lines = [
        f"bench train: preset {result['preset']} {result['overrides'] or ''} on {result['device']}, "
        f"{result['steps']} timed steps after {result['warmup']}, {result['repeats']} rounds of fresh processes; "
        f"peak {peak_text}",
        f"{'case':<34} {'tokens/s':>10} {'range':>17} {'peak memory':>12} {'MFU':>7}",
    ]
    for name, case in result["cases"].items():
        if "error" in case:
            lines.append(f"{name:<34} error: {case['error']}")
            continue
        low, high = case["tokens_per_s_range"]
        mfu = f"{case['mfu']:.1%}" if case["mfu"] is not None else "-"
        memory = f"{case['peak_memory_bytes'] / 2**20:,.0f} MiB"
        lines.append(f"{name:<34} {case['tokens_per_s']:>10,.0f} {f'{low:,.0f}-{high:,.0f}':>17} {memory:>12} {mfu:>7}")
    lines.append(f"(memory: {next(iter(result['cases'].values())).get('memory_kind', '?')})")
    for name, ratio in result.get("peers", {}).items():
        baseline = "transformers' (bf16 autocast)" if ratio.get("baseline") == "transformers-bf16" else "transformers'"
        lines.append(f"{name}: {ratio['ratio']:.2f}x {baseline} tokens/s "
                     f"(range {ratio['range'][0]:.2f}-{ratio['range'][1]:.2f})")
    return "\n".join(lines)
