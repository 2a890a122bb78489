"""The servers `moeforge bench serve` compares and the model they serve: one subprocess at a time on
a free loopback port, started, waited for, and stopped (SIGTERM, then SIGKILL of its process group
after a timeout) whatever happens in between.

The model is a moeforge checkpoint, given or made here (a freshly initialised preset saved as one),
and its export by moeforge's own `convert --to-hf` code: `moeforge serve` reads the checkpoint,
`transformers serve` the exported directory, so both serve the same weights. A byte-tokenizer run
has no tokenizer.json to export; one is written that maps each byte to its own id (GPT-2's
byte-to-character table, no merges), so that transformers tokenizes a text exactly as moeforge does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx
import torch

from moeforge import checkpoint as ckpt
from moeforge import run
from moeforge.bench.serve_client import ServeBenchError
from moeforge.checkpoint.model_loading import load_config_and_tokenizer
from moeforge.config import load_config
from moeforge.data.tokenizer import Tokenizer
from moeforge.interop.convert import checkpoint_to_hf
from moeforge.model.transformer import Transformer

HOST = "127.0.0.1"
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
PRINTABLE = (32, 127)
"""the byte tokens a fresh model's head is restricted to (printable ASCII)"""


@dataclass
class ServedModel:
    """The weights both servers serve: moeforge's checkpoint and its Hugging Face export."""

    checkpoint: Path
    hf_dir: Path
    tokenizer: Tokenizer
    max_seq_len: int
    mtp_depth: int
    description: str


@dataclass
class ServerCase:
    """One server of the comparison: how it is started and what each request adds for it."""

    name: str
    argv: list[str]
    port: int
    request_fields: dict = field(default_factory=dict)
    """added to every request body (the model's name, the way to ignore the end token)"""
    moeforge_metrics: bool = False
    """its /metrics has the moeforge engine's counters"""


def prepare_model(checkpoint: str | None, preset: str, seed: int, workdir: Path) -> ServedModel:
    """The given checkpoint, or a fresh `preset` model saved as one under `workdir`; exported to
    `workdir/hf` with moeforge's HF export."""
    if checkpoint is None:
        checkpoint_path, description = (
            _fresh_checkpoint(preset, seed, workdir / "run"),
            f"fresh {preset} (seed {seed})",
        )
    else:
        checkpoint_path, description = ckpt.resolve_checkpoint(checkpoint), checkpoint
    cfg, tokenizer = load_config_and_tokenizer(checkpoint_path)
    hf_dir = workdir / "hf"
    checkpoint_to_hf(checkpoint_path, hf_dir)
    if not (hf_dir / run.TOKENIZER_FILE).exists():
        write_byte_tokenizer(hf_dir)
    return ServedModel(
        checkpoint_path, hf_dir, tokenizer, cfg.model.max_seq_len, cfg.model.mtp_depth, description
    )


def _fresh_checkpoint(preset: str, seed: int, run_dir: Path) -> Path:
    """A freshly initialised `preset` model saved as a moeforge run. With the byte tokenizer its
    output head keeps only the printable ASCII rows (scaled up, the others zeroed, as in the server's
    tests): random weights would otherwise emit bytes that are not UTF-8, which both servers hold
    back until a character completes, so that chunks and tokens would no longer match one to one."""
    cfg = load_config(preset)
    torch.manual_seed(seed)
    model = Transformer(cfg.model).eval()
    if cfg.data.tokenizer == "byte":
        keep = torch.zeros(cfg.model.vocab_size)
        keep[PRINTABLE[0] : PRINTABLE[1]] = 4.0
        with torch.no_grad():
            model.output.weight.mul_(keep[:, None])
    run.write_run_files(run_dir, cfg)
    return ckpt.save_checkpoint(run_dir, 0, model, None, cfg.to_dict(), {"bench": "serve"}, keep=1)


