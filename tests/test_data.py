import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moeforge.config import ConfigError, DataConfig
from moeforge.data import (
    ByteTokenizer,
    HFTokenizer,
    PackedLoader,
    build_datasets,
    build_tokenizer,
    document_separator,
    embedded_corpus,
    validation_batches,
)
from conftest import trainer_documents

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models route each token to a few experts.",
    "Ünïcödé text: café, naïve, 日本語, and a snake 🐍.",
]


def write_bpe_tokenizer(path: Path, special_tokens: list[str]) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    tok.save(str(path))
    return path


def window_starts(inputs: torch.Tensor, seq_len: int) -> list[int]:
    """Window index of each row, for loaders over `torch.arange(n)` (row k starts at k*(seq_len+1))."""
    assert torch.all(inputs[:, 0] % (seq_len + 1) == 0)
    return (inputs[:, 0] // (seq_len + 1)).tolist()


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trips_non_ascii():
    tok = ByteTokenizer()
    text = "héllo wörld — 日本語 🐍\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < tok.vocab_size == 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.eos_id is None
    assert document_separator(tok) == [ord("\n")]


def test_byte_tokenizer_decodes_invalid_utf8_with_replacement():
    assert ByteTokenizer().decode([104, 0xFF, 105]) == "h\ufffdi"


def test_build_tokenizer_byte_by_default():
    assert isinstance(build_tokenizer(DataConfig()), ByteTokenizer)


def test_hf_tokenizer_round_trips_and_finds_eos(tmp_path):
    path = write_bpe_tokenizer(tmp_path / "tokenizer.json", ["<|endoftext|>"])
    tok = build_tokenizer(DataConfig(tokenizer=str(path)))
    raw = Tokenizer.from_file(str(path))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == raw.get_vocab_size()
    assert tok.eos_id == raw.token_to_id("<|endoftext|>")
    for text in SENTENCES + ["unseen wörds ✓"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(SENTENCES[0])) < len(SENTENCES[0])
    assert tok.encode_batch(SENTENCES) == [tok.encode(s) for s in SENTENCES]


def test_hf_tokenizer_without_eos_separates_with_newline(tmp_path):
    tok = HFTokenizer(write_bpe_tokenizer(tmp_path / "tok.json", []))
    assert tok.eos_id is None
    assert document_separator(tok) == tok.encode("\n") != []


def test_hf_tokenizer_bad_file_names_the_field(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: ") as err:
        build_tokenizer(DataConfig(tokenizer=str(bad)))
    assert "\n" not in str(err.value)


def test_byte_stream_ends_each_document_with_a_newline(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in ["ab", "é"] * 8))
    _, train, val = build_datasets(DataConfig(path=str(path), val_fraction=0.5), seq_len=4)
    assert [*train, *val] == [97, 98, 10, 0xC3, 0xA9, 10] * 8


# ---------------------------------------------------------------------------------------------
# Corpus and files


def test_embedded_corpus_is_pydoc_topics_in_sorted_order():
    docs = embedded_corpus()
    assert docs == [topics[k] for k in sorted(topics)]
    assert docs == embedded_corpus()
    assert sum(map(len, docs)) > 100_000
    assert trainer_documents(DataConfig()) == docs


def test_read_txt_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n", encoding="utf-8")
    assert trainer_documents(DataConfig(path=str(tmp_path / "a.txt"))) == ["line one\nline two\n"]


def test_read_jsonl_one_document_per_record(tmp_path):
    lines = [json.dumps({"body": "first", "id": 1}), "", json.dumps({"body": "sécond"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = DataConfig(path=str(tmp_path / "d.jsonl"), text_field="body")
    assert trainer_documents(cfg) == ["first", "sécond"]


def test_read_directory_sorted_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "A1"}) + "\n" + json.dumps({"text": "A2"}))
    (tmp_path / "sub" / "c.txt").write_text("C")
    (tmp_path / "notes.md").write_text("ignored")
    assert trainer_documents(DataConfig(path=str(tmp_path))) == ["A1", "A2", "B", "C"]
    (tmp_path / "empty.txt").write_text("")  # an empty source is refused, as every other one
    with pytest.raises(ConfigError, match=r"^data\.path: '.*empty\.txt' is empty"):
        trainer_documents(DataConfig(path=str(tmp_path)))


def test_jsonl_missing_field_names_text_field_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"^data\.text-field: .*line 2 has no field 'text'$"):
        trainer_documents(DataConfig(path=str(path)))


