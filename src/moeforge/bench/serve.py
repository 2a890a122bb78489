"""`moeforge bench serve`: output throughput, time to first token and inter-token latency of
`moeforge serve` (plain and with MTP speculation) against `transformers serve` with continuous
batching, on the same weights, under N concurrent streaming clients over loopback.

The model is a checkpoint (`--checkpoint`) or a freshly initialised `--preset` (deepseek-v3-tiny by
default: it has an MTP module to draft with), exported with moeforge's HF export so that
`transformers serve` loads the same weights (serve_servers.py). Every request has a prompt of exactly
`--prompt-tokens` tokens and asks for `--output-tokens` tokens, greedy, with the end token ignored on
both sides; output tokens are counted as the servers return them (their closing usage chunk).

Every server is started once, as a subprocess with the same torch thread count, and stays up while
the others are timed (an idle server takes under 1 % of a core). In each repeat the servers are timed
one after another, each alone under load: warmed up with one request per client, then loaded by the
clients with prompts no earlier repeat sent (so no server gains from cached prefixes); the order
rotates from one repeat to the next so that background load does not always fall on the same one.
Throughput ratios to transformers are paired within a repeat, seconds apart; the table gives their
median and range over the repeats. Speculation's acceptance rate and tokens per verify round come
from moeforge's /metrics, read before and after the timed requests. With greedy decoding of the same
weights every server should return the same text for a prompt: the table counts the texts equal to
plain moeforge's.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from moeforge.bench.serve_client import ServeBenchError, fixed_length_prompts, scrape_metrics, timed_run
from moeforge.bench import spread
from moeforge.bench.serve_measure import RequestTrace, same_texts, summarize
from moeforge.bench.serve_servers import (
    ServedModel,
    ServerCase,
    ServerProcess,
    free_port,
    moeforge_case,
    prepare_model,
    server_env,
    transformers_case,
)
from moeforge.config import ConfigError, available_presets

CASES = ("moeforge", "speculative", "transformers")
BASELINE = "transformers"
DEFAULT_PRESET = "deepseek-v3-tiny"
LABELS = {
    "moeforge": "moeforge",
    "speculative": "moeforge --speculative",
    "transformers": "transformers serve",
}


@dataclass
class ServeBenchSettings:
    checkpoint: str | None = None
    preset: str | None = None
    """a fresh model of this preset when no checkpoint is given (default deepseek-v3-tiny)"""
    clients: int = 16
    requests: int | None = None
    """requests per server and repeat (default: 8 per client)"""
    prompt_tokens: int = 64
    output_tokens: int = 64
    repeats: int = 3
    threads: int = 1
    """torch threads of every server (1: on a small CPU shared with other jobs, threads wait on each other)"""
    seed: int = 0
    cases: tuple[str, ...] = CASES
    max_seconds: float = 600.0
    """the longest one server's timed requests may take (then they are cancelled, counted unfinished)"""
    compile: bool = False
    """moeforge's servers run `serve --compile` (their graphs compiled while they start, untimed)"""
    engine_process: bool = False
    """moeforge's servers run `serve --engine-process` (the engine in a process of its own)"""

    def moeforge_flags(self) -> list[str]:
        """The flags every moeforge server of the run gets (beyond its limits and --speculative)."""
        return ["--compile"] * self.compile + ["--engine-process"] * self.engine_process

    @property
    def n_requests(self) -> int:
        return self.requests if self.requests is not None else 8 * self.clients

    def validate(self) -> None:
        unknown = [case for case in self.cases if case not in CASES]
        if unknown or not self.cases:
            raise ConfigError(f"--cases: got {','.join(unknown) or 'nothing'}; allowed: {', '.join(CASES)}")
        if self.checkpoint is not None and self.preset is not None:
            raise ConfigError(
                "--preset: a fresh model is made only without --checkpoint; give one of the two"
            )
        if self.preset is not None and self.preset not in available_presets():
            raise ConfigError(f"--preset: got {self.preset}; allowed: {', '.join(available_presets())}")
        for flag, value in (("--clients", self.clients), ("--requests", self.n_requests),
                            ("--prompt-tokens", self.prompt_tokens), ("--output-tokens", self.output_tokens),
                            ("--repeats", self.repeats), ("--threads", self.threads)):  # fmt: skip
            if value < 1:
                raise ConfigError(f"{flag}: got {value}; allowed: an integer >= 1")
        if not self.max_seconds > 0:
            raise ConfigError(f"--max-seconds: got {self.max_seconds:g}; allowed: a number > 0")


