"""Sizes are checked before they are allocated (issue 25, items 4 and 5): bounded config fields, finite
numbers, a memory estimate checked against the process's budget before train, generate, convert and
the Hugging Face import build a model; each refusal is one line through the command line. `plan`
never refuses. The budget is set with MOEFORGE_MEMORY_LIMIT_BYTES, so that every case is
deterministic whatever this machine has free."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import SMALL, small_config
from moeforge import checkpoint as ckpt
from moeforge.cli import main
from moeforge.config import Config, load_config
from moeforge.interop.hf import HFInteropError, hf_model_config
from moeforge.model.attention import rope_tables
from moeforge.model.flops import kv_cache_bytes_per_token
from moeforge.model.transformer import Transformer
from moeforge.plan import estimate_run
from moeforge.plan import memory_budget as budget_module
from moeforge.plan.memory_budget import (
    ENV_LIMIT,
    MemoryLimitError,
    check_model_fits,
    host_budget,
    memory_budget,
    model_memory,
)

LIMIT_FLAG_ARGS = [part for key, value in SMALL.items() for part in (f"--{key}", value)]


def run(capsys, *args: str) -> tuple[int, str, str]:
    """`moeforge ARGS` in this process: exit code, stdout, stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *args: str, code: int = 2) -> str:
    """The one line of stderr a refused command prints, checked to be one line with exit code `code`."""
    got, _, err = run(capsys, *args)
    assert got == code, err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------------
# Config fields: bounds and finite numbers, one line through `moeforge train`


@pytest.mark.parametrize(
    "flag, value, said",
    [
        ("model.n-layers", "100000", "model.n-layers: got 100000; allowed: an integer in [1, 1024]"),
        ("model.moe.n-experts", "1e9", "model.moe.n-experts: got 1000000000; allowed: an integer in [1, 65536]"),
        ("model.dim", "1e6", "model.dim: got 1000000; allowed: an integer in [1, 65536]"),
        ("model.vocab-size", "2e9", "model.vocab-size: got 2000000000; allowed: an integer in [1, 16777216]"),
        ("train.global-batch-size", "1e8", "train.global-batch-size: got 100000000; allowed: an integer in [1, 16777216]"),
        ("model.max-seq-len", "1e12", "model.max-seq-len: got 1000000000000; allowed: an integer in [1, 16777216]"),
        ("train.lr", "inf", "train.lr: got inf; allowed: a finite number"),
        ("train.lr", "nan", "train.lr: got nan; allowed: a finite number"),
        ("model.rope-theta", "1e999", "model.rope-theta: got inf; allowed: a finite number"),
        ("diloco.outer-lr", "-inf", "diloco.outer-lr: got -inf; allowed: a finite number"),
        ("train.seed", "1e30", "train.seed: got 1000000000000000000000000000000; allowed: an integer within int64"),
        ("train.steps", "1.5", "train.steps: '1.5' is not a valid int"),
        ("train.steps", "1e999999999", "train.steps: '1e999999999' is not a valid int"),
    ],
)
def test_out_of_range_flags_are_one_line(capsys, tmp_path, flag, value, said):
    err = one_line_error(capsys, "train", "--out", str(tmp_path), f"--{flag}", value)
    assert said in err


def test_deepseek_v3_671b_still_validates_and_plans_whatever_the_budget(capsys, monkeypatch):
    """The bounds forbid no real model, and `plan` never refuses: not even with a 1-byte budget."""
    monkeypatch.setenv(ENV_LIMIT, "1")
    cfg = load_config("deepseek-v3-671b")
    assert cfg.model.n_layers == 61 and cfg.model.moe.n_experts == 256
    code, out, err = run(
        capsys, "plan", "--preset", "deepseek-v3-671b", "--cluster", "h800", "--gpus", "2048",
        "--layout.pp", "16", "--parallel.ep", "64",
    )  # fmt: skip
    assert code == 0 and "tokens/s" in out, err


# ------------------------------------------------------------------------------------------------
# The model's bytes against an independent count, and the budget