def test_jsonl_non_string_field_names_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(ConfigError, match=r"^data\.text-field: .*line 1"):
        trainer_documents(DataConfig(path=str(path)))


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"^data\.path: '.*docs\.jsonl' line 2 is not UTF-8 text \(byte 30 "):
        trainer_documents(DataConfig(path=str(path)))


def test_empty_jsonl_names_the_file(tmp_path):
    (tmp_path / "good.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match=r"^data\.path: '.*empty\.jsonl' has no records \(an empty \.jsonl file\)$"):
        trainer_documents(DataConfig(path=str(tmp_path)))


def test_jsonl_invalid_json_names_path_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"^data\.path: .*line 2 is not valid JSON"):
        trainer_documents(DataConfig(path=str(path)))


@pytest.mark.parametrize(
    "name, content",
    [
        ("missing.txt", None),
        ("empty-dir", "dir"),
        ("empty.txt", b""),
        ("data.csv", b"a,b"),
        ("latin1.txt", b"caf\xe9"),
    ],
)
def test_bad_data_path_names_the_field(tmp_path, name, content):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"^data\.path: ") as err:
        trainer_documents(DataConfig(path=str(path)))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Splitting and packing


def test_batches_are_shifted_windows_of_the_stream():
    seq_len, stream = 8, torch.randint(0, 256, (300,))
    loader = PackedLoader(stream, seq_len, global_batch_size=4, seed=3)
    windows = [stream[k * (seq_len + 1) : (k + 1) * (seq_len + 1)] for k in range(loader.n_windows)]
    assert loader.n_windows == 300 // 9
    for _ in range(10):
        inputs, targets = loader.next_batch()
        assert inputs.shape == targets.shape == (4, seq_len)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for x, y in zip(inputs, targets):
            assert any(torch.equal(torch.cat([x, y[-1:]]), w) for w in windows)


