"""The command line, end to end in processes of its own: train, resume, SIGTERM, generate, bench, errors.

Each command runs in a process forked from the fork server that imported torch and moeforge once
(tests/forked.py), which then does what `python -m moeforge ARGS` does after its imports: a fresh
interpreter would spend seconds of CPU importing them again for every command. Real interpreters
start in test_python_dash_m_and_no_args_prints_help, test_sigterm_saves_a_checkpoint_and_exits_cleanly
and tests/test_readme_commands.py (every command of the README's tour)."""

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import SMALL
from forked import call_in_fork
from moeforge import checkpoint as ckpt
from moeforge.run import read_metrics


def moeforge(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """What `python -m moeforge ARGS` does after its imports, in a process forked from the warm fork
    server (`forked.call_in_fork`): its exit code, standard output and error."""
    with tempfile.TemporaryDirectory() as streams:
        out, err = Path(streams, "stdout"), Path(streams, "stderr")
        out.touch()
        err.touch()
        code = call_in_fork(_moeforge_main, list(args), timeout=timeout, stdout=out, stderr=err)
        result = subprocess.CompletedProcess(["moeforge", *args], code, out.read_text(), err.read_text())
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def _moeforge_main(argv: list[str]) -> None:
    """moeforge's `__main__`."""
    from moeforge.cli import main

    sys.exit(main(argv))


def small_args(**extra):
    values = dict(SMALL)
    values.update(extra)
    return [part for key, value in values.items() for part in (f"--{key}", value)]


def test_train_then_rerun_resumes_then_generate(tmp_path):
    out = str(tmp_path / "run")
    moeforge("train", "--out", out, *small_args(**{"train.steps": "4"}))
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    moeforge("train", "--out", out, *small_args(**{"train.steps": "6"}))
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert ckpt.latest_checkpoint(out).name == "step_000006"

    gen = moeforge("generate", "--checkpoint", out, "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0", "--json")
    report = json.loads(gen.stdout)
    assert report["new_tokens"] == 8 and isinstance(report["text"], str)
    assert report["tokens_per_s"] > 0 and report["bandwidth_gb_s"] > 0 and report["step"] == 6
    again = moeforge("generate", "--checkpoint", str(ckpt.latest_checkpoint(out)), "--prompt", "def ",
                     "--max-new-tokens", "8", "--temperature", "0", "--json")
    assert json.loads(again.stdout)["text"] == report["text"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeforge", "train", "--out", str(out),
         *small_args(**{"train.steps": "100000", "train.checkpoint-every": "100000"})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    saved = ckpt.latest_checkpoint(out)
    assert saved is not None and "SIGTERM" in stderr + stdout
    assert ckpt.read_meta(saved).step >= 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--model.moe.top-k", "99"], "model.moe.top-k: got 99; allowed: an integer in [1, n-experts=16]"),
        (["train", "--data.path", "/nowhere/corpus.txt"], "data.path: got '/nowhere/corpus.txt'"),
        (["train", "--train.bogus", "1"], "--train.bogus: unknown option"),
        (["generate", "--checkpoint", "/nowhere"], "--checkpoint: no complete checkpoint in '/nowhere'"),
        # flags are checked before the checkpoint is looked at
        (["generate", "--checkpoint", "/nowhere", "--max-new-tokens", "-1"], "--max-new-tokens: got -1; allowed"),
        (["generate", "--checkpoint", "/nowhere", "--top-p", "0"], "--top-p: got 0.0; allowed: a number in (0, 1]"),
        (["train", "--out", "/proc/version/run"], "--out: cannot create the directory '/proc/version/run': "),
        (["checkpoint", "verify", "/nowhere"], "RUN_DIR: '/nowhere' is not a directory"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message):
    result = moeforge(*args, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_lists_dotted_options():
    result = moeforge("train", "--help")
    assert "--model.moe.n-experts" in result.stdout and "--train.global-batch-size" in result.stdout


def test_bench_moe_json(tmp_path):
    result = moeforge("bench", "moe", "--dim", "64", "--ffn-dim", "32", "--experts", "8", "--top-k", "2",
                      "--tokens", "256", "--repeats", "1", "--json")
    report = json.loads(result.stdout)
    assert report  # structure is checked in tests/test_bench_moe.py


def test_python_dash_m_and_no_args_prints_help():
    """A real interpreter: `python -m moeforge` imports and starts without a word on stderr."""
    result = subprocess.run([sys.executable, "-m", "moeforge"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "train" in result.stdout
    assert result.stderr == ""


def test_the_diloco_line_gives_the_payload_and_past_two_replicas_the_wire():
    from moeforge.cli.train import _exchange_line

    exchange = {
        "wire_format": "top-0.02 of 4096 + int2",
        "bytes_per_replica": 10e6,
        "data_parallel_bytes_per_replica": 1000e6,
        "wire_bytes_per_replica": 20e6,
        "data_parallel_wire_bytes_per_replica": 2 * 2 / 3 * 1000e6,
    }
    two = (
        "diloco (top-0.02 of 4096 + int2): 10.0 MB sent per replica; data parallelism would have sent "
        "1,000.0 MB for these steps (100x fewer)"
    )
    assert _exchange_line(exchange, 2) == two
    three = "; on each replica's links 20.0 MB out and in by all-gather, against 1,333.3 MB by all-reduce (67x fewer)"
    assert _exchange_line(exchange, 3) == two + three
