"""`moeforge bench data`: the data path against what it feeds, each figure a ratio to a baseline timed
in the same run, every round's figures kept (the machine may be shared: read the spread first).

- **Prepare**: tokens/s and MB/s of input of `prepare` (read, tokenize on `workers` processes, write,
  merge, hash the outputs) on a generated corpus, against the same tokenizer's `encode_batch` over the
  same documents in this one process, chunk by chunk as `prepare` batches them (read before the clock
  starts, nothing written): what the format and the workers cost or win over plain tokenizing.
- **Loader**: tokens/s of `PackedLoader.next_batch` over the prepared memory map, against the tokens/s
  a real training step of the run's model consumes (a few steps of `moeforge.train.trainer.Trainer`).
  The ratio is how many times faster the loader is
  than training needs. The files were just written, so their pages are in the page cache: a cold
  disk is not measured here.
- **Start-up**: time to the end of the first training step and the peak resident set (VmHWM), with
  its anonymous and file-backed parts after step 1, for two prepared corpora of different sizes, each
  run in a fresh spawned interpreter that counts from its start (imports included, as `moeforge
  train` pays them); with 2 processes, two gloo ranks (the slower rank's time, the larger rank's
  memory). The ratios large/small say whether start-up grows with the corpus: the token files are
  memory maps, so only the pages of the batches' windows count as file-backed RSS.

Corpora are generated (`write_corpus`): paragraphs of the embedded text drawn with a fixed seed, so
the same size and seed give the same file byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import torch

from moeforge.config import Config, ConfigError, DataConfig, load_config
from moeforge.data import PackedLoader, Tokenizer, TokenArray, build_datasets, build_tokenizer
from moeforge.data.prepare import PrepareOptions, prepare
from moeforge.data.sources import iter_chunks, list_sources
from moeforge.parallel.spawn import free_port
from moeforge.train.trainer import Trainer


Loader = Callable[[TokenArray, int, int, int], PackedLoader]
"""(train tokens, seq_len, global batch size, seed) -> the loader timed (PackedLoader by default)"""

VAL_FRACTION = 0.01
"""the share of documents every prepared corpus holds out (training needs a validation split)"""


@dataclasses.dataclass(frozen=True)
class DataBenchSettings:
    size_mb: float = 4.0
    """the corpus of the prepare and loader measurements"""
    tokenizer: str = "byte"
    """'byte' or the path of a tokenizer.json, for prepare, its baseline and training"""
    workers: int = 1
    """prepare's worker processes"""
    chunk_mb: float = 1.0
    """prepare's chunk of input per task (and the baseline's batch)"""
    repeats: int = 3
    """rounds of every measurement"""
    loader_batches: int = 200
    """timed `next_batch` calls per round"""
    train_steps: int = 3
    """timed training steps per round, after one untimed"""
    startup_mb: tuple[float, ...] = (2.0, 50.0)
    """(small, large) corpora of the start-up measurement; () skips it"""
    processes: tuple[int, ...] = (1,)
    """start-up on 1 process, and on 2 with --two-processes"""
    overrides: tuple[tuple[str, str], ...] = ()
    """dotted --model.* / --train.* overrides of the training runs"""
    work_dir: str = ""
    """where corpora and prepared directories go (default: the system's temporary directory)"""

    def validate(self) -> None:
        for name in ("repeats", "loader_batches", "train_steps", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: got {getattr(self, name)}; allowed: an integer >= 1")
        if not self.size_mb > 0:
            raise ConfigError(f"--size-mb: got {self.size_mb}; allowed: a number > 0")
        if self.startup_mb and (len(self.startup_mb) != 2 or not 0 < self.startup_mb[0] < self.startup_mb[1]):
            raise ConfigError(f"--startup-mb: got {','.join(map(str, self.startup_mb))}; allowed: SMALL,LARGE "
                              "with 0 < SMALL < LARGE")
        if self.work_dir and not Path(self.work_dir).is_dir():
            raise ConfigError(f"--work-dir: {self.work_dir!r} is not a directory")
        if any(p not in (1, 2) for p in self.processes):
            raise ConfigError(f"processes: got {self.processes}; allowed: 1 and 2")
        PrepareOptions((), Path(), chunk_bytes=self.chunk_bytes, workers=self.workers).validate()
        build_tokenizer(DataConfig(tokenizer=self.tokenizer))  # a bad tokenizer.json is one line, first

    @property
    def chunk_bytes(self) -> int:
        return int(self.chunk_mb * 2**20)


def run_data_bench(
    settings: DataBenchSettings,
    baseline_tokenizer: Tokenizer | None = None,
    loader: Loader = PackedLoader,
) -> dict[str, Any]:
    """Every measurement of the module docstring; a JSON-ready dict. `baseline_tokenizer` (default:
    `settings.tokenizer`'s) and `loader` are the pieces timed as the baselines' and the loader's
    (a test injects a known cost through them)."""
    settings.validate()
    tokenizer = baseline_tokenizer or build_tokenizer(DataConfig(tokenizer=settings.tokenizer))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=settings.work_dir or None) as tmp:
        work = Path(tmp)
        corpus = work / "corpus.jsonl"
        written = write_corpus(corpus, settings.size_mb)
        rounds = [prepare_round(corpus, work / f"prepared-{r}", settings, tokenizer) for r in range(settings.repeats)]
        cfg = run_config(settings, str(work / "prepared-0"))
        loader_rounds = [loader_round(cfg, settings, loader) for _ in range(settings.repeats)]
        startup = measure_startup(settings, work) if settings.startup_mb else {}
    return {
        "config": {
            **dataclasses.asdict(settings),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "seq_len": cfg.train.seq_len,
            "global_batch_size": cfg.train.global_batch_size,
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
        },
        "prepare": {**written, **summarise_prepare(rounds)},
        "loader": summarise_loader(loader_rounds),
        "startup": startup,
    }


