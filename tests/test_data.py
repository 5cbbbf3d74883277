"""wid.data and wid.teachers: corpus resolution, BERT-style packing, dynamic masking, shipped assets (offline)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from wid.data import (
    CorpusError,
    build_mlm_dataset,
    default_corpus_files,
    mlm_collator,
    resolve_corpus,
)
from wid.teachers import DEFAULT_TEACHER_NAME, default_teacher_path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Anarchism is a political philosophy that advocates self-governed societies.",
    "Albedo is the measure of the diffuse reflection of solar radiation.",
    "Hundreds of people have been forced to vacate their homes in New South Wales.",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_teacher_path())


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    lines = []
    for i in range(60):
        lines.append(f"{SENTENCES[i % 4]} Paragraph number {i}.")
        if i % 5 == 4:
            lines.append("")  # blank lines between documents are dropped
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _stream(tokenizer, path):
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [t for line in lines for t in tokenizer(line, add_special_tokens=False)["input_ids"]]


def test_packing_gives_full_cls_sep_sequences_in_corpus_order(tokenizer, corpus_file, tmp_path):
    seq_len = 32
    dataset = build_mlm_dataset(tokenizer, str(corpus_file), seq_len=seq_len, cache_dir=str(tmp_path / "cache"))
    stream = _stream(tokenizer, corpus_file)
    assert len(dataset) == len(stream) // (seq_len - 2)
    body = []
    for row in dataset:
        ids = row["input_ids"]
        assert len(ids) == seq_len
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert row["special_tokens_mask"] == [1] + [0] * (seq_len - 2) + [1]
        body += ids[1:-1]
    assert body == stream[: len(body)]  # concatenated across documents, only the tail dropped


def test_files_are_read_in_the_order_given(tokenizer, tmp_path):
    first, second = tmp_path / "b.txt", tmp_path / "a.txt"
    first.write_text(" ".join(["alpha"] * 40) + "\n", encoding="utf-8")
    second.write_text(" ".join(["omega"] * 40) + "\n", encoding="utf-8")
    dataset = build_mlm_dataset(tokenizer, [str(first), str(second)], seq_len=42, cache_dir=str(tmp_path / "cache"))
    alpha, omega = tokenizer.convert_tokens_to_ids(["alpha", "omega"])
    assert dataset[0]["input_ids"][1:-1] == [alpha] * 40
    assert dataset[1]["input_ids"][1:-1] == [omega] * 40


def test_directory_resolves_to_sorted_text_files_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "a.txt", "sub/c.txt", "ignored.csv", "sub/d.jsonl", "config.json", "sub/.hidden.txt"):
        (tmp_path / name).write_text('{"text": "some text"}\n' if "json" in name else "some text\n", encoding="utf-8")
    files = resolve_corpus(str(tmp_path))
    # a .json in a folder is a config or a saved dataset's metadata far more often than text: read only when named
    assert [os.path.relpath(f, tmp_path) for f in files] == ["a.txt", "b.txt", os.path.join("sub", "c.txt"),
                                                            os.path.join("sub", "d.jsonl")]
    assert resolve_corpus(str(tmp_path / "config.json")) == [str(tmp_path / "config.json")]


def test_collator_masks_15_percent_80_10_10_never_special(tokenizer, corpus_file, tmp_path):
    dataset = build_mlm_dataset(tokenizer, str(corpus_file), seq_len=32, cache_dir=str(tmp_path / "cache"))
    examples = [dataset[i % len(dataset)] for i in range(2000)]  # 60k maskable tokens
    original = torch.tensor([e["input_ids"] for e in examples])
    torch.manual_seed(0)
    batch = mlm_collator(tokenizer)(examples)
    inputs, labels = batch["input_ids"], batch["labels"]
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # CLS / SEP never masked
    assert (inputs[:, 0] == tokenizer.cls_token_id).all() and (inputs[:, -1] == tokenizer.sep_token_id).all()
    assert torch.equal(labels[chosen], original[chosen])  # labels are the true tokens, -100 elsewhere
    assert torch.equal(inputs[~chosen], original[~chosen])
    rate = chosen[:, 1:-1].float().mean().item()
    assert 0.14 < rate < 0.16
    masked = (inputs[chosen] == tokenizer.mask_token_id).float().mean().item()
    kept = (inputs[chosen] == original[chosen]).float().mean().item()
    assert 0.78 < masked < 0.82
    assert 0.08 < kept < 0.12
    assert 0.08 < 1 - masked - kept < 0.12  # random replacements (a random token may equal the original: ~0)


def test_collator_seed_makes_masks_reproducible(tokenizer, corpus_file, tmp_path):
    dataset = build_mlm_dataset(tokenizer, str(corpus_file), seq_len=32, cache_dir=str(tmp_path / "cache"))
    examples = [dataset[i] for i in range(len(dataset))]
    first = mlm_collator(tokenizer, seed=7)(examples)
    second = mlm_collator(tokenizer, seed=7)(examples)
    assert torch.equal(first["input_ids"], second["input_ids"]) and torch.equal(first["labels"], second["labels"])


def _one_line_corpus_error(call):
    with pytest.raises(CorpusError) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_missing_file_is_a_one_line_corpus_error(tmp_path):
    message = _one_line_corpus_error(lambda: resolve_corpus(str(tmp_path / "missing.txt")))
    assert "does not exist" in message


def test_empty_file_is_a_one_line_corpus_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    assert "empty" in _one_line_corpus_error(lambda: resolve_corpus([str(empty)]))


def test_directory_without_text_files_is_a_one_line_corpus_error(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n", encoding="utf-8")
    assert "no .txt" in _one_line_corpus_error(lambda: resolve_corpus(str(tmp_path)))


def test_corpus_too_short_for_one_sequence_says_how_many_tokens(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n", encoding="utf-8")
    message = _one_line_corpus_error(lambda: build_mlm_dataset(tokenizer, str(short), seq_len=128, cache_dir=str(tmp_path / "cache")))
    assert "4 tokens" in message and "needs 126" in message


def test_unknown_hub_dataset_offline_is_a_corpus_error(tokenizer, tmp_path):
    assert resolve_corpus("no-such-dataset-wid-test") == "no-such-dataset-wid-test"
    message = _one_line_corpus_error(lambda: build_mlm_dataset(tokenizer, "no-such-dataset-wid-test", cache_dir=str(tmp_path / "cache")))
    assert "local text files" in message


def test_shipped_corpus_exists_and_is_non_trivial():
    (train,), (heldout,) = default_corpus_files(), default_corpus_files(heldout=True)
    assert resolve_corpus(None) == [train]
    with open(train, encoding="utf-8") as handle:
        train_words = sum(len(line.split()) for line in handle)
    with open(heldout, encoding="utf-8") as handle:
        heldout_words = sum(len(line.split()) for line in handle)
    assert train_words > 200_000
    assert 0.02 * train_words < heldout_words < 0.1 * train_words


def test_default_teacher_loads_offline():
    from transformers import AutoConfig, AutoTokenizer

    path = default_teacher_path()
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert DEFAULT_TEACHER_NAME == "all-MiniLM-L6-v2"
    assert config.model_type == "bert" and config.hidden_size == 384 and config.num_hidden_layers == 6
    assert tokenizer.cls_token_id is not None and tokenizer.mask_token_id is not None


def test_device_side_masking_matches_the_collators_statistics():
    import torch

    from wid.data import mask_tokens

    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (400, 128))
    special = torch.zeros_like(ids)
    special[:, 0] = special[:, -1] = 1
    masked, labels = mask_tokens(ids, special, mask_token_id=103, vocab_size=30522)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    rate = chosen.float().sum() / (ids.numel() - 800)
    assert 0.14 < rate < 0.16
    as_mask = (masked == 103) & chosen
    unchanged = (masked == ids) & chosen
    assert 0.78 < as_mask.sum() / chosen.sum() < 0.82
    assert 0.08 < unchanged.sum() / chosen.sum() < 0.12


def test_the_corpus_fingerprint_follows_the_text_not_the_paths(tmp_path):
    import gzip

    from wid.data import corpus_fingerprint

    (tmp_path / "a").mkdir()
    first = tmp_path / "a" / "part.txt"
    first.write_text("\n".join(SENTENCES) + "\n")
    copy = tmp_path / "copy.txt"
    copy.write_bytes(first.read_bytes())
    packed = tmp_path / "packed.txt.gz"
    packed.write_bytes(gzip.compress(first.read_bytes()))
    assert len(corpus_fingerprint([str(first)])) == 64
    assert corpus_fingerprint([str(first)]) == corpus_fingerprint([str(copy)]) == corpus_fingerprint([str(packed)])
    assert corpus_fingerprint([str(tmp_path / "a")]) == corpus_fingerprint([str(first)])
    assert corpus_fingerprint([str(first), str(copy)]) != corpus_fingerprint([str(first)])
    assert corpus_fingerprint(None) == corpus_fingerprint(default_corpus_files())
    before = corpus_fingerprint([str(first)])
    mtime = first.stat().st_mtime_ns
    first.write_text("\n".join(reversed(SENTENCES)) + "\n")  # same size, other text, written a second later
    os.utime(first, ns=(mtime + 10**9, mtime + 10**9))
    assert corpus_fingerprint([str(first)]) != before
