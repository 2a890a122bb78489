"""Hugging Face interop: tiny random `transformers` models are imported, compared logit for logit,
exported bit for bit, converted through the CLI and fine-tuned; unsupported configs are refused."""

import json

import pytest
import torch
import torch.nn.functional as F
from hf_models import (
    VOCAB,
    deepseek_v3_config,
    edit_config,
    glm4_moe_config,
    mixtral_config,
    qwen3_config,
    read_tensors,
    save_deepseek_with_mtp,
    save_hf_model,
    transformers,
)
from safetensors.torch import save_file

from moeforge.cli import main as cli_main
from moeforge.config import ConfigError, load_config
from moeforge.interop import (
    HFInteropError,
    apply_hf_model,
    from_hf,
    hf_model_config,
    hf_weights_loader,
    load_hf_weights,
    to_hf,
)
from moeforge.interop.hf import weight_files
from moeforge.model.transformer import Transformer
from moeforge.train.trainer import Trainer
from moeforge.serve.chat_template import load_chat_template

CASES = {
    "qwen3_moe": lambda: qwen3_config(),
    "qwen3_moe-unnormalised-tied": lambda: qwen3_config(norm_topk_prob=False, tie_word_embeddings=True),
    "mixtral": lambda: mixtral_config(),
    "deepseek_v3": lambda: deepseek_v3_config(),
    "deepseek_v3-no-q-lora-ungrouped": lambda: deepseek_v3_config(
        q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False
    ),
    "glm4_moe": lambda: glm4_moe_config(),
    "glm4_moe-no-qk-norm-ungrouped": lambda: glm4_moe_config(use_qk_norm=False, n_group=1, topk_group=1),
}


def hf_logits(path_or_model, tokens):
    model = path_or_model
    if not isinstance(model, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def tokens(seq=24, batch=2):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def assert_same_tensors(expected_dir, actual_dir):
    expected, actual = read_tensors(expected_dir), read_tensors(actual_dir)
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("case", CASES)
def test_import_matches_transformers_and_export_round_trips_bit_for_bit(tmp_path, case):
    hf_model = save_hf_model(CASES[case](), tmp_path / "hf")
    ids = tokens()
    expected = hf_logits(hf_model, ids)
    assert expected.abs().max() > 1  # routing and attention do matter at this init scale

    model = from_hf(tmp_path / "hf", progress=False)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 24, VOCAB)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=2e-5)

    to_hf(model, tmp_path / "out", progress=False)
    assert_same_tensors(tmp_path / "hf", tmp_path / "out")
    torch.testing.assert_close(hf_logits(tmp_path / "out", ids), expected, rtol=1e-6, atol=1e-6)