MODELS = {
    "gqa-moe-mtp": {"model.mtp-depth": "1"},
    "mla-tied": {
        "model.attention": "mla", "model.q-lora-rank": "16", "model.kv-lora-rank": "16",
        "model.qk-nope-head-dim": "8", "model.qk-rope-head-dim": "8", "model.v-head-dim": "8",
        "model.tie-embeddings": "true",
    },
    "dense": {"model.n-dense-layers": "3"},
}  # fmt: skip


@pytest.mark.parametrize("name", MODELS)
def test_model_bytes_equal_the_built_models_own(name):
    """Parameters and buffers counted in closed form equal the built model's, tensor by tensor summed
    (a tied weight once); the RoPE temporaries are two float64 tables the size of one fp32 table."""
    cfg = load_config(overrides={**SMALL, **MODELS[name]}).model
    model = Transformer(cfg)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    memory = model_memory(cfg)
    assert (memory.parameters, memory.buffers) == (params, buffers)
    cos, _ = rope_tables(cfg.rope_head_dim, cfg.max_seq_len, cfg.rope_theta)
    assert memory.transient == 2 * cos.numel() * torch.float64.itemsize
    assert memory.peak == params + buffers + memory.transient


def test_the_refusal_threshold_is_the_estimate_on_both_sides(monkeypatch):
    cfg = small_config().model
    need = model_memory(cfg).peak
    monkeypatch.setenv(ENV_LIMIT, str(int(need)))
    check_model_fits(cfg, "cpu", "the model")  # exactly the estimate: fits
    monkeypatch.setenv(ENV_LIMIT, str(int(need) - 1))
    with pytest.raises(MemoryLimitError) as refused:
        check_model_fits(cfg, "cpu", "the model")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("the model needs ~")
    assert f"but the limit is {int(need) - 1:,} bytes ({ENV_LIMIT})" in message
    assert "model.n-layers=3" in message and "model.dim=64" in message and ENV_LIMIT in message


def test_a_large_part_of_the_model_names_its_own_flags(monkeypatch):
    monkeypatch.setenv(ENV_LIMIT, "1000")
    vocab = load_config(overrides={**SMALL, "model.vocab-size": "1000000"}).model
    with pytest.raises(MemoryLimitError, match=r"driven by model\.vocab-size=1000000, model\.dim=64;"):
        check_model_fits(vocab, "cpu", "the model")
    experts = load_config(overrides={**SMALL, "model.moe.n-experts": "4096", "model.moe.expert-ffn-dim": "512"}).model
    with pytest.raises(MemoryLimitError, match=r"driven by model\.n-layers=3, model\.moe\.n-experts=4096, "):
        check_model_fits(experts, "cpu", "the model")


def test_budgets_come_from_meminfo_shared_by_local_ranks_or_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_LIMIT, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    alone = host_budget()
    if alone is None:
        pytest.skip("no /proc/meminfo here")
    assert alone.source == "MemAvailable of this host" and alone.bytes > 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    shared = host_budget()
    assert shared.source == "MemAvailable of this host / 4 local ranks"
    assert shared.bytes == pytest.approx(alone.bytes / 4, rel=0.2)  # MemAvailable moves a little
    monkeypatch.setenv(ENV_LIMIT, "2.5e9")
    assert memory_budget("cpu").bytes == 2.5e9 and memory_budget("cpu").source == ENV_LIMIT
    monkeypatch.setenv(ENV_LIMIT, "inf")
    assert memory_budget("cpu") is None
    monkeypatch.setenv(ENV_LIMIT, "lots")
    with pytest.raises(ValueError, match=rf"^{ENV_LIMIT}: got 'lots'; allowed: a number of bytes >= 0"):
        memory_budget("cpu")