def run_serve_bench(settings: ServeBenchSettings) -> dict[str, Any]:
    settings.validate()
    result: dict[str, Any] = {
        "settings": asdict(settings),
        "requests": settings.n_requests,
        "cores": os.cpu_count(),
    }
    result["versions"] = _versions()
    with tempfile.TemporaryDirectory(prefix="moeforge-bench-serve-") as tmp:
        model = prepare_model(
            settings.checkpoint, settings.preset or DEFAULT_PRESET, settings.seed, Path(tmp)
        )
        _check_fits(model, settings)
        # one prompt per client for the warm-ups, then each repeat's timed requests' own
        count = settings.clients + settings.repeats * settings.n_requests
        prompts = fixed_length_prompts(model.tokenizer, settings.prompt_tokens, count, settings.seed)
        result["model"] = model.description
        result["skipped"] = (
            {BASELINE: reason} if BASELINE in settings.cases and (reason := _missing_peer()) else {}
        )
        result["load_average"] = [os.getloadavg()]
        runs: dict[str, list[dict[str, Any]]] = {case: [] for case in settings.cases}
        with contextlib.ExitStack() as running:
            servers = _start_servers(model, settings, result, Path(tmp), running)
            for repeat in range(settings.repeats):
                traces = _run_repeat(repeat, servers, prompts, settings, runs, result)
                for case, case_traces in traces.items():
                    if "moeforge" in traces and case != "moeforge":
                        runs[case][-1]["same_text"] = same_texts(case_traces, traces["moeforge"])
        result["exit_codes"] = {case: server.process.returncode for case, server in servers.items()}
        result["load_average"].append(os.getloadavg())
    result["runs"] = {case: case_runs for case, case_runs in runs.items() if case_runs}
    result["summary"] = summarize_cases(result["runs"])
    return result


def _start_servers(
    model: ServedModel, settings: ServeBenchSettings, result: dict[str, Any], workdir: Path, stack: contextlib.ExitStack
) -> dict[str, ServerProcess]:
    """Every case's server, started one after another (each compiles and loads alone) and left
    running in `stack`; transformers, outside our control, is skipped with the reason it failed."""
    servers = {}
    for case in settings.cases:
        if case in result["skipped"]:
            continue
        server = _server_case(case, model, settings)
        result.setdefault("commands", {})[case] = server.argv
        try:
            process = ServerProcess(server, server_env(settings.threads), workdir / f"{case}.log")
            servers[case] = stack.enter_context(process)
        except ServeBenchError as err:
            if case != BASELINE:
                raise
            result["skipped"][case] = f"failed to start: {err}"
    return servers


def _run_repeat(
    repeat: int,
    servers: dict[str, ServerProcess],
    prompts: list[str],
    settings: ServeBenchSettings,
    runs: dict[str, list[dict[str, Any]]],
    result: dict[str, Any],
) -> dict[str, list[RequestTrace]]:
    """Each running server timed once, in an order rotated by the repeat, on this repeat's prompts
    (after the warm-ups' own); the traces of those that ran."""
    active = [case for case in servers if case not in result["skipped"]]
    shift = repeat % max(len(active), 1)
    first = settings.clients + repeat * settings.n_requests
    timed = prompts[: settings.clients] + prompts[first : first + settings.n_requests]
    traces = {}
    for case in active[shift:] + active[:shift]:
        try:
            run, traces[case] = _run_case(servers[case], timed, settings)
        except ServeBenchError as err:
            if case != BASELINE:
                raise
            result["skipped"][case] = (
                f"failed in repeat {repeat}: {err}"  # a peer outside our control: its row says why
            )
            continue
        runs[case].append({"repeat": repeat, **run})
    return traces