def test_deepseek_rope_without_interleave_imports_and_exports_the_same_model(tmp_path):
    """Export writes DeepSeek's interleaved RoPE layout: other tensors, the same logits."""
    hf_model = save_hf_model(deepseek_v3_config(rope_interleave=False), tmp_path / "hf")
    ids = tokens()
    expected = hf_logits(hf_model, ids)
    model = from_hf(tmp_path / "hf", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=2e-5)
    to_hf(model, tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_interleave"] is True
    torch.testing.assert_close(hf_logits(tmp_path / "out", ids), expected, rtol=1e-5, atol=2e-5)


def rms_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def deepseek_mtp_reference_logits(deeper, mtp, main_hidden, next_ids):
    """DeepSeek's MTP layer as vLLM runs it (`deepseek_mtp.py`), with `transformers`' decoder layer as
    the block: shared_head.head(shared_head.norm(block(eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]))))."""
    n = deeper.config.num_hidden_layers - 1
    weight = {name.removeprefix(f"model.layers.{n}."): tensor for name, tensor in mtp.items()}
    embedded = rms_norm(deeper.model.embed_tokens(next_ids), weight["enorm.weight"])
    merged = F.linear(torch.cat([embedded, rms_norm(main_hidden, weight["hnorm.weight"])], -1), weight["eh_proj.weight"])
    seq = merged.shape[1]
    positions = torch.arange(seq)[None]
    causal = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
    rope = deeper.model.rotary_emb(merged, positions)
    hidden = deeper.model.layers[n](merged, attention_mask=causal, position_ids=positions, position_embeddings=rope)
    return F.linear(rms_norm(hidden, weight["shared_head.norm.weight"]), weight["shared_head.head.weight"])


def test_deepseek_mtp_layer_becomes_the_mtp_module_and_round_trips_bit_for_bit(tmp_path):
    deeper, mtp = save_deepseek_with_mtp(tmp_path / "hf")
    model = from_hf(tmp_path / "hf", progress=False)
    assert model.cfg.mtp_depth == 1
    module, stored = model.mtp[0], read_tensors(tmp_path / "hf")
    eh_proj = stored["model.layers.3.eh_proj.weight"]  # takes [emb; h], moeforge's proj [h; emb]
    assert torch.equal(module.proj.weight, torch.cat([eh_proj[:, 32:], eh_proj[:, :32]], dim=1))
    assert torch.equal(module.hidden_norm.weight, stored["model.layers.3.hnorm.weight"])
    assert torch.equal(module.embed_norm.weight, stored["model.layers.3.enorm.weight"])
    assert torch.equal(module.norm.weight, stored["model.layers.3.shared_head.norm.weight"])
    assert torch.equal(module.block.ffn.experts.w2[5], stored["model.layers.3.mlp.experts.5.down_proj.weight"].T)
    assert torch.equal(module.block.ffn.router.expert_bias, stored["model.layers.3.mlp.gate.e_score_correction_bias"])

    ids = tokens()
    main = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = main(ids).logits  # transformers leaves layer 3 out
        main_hidden = main.model(ids).last_hidden_state
        expected_mtp = deepseek_mtp_reference_logits(deeper, mtp, main_hidden[:, :-1], ids[:, 1:])
        out = model(ids, mtp_targets=ids.roll(-1, dims=1))  # next-token targets
        logits, (mtp_logits,) = out.logits, out.mtp_logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(mtp_logits, expected_mtp, rtol=1e-5, atol=2e-5)

    to_hf(model, tmp_path / "out", progress=False)
    assert_same_tensors(tmp_path / "hf", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_deepseek_mtp_layer_is_skipped_with_a_notice_by_a_model_without_mtp(tmp_path):
    save_deepseek_with_mtp(tmp_path)
    cfg = hf_model_config(tmp_path)
    cfg.mtp_depth = 0
    model = Transformer(cfg).eval()
    with pytest.warns(UserWarning, match=r"skipped the \d+ tensors of the multi-token-prediction layer"):
        load_hf_weights(model, tmp_path, progress=False)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf_logits(tmp_path, ids), rtol=1e-5, atol=2e-5)


def test_deepseek_mtp_layers_moeforge_cannot_represent_are_refused(tmp_path):
    _, mtp = save_deepseek_with_mtp(tmp_path / "other-head")
    mtp["model.layers.3.shared_head.head.weight"] += 1
    save_file(mtp, str(tmp_path / "other-head" / "mtp.safetensors"))
    with pytest.raises(HFInteropError, match=r"'model.layers.3.shared_head.head.weight' differs from the output"):
        from_hf(tmp_path / "other-head", progress=False)

    save_deepseek_with_mtp(tmp_path / "two")
    layer_3 = {k: v for k, v in read_tensors(tmp_path / "two").items() if k.startswith("model.layers.3.")}
    save_file({k.replace(".3.", ".4.", 1): v for k, v in layer_3.items()}, str(tmp_path / "two" / "mtp2.safetensors"))
    edit_config(tmp_path / "two", num_nextn_predict_layers=2)
    with pytest.raises(HFInteropError, match="num_nextn_predict_layers=2"):
        hf_model_config(tmp_path / "two")

    save_hf_model(deepseek_v3_config(), tmp_path / "partial")
    save_file({"model.layers.3.eh_proj.weight": torch.zeros(32, 64)}, str(tmp_path / "partial" / "mtp.safetensors"))
    with pytest.raises(HFInteropError, match="missing from the checkpoint"):
        from_hf(tmp_path / "partial", progress=False)


def test_config_mapping_of_deepseek_v3(tmp_path):
    save_hf_model(deepseek_v3_config(), tmp_path)
    cfg = hf_model_config(tmp_path)
    assert (cfg.attention, cfg.n_dense_layers, cfg.q_lora_rank, cfg.kv_lora_rank) == ("mla", 1, 16, 16)
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (8, 8, 8)
    moe = cfg.moe
    assert (moe.score_func, moe.n_shared_experts, moe.n_groups, moe.topk_groups) == ("sigmoid", 1, 4, 2)
    assert (moe.route_norm, moe.route_scale, moe.bias_update_rate) == (True, 2.5, 1e-3)
    assert cfg.mtp_depth == 0  # the config declares one MTP layer; transformers saves none


def test_config_mapping_of_qwen3(tmp_path):
    save_hf_model(qwen3_config(), tmp_path)
    cfg = hf_model_config(tmp_path)
    assert (cfg.n_layers, cfg.n_dense_layers, cfg.dim, cfg.head_dim, cfg.qk_norm) == (3, 1, 32, 16, True)
    assert (cfg.rope_theta, cfg.ffn_dim, cfg.tie_embeddings) == (5000.0, 48, False)
    moe = cfg.moe
    assert (moe.n_experts, moe.top_k, moe.expert_ffn_dim, moe.n_shared_experts) == (8, 2, 16, 0)
    assert (moe.score_func, moe.route_norm, moe.bias_update_rate) == ("softmax", True, 0.0)


def test_sharded_checkpoints_and_bf16_round_trip(tmp_path):
    save_hf_model(mixtral_config(), tmp_path / "hf", dtype=torch.bfloat16, max_shard_size="40KB")
    assert len(weight_files(tmp_path / "hf")) > 1
    model = from_hf(tmp_path / "hf", progress=False)
    assert model.tok_embeddings.weight.dtype == torch.float32
    to_hf(model, tmp_path / "out", dtype=torch.bfloat16, max_shard_bytes=40_000, progress=False)
    assert len(weight_files(tmp_path / "out")) > 1
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert_same_tensors(tmp_path / "hf", tmp_path / "out")


@pytest.mark.parametrize(
    ("make_config", "changes", "named"),
    [
        (mixtral_config, {"sliding_window": 16}, "sliding_window"),
        (mixtral_config, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        (qwen3_config, {"attention_bias": True}, "attention_bias"),
        (qwen3_config, {"use_sliding_window": True}, "use_sliding_window"),
        (qwen3_config, {"mlp_only_layers": [1]}, "mlp_only_layers"),
        (qwen3_config, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters"),
        (qwen3_config, {"hidden_act": "gelu"}, "hidden_act"),
        (qwen3_config, {"some_new_feature": 1}, "some_new_feature"),
        (qwen3_config, {"model_type": "llama"}, "model_type"),
        (deepseek_v3_config, {"scoring_func": "softmax"}, "scoring_func"),
        (deepseek_v3_config, {"rms_norm_eps": 1e-5}, "rms_norm_eps"),
        (deepseek_v3_config, {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ],
)
def test_unsupported_config_is_a_one_line_error_naming_the_field(tmp_path, make_config, changes, named):
    make_config().save_pretrained(tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(HFInteropError, match=named) as err:
        hf_model_config(tmp_path)
    assert "\n" not in str(err.value)


def test_missing_config_field_is_named(tmp_path):
    qwen3_config().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["moe_intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFInteropError, match=r"config.json: missing field 'moe_intermediate_size'"):
        hf_model_config(tmp_path)


def test_checkpoint_with_a_foreign_tensor_or_a_missing_one_is_refused(tmp_path):
    save_hf_model(mixtral_config(), tmp_path)
    edit_config(tmp_path, num_hidden_layers=1)
    with pytest.raises(HFInteropError, match="model.layers.1.* has no place"):
        from_hf(tmp_path, progress=False)
    edit_config(tmp_path, num_hidden_layers=3)
    with pytest.raises(HFInteropError, match="missing"):
        from_hf(tmp_path, progress=False)


def test_the_default_model_exports_and_transformers_computes_its_logits(tmp_path):
    """The default preset (GQA attention, DeepSeek-V3 routing with shared experts and a balancing bias)
    is written as GLM-4.5's MoE; transformers' forward of the export gives moeforge's logits, and
    reading it back gives the same tensors."""
    torch.manual_seed(0)
    model = Transformer(load_config().model).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.expert_bias.uniform_(-0.1, 0.1)
    to_hf(model, tmp_path / "hf", progress=False)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "glm4_moe"
    ids = tokens(seq=32)
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), expected, rtol=1e-5, atol=2e-5)
    back = from_hf(tmp_path / "hf", progress=False)
    assert all(torch.equal(back.state_dict()[name], t) for name, t in model.state_dict().items())


def test_export_refuses_what_the_format_cannot_hold(tmp_path, small_cfg):
    small_cfg.model.moe.n_shared_experts = 0
    with pytest.raises(HFInteropError, match="glm4_moe format: moe.n-shared-experts=0"):
        to_hf(Transformer(small_cfg.model), tmp_path / "a", progress=False)
    save_hf_model(qwen3_config(), tmp_path / "hf")
    model = from_hf(tmp_path / "hf", progress=False)
    next(model.moe_layers()).router.expert_bias.fill_(0.01)
    with pytest.raises(HFInteropError, match="expert_bias"):
        to_hf(model, tmp_path / "b", progress=False)
    save_hf_model(deepseek_v3_config(), tmp_path / "deepseek")
    cfg = hf_model_config(tmp_path / "deepseek")
    cfg.mtp_depth = 2
    with pytest.raises(HFInteropError, match="mtp-depth=2"):
        to_hf(Transformer(cfg), tmp_path / "c", progress=False)


@pytest.mark.slow
def test_convert_cli_round_trip_and_generate(tmp_path, capsys):
    save_hf_model(qwen3_config(), tmp_path / "hf", dtype=torch.bfloat16)
    chat = {"tokenizer_config.json": '{"chat_template": "{{ messages[0].content }}", "eos_token": "</s>"}',
            "chat_template.jinja": "[{{ messages[0].role }}] {{ messages[0].content }}"}  # fmt: skip
    for name, text in chat.items():
        (tmp_path / "hf" / name).write_text(text)
    assert cli_main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    # the chat template travels with the model, both ways: `moeforge serve` reads it from the run
    assert {name: (tmp_path / "run" / name).read_text() for name in chat} == chat
    assert load_chat_template(tmp_path / "run").render([{"role": "user", "content": "hi"}]) == "[user] hi"
    assert cli_main(["generate", "--checkpoint", str(tmp_path / "run"), "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["new_tokens"] == 4
    assert cli_main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    assert_same_tensors(tmp_path / "hf", tmp_path / "back")  # bf16 again: the imported precision is remembered
    assert {name: (tmp_path / "back" / name).read_text() for name in chat} == chat
    assert cli_main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


@pytest.mark.slow
def test_fine_tune_from_an_imported_model_then_export(tmp_path):
    save_hf_model(qwen3_config(), tmp_path / "hf")
    train = {"train.steps": "3", "train.seq-len": "32", "train.global-batch-size": "2", "train.log-every": "1",
             "train.eval-every": "0", "train.eval-batches": "1", "train.progress": "false", "train.report": "false"}
    cfg = load_config(overrides={**train, "train.init-from-hf": str(tmp_path / "hf")}, apply_init_from=apply_hf_model)
    assert cfg.model == hf_model_config(tmp_path / "hf")
    trainer = Trainer(cfg, tmp_path / "run", init_weights=hf_weights_loader(cfg))
    imported = from_hf(tmp_path / "hf", progress=False).state_dict()
    assert all(torch.equal(trainer.model.state_dict()[name], t) for name, t in imported.items())
    result = trainer.fit()
    assert result.step == 3 and result.final_loss == result.final_loss
    to_hf(trainer.model, tmp_path / "tuned", progress=False)
    tuned = read_tensors(tmp_path / "tuned")
    assert not torch.equal(tuned["model.embed_tokens.weight"], read_tensors(tmp_path / "hf")["model.embed_tokens.weight"])

    other = load_config(overrides={**train, "train.init-from-hf": str(tmp_path / "hf"), "model.dim": "64"},
                        apply_init_from=apply_hf_model)
    with pytest.raises(HFInteropError, match="does not fit this model"):
        Trainer(other, tmp_path / "other", init_weights=hf_weights_loader(other))
    with pytest.raises(ConfigError, match=r"^train\.init-from-hf: set, but nothing to read it with"):
        load_config(overrides={"train.init-from-hf": str(tmp_path / "hf")})
    with pytest.raises(ConfigError, match=r"^train\.init-from-hf: set, but this Trainer was given no init_weights"):
        Trainer(cfg, tmp_path / "third")
