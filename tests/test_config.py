"""Config loading, overrides and one-line validation errors."""

import re

import pytest

from moeforge import cli
from moeforge.cli import train as train_command
from moeforge.cli.arguments import parse_overrides
from moeforge.config import (
    Config,
    ConfigError,
    MoEConfig,
    TrainConfig,
    config_from_dict,
    iter_options,
    load_config,
)
from moeforge.errors import MoeforgeError
from moeforge.checkpoint import CheckpointError

CHOICES = {
    "model.attention": ("gqa", "mla"),
    "model.moe.score-func": ("sigmoid", "softmax"),
    "model.moe.backend": ("grouped", "loop"),
    "train.optimizer": ("adamw", "sgd", "muon"),
    "train.schedule": ("cosine", "wsd", "constant"),
    "train.dtype": ("auto", "fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.activation-checkpoint": ("none", "experts", "block"),
    "diloco.outer": ("nesterov", "sparseloco"),
    "diloco.quantize": ("none", "bf16", "fp8", "fp4-e3m0", "fp4-e2m1", "int2"),
    "parallel.pp-schedule": ("1f1b", "interleaved-1f1b", "zbv", "dualpipev"),
}
"""every field typed as a choice of strings, with its allowed values in order"""


def test_default_is_tiny_preset_and_valid():
    cfg = load_config()
    assert cfg.model.moe.n_experts == 16 and cfg.model.dim == 128
    assert cfg.train.steps == 500


def test_dotted_overrides_with_dashes_and_nested_sections():
    cfg = load_config(overrides={"model.moe.n-experts": "32", "train.steps": "7", "train.lr": "1e-4"})
    assert cfg.model.moe.n_experts == 32
    assert cfg.train.steps == 7
    assert cfg.train.lr == pytest.approx(1e-4)


def test_cli_override_parsing_both_spellings():
    assert parse_overrides(["--train.steps", "5", "--model.moe.top-k=3"]) == {
        "train.steps": "5",
        "model.moe.top-k": "3",
    }
    with pytest.raises(ConfigError, match="--train.steps: missing a value"):
        parse_overrides(["--train.steps"])
    with pytest.raises(ConfigError, match="unrecognised"):
        parse_overrides(["steps"])


def test_toml_file_overrides_preset(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nsteps = 11\n[model.moe]\ntop-k = 1\n")
    cfg = load_config(preset="tiny", config_file=path)
    assert cfg.train.steps == 11 and cfg.model.moe.top_k == 1
    assert cfg.model.dim == 128  # from the preset


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"model.moe.top-k": "99"},
            r"^model\.moe\.top-k: got 99; allowed: an integer in \[1, n-experts=16\]$",
        ),
        ({"model.moe.n-groups": "5"}, r"^model\.moe\.n-groups: got 5; allowed: a divisor of n-experts=16$"),
        (
            {"model.moe.score-func": "relu"},
            r"^model\.moe\.score-func: got 'relu'; allowed: 'sigmoid' \| 'softmax'$",
        ),
        ({"model.n-kv-heads": "3"}, r"^model\.n-kv-heads: got 3; allowed: a divisor of n-heads=4$"),
        ({"train.steps": "ten"}, r"^train\.steps: 'ten' is not a valid int$"),
        ({"train.schedule": "linear"}, r"^train\.schedule: got 'linear'"),
        ({"train.optimizer": "lion"}, r"^train\.optimizer: got 'lion'; allowed: 'adamw' \| 'sgd' \| 'muon'$"),
        ({"train.muon-momentum": "1"}, r"^train\.muon-momentum: got 1\.0; allowed: a number in \[0, 1\)$"),
        ({"train.muon-ns-steps": "0"}, r"^train\.muon-ns-steps: got 0; allowed: an integer in \[1, 100\]$"),
        ({"train.seq-len": "4096"}, r"^train\.seq-len: got 4096; allowed: at most model\.max-seq-len=512$"),
        ({"parallel.ep": "3"}, r"^parallel\.ep: got 3; allowed: a divisor of dp-shard=1$"),
        ({"data.path": "/no/such/file.txt"}, r"^data\.path: got '/no/such/file\.txt'"),
        ({"data.val-fraction": "1"}, r"^data\.val-fraction: got 1\.0; allowed: a number in \(0, 1\)$"),
        ({"train.stepz": "1"}, r"^--train\.stepz: unknown option; allowed here: steps, global-batch-size"),
        ({"model.moe": "1"}, r"^--model\.moe: is a section"),
        ({"diloco.topk-fraction": "0"}, r"^diloco\.topk-fraction: got 0\.0; allowed: a number in \(0, 1\]$"),
        ({"diloco.topk-chunk": "65537"}, r"^diloco\.topk-chunk: got 65537; allowed: an integer in \[1, 65536\]"),
        ({"diloco.ef-decay": "1.5"}, r"^diloco\.ef-decay: got 1\.5; allowed: a number in \(0, 1\]$"),
        ({"diloco.outer": "adam"}, r"^diloco\.outer: got 'adam'; allowed: 'nesterov' \| 'sparseloco'$"),
        (
            {"diloco.outer": "sparseloco", "diloco.error-feedback": "false"},
            r"^diloco\.error-feedback: got False; allowed: true with diloco\.outer 'sparseloco'",
        ),
    ],
)
def test_errors_are_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(overrides=overrides)
    assert "\n" not in str(info.value)