def _server_case(case: str, model: ServedModel, settings: ServeBenchSettings) -> ServerCase:
    port = free_port()
    if case == BASELINE:
        return transformers_case(model, port)
    positions = settings.prompt_tokens + settings.output_tokens
    flags = settings.moeforge_flags()
    return moeforge_case(model, port, settings.clients, positions, case == "speculative", flags)


def _run_case(
    process: ServerProcess, prompts: list[str], settings: ServeBenchSettings
) -> tuple[dict[str, Any], list[RequestTrace]]:
    """Warm a running server up and time its requests: the run's figures and traces."""
    server = process.case
    all_bodies = [request_body(prompt, settings.output_tokens, server.request_fields) for prompt in prompts]
    warm_ups, bodies = all_bodies[: settings.clients], all_bodies[settings.clients :]
    load = os.getloadavg()
    before = scrape_metrics(process.url) if server.moeforge_metrics else {}
    traces = asyncio.run(timed_run(process.url, warm_ups, bodies, settings.clients, settings.max_seconds))
    after = scrape_metrics(process.url) if server.moeforge_metrics else {}
    figures = asdict(summarize(traces, settings.output_tokens))
    if figures["completed"] == 0:
        raise ServeBenchError(f"{server.name}: no request completed: {figures['first_error']}")
    engine = engine_figures(before, after) if server.moeforge_metrics else {}
    return {**figures, **engine, "load_average": load}, traces


def request_body(prompt: str, output_tokens: int, fields: dict) -> dict[str, Any]:
    """A streamed greedy completion of exactly `output_tokens` tokens (the server's own way of
    ignoring the end token is in `fields`), with the usage in a closing chunk."""
    return {
        "prompt": prompt, "max_tokens": output_tokens, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True}, **fields,
    }  # fmt: skip


def engine_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """moeforge's engine over the timed requests, from two scrapes of /metrics: prompt tokens taken
    from cached prefixes (~0: the prompts are random), forward passes, tokens per forward, and
    speculation's acceptance (accepted / drafted) and tokens per verify round (each round keeps its
    accepted drafts and one token of its own)."""

    def grown(name: str) -> float:
        return after.get(f"moeforge_{name}_total", 0.0) - before.get(f"moeforge_{name}_total", 0.0)

    steps, drafted, accepted, rounds = (grown(n) for n in ("engine_steps", "speculative_drafted_tokens",
                                                          "speculative_accepted_tokens", "speculative_verify_rounds"))  # fmt: skip
    return {
        "prefix_hit_tokens": grown("prefix_hit_tokens"),
        "engine_steps": steps,
        "tokens_per_step": grown("generated_tokens") / steps if steps else None,
        "acceptance": accepted / drafted if drafted else None,
        "tokens_per_round": (accepted + rounds) / rounds if rounds else None,
    }


