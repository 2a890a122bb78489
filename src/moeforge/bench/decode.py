"""`moeforge bench decode`: greedy decoding, batch 1, moeforge against transformers on the same weights.

For each architecture (a small DeepSeek-V3-like model with MLA, a Qwen3-MoE-like one with GQA), a
random model is made with `transformers` from a config, saved, and imported with `moeforge.from_hf`.
In one process, repeats interleaved so that background load hits every case alike:

- transformers: `model.generate(do_sample=False)`, eager, with its default (dynamic) cache;
- moeforge eager: `generate` (static caches, the decoding step of `infer/decode.py`);
- moeforge compiled: the same with the step compiled (compilation timed apart, before the repeats).

Speeds are new tokens over the whole call, prefill included (transformers' `generate` does not
split them): the best of the repeats and their range. Ratios: of the bests, and per repeat (the
cases of one repeat run back to back, under the same background load) their median and range. The tokens must be identical; a
difference counts as a tie when the top two of transformers' logits at that step are within
`TIE_GAP` (float rounding may then pick either). Bandwidth: (active weight bytes + KV cache bytes up
to the token) per token x tokens/s, against the machine's copy bandwidth measured in the same run
(every core copying; the copy at the bench's thread count is printed beside it).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeforge.config import ConfigError
from moeforge.infer import GenerationResult, SamplingConfig, generate
from moeforge.interop import from_hf
from moeforge.model.transformer import Transformer

TIE_GAP = 1e-4
VOCAB = 2048
COMMON = {
    "vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_experts_per_tok": 4, "max_position_embeddings": 512,
    "initializer_range": 0.1, "rms_norm_eps": 1e-6,
}  # fmt: skip
MODELS = {
    "deepseek-v3": ("DeepseekV3Config", {
        **COMMON, "n_routed_experts": 16, "n_shared_experts": 1, "n_group": 4, "topk_group": 2,
        "first_k_dense_replace": 1, "q_lora_rank": 64, "kv_lora_rank": 64, "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16, "v_head_dim": 32, "routed_scaling_factor": 2.5,
    }),
    "qwen3-moe": ("Qwen3MoeConfig", {
        **COMMON, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 16, "norm_topk_prob": True,
        "mlp_only_layers": [], "rope_theta": 10000.0,
    }),
}  # fmt: skip
"""4 layers of width 256, 16 experts of width 128, top-4 (DeepSeek: 1 shared, first layer dense)"""


@dataclass
class DecodeBenchSettings:
    models: tuple[str, ...] = tuple(MODELS)
    new_tokens: int = 128
    prompt_len: int = 16
    repeats: int = 5
    threads: int = 1
    """torch threads for every case (1: on a small CPU shared with other jobs, threads wait on each other)"""
    compile: bool = True

    def validate(self) -> None:
        unknown = [name for name in self.models if name not in MODELS]
        if unknown:
            raise ConfigError(f"--models: got {', '.join(unknown)}; allowed: {', '.join(MODELS)}")
        for flag, value in (("--new-tokens", self.new_tokens), ("--prompt-len", self.prompt_len),
                            ("--repeats", self.repeats), ("--threads", self.threads)):  # fmt: skip
            if value < 1:
                raise ConfigError(f"{flag}: got {value}; allowed: an integer >= 1")


@dataclass
class Timings:
    seconds: list[float] = field(default_factory=list)

    def tokens_per_s(self, tokens: int) -> tuple[float, float]:
        """(best, worst) tokens/s over the repeats."""
        rates = [tokens / s for s in self.seconds]
        return max(rates), min(rates)


def run_decode_bench(settings: DecodeBenchSettings) -> dict[str, Any]:
    settings.validate()
    transformers = _transformers()
    cores, threads_before = os.cpu_count() or 1, torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        copy_gb_s = copy_bandwidth_gb_s()  # the machine's: every core copying
        torch.set_num_threads(settings.threads)
        copy_at_threads_gb_s = copy_bandwidth_gb_s()
        rows = [_bench_model(transformers, name, settings) for name in settings.models]
    finally:
        torch.set_num_threads(threads_before)
    return {
        "settings": vars(settings),
        "copy_gb_s": copy_gb_s,
        "cores": cores,
        "copy_at_threads_gb_s": copy_at_threads_gb_s,
        "threads": settings.threads,
        "models": rows,
    }


def copy_bandwidth_gb_s(n_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Memory bandwidth as a large tensor copy achieves it at the current torch thread count:
    (read + write) bytes over the best time."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * n_bytes / best / 1e9


def _bench_model(transformers: Any, name: str, settings: DecodeBenchSettings) -> dict[str, Any]:
    hf, model = _same_weights(transformers, name)
    prompt = torch.randint(0, VOCAB, (1, settings.prompt_len), generator=torch.Generator().manual_seed(1))
    n = settings.new_tokens

    def run_hf() -> tuple[float, list[int]]:
        started = time.perf_counter()
        out = hf.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        return time.perf_counter() - started, out[0, prompt.shape[1] :].tolist()

    def run_moeforge(compile: bool) -> tuple[float, list[int], Any]:
        result = greedy(model, prompt[0].tolist(), n, compile)
        return result.prefill_s + result.decode_s, result.new_tokens, result

    compile_s = run_moeforge(True)[2].compile_s if settings.compile else 0.0
    cases = {"transformers": run_hf, "eager": lambda: run_moeforge(False)}
    if settings.compile:
        cases["compiled"] = lambda: run_moeforge(True)
    times = {case: Timings() for case in cases}
    tokens: dict[str, list[int]] = {}
    for _ in range(settings.repeats):
        for case, run in cases.items():
            seconds, tokens[case], *_ = run()
            times[case].seconds.append(seconds)
    result = greedy(model, prompt[0].tolist(), n, False)
    speeds = {case: t.tokens_per_s(n) for case, t in times.items()}
    row = {
        "model": name,
        "attention": model.cfg.attention,
        "tokens_per_s": {case: best for case, (best, _) in speeds.items()},
        "tokens_per_s_range": {case: [low, best] for case, (best, low) in speeds.items()},
        "compile_s": compile_s,
        "bytes_per_token": result.bytes_per_token,
        "active_weight_bytes": result.active_weight_bytes,
        "kv_bytes_per_token": result.kv_bytes_per_token,
    }
    row["vs_transformers"] = {c: speeds[c][0] / speeds["transformers"][0] for c in cases if c != "transformers"}
    row["vs_transformers_per_repeat"] = {
        c: paired_ratios(times["transformers"].seconds, times[c].seconds) for c in cases if c != "transformers"
    }
    if settings.compile:
        row["compiled_vs_eager"] = speeds["compiled"][0] / speeds["eager"][0]
    row["bandwidth_gb_s"] = {c: row["bytes_per_token"] * speeds[c][0] / 1e9 for c in cases}
    row["tokens"] = {c: compare_tokens(tokens["transformers"], tokens[c], _hf_logits(hf, prompt, n)) for c in cases}
    return row


def paired_ratios(baseline_s: list[float], case_s: list[float]) -> dict[str, float]:
    """Speed-up over the baseline within each repeat (the two ran back to back, under the same
    background load): median, min and max over the repeats."""
    ratios = sorted(base / case for base, case in zip(baseline_s, case_s))
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}


def compare_tokens(reference: list[int], tokens: list[int], logits: torch.Tensor) -> dict[str, Any]:
    """Whether `tokens` equal `reference` (transformers'); at the first difference, the gap between
    the top two of the reference's logits [steps, vocab] there, and whether it is a tie (< TIE_GAP).
    Past a difference the two continue from different tokens, so only the first one counts."""
    first = next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), None)
    if first is None:
        return {"identical": len(reference) == len(tokens), "first_difference": None}
    top2 = logits[first].topk(2).values
    gap = float(top2[0] - top2[1])
    return {"identical": False, "first_difference": first, "top2_gap": gap, "tie": gap < TIE_GAP}


def _hf_logits(hf: Any, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' greedy logits at each of the n steps, [n, vocab] (an untimed run)."""
    out = hf.generate(
        prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    return torch.cat(out.logits).float()


def greedy(model: Transformer, prompt: list[int], new_tokens: int, compile: bool) -> GenerationResult:
    """moeforge's greedy decoding of `new_tokens` after `prompt`, the decoding step compiled or not."""
    return generate(model, prompt, new_tokens, SamplingConfig(temperature=0), compile=compile)


def _same_weights(transformers: Any, name: str) -> tuple[Any, Transformer]:
    """A random transformers model of this architecture and the moeforge model imported from its
    saved checkpoint (DeepSeek's routing correction biases made random too, so that they matter)."""
    config_class, values = MODELS[name]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**values)).float().eval()
    with torch.no_grad():
        for module in hf.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.uniform_(-0.1, 0.1)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(Path(tmp))
        model = from_hf(tmp, progress=False)
    return hf, model


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "bench decode: needs the peer it compares with, transformers; allowed: pip install 'moeforge[hf]'"
        ) from None
    transformers.logging.set_verbosity_error()
    return transformers