def run_config(settings: DataBenchSettings, data_path: str, world_size: int = 1) -> Config:
    """The training runs' config: the default preset <- overrides, on `data_path`, quiet, fp32."""
    values = {**dict(settings.overrides), "data.path": data_path, "data.tokenizer": settings.tokenizer,
              "train.progress": "false", "train.report": "false", "train.eval-every": "0",
              "train.steps": str(settings.train_steps + 1000)}  # fmt: skip
    return load_config(overrides=values, world_size=world_size)


# ----------------------------------------------------------------------------------------------
# The corpus


def write_corpus(path: Path, size_mb: float, seed: int = 0) -> dict[str, Any]:
    """A .jsonl corpus of about `size_mb` megabytes: each document 1-12 paragraphs of the embedded
    text (Python's reference manual), drawn with `seed`; {'corpus_bytes', 'documents'}."""
    paragraphs = [p for key in sorted(topics) for p in topics[key].split("\n\n") if p.strip()]
    rng = random.Random(seed)
    target, written, documents = int(size_mb * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            text = "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(1, 12)))
            line = json.dumps({"text": text}) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))
            documents += 1
    return {"corpus_bytes": written, "documents": documents}


def prepare_corpus(corpus: Path, out: Path, settings: DataBenchSettings) -> dict[str, Any]:
    """`prepare` of `corpus` into `out` as the bench runs it; the manifest."""
    options = PrepareOptions((str(corpus),), out, settings.tokenizer, val_fraction=VAL_FRACTION,
                             workers=settings.workers, chunk_bytes=settings.chunk_bytes)  # fmt: skip
    return prepare(options, progress=False)


# ----------------------------------------------------------------------------------------------
# Prepare vs encode_batch


def prepare_round(corpus: Path, out: Path, settings: DataBenchSettings, tokenizer: Tokenizer) -> dict[str, float]:
    """One round: the baseline's seconds and tokens, then `prepare`'s."""
    encode_s, encode_tokens = encode_seconds(corpus, settings.chunk_bytes, tokenizer)
    started = time.perf_counter()
    manifest = prepare_corpus(corpus, out, settings)
    prepare_s = time.perf_counter() - started
    tokens = sum(split["tokens"] for split in manifest["splits"].values())
    return {"encode_s": encode_s, "encode_tokens": encode_tokens, "prepare_s": prepare_s, "tokens": tokens}


def encode_seconds(corpus: Path, chunk_bytes: int, tokenizer: Tokenizer) -> tuple[float, int]:
    """(seconds in `tokenizer.encode_batch`, tokens) over `corpus`'s documents in `prepare`'s chunks,
    each chunk read before its clock starts."""
    seconds, tokens = 0.0, 0
    for chunk in iter_chunks(list_sources([corpus]), "text", chunk_bytes):
        started = time.perf_counter()
        encoded = tokenizer.encode_batch(chunk.documents)
        seconds += time.perf_counter() - started
        tokens += sum(map(len, encoded))
    return seconds, tokens


def summarise_prepare(rounds: list[dict[str, float]]) -> dict[str, Any]:
    """Median and [min, max] over the rounds of each rate, and of the ratio prepare/encode_batch taken
    round by round (the two timed back to back)."""
    prepare_rate = [r["tokens"] / r["prepare_s"] for r in rounds]
    encode_rate = [r["encode_tokens"] / r["encode_s"] for r in rounds]
    return {
        "tokens": rounds[0]["tokens"],
        **spread("prepare_tokens_per_s", prepare_rate),
        **spread("encode_tokens_per_s", encode_rate),
        **spread("ratio", [p / e for p, e in zip(prepare_rate, encode_rate, strict=True)]),
        "rounds": rounds,
    }


