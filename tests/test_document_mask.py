"""Document masking (`--data.document-mask`): packed documents compute what each computes alone.

The reference is the model itself run on each document separately (positions from 0, causal over
the document alone), in fp32: every token's logits, the MTP logits, and the gradients of the summed
cross-entropy must match the packed run's.
"""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from conftest import SMALL, small_config

from moeforge.config import ConfigError, load_config
from moeforge.data.blend import BlendedLoader
from moeforge.data.indexed import IndexedDataset, IndexedDatasetWriter
from moeforge.data.loader import PackedLoader, validation_batches, validation_document_ids
from moeforge.model import transformer as transformer_module
from moeforge.model.attention import attention_mask_for, document_block_mask, document_mask, document_positions
from moeforge.model.mtp import mtp_inputs_and_labels
from moeforge.checkpoint.model_loading import load_model
from moeforge.cli import main
from moeforge.data.prepare import PrepareOptions, prepare
from moeforge.infer.evaluate import evaluate
from moeforge.model.transformer import Transformer
from moeforge.parallel.overlap import overlapped_forward
from moeforge.run import read_metrics
from moeforge.train.trainer import Trainer

SEQ = 32
ROWS = [
    [6, 9, 1, 7, 10],  # five documents, one of a single token
    [12, 3, 18],  # the first continues a document begun before the window (its ids start at 40)
]
"""document lengths of each packed row (each sums to SEQ + 1: the window's last token is a target)"""


def window_document_ids(lengths: list[int], first_id: int) -> torch.Tensor:
    """[sum(lengths)] the document id of each token of a window made of documents of `lengths`."""
    return torch.cat([torch.full((n,), first_id + d) for d, n in enumerate(lengths)])


def packed_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, input document ids), each [len(ROWS), SEQ]: windows of SEQ+1 random tokens."""
    generator = torch.Generator().manual_seed(1)
    windows = torch.randint(0, vocab, (len(ROWS), SEQ + 1), generator=generator)
    ids = torch.stack([window_document_ids(lengths, 40 * r) for r, lengths in enumerate(ROWS)])
    return windows[:, :-1], windows[:, 1:], ids[:, :-1]


def document_spans(ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of equal ids in the 1-D `ids`, by a plain loop."""
    spans, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            spans.append((start, i))
            start = i
    return spans


def small_model(preset: str, **overrides: str) -> Transformer:
    values = dict(SMALL)
    values.update({key.replace("__", ".").replace("_", "-"): value for key, value in overrides.items()})
    cfg = load_config(preset=preset, overrides=values)
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    with torch.no_grad():  # larger weights than the init: attention far from uniform, so a leak shows
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return model


MODELS = {
    "gqa": lambda: small_model("tiny", model__mtp_depth="2"),
    "mla": lambda: small_model("deepseek-v3-tiny"),
}


def summed_loss(out, targets: torch.Tensor, spans_by_row: list[list[tuple[int, int]]] | None = None) -> torch.Tensor:
    """Summed cross-entropy of the logits and of each MTP depth k; with `spans_by_row` the MTP terms
    only over positions i with i + k inside i's document (those a document run alone has)."""
    loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), reduction="sum")
    for depth, logits in enumerate(out.mtp_logits, start=1):
        _, labels = mtp_inputs_and_labels(targets, depth)
        per_token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        if spans_by_row is not None:
            keep = torch.zeros_like(per_token, dtype=torch.bool)
            for row, spans in enumerate(spans_by_row):
                for start, end in spans:
                    keep[row, start : end - depth] = True
            per_token = per_token[keep]
        loss = loss + per_token.sum()
    return loss