def format_table(result: dict[str, Any]) -> str:
    """One line per model: tokens/s of each case, the ratios, tokens identical, bandwidth."""
    copy_gb_s = result["copy_gb_s"]
    lines = [
        f"greedy decoding, batch 1, {result['settings']['new_tokens']} new tokens, {result['threads']} thread(s); "
        f"copy bandwidth {copy_gb_s:.1f} GB/s on {result['cores']} cores (\"of copy\"), "
        f"{result['copy_at_threads_gb_s']:.1f} GB/s on {result['threads']} thread(s)",
        f"{'model':<12} {'case':<13} {'tokens/s (range)':>22} {'vs hf: best, per repeat':>28} {'GB/s':>6} "
        f"{'of copy':>8}  tokens",
    ]
    for row in result["models"]:
        for case, best in row["tokens_per_s"].items():
            low, high = row["tokens_per_s_range"][case]
            bandwidth = row["bandwidth_gb_s"][case]
            lines.append(
                f"{row['model']:<12} {case:<13} {best:>8.1f} ({low:>5.1f}-{high:>5.1f}) {_ratios(row, case):>28} "
                f"{bandwidth:>6.2f} {bandwidth / copy_gb_s:>8.1%}  {_tokens_verdict(row['tokens'][case])}"
            )
        extra = f"; compiled vs eager {row['compiled_vs_eager']:.2f}x, compile {row['compile_s']:.0f} s" if (
            "compiled_vs_eager" in row
        ) else ""
        lines.append(
            f"{'':<12} {row['bytes_per_token'] / 1e6:.2f} MB read per token ({row['attention']}){extra}"
        )
    return "\n".join(lines)


def _ratios(row: dict[str, Any], case: str) -> str:
    if case not in row["vs_transformers"]:
        return ""
    paired = row["vs_transformers_per_repeat"][case]
    return (
        f"{row['vs_transformers'][case]:.2f}x, {paired['median']:.2f}x "
        f"({paired['min']:.2f}-{paired['max']:.2f})"
    )


def _tokens_verdict(comparison: dict[str, Any]) -> str:
    if comparison["identical"]:
        return "identical"
    first, gap = comparison["first_difference"], comparison.get("top2_gap", float("nan"))
    kind = "a tie" if comparison.get("tie") else "NOT a tie"
    return f"differ from token {first} (top-2 gap {gap:.1e}: {kind})"