def test_on_cuda_the_model_needs_the_gpus_free_memory_and_the_hosts_for_its_build(monkeypatch, tmp_path):
    """No GPU needed: the free memory CUDA reports and /proc/meminfo are stood in for."""
    monkeypatch.delenv(ENV_LIMIT, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = small_config().model
    memory = model_memory(cfg)
    meminfo = tmp_path / "meminfo"
    monkeypatch.setattr(budget_module, "MEMINFO", meminfo)
    free = {"bytes": memory.resident}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80e9))
    meminfo.write_text(f"MemTotal: 99999999 kB\nMemAvailable: {math.ceil(2 * memory.peak / 1024)} kB\n")
    assert host_budget().source == "MemAvailable of this host / 2 local ranks"
    assert memory_budget("cuda").source == "free memory of cuda" and memory_budget("cuda").bytes == memory.resident
    check_model_fits(cfg, "cuda", "the model")  # both exactly enough
    free["bytes"] = memory.resident - 1
    with pytest.raises(MemoryLimitError, match=r"^the model needs ~.* \(free memory of cuda\); driven by"):
        check_model_fits(cfg, "cuda", "the model")
    free["bytes"] = 80e9
    meminfo.write_text(f"MemAvailable: {math.floor(2 * memory.peak / 1024) - 1} kB\n")
    with pytest.raises(MemoryLimitError, match=r"^the model, built on the host first, needs ~.*RoPE temporaries"):
        check_model_fits(cfg, "cuda", "the model")


# ------------------------------------------------------------------------------------------------
# train: the trainer's own estimate (estimate_run) refuses


def test_the_trainers_estimate_fits_on_both_sides_of_its_budget(monkeypatch):
    cfg = small_config()
    need = estimate_run(cfg, 1, "cpu").needed_bytes
    monkeypatch.setenv(ENV_LIMIT, str(math.ceil(need)))
    assert estimate_run(cfg, 1, "cpu").fits
    monkeypatch.setenv(ENV_LIMIT, str(math.ceil(need) - 1))
    estimate = estimate_run(cfg, 1, "cpu")
    assert not estimate.fits
    line = estimate.refusal()
    assert "\n" not in line and "DOES NOT FIT: the run needs ~" in line and f"({ENV_LIMIT})" in line
    assert "activations" in line and "train.global-batch-size=4, train.micro-batch-size=0, train.seq-len=32" in line


@pytest.mark.parametrize(
    "flags, driven_by",
    [
        (["--train.global-batch-size", "1000000"], "driven by train.global-batch-size=1000000, "),
        (["--model.n-layers", "512", "--model.dim", "4096", "--model.n-heads", "32"], "driven by model.n-layers=512, "),
    ],
)
def test_train_refuses_a_run_over_its_budget_in_one_line(capsys, tmp_path, monkeypatch, flags, driven_by):
    monkeypatch.setenv(ENV_LIMIT, "8e9")
    err = one_line_error(capsys, "train", "--out", str(tmp_path), *LIMIT_FLAG_ARGS, *flags)
    assert "train.force: off" in err and "DOES NOT FIT" in err and f"8.0 GB ({ENV_LIMIT})" in err
    assert driven_by in err
    assert ckpt.latest_checkpoint(tmp_path) is None


# ------------------------------------------------------------------------------------------------
# generate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run directory holding one checkpoint of the small model (weights only, as convert writes)."""
    out = tmp_path_factory.mktemp("run")
    cfg = small_config()
    torch.manual_seed(0)
    ckpt.save_checkpoint(out, 1, Transformer(cfg.model), None, cfg.to_dict(), {}, keep=1)
    return out


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--temperature", "nan"], "--temperature: got nan; allowed: a finite number >= 0 (0 = greedy)"),
        (["--temperature", "inf"], "--temperature: got inf; allowed: a finite number >= 0"),
        (["--temperature", "-1"], "--temperature: got -1.0; allowed: a finite number >= 0"),
        (["--top-p", "nan"], "--top-p: got nan; allowed: a number in (0, 1]"),
        (["--top-p", "1.5"], "--top-p: got 1.5; allowed: a number in (0, 1]"),
        (["--prompt", "caf\udcc3("], "--prompt: not valid UTF-8 (byte 0xc3 at character 3); allowed: UTF-8 text"),
        (["--seed", str(2**70)], f"--seed: got {2**70}; allowed: an integer within int64"),
        (["--device", "gpu"], "--device: got 'gpu'; allowed: 'cpu', 'cuda' or 'cuda:N'"),
        (["--max-new-tokens", "1000000"], "--max-new-tokens: prompt (4) + 1000000 new tokens exceed model.max-seq-len=128"),
    ],
)
def test_generate_refuses_bad_flags_in_one_line(capsys, checkpoint, flags, said):
    err = one_line_error(capsys, "generate", "--checkpoint", str(checkpoint), "--prompt", "def ", *flags)
    assert said in err