def summarize_cases(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per server, over the repeats: median and range of throughput, of each latency percentile and of
    speculation's figures; and the throughput ratio to transformers paired within each repeat."""
    baseline = {run["repeat"]: run["tokens_per_s"] for run in runs.get(BASELINE, [])}
    summary = {}
    for case, case_runs in runs.items():
        row: dict[str, Any] = {"tokens_per_s": spread([r["tokens_per_s"] for r in case_runs])}
        for figure in ("ttft_ms", "itl_ms", "tpot_ms"):
            row[figure] = {q: spread([r[figure][q] for r in case_runs]) for q in ("p50", "p99")}
        for figure in ("acceptance", "tokens_per_round", "tokens_per_step"):
            values = [r[figure] for r in case_runs if r.get(figure) is not None]
            row[figure] = spread(values) if values else None
        ratios = [r["tokens_per_s"] / baseline[r["repeat"]] for r in case_runs if baseline.get(r["repeat"])]
        row["vs_transformers"] = spread(ratios) if ratios and case != BASELINE else None
        row["completed"] = sum(r["completed"] for r in case_runs)
        row["requests"] = sum(r["requests"] for r in case_runs)
        row["short"] = sum(r["short"] for r in case_runs)
        same = [r["same_text"] for r in case_runs if "same_text" in r]
        row["same_text"] = sum(same) if same else None
        summary[case] = row
    return summary


def _check_fits(model: ServedModel, settings: ServeBenchSettings) -> None:
    if "speculative" in settings.cases and model.mtp_depth == 0:
        raise ConfigError(
            f"--cases: speculative needs a model with MTP modules; {model.description} has model.mtp-depth=0"
        )
    positions = settings.prompt_tokens + settings.output_tokens + model.mtp_depth
    if positions > model.max_seq_len:
        raise ConfigError(
            f"--output-tokens: prompt {settings.prompt_tokens} + output {settings.output_tokens} (+ {model.mtp_depth} "
            f"draft) = {positions} positions; allowed: at most the model's context, {model.max_seq_len}"
        )


def _missing_peer() -> str | None:
    """Why `transformers serve` cannot run here, or None."""
    missing = [
        name
        for name in ("transformers", "fastapi", "uvicorn", "accelerate")
        if importlib.util.find_spec(name) is None
    ]
    return f"not installed: {', '.join(missing)} (pip install 'transformers[serving]')" if missing else None


def _versions() -> dict[str, str | None]:
    def installed(name: str) -> str | None:
        return version(name) if importlib.util.find_spec(name) is not None else None

    return {"torch": torch.__version__, "transformers": installed("transformers")}


def format_table(result: dict[str, Any]) -> str:
    """One line per server: throughput and its ratio to transformers, latency percentiles (medians
    over the repeats), speculation's figures, requests completed and texts equal to moeforge's."""
    s = result["settings"]
    loads = [load[0] for load in result["load_average"]]
    flags = " ".join(ServeBenchSettings(**s).moeforge_flags())
    lines = [
        f"bench serve: {s['clients']} clients, {result['requests']} requests of {s['prompt_tokens']} "
        f"prompt + {s['output_tokens']} output tokens (greedy, end token ignored), {s['threads']} torch thread(s) "
        f"per server, {s['repeats']} repeat(s); moeforge serve {flags or 'without flags'}; "
        f"model: {result['model']}; load average {min(loads):.1f}-{max(loads):.1f}",
        f"{'server':<24} {'output tok/s (range)':>22} {'vs transformers':>20} {'TTFT p50/p99 ms':>17} "
        f"{'ITL p50/p99 ms':>16} {'TPOT p50 ms':>11} {'accept':>7} {'tok/round':>9} {'done':>7} {'same text':>9}",
    ]
    for case, row in result["summary"].items():
        tps = row["tokens_per_s"]
        lines.append(
            f"{LABELS[case]:<24} {tps['median']:>8.1f} ({tps['min']:>5.1f}-{tps['max']:>5.1f}) "
            f"{_ratio(row['vs_transformers'], case):>20} {_pair(row['ttft_ms']):>17} {_pair(row['itl_ms']):>16} "
            f"{row['tpot_ms']['p50']['median']:>11.1f} "
            f"{_figure(row['acceptance'], '.1%'):>7} {_figure(row['tokens_per_round'], '.2f'):>9} "
            f"{row['completed']:>3}/{row['requests']:<3} {_same(row):>9}"
        )
    lines += [f"{LABELS[case]:<24} skipped: {reason}" for case, reason in result["skipped"].items()]
    return "\n".join(lines)


def _ratio(ratio: dict[str, float] | None, case: str) -> str:
    if case == BASELINE:
        return "1"
    return "-" if ratio is None else f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"


def _pair(percentiles: dict[str, dict[str, float]]) -> str:
    return f"{percentiles['p50']['median']:.0f} / {percentiles['p99']['median']:.0f}"


def _figure(value: dict[str, float] | None, spec: str) -> str:
    return "-" if value is None else format(value["median"], spec)


def _same(row: dict[str, Any]) -> str:
    return "-" if row["same_text"] is None else f"{row['same_text']}/{row['completed']}"
