"""The DeepSeek-V3 presets: the full model's parameter counts (built on the meta device, nothing
allocated) and the tiny one's recipe."""

import pytest
import torch

from moeforge.config import load_config
from moeforge.model.flops import parameter_counts
from moeforge.model.transformer import Transformer


def test_deepseek_v3_671b_counts_671b_total_37b_active_and_14b_for_mtp():
    cfg = load_config("deepseek-v3-671b").model
    counts = parameter_counts(cfg)
    assert counts.total / 1e9 == pytest.approx(671, abs=1)
    assert counts.active / 1e9 == pytest.approx(37, abs=1)
    # The released checkpoint (685B) stores the MTP module with its own copies of the embedding and
    # head, which here are shared with the main model.
    released_mtp = counts.mtp_total + 2 * counts.embedding
    assert released_mtp / 1e9 == pytest.approx(14, abs=1)
    assert (counts.total + released_mtp) / 1e9 == pytest.approx(685, abs=1)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == counts.total + counts.mtp_total
    assert sum(p.numel() for p in model.mtp.parameters()) == counts.mtp_total


def test_deepseek_v3_tiny_has_the_whole_recipe():
    cfg = load_config("deepseek-v3-tiny")
    model, moe = cfg.model, cfg.model.moe
    assert model.attention == "mla" and model.q_lora_rank > 0 and model.mtp_depth >= 1
    assert moe.score_func == "sigmoid" and moe.n_groups > 1 and moe.topk_groups < moe.n_groups
    assert moe.n_shared_experts >= 1 and moe.bias_update_rate > 0 and moe.seq_aux_coef > 0
    assert not model.tie_embeddings and model.n_dense_layers >= 1