def test_generate_checks_the_models_size_before_building_it(capsys, checkpoint, monkeypatch):
    cfg = small_config().model
    tokens = len("def ") + 8
    need = max(model_memory(cfg).peak, model_memory(cfg).resident + kv_cache_bytes_per_token(cfg, 4) * tokens)
    monkeypatch.setenv(ENV_LIMIT, str(int(need) - 1))
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "def ", "--max-new-tokens", "8", "--json"]
    err = one_line_error(capsys, *args)
    assert f"the model of {ckpt.latest_checkpoint(checkpoint)} needs ~" in err and "KV cache" in err
    assert f"but the limit is {int(need) - 1:,} bytes" in err
    monkeypatch.setenv(ENV_LIMIT, str(int(need)))
    code, out, err = run(capsys, *args)
    assert code == 0 and json.loads(out)["new_tokens"] == 8, err


# ------------------------------------------------------------------------------------------------
# convert and the Hugging Face import: hostile config.json files, and the budget

DEEPSEEK = {
    "model_type": "deepseek_v3", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
    "moe_intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 4, "n_routed_experts": 8,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
    "max_position_embeddings": 128, "num_nextn_predict_layers": 0,
}  # fmt: skip
QWEN3 = {
    "model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 48,
    "moe_intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 128,
}  # fmt: skip