def test_mesh_product_must_match_world_size():
    with pytest.raises(ConfigError, match="parallel.dp-shard: got 3; allowed: a value with pp\\*dp-replicate"):
        load_config(overrides={"parallel.dp-shard": "3"}, world_size=4)
    cfg = load_config(
        overrides={"parallel.dp-replicate": "2", "parallel.ep": "2", "model.moe.n-experts": "8"}, world_size=4
    )
    assert cfg.parallel.resolved_dp_shard(4) == 2


def test_experts_must_divide_by_ep():
    with pytest.raises(ConfigError, match="parallel.ep: got 3; allowed: a divisor of model.moe.n-experts=16"):
        load_config(overrides={"parallel.ep": "3"}, world_size=3)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; allowed: .*tiny"):
        load_config(preset="huge")
    with pytest.raises(ConfigError, match="--config: file"):
        load_config(config_file="/no/such.toml")


def test_standalone_moe_config_validation():
    MoEConfig(dim=64).validate()
    with pytest.raises(ConfigError, match="moe.top-k"):
        MoEConfig(dim=64, n_experts=8, n_groups=4, topk_groups=1, top_k=3).validate()


def test_round_trip_through_dict():
    cfg = load_config(overrides={"model.moe.n-experts": "8", "train.seed": "3"})
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert isinstance(again, Config)


def test_every_option_has_help_text():
    options = list(iter_options())
    assert any(option.flag == "model.moe.n-experts" for option in options)
    missing = [option.flag for option in options if not option.doc]
    assert not missing


def test_the_typed_choices_are_the_literal_fields():
    assert {option.flag: option.choices for option in iter_options() if option.choices} == CHOICES


@pytest.mark.parametrize("flag", CHOICES)
def test_a_choice_field_accepts_each_allowed_value_and_rejects_others_in_one_line(flag, tmp_path):
    for value in CHOICES[flag]:
        assert _field_value(load_config(overrides={flag: value}), flag) == value
    allowed = " | ".join(f"'{value}'" for value in CHOICES[flag])
    message = f"{flag}: got 'bogus'; allowed: {allowed}"
    with pytest.raises(ConfigError) as from_flag:
        load_config(overrides={flag: "bogus"})
    assert str(from_flag.value) == message
    table, key = flag.rsplit(".", 1)
    (tmp_path / "run.toml").write_text(f'[{table}]\n{key} = "bogus"\n')
    with pytest.raises(ConfigError) as from_toml:
        load_config(config_file=tmp_path / "run.toml")
    assert str(from_toml.value) == message


def _field_value(cfg: Config, flag: str) -> object:
    value: object = cfg
    for name in flag.replace("-", "_").split("."):
        value = getattr(value, name)
    return value