def write_byte_tokenizer(hf_dir: Path) -> None:
    """tokenizer.json and tokenizer_config.json of moeforge's byte tokenizer: token id = byte value."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    table = byte_characters()
    tokenizer = HFTokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(hf_dir / run.TOKENIZER_FILE))
    (hf_dir / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}\n')


def byte_characters() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level tokenizers name tokens with: the
    printable bytes stand for themselves, the others for the characters from U+0100 on."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def moeforge_case(
    model: ServedModel,
    port: int,
    clients: int,
    positions: int,
    speculative: bool,
    flags: list[str] | None = None,
) -> ServerCase:
    """`moeforge serve` with room for every client in the running batch and the cache, and `flags`."""
    blocks_per_request = -(-(positions + model.mtp_depth) // 16)
    argv = [
        sys.executable, "-m", "moeforge", "serve", "--checkpoint", str(model.checkpoint), "--host", HOST,
        "--port", str(port), "--max-batch", str(clients), "--max-waiting", str(max(64, clients)),
        "--max-step-tokens", str(max(256, 2 * clients)), "--cache-blocks", str(max(256, clients * blocks_per_request)),
    ]  # fmt: skip
    name = "moeforge --speculative" if speculative else "moeforge"
    argv += ["--speculative"] * speculative + (flags or [])
    return ServerCase(name, argv, port, {"ignore_eos": True}, moeforge_metrics=True)


def transformers_case(model: ServedModel, port: int) -> ServerCase:
    """`transformers serve` with continuous batching (its default is off), fp32 on the CPU, the
    model preloaded; each request turns the end token off (`eos_token_id` -1, which its continuous
    batching reads as none)."""
    argv = [
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(model.hf_dir), "--continuous-batching",
        "--dtype", "float32", "--device", "cpu", "--host", HOST, "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    return ServerCase(
        "transformers", argv, port, {"model": str(model.hf_dir), "generation_config": '{"eos_token_id": -1}'}
    )


def server_env(threads: int) -> dict[str, str]:
    """The environment of every server: the same torch thread count, and no network for models."""
    return {
        **os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server subprocess in a session (and process group) of its own: started and waited for until
    /health answers 200 on entry; stopped on exit. While it runs, a SIGTERM to the benchmark raises
    SystemExit, so that the benchmark's own exit still stops it."""

    def __init__(self, case: ServerCase, env: dict[str, str], log_path: Path) -> None:
        self.case, self.env, self.log_path = case, env, log_path
        self.url = f"http://{HOST}:{case.port}"
        self.process: subprocess.Popen | None = None
        self._previous_handler = None
        self._stopping = False

    def __enter__(self) -> ServerProcess:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    self.case.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
                )
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.stop()

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if not self._stopping:
            raise SystemExit(128 + signum)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServeBenchError(
                    f"{self.case.name}: exited with code {self.process.returncode} before serving: {self.last_log_line()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ServeBenchError(
            f"{self.case.name}: not serving after {START_TIMEOUT_S:.0f} s: {self.last_log_line()}"
        )

    def stop(self) -> int | None:
        """SIGTERM (moeforge drains its requests and exits 0); once it has exited, or after a timeout,
        SIGKILL to whatever is left in its process group (a model process it spawned, or itself). The
        server is reaped only after that, so that its group id cannot have passed to another process.
        The exit code."""
        self._stopping = True
        try:
            if self.process is not None and self.process.returncode is None:
                self.process.send_signal(signal.SIGTERM)
                self._exited_unreaped(STOP_TIMEOUT_S)
                _kill_group(self.process.pid)
                self.process.wait()
        finally:
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)
                self._previous_handler = None
        return None if self.process is None else self.process.returncode

    def _exited_unreaped(self, timeout: float) -> bool:
        """Wait up to `timeout` for the server to exit, leaving it unreaped; whether it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.1)
        return False

    def last_log_line(self) -> str:
        lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1].strip()[:300] if lines else "(no output)"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