def hf_dir(tmp_path, text: str | bytes):
    path = tmp_path / "hf"
    path.mkdir(exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    (path / "config.json").write_bytes(data)
    return path


def with_field(base: dict, key: str, literal: str) -> str:
    """`base` as JSON with `key` written as the raw JSON `literal` (e.g. 1e999, NaN, a 30-digit int)."""
    return json.dumps({**base, key: "@"}).replace('"@"', literal)


@pytest.mark.parametrize(
    "text, said",
    [
        (b'{"model_type": "deepseek_v3", "vocab_size": 2\xff56}', "config.json: not valid UTF-8 (byte 0xff at offset"),
        (with_field(DEEPSEEK, "num_hidden_layers", "1e999"), "config.json: num_hidden_layers: got inf; allowed: a finite number"),
        (with_field(DEEPSEEK, "rope_theta", "NaN"), "config.json: rope_theta: got nan; allowed: a finite number"),
        (with_field(QWEN3, "rope_parameters", '{"rope_theta": -Infinity}'), "config.json: rope_parameters.rope_theta: got -inf"),
        (with_field(DEEPSEEK, "num_hidden_layers", "1e18"), "config.json: num_hidden_layers: got 1e+18; allowed: an integer in [0, 1024]"),
        (with_field(QWEN3, "num_hidden_layers", "1000000000000000000"), "config.json: num_hidden_layers: got 1000000000000000000; allowed: an integer in [0, 1024]"),
        (with_field(DEEPSEEK, "vocab_size", "1" + "0" * 30), "config.json: vocab_size: got an integer of 31 digits; allowed: an integer within int64"),
        (with_field(DEEPSEEK, "vocab_size", "9" * 5000), "config.json: not valid JSON: Exceeds the limit (4300 digits)"),
        (with_field(DEEPSEEK, "num_nextn_predict_layers", "1e18"), "config.json: num_nextn_predict_layers: got 1e+18; allowed: an integer in [0, 64]"),
        (with_field(DEEPSEEK, "n_routed_experts", '"256"'), "config.json: n_routed_experts: got '256'; allowed: an integer"),
        (with_field(DEEPSEEK, "routed_scaling_factor", '"2.5"'), "config.json: routed_scaling_factor: got '2.5'; allowed: a number"),
        (with_field(DEEPSEEK, "model_type", '["deepseek_v3"]'), "config.json: model_type: got ['deepseek_v3']; allowed:"),
        (with_field(QWEN3, "tie_word_embeddings", '"false"'), "config.json: tie_word_embeddings: got 'false'; allowed: true | false"),
        (with_field(QWEN3, "rope_parameters", "[10000]"), "config.json: rope_parameters: got [10000]; allowed: an object"),
        (with_field(QWEN3, "rope_parameters", '{"rope_theta": "1e4"}'), "config.json: rope_parameters.rope_theta: got '1e4'; allowed: a number"),
        (with_field(QWEN3, "mlp_only_layers", "[[0]]"), "config.json: mlp_only_layers: got [[0]]; allowed: a list of layer numbers"),
        ("[" * 100_000 + "]" * 100_000, "config.json: not valid JSON:"),
        ('["a list"]', "config.json: got a JSON list; allowed: a JSON object of fields"),
        ("{" + " " * (16 << 20) + "}", "entry 'config.json': more than the 16777216 bytes allowed"),
    ],
)
def test_hostile_config_json_is_one_line_naming_the_file_and_the_field(capsys, tmp_path, text, said):
    path = hf_dir(tmp_path, text)
    with pytest.raises(HFInteropError) as refused:
        hf_model_config(path)
    assert said in str(refused.value) and "\n" not in str(refused.value)
    err = one_line_error(capsys, "convert", "--from-hf", str(path), "--out", str(tmp_path / "out"))
    assert said in err


def test_a_good_config_json_still_imports(tmp_path):
    for config in (DEEPSEEK, QWEN3):
        cfg = hf_model_config(hf_dir(tmp_path, json.dumps(config)))
        assert cfg.n_layers == 3 and cfg.vocab_size == 256


def test_convert_checks_the_models_size_before_building_it_and_plan_never_does(capsys, tmp_path, monkeypatch):
    big = {**DEEPSEEK, "hidden_size": 4096, "num_attention_heads": 32, "n_routed_experts": 256, "moe_intermediate_size": 2048}
    path = hf_dir(tmp_path, json.dumps(big))
    monkeypatch.setenv(ENV_LIMIT, "1e9")
    err = one_line_error(capsys, "convert", "--from-hf", str(path), "--out", str(tmp_path / "out"))
    assert f"the model of {path / 'config.json'} needs ~" in err and f"1.0 GB ({ENV_LIMIT})" in err
    assert "driven by model.n-layers=3, model.moe.n-experts=256, model.moe.expert-ffn-dim=2048, model.dim=4096" in err
    code, out, err = run(capsys, "plan", "--from-hf", str(path), "--cluster", "h100", "--gpus", "8", "--train.seq-len", "128")
    assert code == 0 and "tokens/s" in out, err


def test_convert_to_hf_checks_the_models_size_first(capsys, tmp_path, checkpoint, monkeypatch):
    monkeypatch.setenv(ENV_LIMIT, "1000")
    err = one_line_error(capsys, "convert", "--to-hf", str(checkpoint), "--out", str(tmp_path / "hf"))
    assert "the model of " in err and f"but the limit is 1,000 bytes ({ENV_LIMIT})" in err
    assert not (tmp_path / "hf" / "config.json").exists()


def test_the_config_of_a_config_object_is_checked_as_a_flag_would_be():
    """Values set without parsing (the Python API, an HF import) meet the same walk."""
    cfg = Config()
    cfg.model.n_layers = 1e18  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"^model\.n-layers: got 1e\+18; allowed: an integer$"):
        cfg.validate()