def spread(name: str, values: list[float]) -> dict[str, Any]:
    """{name: median, name_range: [min, max]}."""
    return {name: statistics.median(values), f"{name}_range": [min(values), max(values)]}


# ----------------------------------------------------------------------------------------------
# Loader vs training


def loader_round(cfg: Config, settings: DataBenchSettings, loader: Loader) -> dict[str, float]:
    """One round: `next_batch`'s seconds over the prepared memory map (the first batch, which draws
    the epoch's order, apart), then the training steps'."""
    tcfg = cfg.train
    _, train_tokens, _ = build_datasets(cfg.data, tcfg.seq_len)
    batches = loader(train_tokens, tcfg.seq_len, tcfg.global_batch_size, tcfg.seed)
    started = time.perf_counter()
    batches.next_batch()
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(settings.loader_batches):
        batches.next_batch()
    loader_s = time.perf_counter() - started
    return {"first_batch_s": first_s, "loader_s": loader_s, "batches": settings.loader_batches,
            "step_s": train_step_seconds(cfg, settings.train_steps),
            "tokens_per_batch": tcfg.global_batch_size * tcfg.seq_len}  # fmt: skip


def train_step_seconds(cfg: Config, steps: int) -> list[float]:
    """Seconds of each of `steps` training steps after one untimed, in a fresh run directory."""
    with tempfile.TemporaryDirectory() as out:
        run = Trainer(cfg, out)
        run.train_step()
        seconds = []
        for _ in range(steps):
            started = time.perf_counter()
            run.train_step()
            seconds.append(time.perf_counter() - started)
    return seconds