def test_a_choice_field_set_in_code_is_rejected_by_validate():
    with pytest.raises(ConfigError, match=r"^model\.moe\.backend: got 'gemm'; allowed: 'grouped' \| 'loop'$"):
        MoEConfig(dim=64, backend="gemm").validate("model.moe")
    with pytest.raises(ConfigError, match=r"^train\.dtype: got 'fp16'; allowed: 'auto' \| 'fp32' \| 'bf16'$"):
        TrainConfig(dtype="fp16").validate()


def test_help_shows_the_allowed_values_of_a_choice_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    flag_line = lines.index("  --model.moe.score-func 'sigmoid' (allowed: 'sigmoid' | 'softmax')")
    assert lines[flag_line + 1].strip().startswith("router score: 'sigmoid' (DeepSeek-V3)")
    for flag, choices in CHOICES.items():
        allowed = " | ".join(f"'{value}'" for value in choices)
        assert any(
            line.startswith(f"  --{flag} ") and line.endswith(f"(allowed: {allowed})") for line in lines
        )
    assert any(line.startswith("  --train.steps ") and "allowed" not in line for line in lines)


@pytest.mark.parametrize(
    "argv, preset",
    [
        (["train", "--help"], "tiny"),
        (["train", "--preset", "deepseek-v3-671b", "--help"], "deepseek-v3-671b"),
        (["train", "--help", "--preset", "deepseek-v3-tiny"], "deepseek-v3-tiny"),
    ],
)
def test_train_help_shows_the_values_the_preset_gives(argv, preset, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"configuration options (--section.field-name VALUE; default shown is preset {preset}'s):" in lines
    cfg = load_config(preset)
    assert f"  --train.steps {cfg.train.steps!r}" in lines and f"  --train.seq-len {cfg.train.seq_len!r}" in lines
    if preset == "tiny":  # the preset's values, not the dataclass defaults (300 steps of 128 tokens)
        assert "  --train.steps 500" in lines and "  --train.seq-len 256" in lines


def test_train_help_with_an_unknown_preset_is_one_line(capsys):
    assert cli.main(["train", "--preset", "tiniest", "--help"]) == ConfigError.exit_code
    assert capsys.readouterr().err.startswith("moeforge train: error: --preset: unknown preset 'tiniest'; allowed: ")


def _train_handler_raising(monkeypatch, error: Exception) -> None:
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(train_command, "load_config", fail)


def test_cli_reports_project_errors_in_one_line_with_their_exit_code(monkeypatch, tmp_path, capsys):
    for error, code in [
        (ConfigError("train.steps: got 0; allowed: an integer >= 1"), 2),
        (CheckpointError("torn"), 1),
    ]:
        _train_handler_raising(monkeypatch, error)
        assert cli.main(["train", "--out", str(tmp_path)]) == code
        assert capsys.readouterr().err == f"moeforge train: error: {error}\n"


def test_cli_does_not_report_an_internal_value_error_as_a_user_error(monkeypatch, tmp_path, capsys):
    bug = ValueError("too many values to unpack (expected 2)")
    assert not isinstance(bug, MoeforgeError)
    _train_handler_raising(monkeypatch, bug)
    with pytest.raises(ValueError) as raised:  # out of main: Python prints its traceback, exit status 1
        cli.main(["train", "--out", str(tmp_path)])
    assert raised.value is bug
    assert "error:" not in capsys.readouterr().err


def test_a_saved_config_loads_and_unknown_fields_are_refused():
    cfg = load_config()
    old = cfg.to_dict()
    assert config_from_dict(old) == cfg
    old["parallel"]["bogus"] = 1
    with pytest.raises(ConfigError, match=r"^parallel\.bogus: unknown field"):
        config_from_dict(old)


def test_ep_nodes_must_divide_ep_and_hold_whole_expert_groups():
    with pytest.raises(ConfigError, match=r"^parallel\.ep-nodes: got 3; allowed: a divisor of ep=4$"):
        load_config(overrides={"parallel.ep": "4", "parallel.ep-nodes": "3"}, world_size=4)
    groups_across_nodes = {"parallel.ep": "4", "parallel.ep-nodes": "4", "model.moe.n-groups": "2"}
    with pytest.raises(
        ConfigError, match=r"^model\.moe\.n-groups: got 2; allowed: a multiple of parallel\.ep-nodes=4"
    ):
        load_config(overrides=groups_across_nodes, world_size=4)
    cfg = load_config(
        overrides={**groups_across_nodes, "model.moe.n-groups": "8", "model.moe.topk-groups": "2"},
        world_size=4,
    )
    assert cfg.parallel.ep_nodes == 4


@pytest.mark.parametrize(
    ("overrides", "world_size", "message"),
    [
        ({"parallel.pp": "3"}, 4, r"^parallel\.pp: got 3; allowed: a divisor of the world size 4$"),
        ({"parallel.pp-schedule": "gpipe"}, 1, r"^parallel\.pp-schedule: got 'gpipe'; allowed: '1f1b' \|"),
        (
            {"parallel.pp": "2", "parallel.pp-schedule": "dualpipev", "train.micro-batch-size": "8"},
            2,
            r"^train\.micro-batch-size: got '2 micro-batches per step'; allowed: at least 4 micro-batches "
            r"for pp-schedule='dualpipev' with pp=2 \(",
        ),
        (
            {"parallel.pp": "2", "parallel.pp-schedule": "1f1b"},
            2,
            r"^train\.micro-batch-size: got '1 micro-batches per step'; allowed: at least 2",
        ),
        (
            {"parallel.pp": "4", "parallel.pp-schedule": "zbv", "train.micro-batch-size": "1"},
            4,
            r"^parallel\.pp: got 4; allowed: at most 2 for pp-schedule='zbv' \(8 stages of model\.n-layers=4",
        ),
        (
            {"parallel.pp": "2", "parallel.pp-stage-blocks": "1,0,3", "train.micro-batch-size": "2"},
            2,
            r"^parallel\.pp-stage-blocks: got '1,0,3'; allowed: 2 counts summing to model\.n-layers=4",
        ),
        (
            {"parallel.pp": "2", "parallel.pp-schedule": "zbv", "train.micro-batch-size": "2",
             "model.tie-embeddings": "true", "model.mtp-depth": "1"},  # fmt: skip
            2,
            r"^parallel\.pp-schedule: got 'zbv'; allowed: '1f1b' or 'interleaved-1f1b' with model\.tie-embeddings",
        ),
        (
            {"parallel.ep-overlap": "true", "parallel.pp": "2", "train.micro-batch-size": "2"},
            2,
            r"^parallel\.ep-overlap: got True; allowed: false unless pp-schedule='dualpipev'",
        ),
        (
            {"parallel.ep-overlap": "true", "train.micro-batch-size": "1"},
            1,
            r"^train\.micro-batch-size: got 1; allowed: at least 2 sequences per micro-batch with parallel\.ep-overlap",
        ),
        (
            {"parallel.pp": "2", "parallel.pp-stage-blocks": "1,x", "train.micro-batch-size": "2"},
            2,
            r"^parallel\.pp-stage-blocks: '1,x' is not a comma-separated list of integers$",
        ),
    ],
)
def test_pipeline_layout_errors_name_the_flag(overrides, world_size, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(overrides=overrides, world_size=world_size)
    assert "\n" not in str(info.value)


def test_pipeline_ranks_come_out_of_the_data_parallel_ranks():
    cfg = load_config(overrides={"parallel.pp": "2", "train.micro-batch-size": "2"}, world_size=4)
    assert cfg.parallel.resolved_dp_shard(4) == 2
    assert cfg.parallel.pp_stages() == 2
    v_shape = {"parallel.pp": "2", "parallel.pp-schedule": "zbv", "parallel.pp-stage-blocks": "0,2,2,0"}
    cfg = load_config(overrides={**v_shape, "train.micro-batch-size": "2"}, world_size=2)
    assert cfg.parallel.pp_stages() == 4


FLOAT_FLAGS = [option.flag for option in iter_options() if type(option.default) is float]
INT_FLAGS = [option.flag for option in iter_options() if type(option.default) is int]


def test_the_walked_fields_are_the_numeric_ones():
    assert "train.lr" in FLOAT_FLAGS and "parallel.timeout-s" in FLOAT_FLAGS and len(FLOAT_FLAGS) >= 25
    assert "model.n-layers" in INT_FLAGS and "train.seed" in INT_FLAGS and len(INT_FLAGS) >= 35


@pytest.mark.parametrize("flag", FLOAT_FLAGS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_every_float_field_refuses_a_non_finite_value_in_one_line(flag, value, tmp_path):
    """One walk over the float fields (`checks._check_values`): no field gives inf or nan a meaning."""
    shown = "inf" if value == "1e999" else value
    message = rf"^{re.escape(flag)}: got {shown}; allowed: a finite number$"
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={flag: value})
    table, key = flag.rsplit(".", 1)
    (tmp_path / "run.toml").write_text(f"[{table}]\n{key} = {shown}\n")  # TOML has inf and nan too
    with pytest.raises(ConfigError, match=message):
        load_config(config_file=tmp_path / "run.toml")


@pytest.mark.parametrize("flag", INT_FLAGS)
def test_every_integer_field_refuses_a_value_past_int64(flag):
    with pytest.raises(ConfigError, match=rf"^{re.escape(flag)}: got 9223372036854775808; allowed: "):
        load_config(overrides={flag: str(2**63)})


def test_integers_in_exact_scientific_notation_are_integers():
    cfg = load_config(overrides={"train.steps": "2.5e3", "model.moe.n-experts": "1.6E1", "train.seed": "1_000"})
    assert (cfg.train.steps, cfg.model.moe.n_experts, cfg.train.seed) == (2500, 16, 1000)
    for text in ("2.5", "1e-3", "1e101", "nan", "inf", "0x10"):
        with pytest.raises(ConfigError, match=rf"^train\.steps: '{text}' is not a valid int$"):
            load_config(overrides={"train.steps": text})


@pytest.mark.parametrize(
    "flag, high",
    [
        ("model.vocab-size", 2**24),
        ("model.dim", 2**16),
        ("model.n-layers", 1024),
        ("model.ffn-dim", 2**20),
        ("model.max-seq-len", 2**24),
        ("model.mtp-depth", 64),
        ("model.moe.n-experts", 2**16),
        ("model.moe.expert-ffn-dim", 2**20),
        ("train.global-batch-size", 2**24),
    ],
)
def test_sizes_are_bounded_at_a_value_that_is_still_valid(flag, high):
    """Each bound itself validates (only the config: nothing is built); one more is one line."""
    at_bound = {"model.max-seq-len": str(2**24), flag: str(high)}
    if flag == "model.moe.n-experts":
        at_bound.update({"model.moe.n-groups": "1", "model.moe.topk-groups": "1"})
    load_config(overrides=at_bound)
    low = 0 if flag == "model.mtp-depth" else 1
    message = rf"^{re.escape(flag)}: got {high + 1}; allowed: an integer in \[{low}, {high}\]$"
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={**at_bound, flag: str(high + 1)})


def test_values_set_in_code_meet_the_same_checks():
    cases = [
        (lambda cfg: setattr(cfg.model, "n_layers", 61.0), r"^model\.n-layers: got 61\.0; allowed: an integer$"),
        (lambda cfg: setattr(cfg.model, "tie_embeddings", "yes"), r"^model\.tie-embeddings: got 'yes'; allowed: true \| false$"),
        (lambda cfg: setattr(cfg.model.moe, "top_k", True), r"^model\.moe\.top-k: got True; allowed: an integer$"),
        (lambda cfg: setattr(cfg.train, "lr", "3e-4"), r"^train\.lr: got '3e-4'; allowed: a finite number$"),
        (lambda cfg: setattr(cfg.model, "attention", None), r"^model\.attention: got None; allowed: a string$"),
    ]
    for change, message in cases:
        cfg = Config()
        change(cfg)
        with pytest.raises(ConfigError, match=message):
            cfg.validate()