def test_positions_and_mask_match_a_plain_loop():
    ids = torch.tensor([[3, 3, 3, 5, 5, 9, 2, 2], [1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 2, 3, 3, 0, 0, 4]])
    positions, mask = document_positions(ids), document_mask(ids)
    assert mask.shape == (3, 1, 8, 8)
    for row in range(ids.shape[0]):
        spans = document_spans(ids[row])
        doc_of = {i: d for d, (s, e) in enumerate(spans) for i in range(s, e)}
        assert positions[row].tolist() == [i - spans[doc_of[i]][0] for i in range(8)]
        expected = [[j <= i and doc_of[i] == doc_of[j] for j in range(8)] for i in range(8)]
        assert mask[row, 0].tolist() == expected
    assert positions[1].tolist() == list(range(8))  # one document: plain positions and causal


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_packed_documents_give_the_logits_and_gradients_of_each_document_alone(attention):
    model = MODELS[attention]()
    inputs, targets, ids = packed_batch(model.cfg.vocab_size)
    spans_by_row = [document_spans(row) for row in ids]
    depths = model.cfg.mtp_depth
    assert depths >= 1

    packed = model(inputs, mtp_targets=targets, document_ids=ids)
    # RoPE's scores depend on offsets only, so the logits cannot show the positions: check the tables
    cos, sin, _ = model.training_attention(SEQ, ids)
    for row, spans in enumerate(spans_by_row):
        for start, end in spans:
            assert torch.equal(cos[row, 0, start:end], model.rope_cos[: end - start])
            assert torch.equal(sin[row, 0, start:end], model.rope_sin[: end - start])
    summed_loss(packed, targets, spans_by_row).backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    for row, spans in enumerate(spans_by_row):
        for start, end in spans:
            mine = targets[row : row + 1, start:end]
            # a document of no more tokens than MTP depths has no MTP positions: run without them
            alone = model(inputs[row : row + 1, start:end], mtp_targets=mine if end - start > depths else None)
            summed_loss(alone, mine).backward()
            torch.testing.assert_close(packed.logits[row, start:end], alone.logits[0], atol=2e-5, rtol=1e-5)
            for depth in range(1, len(alone.mtp_logits) + 1):
                mine = packed.mtp_logits[depth - 1][row, start : max(start, end - depth)]
                torch.testing.assert_close(mine, alone.mtp_logits[depth - 1][0], atol=2e-5, rtol=1e-5)
    alone_grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert alone_grads.keys() == packed_grads.keys()
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, alone_grads[name], atol=5e-5, rtol=1e-4, msg=name)

    # without the ids the same rows attend across documents: the logits differ
    plain = model(inputs)
    assert not torch.allclose(plain.logits, packed.logits, atol=1e-3)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_the_overlapped_forward_attends_inside_documents_too(attention):
    """parallel.ep-overlap's two halves (here in one process, local dispatch) give the whole batch's
    masked forward: each half gets its own rows of the positions and of the mask."""
    model = MODELS[attention]()
    inputs, targets, ids = packed_batch(model.cfg.vocab_size)
    whole = model(inputs, mtp_targets=targets, document_ids=ids)
    halves = overlapped_forward(model, inputs, targets, document_ids=ids)
    torch.testing.assert_close(halves.logits, whole.logits, atol=2e-5, rtol=1e-5)
    for mine, expected in zip(halves.mtp_logits, whole.mtp_logits, strict=True):
        torch.testing.assert_close(mine, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_the_flex_attention_block_mask_gives_the_sdpa_mask_s_forward(attention, monkeypatch):
    """CUDA runs the document mask as a FlexAttention block mask (attention_mask_for); its forward
    runs on the CPU too (not its backward, in torch 2.13), so the two forms are compared here."""
    model = MODELS[attention]()
    inputs, targets, ids = packed_batch(model.cfg.vocab_size)
    with torch.no_grad():
        dense = model(inputs, mtp_targets=targets, document_ids=ids)
        monkeypatch.setattr(transformer_module, "attention_mask_for", document_block_mask)
        assert isinstance(model.training_attention(SEQ, ids)[2], BlockMask)
        flex = model(inputs, mtp_targets=targets, document_ids=ids)
    torch.testing.assert_close(flex.logits, dense.logits, atol=2e-5, rtol=1e-5)
    for mine, expected in zip(flex.mtp_logits, dense.mtp_logits, strict=True):
        torch.testing.assert_close(mine, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's compiled kernels: CUDA")
@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_on_cuda_the_block_mask_gives_the_sdpa_mask_s_logits_and_gradients(attention, monkeypatch):
    model = MODELS[attention]().cuda()
    inputs, targets, ids = (t.cuda() for t in packed_batch(model.cfg.vocab_size))
    assert isinstance(attention_mask_for(ids), BlockMask)

    def run(mask_of):
        model.zero_grad()
        with monkeypatch.context() as patch:
            patch.setattr(transformer_module, "attention_mask_for", mask_of)
            out = model(inputs, mtp_targets=targets, document_ids=ids)
        summed_loss(out, targets).backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (dense_logits, dense_grads), (flex_logits, flex_grads) = run(document_mask), run(attention_mask_for)
    torch.testing.assert_close(flex_logits, dense_logits, atol=1e-4, rtol=1e-4)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, atol=1e-3, rtol=1e-3, msg=name)


def test_one_document_per_row_is_plain_causal_attention():
    model = MODELS["mla"]()
    inputs, targets, _ = packed_batch(model.cfg.vocab_size)
    ids = torch.zeros_like(inputs)
    masked = model(inputs, mtp_targets=targets, document_ids=ids)
    plain = model(inputs, mtp_targets=targets)
    torch.testing.assert_close(masked.logits, plain.logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(masked.mtp_logits[0], plain.mtp_logits[0], atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# The loader: document ids of each window from the prepared dataset's index


def indexed_corpus(prefix, seed: int, n_documents: int = 80) -> tuple[IndexedDataset, np.ndarray]:
    """A prepared dataset of random documents (some empty) and, by a plain running count, the
    corpus-wide number of the document each token belongs to."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 14, n_documents)
    with IndexedDatasetWriter(prefix, 300) as writer:
        for n in lengths:
            writer.add_document(rng.integers(0, 300, n))
    owner = np.repeat(np.arange(n_documents), lengths)
    return IndexedDataset(prefix), owner


def windows_of(ids: torch.Tensor, seq_len: int) -> list[range]:
    return [range(int(w) * (seq_len + 1), (int(w) + 1) * (seq_len + 1)) for w in ids]


def assert_ids_follow_documents(document_ids: torch.Tensor, windows: list[range], owner: np.ndarray) -> None:
    """Each row counts from 0 and steps up exactly where the token's corpus document changes."""
    for row, window in zip(document_ids.tolist(), windows):
        expected, current = [], 0
        for i in window[:-1]:
            current += i > window[0] and owner[i] != owner[i - 1]
            expected.append(current)
        assert row == expected


def test_packed_loader_gives_the_document_ids_of_each_window(tmp_path):
    ds, owner = indexed_corpus(tmp_path / "c", seed=0)
    seq_len = 9
    loader = PackedLoader(ds, seq_len, global_batch_size=6, seed=3, document_mask=True)
    plain = PackedLoader(ds.tokens, seq_len, global_batch_size=6, seed=3)
    for _ in range(4):
        ids = loader.window_ids(loader.sequences_consumed, 6)
        inputs, targets, document_ids = loader.next_training_batch()
        expected_inputs, expected_targets = plain.next_batch()
        assert torch.equal(inputs, expected_inputs) and torch.equal(targets, expected_targets)
        assert document_ids.shape == inputs.shape and document_ids.dtype == torch.int64
        assert_ids_follow_documents(document_ids, windows_of(ids, seq_len), owner)
    assert plain.next_training_batch()[2] is None  # without the option: no ids


def test_validation_document_ids_follow_the_validation_batches(tmp_path):
    ds, owner = indexed_corpus(tmp_path / "v", seed=1)
    seq_len, batch = 7, 3
    batches = list(validation_batches(ds.tokens, batch, seq_len, 4))
    documents = list(validation_document_ids(ds, batch, seq_len, 4))
    assert [d.shape for d in documents] == [inputs.shape for inputs, _ in batches]
    for b, document_ids in enumerate(documents):
        first = b * batch
        assert_ids_follow_documents(document_ids, windows_of(torch.arange(first, first + len(document_ids)), seq_len), owner)


def test_blended_loader_gives_each_source_s_document_ids(tmp_path):
    (a, owner_a), (b, owner_b) = indexed_corpus(tmp_path / "a", seed=2), indexed_corpus(tmp_path / "b", seed=4)
    seq_len = 5
    loader = BlendedLoader([a, b], [0.6, 0.4], seq_len, global_batch_size=8, seed=1, document_mask=True)
    ids = loader.window_ids(0, 8)
    inputs, _, document_ids = loader.next_training_batch()
    assert torch.equal(inputs, loader.batch(ids)[0])
    for source, owner in ((0, owner_a), (1, owner_b)):
        rows = ids[:, 0] == source
        assert rows.any()
        assert_ids_follow_documents(document_ids[rows], windows_of(ids[rows, 1], seq_len), owner)


def test_plain_tokens_and_pipelines_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^data\.document-mask: .*document index"):
        PackedLoader(torch.arange(100), 8, 2, document_mask=True)
    with pytest.raises(ConfigError, match=r"^data\.document-mask: .*document index"):
        validation_document_ids(torch.arange(100), 2, 8, 1)
    with pytest.raises(ConfigError, match=r"^data\.document-mask: .*parallel\.pp=2"):
        load_config(overrides={**SMALL, "data.document-mask": "true", "parallel.pp": "2", "train.micro-batch-size": "1"}, world_size=2)


# ------------------------------------------------------------------------------------------------
# Training with --data.document-mask on a prepared directory


def test_training_with_document_mask_starts_at_the_loss_of_each_document_alone(tmp_path, capsys):
    """The first step's loss is, by hand, the summed cross-entropy of every document piece of the
    step's windows run alone through the initial model, over the batch's tokens; then the loss falls."""
    rng = np.random.default_rng(0)
    words = ["moe", "expert", "router", "token", "layer", "gate", "loss", "batch"]
    texts = [" ".join(rng.choice(words, rng.integers(1, 9))) for _ in range(120)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:20]))
    data = tmp_path / "data"
    prepare(PrepareOptions((str(tmp_path / "train.jsonl"),), data, val_inputs=(str(tmp_path / "val.jsonl"),)), progress=False)
    seq_len, batch = 32, 4
    cfg = small_config(
        data__path=str(data), data__document_mask="true", train__steps="8", train__seq_len=str(seq_len),
        train__global_batch_size=str(batch), train__lr="1e-2",
    )
    trainer = Trainer(cfg, tmp_path / "run")
    initial = copy.deepcopy(trainer.model).eval()
    windows = trainer.loader.window_ids(0, batch)

    # the byte tokenizer stores each document as its UTF-8 bytes and a newline separator
    starts = np.cumsum([0] + [len(t.encode()) + 1 for t in texts])
    stream = torch.from_numpy(np.concatenate([np.frombuffer(t.encode() + b"\n", np.uint8) for t in texts]).astype(np.int64))
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for w in windows.tolist():
            lo, hi = w * (seq_len + 1), (w + 1) * (seq_len + 1)
            cuts = sorted({lo, *(int(s) for s in starts if lo < s < hi - 1), hi - 1})  # pieces of the inputs
            for a, b in zip(cuts[:-1], cuts[1:]):
                logits = initial(stream[a:b][None]).logits[0]
                total += F.cross_entropy(logits, stream[a + 1 : b + 1], reduction="sum").double()
    result = trainer.fit()
    metrics = [r for r in read_metrics(tmp_path / "run") if "lm_loss" in r]
    assert metrics[0]["lm_loss"] == pytest.approx(float(total) / (batch * seq_len), rel=1e-5)
    losses = [r["lm_loss"] for r in metrics]
    assert all(np.isfinite(losses)) and np.isfinite(result.val_loss)
    assert np.mean(losses[-3:]) < losses[0]

    # `moeforge eval` scores the validation split as the run validated it: inside each document
    val = IndexedDataset(data / "val")
    trained = load_model(tmp_path / "run").model
    assert evaluate(trained, val, seq_len, batch, 1, document_mask=True).loss == pytest.approx(result.val_loss, rel=1e-6)
    assert evaluate(trained, val, seq_len, batch, 1).loss != pytest.approx(result.val_loss, rel=1e-6)
    main(["eval", "--checkpoint", str(tmp_path / "run"), str(data), "--batch-size", str(batch), "--max-batches", "1", "--json"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["datasets"][0]["loss"] == pytest.approx(result.val_loss, rel=1e-6)