def summarise_loader(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The loader's and training's tokens/s (a round's median step) and their ratio, round by round."""
    loader_rate = [r["tokens_per_batch"] * r["batches"] / r["loader_s"] for r in rounds]
    train_rate = [r["tokens_per_batch"] / statistics.median(r["step_s"]) for r in rounds]
    return {
        **spread("loader_tokens_per_s", loader_rate),
        **spread("training_tokens_per_s", train_rate),
        **spread("ratio", [a / b for a, b in zip(loader_rate, train_rate, strict=True)]),
        "rounds": rounds,
    }


# ----------------------------------------------------------------------------------------------
# Start-up: time to the first step and memory


def measure_startup(settings: DataBenchSettings, work: Path) -> dict[str, Any]:
    """For each process count: the small and the large corpus, `repeats` interleaved rounds of fresh
    processes, and the ratios large/small of the medians."""
    sizes = dict(zip(("small", "large"), settings.startup_mb, strict=True))
    prepared = {}
    for name, size_mb in sizes.items():
        corpus = work / f"startup-{name}.jsonl"
        written = write_corpus(corpus, size_mb)
        manifest = prepare_corpus(corpus, work / f"startup-{name}", settings)
        corpus.unlink()  # the large corpus need not sit on the disk twice
        prepared[name] = {**written, "tokens": manifest["splits"]["train"]["tokens"]}
    result: dict[str, Any] = {}
    for processes in settings.processes:
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in sizes}
        for _ in range(settings.repeats):
            for name in sizes:
                cfg = run_config(settings, str(work / f"startup-{name}"), processes)
                runs[name].append(first_step_in_fresh_processes(cfg, processes))
        cases = {name: {**prepared[name], **summarise_startup(runs[name])} for name in sizes}
        result[str(processes)] = {**cases, "ratios": startup_ratios(cases["small"], cases["large"])}
    return result


STARTUP_FIELDS = ("first_step_s", "peak_rss_mb", "anonymous_mb", "file_backed_mb")


def summarise_startup(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {key: value for field in STARTUP_FIELDS for key, value in spread(field, [r[field] for r in runs]).items()}


def startup_ratios(small: dict[str, Any], large: dict[str, Any]) -> dict[str, float]:
    """large/small of each figure's median, and of the training tokens."""
    return {"tokens": large["tokens"] / small["tokens"],
            **{field: large[field] / small[field] for field in STARTUP_FIELDS}}  # fmt: skip


def first_step_in_fresh_processes(cfg: Config, processes: int) -> dict[str, float]:
    """Start `processes` spawned interpreters (joined in one gloo group when 2), each building the
    trainer and taking one step; the slowest rank's seconds from before the start, the largest rank's
    memory."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    pipes, children = [], []
    started = time.time()  # wall clock: compared with the children's
    for rank in range(processes):
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_first_step, args=(send, cfg, rank, processes, port, started))
        child.start()
        send.close()
        pipes.append(receive)
        children.append(child)
    outcomes = []
    for receive, child in zip(pipes, children, strict=True):
        try:
            outcomes.append(receive.recv())
        except EOFError:
            outcomes.append({"error": "the process died (out of memory?)"})
        child.join()
    errors = [o["error"] for o in outcomes if "error" in o]
    if errors:
        raise RuntimeError(f"bench data: the start-up run failed: {errors[0]}")
    return {field: max(o[field] for o in outcomes) for field in STARTUP_FIELDS}


def _first_step(send: Any, cfg: Config, rank: int, world: int, port: int, started: float) -> None:
    """In a spawned process: build the trainer, one step, then the figures down the pipe."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))  # fmt: skip
        torch.set_num_threads(1)  # two ranks share the two cores
    try:
        with tempfile.TemporaryDirectory() as out:
            Trainer(cfg, out).train_step()
            outcome: dict[str, Any] = {"first_step_s": time.time() - started, **resident_memory_mb()}
    except Exception as err:  # reported by the parent in one line
        outcome = {"error": f"{type(err).__name__}: {err}"}
    send.send(outcome)
    send.close()
    if world > 1 and "error" not in outcome:
        from moeforge.parallel import leave_process_group

        leave_process_group(0)


def resident_memory_mb() -> dict[str, float]:
    """This process's peak resident set (VmHWM) and its anonymous and file-backed parts now, in MB
    (2^20 bytes), from /proc/self/status."""
    names = {"VmHWM": "peak_rss_mb", "RssAnon": "anonymous_mb", "RssFile": "file_backed_mb"}
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in names:
            fields[names[key]] = int(value.split()[0]) / 1024
    return fields


# ----------------------------------------------------------------------------------------------
# The table


def format_table(result: dict[str, Any]) -> str:
    config, prep, load = result["config"], result["prepare"], result["loader"]
    average = "/".join(f"{x:.2f}" for x in config["load_average_before"])
    lines = [
        f"bench data: tokenizer {config['tokenizer']}, {config['repeats']} rounds, {config['cores']} cores, "
        f"load average {average} before, {config['load_average_after'][0]:.2f} after",
        f"prepare ({prep['corpus_bytes'] / 1e6:.1f} MB, {prep['documents']:,} documents, {prep['tokens']:,} tokens, "
        f"{config['workers']} worker(s), {config['chunk_mb']:g} MB chunks):",
        f"  prepare        {_rate(prep, 'prepare_tokens_per_s')} tokens/s "
        f"({prep['prepare_tokens_per_s'] * prep['corpus_bytes'] / prep['tokens'] / 1e6:.1f} MB/s of input)",
        f"  encode_batch   {_rate(prep, 'encode_tokens_per_s')} tokens/s (one process, same chunks)",
        f"  prepare / encode_batch: {_ratio(prep)}",
        f"loader (batch {config['global_batch_size']} x {config['seq_len']} tokens, memory map in the page cache):",
        f"  next_batch     {_rate(load, 'loader_tokens_per_s')} tokens/s",
        f"  training step  {_rate(load, 'training_tokens_per_s')} tokens/s",
        f"  loader / training needs: {_ratio(load)}",
    ]
    for processes, cases in result["startup"].items():
        lines.append(f"start-up, {processes} process(es) (to the end of step 1 from interpreter start; MB = 2^20 B):")
        for name in ("small", "large"):
            case = cases[name]
            lines.append(
                f"  {name:<5} {case['corpus_bytes'] / 1e6:>7.1f} MB  first step {_span(case, 'first_step_s', '.2f')} s, "
                f"peak RSS {_span(case, 'peak_rss_mb', '.0f')}, anonymous {_span(case, 'anonymous_mb', '.0f')}, "
                f"file-backed {_span(case, 'file_backed_mb', '.0f')}"
            )
        ratios = cases["ratios"]
        lines.append(
            f"  large / small: tokens x{ratios['tokens']:.1f}; first step x{ratios['first_step_s']:.2f}, "
            f"peak RSS x{ratios['peak_rss_mb']:.2f}, anonymous x{ratios['anonymous_mb']:.2f}, "
            f"file-backed x{ratios['file_backed_mb']:.2f}"
        )
    return "\n".join(lines)


def _rate(figures: dict[str, Any], name: str) -> str:
    low, high = figures[f"{name}_range"]
    return f"{figures[name]:>12,.0f} ({low:,.0f}-{high:,.0f})"


def _ratio(figures: dict[str, Any]) -> str:
    low, high = figures["ratio_range"]
    return f"{figures['ratio']:.2f}x (rounds {low:.2f}-{high:.2f})"


def _span(figures: dict[str, Any], name: str, spec: str) -> str:
    low, high = figures[f"{name}_range"]
    return f"{figures[name]:{spec}} ({low:{spec}}-{high:{spec}})"