def test_each_epoch_visits_every_window_once_in_a_fresh_order():
    seq_len, n_windows = 4, 7
    loader = PackedLoader(torch.arange(n_windows * (seq_len + 1) + 3), seq_len, global_batch_size=3, seed=0)
    seen = [w for _ in range(7) for w in window_starts(loader.next_batch()[0], seq_len)]  # 3 epochs
    epochs = [seen[i : i + n_windows] for i in range(0, len(seen), n_windows)]
    assert all(sorted(e) == list(range(n_windows)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    assert loader.sequences_consumed == 21 and loader.epoch == 3.0


def test_order_is_deterministic_and_depends_on_seed():
    stream = torch.arange(200)

    def first_batches(seed: int) -> list[list[int]]:
        loader = PackedLoader(stream, 4, global_batch_size=8, seed=seed)
        return [window_starts(loader.next_batch()[0], 4) for _ in range(5)]

    assert first_batches(1) == first_batches(1)
    assert first_batches(1) != first_batches(2)


def take(loader: PackedLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_resume_continues_with_identical_batches():
    stream = torch.randint(0, 256, (500,))
    uninterrupted = take(PackedLoader(stream, 6, global_batch_size=5, seed=7), 12)
    first = PackedLoader(stream, 6, global_batch_size=5, seed=7)
    take(first, 5)
    state = first.state_dict()
    resumed = PackedLoader(stream, 6, global_batch_size=5, seed=7)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 7), uninterrupted[5:])


def rank_concatenated(stream: torch.Tensor, world_size: int, n: int, state: dict | None = None):
    loaders = [PackedLoader(stream, 6, 8, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    per_rank = [take(loader, n) for loader in loaders]
    assert all(loader.state_dict() == loaders[0].state_dict() for loader in loaders)
    return [
        (torch.cat([b[i][0] for b in per_rank]), torch.cat([b[i][1] for b in per_rank])) for i in range(n)
    ], loaders[0].state_dict()


def test_ranks_split_the_global_batch_and_resume_on_another_world_size():
    stream = torch.randint(0, 256, (400,))  # 57 windows: batches of 8 cross epoch boundaries
    single, _ = rank_concatenated(stream, 1, 12)
    double, _ = rank_concatenated(stream, 2, 12)
    assert double[0][0].shape == (8, 6)
    assert_same_batches(single, double)

    _, state_after_4 = rank_concatenated(stream, 1, 4)
    resumed_on_2, _ = rank_concatenated(stream, 2, 8, state=state_after_4)
    resumed_on_4, _ = rank_concatenated(stream, 4, 8, state=state_after_4)
    assert_same_batches(resumed_on_2, single[4:])
    assert_same_batches(resumed_on_4, single[4:])


def test_loader_errors_name_the_fields():
    with pytest.raises(ConfigError, match=r"^train\.global-batch-size: "):
        PackedLoader(torch.arange(100), 4, global_batch_size=6, world_size=4)
    with pytest.raises(ConfigError, match=r"^train\.seq-len: "):
        PackedLoader(torch.arange(10), 10, global_batch_size=1)
    state = PackedLoader(torch.arange(100), 4, 2).state_dict()
    with pytest.raises(ConfigError, match=r"^train\.seq-len: "):
        PackedLoader(torch.arange(100), 5, 2).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"^train\.seed: "):
        PackedLoader(torch.arange(100), 4, 2, seed=1).load_state_dict(state)


def test_validation_batches_are_sequential_and_fixed():
    seq_len, val = 4, torch.arange(5 * 7 + 2)  # 7 windows
    batches = list(validation_batches(val, batch_size=3, seq_len=seq_len, n_batches=2))
    assert [window_starts(x, seq_len) for x, _ in batches] == [[0, 1, 2], [3, 4, 5]]
    assert_same_batches(batches, list(validation_batches(val, 3, seq_len, 2)))
    x, y = batches[0]
    assert torch.equal(x[1], val[5:9]) and torch.equal(y[1], val[6:10])

    fewer = list(validation_batches(val, batch_size=3, seq_len=seq_len, n_batches=10))
    assert [window_starts(x, seq_len) for x, _ in fewer] == [[0, 1, 2], [3, 4, 5], [6]]


def test_validation_needs_one_window():
    with pytest.raises(ConfigError, match=r"^data\.val-fraction: "):
        validation_batches(torch.arange(4), batch_size=2, seq_len=4, n_batches=1)


# ---------------------------------------------------------------------------------------------
# build_datasets


def test_build_datasets_on_embedded_corpus():
    tok, train, val = build_datasets(DataConfig(val_fraction=0.05), seq_len=64)
    total = b"".join(doc.encode() + b"\n" for doc in embedded_corpus())
    assert isinstance(tok, ByteTokenizer)
    assert [*train.tolist(), *val.tolist()] == list(total)
    assert len(val) == int(len(total) * 0.05)


def test_build_datasets_errors_name_the_fields(tmp_path):
    (tmp_path / "small.txt").write_text("x" * 100)
    cfg = DataConfig(path=str(tmp_path / "small.txt"), val_fraction=0.9)
    _, train, _ = build_datasets(cfg, seq_len=20)  # validation holds a window; training, read by the loader, not
    with pytest.raises(ConfigError, match=r"^train\.seq-len: got 20; allowed: at most \d+ \(the training split"):
        PackedLoader(train, 20, global_batch_size=1)
    cfg.val_fraction = 0.05
    with pytest.raises(ConfigError, match=r"^data\.val-fraction: "):
        build_datasets(cfg, seq_len=20)
