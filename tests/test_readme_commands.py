"""Every `moeforge` command the README shows works today. Each one's flags parse, and a training
command's configuration loads and validates for the world it names (a torchrun line's
--nproc-per-node); and the short tour runs, command after command in one directory, as a reader would
type it (test_the_tour_runs_in_order). What each command computes is tested beside it (test_cli,
test_generate, ...); these tests keep the front page from going stale when a flag is renamed.

The README's `make train` and `make test` are make targets, not moeforge commands: `make test` is this
suite, and `make train` is `moeforge train --out runs/tiny` (500 steps of the default model), which
test_cli runs small as a command and test_train trains in-process."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from moeforge import checkpoint as ckpt
from moeforge.cli import build_parser
from moeforge.cli.arguments import parse_overrides
from moeforge.config import load_config
from moeforge.run import read_metrics

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[tuple[list[str], int]]:
    """(moeforge's argv, processes) of every command line in the README's bash blocks. A torchrun
    line may give the launcher --nproc-per-node only (the tour test launches it with that alone)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["moeforge"]:
                commands.append((words[1:], 1))
            elif words[:1] == ["torchrun"]:
                at = words.index("moeforge")
                assert words[at - 1] == "-m" and words[1 : at - 1 : 2] == ["--nproc-per-node"], line
                commands.append((words[at + 1 :], int(words[2])))
    return commands


def test_the_readme_shows_the_tour():
    shown = {argv[0] for argv, _ in readme_commands()}
    assert {"train", "generate", "convert", "plan", "bench", "data", "eval"} <= shown


@pytest.mark.parametrize("argv, processes", readme_commands(), ids=lambda value: " ".join(value)[:60] if isinstance(value, list) else str(value))
def test_a_readme_command_parses_and_validates(argv, processes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, rest = build_parser().parse_known_args(argv)
    if args.command != "train":
        assert rest == [], f"unknown arguments {rest} in `moeforge {' '.join(argv)}`"
        return
    overrides = parse_overrides(rest)
    for name, _ in [item.rsplit(":", 1) for item in overrides.get("data.path", "").split(",") if ":" in item]:
        (tmp_path / name).mkdir(parents=True)  # a mixture's directories must exist to validate
    if overrides.get("data.tokenizer", "byte") != "byte":
        (tmp_path / overrides["data.tokenizer"]).touch()  # and so must a tokenizer file
    cfg = load_config(args.preset, args.config, overrides, world_size=processes)
    cfg.validate(processes)


# ---------------------------------------------------------------------------------------------
# The tour, run


@dataclass(frozen=True)
class TourStep:
    """How the test runs one README command: `setup` makes the files the reader is assumed to have,
    `extra` flags are appended (never a README argument changed) to make it small and fast, `check`
    looks at what it claims to produce."""

    check: Callable[[Path, subprocess.CompletedProcess], None]
    extra: tuple[str, ...] = ()
    setup: Callable[[Path], None] | None = None
    run: Callable[[list[str], Path], subprocess.CompletedProcess] | None = None
    """how to run a command that does not end by itself (a server); None: run it to its end"""


SHORT_TRAINING = (
    "--train.steps", "2", "--train.seq-len", "32", "--train.global-batch-size", "4",
    "--train.warmup-steps", "1", "--train.log-every", "1", "--train.eval-every", "0",
    "--train.eval-batches", "1", "--train.progress", "false", "--train.report", "false",
)  # fmt: skip
"""2 steps of 4 sequences of 32 tokens, each logged (the model keeps the preset's shape), one validation
batch, no plots"""


def _documents(first: int, n: int) -> str:
    from test_data import SENTENCES

    lines = (json.dumps({"text": f"{SENTENCES[i % 3]} Number {i}."}) for i in range(first, first + n))
    return "".join(line + "\n" for line in lines)


def _write_hf_model(tmp: Path) -> None:
    from hf_models import qwen3_config, save_hf_model

    save_hf_model(qwen3_config(), tmp / "models" / "my-moe")


def _write_corpus_and_tokenizer(tmp: Path) -> None:
    from test_data import write_bpe_tokenizer

    (tmp / "corpus").mkdir()
    (tmp / "corpus" / "web.jsonl").write_text(_documents(0, 3000))  # 1 % held out: ~30 documents
    write_bpe_tokenizer(tmp / "tok.json", ["<|endoftext|>"])


def _prepare_books(tmp: Path) -> None:
    """The mixture's second source, prepared as data/web was (in this process: not a README command)."""
    from moeforge.data.prepare import PrepareOptions, prepare

    (tmp / "books").mkdir()
    (tmp / "books" / "books.jsonl").write_text(_documents(10_000, 300))
    books = (str(tmp / "books"),)
    options = PrepareOptions(books, tmp / "data" / "books", str(tmp / "tok.json"), val_fraction=0.1)
    prepare(options, progress=False)


def _trained(run: Path, steps: int = 2) -> list[dict]:
    """The run's metrics, after checking that it saved its last step and logged each step once."""
    assert ckpt.latest_checkpoint(run).name == f"step_{steps:06d}"
    metrics = read_metrics(run)
    assert [record["step"] for record in metrics] == list(range(1, steps + 1))  # once: by rank 0 only
    return metrics


def _check_dsv3(tmp, result):
    _trained(tmp / "runs" / "dsv3")
    assert json.loads((tmp / "runs" / "dsv3" / "config.json").read_text())["model"]["mtp_depth"] == 1


def _check_generate(tmp, result):
    assert result.stdout.startswith("The with statement")
    assert "[speculative:" in result.stderr and "checkpoint step 2]" in result.stderr


def _serve_one_request(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Start the server, wait for its 'serving NAME on URL' line, ask it for a completion, then
    SIGTERM it (it drains and exits 0); the completion's text is the result's stdout."""
    import signal
    import urllib.request

    server = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        match = re.search(r"serving (\S+) on (http://\S+)", line)
        assert match, f"no 'serving' line: {line!r}\n{server.stderr.read() if server.poll() is not None else ''}"
        name, url = match.groups()
        body = json.dumps({"model": name, "prompt": "The with statement", "max_tokens": 6, "temperature": 0})
        request = urllib.request.Request(f"{url}/v1/completions", body.encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            text = json.loads(answer.read())["choices"][0]["text"]
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return subprocess.CompletedProcess(command, server.returncode, text, err)


def _check_serve(tmp, result):
    assert len(result.stdout) > 0  # six tokens of the byte-level model: at least one character


def _check_convert(tmp, result):
    assert ckpt.latest_checkpoint(tmp / "runs" / "my-moe").name == "step_000000"
    model = json.loads((tmp / "runs" / "my-moe" / "config.json").read_text())["model"]
    assert (model["dim"], model["moe"]["n_experts"]) == (32, 8)  # the Qwen3-MoE's


def _check_plan(tmp, result):
    assert re.search(r"^\s+1\s+PP\d+ ", result.stdout, flags=re.M), result.stdout
    assert "layouts that fit" in result.stdout


def _check_bench_moe(tmp, result):
    assert re.search(r"^whole MoE layer \(grouped\) .*\d", result.stdout, flags=re.M), result.stdout


def _check_prepare(tmp, result):
    manifest = json.loads((tmp / "data" / "web" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] > 0 and manifest["splits"]["val"]["tokens"] > 33


def _check_mixture(tmp, result):
    last = _trained(tmp / "runs" / "web")[-1]
    assert set(last["tokens_per_source"]) == {"data/web", "data/books"}


def _check_eval(tmp, result):
    line = r"data/web val: loss \d+\.\d+ nats/token, perplexity .* windows of 32\)\n"
    assert re.fullmatch(line, result.stdout), result.stdout


def _check_torchrun(tmp, result):
    _trained(tmp / "runs" / "tiny")  # train's default --out


TOUR = {
    "train --preset deepseek-v3-tiny --out runs/dsv3": TourStep(_check_dsv3, SHORT_TRAINING),
    "generate --checkpoint runs/dsv3 --prompt 'The with statement' --speculative": TourStep(
        _check_generate, ("--max-new-tokens", "8")
    ),
    "serve --checkpoint runs/dsv3 --speculative": TourStep(_check_serve, ("--port", "0"), run=_serve_one_request),
    "convert --from-hf models/my-moe --out runs/my-moe": TourStep(_check_convert, setup=_write_hf_model),
    # the search's time grows with the model's depth (2048 GPUs or 256 take as long): 8 of the 61
    # blocks plan in ~1 s instead of ~12
    "plan --preset deepseek-v3-671b --cluster h800 --gpus 2048 --search": TourStep(
        _check_plan, ("--model.n-layers", "8")
    ),
    "bench moe": TourStep(
        _check_bench_moe,
        ("--dim", "64", "--ffn-dim", "32", "--experts", "8", "--top-k", "2", "--tokens", "256",
         "--repeats", "1"),  # fmt: skip
    ),
    "data prepare corpus/ --out data/web --tokenizer tok.json --val-fraction 0.01": TourStep(
        _check_prepare, setup=_write_corpus_and_tokenizer
    ),
    "train --data.path data/web:0.7,data/books:0.3 --data.tokenizer tok.json --out runs/web": TourStep(
        _check_mixture, SHORT_TRAINING, _prepare_books
    ),
    "eval --checkpoint runs/web data/web": TourStep(_check_eval),
    "train --parallel.dp-replicate 2 --parallel.ep 2": TourStep(_check_torchrun, SHORT_TRAINING),
}
"""each README command (moeforge's argv, as shlex.join writes it) and how the tour test runs it"""


def _launch(argv: list[str], processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "moeforge", *argv]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    return [sys.executable, *launcher, "-m", "moeforge", *argv]


@pytest.mark.slow
def test_the_tour_runs_in_order(tmp_path):
    """The README's commands in order, in one directory, each a process of its own (torchrun's line
    under torchrun): each exits 0 and leaves what it says it makes, and the later commands use the
    earlier ones' runs and data. A README command without a TOUR entry fails the test."""
    commands = [(shlex.join(argv), argv, processes) for argv, processes in readme_commands()]
    missing = [text for text, _, _ in commands if text not in TOUR]
    assert not missing, f"README commands that TOUR does not know how to run small: {missing}"
    assert {text for text, _, _ in commands} == set(TOUR), "TOUR lists commands the README no longer shows"
    for text, argv, processes in commands:
        step = TOUR[text]
        if step.setup is not None:
            step.setup(tmp_path)
        command = _launch(argv + list(step.extra), processes)
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if processes > 1 else None  # workers share the cores
        if step.run is not None:
            result = step.run(command, tmp_path)
        else:
            result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        said = f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        assert result.returncode == 0, f"`{shlex.join(command)}` exit {result.returncode}\n{said}"
        step.check(tmp_path, result)
