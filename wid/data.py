"""Corpus → masked-LM training sequences, for WID's task-agnostic stage (WID_METHOD §7).

The paper distils with the masked-LM objective only: 15% of tokens, 80% [MASK] / 10% random / 10%
unchanged, masking drawn anew for every batch, sequences of 128 tokens. Here:

* `resolve_corpus` turns what the user gave (nothing, files, directories, a `datasets` name) into files
  or a hub name, failing early with a `CorpusError` that says what to do;
* `build_mlm_dataset` tokenizes the text once (cached by `datasets`) and packs it, BERT-style, into
  `[CLS] + seq_len-2 tokens + [SEP]` sequences that run across document boundaries, so no padding is
  ever trained on;
* `mlm_collator` masks each batch dynamically (transformers' `DataCollatorForLanguageModeling`).

With no corpus given, the shipped one is used (wid/corpus/: Wikipedia articles and the Lee news corpus,
see NOTICE.md there); it has a held-out split for held-out MLM loss.
"""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

DEFAULT_CORPUS = "wiki_lee"
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
# The files a saved tokenizer may consist of (any family): they decide the token ids a corpus becomes.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
                   "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja")
PACK_LINES = 1000  # lines concatenated per packing batch (as run_mlm.py); each batch drops < seq_len-2 tokens


class CorpusError(ValueError):
    """A corpus that cannot be used; the message (one line) says what to do instead."""


def default_corpus_files(heldout: bool = False) -> list[str]:
    """The shipped corpus file (training split, or the held-out split)."""
    stem = DEFAULT_CORPUS + ("_heldout" if heldout else "")
    for suffix in TEXT_SUFFIXES:
        path = CORPUS_DIR / (stem + suffix)
        if path.is_file():
            return [str(path)]
    raise CorpusError(f"the shipped corpus {CORPUS_DIR / (stem + '.txt')} is missing; reinstall wid or pass --corpus FILES")


def read_utf8_text(path, error=ValueError, what: str = "file") -> str:
    """A small text file's content (a leading BOM dropped), or `error`, one line naming the line and the byte, when it
    is not UTF-8: decoding with replacement characters would silently garble every accented letter."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise error(f"{what} {path} is not UTF-8 (byte 0x{data[exc.start]:02x} on line {line}); convert it, e.g. iconv -f "
                    "latin1 -t utf-8") from None


@functools.lru_cache(maxsize=None)  # a run resolves its corpus several times: each file is read once
def _scan_text_file(path: Path, size: int, mtime_ns: int) -> tuple[bool, str]:
    """(whether the file holds text (any non-whitespace character), SHA-256 of its text); CorpusError, one line, when
    it is not readable UTF-8 text: binary data (a NUL byte), bytes that are not UTF-8, or a .jsonl line that is not a
    JSON object. Cached on (path, size, mtime), since a run resolves its corpus more than once."""
    import codecs
    import hashlib

    opener = gzip.open if path.name.endswith(".gz") else open
    decoder, has_text, line, tail = codecs.getincrementaldecoder("utf-8")(errors="strict"), False, 1, ""
    digest = hashlib.sha256()
    json_lines = path.name.endswith((".jsonl", ".jsonl.gz"))
    try:
        with opener(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
                if b"\0" in chunk:
                    raise CorpusError(f"corpus file {path} holds NUL bytes: it is binary or UTF-16, not UTF-8 text; pass UTF-8 "
                                      "text files (iconv -f utf-16 -t utf-8 converts UTF-16)")
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as error:
                    at = line + chunk[:error.start].count(b"\n")
                    raise CorpusError(f"corpus file {path} is not UTF-8 (byte 0x{chunk[error.start]:02x} on line {at}); convert "
                                      "it, e.g. iconv -f latin1 -t utf-8, or pass another file") from None
                has_text = has_text or bool(text.strip())
                if json_lines:
                    lines = (tail + text).split("\n")
                    tail = lines.pop()
                    for offset, record in enumerate(lines):
                        _check_json_line(path, line + offset, record)
                line += text.count("\n")
            decoder.decode(b"", final=True)
            if json_lines and tail:
                _check_json_line(path, line, tail)
    except UnicodeDecodeError:
        raise CorpusError(f"corpus file {path} ends inside a UTF-8 character; the file is truncated or not UTF-8") from None
    except (OSError, EOFError) as error:
        raise CorpusError(f"cannot read corpus file {path} ({error}); pass readable UTF-8 text files") from None
    return has_text, digest.hexdigest()


def _check_json_line(path: Path, number: int, record: str) -> None:
    import json

    if not record.strip():
        return
    try:
        value = json.loads(record)
    except json.JSONDecodeError as error:
        raise CorpusError(f"line {number} of corpus file {path} is not valid JSON ({error.msg}); give one JSON object per "
                          'line, e.g. {"text": "..."}') from None
    if not isinstance(value, dict) or not isinstance(value.get("text", ""), str):
        raise CorpusError(f'line {number} of corpus file {path} is not a JSON object with a "text" string; give one per line')


def _scan(path: Path) -> tuple[bool, str]:
    stat = path.stat()
    return _scan_text_file(path.resolve(), stat.st_size, stat.st_mtime_ns)


def _has_text(path: Path) -> bool:
    return _scan(path)[0]


def corpus_fingerprint(corpus) -> str | None:
    """A digest of the corpus's text, file by file in reading order (not of its paths): a run records it so that a
    resume, or a check of a compensated student, can tell that files under the same names changed. The files are
    read in full when resolved anyway (to check they are UTF-8), so this costs no extra pass. None for a hub dataset."""
    import hashlib

    files = resolve_corpus(corpus)
    if isinstance(files, str):
        return None
    combined = hashlib.sha256()
    for path in files:
        combined.update(_scan(Path(path))[1].encode())
    return combined.hexdigest()


# What a corpus folder contributes: text and JSON-lines files. A plain .json file is read only when given by name: in
# a folder it is far more often a config or a saved dataset's metadata than text.
FOLDER_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".jsonl.gz")


def _is_corpus_file(path: Path) -> bool:
    return path.name.endswith(FOLDER_SUFFIXES) and not path.name.startswith(".")


def _looks_like_path(entry: str) -> bool:
    """Whether a non-existent entry was meant as a local path (so: 'not found') rather than a hub name."""
    return (
        entry.startswith(("/", ".", "~", "\\"))
        or entry.endswith(("/", "\\"))
        or "\\" in entry
        or entry.count("/") > 1
        or "." in Path(entry).name
    )


def resolve_corpus(corpus: str | list[str] | None) -> list[str] | str:
    """Files to read (list, in order) or a `datasets` hub name (str); CorpusError for unusable input.

    None → the shipped corpus. Each entry may be a file (plain text, one document or paragraph per line;
    .gz and .jsonl with a "text" field also work) or a directory (its *.txt, *.txt.gz and *.jsonl files,
    recursively, sorted). A single entry that is no existing path is taken as a `datasets` name
    ("name" or "name:config"), loaded later with split="train".
    """
    if corpus is None:
        return default_corpus_files()
    entries = [corpus] if isinstance(corpus, (str, Path)) else list(corpus)
    if not entries:
        return default_corpus_files()
    entries = [str(entry) for entry in entries]
    if len(entries) == 1 and not Path(entries[0]).expanduser().exists() and not _looks_like_path(entries[0]):
        return entries[0]
    files: list[str] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _is_corpus_file(p))
            if not found:
                raise CorpusError(f"corpus directory {path} holds no {', '.join(FOLDER_SUFFIXES)} files; put plain text files in "
                                  "it (a .json file is read when given by name)")
            candidates = found
        elif path.is_file():
            candidates = [path]
        else:
            raise CorpusError(f"corpus path {path} does not exist; pass existing text files or directories")
        for candidate in candidates:
            if not _has_text(candidate):
                raise CorpusError(f"corpus file {candidate} is empty; remove it or pass a file with text")
            files.append(str(candidate))
    return files


def _load_text(source: list[str] | str, cache_dir: str | None):
    """A `datasets.Dataset` with one column, "text" (files in the given order, or the hub dataset's train split)."""
    import datasets

    if isinstance(source, str):
        name, _, config = source.partition(":")
        try:
            dataset = datasets.load_dataset(name, config or None, split="train", cache_dir=cache_dir)
        except Exception as error:  # network, unknown name, no train split...: all mean the same to the user
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CorpusError(
                f"could not load dataset '{source}' with datasets.load_dataset ({reason}); "
                "offline, pass local text files or a directory instead"
            ) from None
        if "text" not in dataset.column_names:
            raise CorpusError(f"dataset '{source}' has no 'text' column (columns: {', '.join(dataset.column_names)}); pass local text files instead")
        return dataset.select_columns(["text"])

    parts, run, run_builder = [], [], None
    for path in source:  # consecutive files of one kind load together, so the order is kept
        builder = "json" if path.endswith(JSON_SUFFIXES) else "text"
        if run and builder != run_builder:
            parts.append((run_builder, run))
            run = []
        run, run_builder = run + [path], builder
    parts.append((run_builder, run))
    loaded = []
    for builder, files in parts:
        try:
            dataset = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
        except Exception as error:  # noqa: BLE001 - the files were checked; what is left is still the user's input
            cause = error.__cause__ or error
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise CorpusError(f"datasets could not read the corpus files {', '.join(files)} ({type(cause).__name__}: "
                              f"{reason}); pass UTF-8 text files or JSON lines with a \"text\" field") from None
        if "text" not in dataset.column_names:
            raise CorpusError(f"JSON corpus files {files} have no 'text' field; give each record a \"text\" string")
        loaded.append(dataset.select_columns(["text"]))
    return loaded[0] if len(loaded) == 1 else datasets.concatenate_datasets(loaded)


def _tokenize(batch, tokenizer):
    """Token ids without special tokens; blank lines are dropped (a batched map may return fewer rows)."""
    texts = [text for text in batch["text"] if text and text.strip()]
    if not texts:
        return {"input_ids": []}
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)
    return {"input_ids": encoded["input_ids"]}


def _pack(batch, body: int, cls_id: int, sep_id: int):
    """Concatenate the batch's tokens and cut `[CLS] + body tokens + [SEP]` sequences; drop the tail."""
    stream = [token for ids in batch["input_ids"] for token in ids]
    count = len(stream) // body
    input_ids = [[cls_id] + stream[i * body:(i + 1) * body] + [sep_id] for i in range(count)]
    special = [1] + [0] * body + [1]
    return {"input_ids": input_ids, "special_tokens_mask": [list(special) for _ in range(count)]}


def build_mlm_dataset(tokenizer, corpus: str | list[str] | None = None, seq_len: int = 128,
                      cache_dir: str | None = None, num_proc: int | None = None, heldout: bool = False):
    """Packed MLM sequences of exactly `seq_len` tokens: columns input_ids and special_tokens_mask.

    Tokenization is cached by `datasets` (keyed on the files and the tokenizer), in `cache_dir` if given.
    `heldout=True` gives the shipped corpus's held-out split (only with corpus=None).
    """
    if seq_len < 3:
        raise ValueError(f"seq_len must be at least 3 ([CLS] + a token + [SEP]), got {seq_len}")
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise ValueError("the tokenizer has no [CLS]/[SEP] tokens; WID needs a BERT-family tokenizer")
    if heldout:
        if corpus is not None:
            raise CorpusError("a held-out split exists only for the shipped corpus; leave corpus unset for heldout=True")
        source = default_corpus_files(heldout=True)
    else:
        source = resolve_corpus(corpus)

    text = _load_text(source, cache_dir)
    tokens = text.map(
        functools.partial(_tokenize, tokenizer=tokenizer), batched=True, remove_columns=text.column_names,
        num_proc=num_proc, desc="Tokenizing corpus",
    )
    body = seq_len - 2
    packed = tokens.map(
        functools.partial(_pack, body=body, cls_id=cls_id, sep_id=sep_id), batched=True, batch_size=PACK_LINES,
        remove_columns=tokens.column_names, num_proc=num_proc, desc=f"Packing into {seq_len}-token sequences",
    )
    if len(packed) == 0:
        total = sum(len(ids) for ids in tokens["input_ids"])
        name = source if isinstance(source, str) else ", ".join(source)
        raise CorpusError(
            f"corpus {name} gives no full sequence: it has {total} tokens, one sequence of {seq_len} needs {body} "
            f"(plus [CLS]/[SEP], concatenating up to {PACK_LINES} lines); add text or lower the sequence length"
        )
    return packed


def load_tokenizer(model_dir, vocab_size: int, error=ValueError):
    """The tokenizer saved with a model, checked against the model's vocabulary: a folder without tokenizer files
    makes transformers build a 5-token tokenizer that turns every word into [UNK], and one with more tokens than
    the embeddings would index past them. Either is refused with `error` (one line naming the fix)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - missing or broken tokenizer files
        raise error(f"cannot load a tokenizer from {model_dir} ({type(exc).__name__}); save the tokenizer files beside the "
                    "model (tokenizer.save_pretrained)") from None
    size = len(tokenizer)
    if size < vocab_size // 2:
        raise error(f"the tokenizer in {model_dir} has {size} tokens for a model with {vocab_size}: its tokenizer files are "
                    "missing; save the tokenizer the model was trained with beside it (tokenizer.save_pretrained)")
    if size > vocab_size:
        raise error(f"the tokenizer in {model_dir} has {size} tokens but the model only {vocab_size} embeddings; resize the "
                    "model's embeddings (resize_token_embeddings) or use the tokenizer it was trained with")
    return tokenizer


def mlm_collator(tokenizer, mlm_probability: float = 0.15, seed: int | None = None):
    """BERT's dynamic masking: `mlm_probability` of non-special tokens, 80% [MASK] / 10% random / 10% kept.

    Labels are -100 except at chosen positions. `seed` gives the collator its own generator (reproducible
    masks; in DataLoader workers, seed + worker id); None uses torch's global RNG.
    """
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(
        tokenizer=tokenizer, mlm=True, mlm_probability=mlm_probability,
        mask_replace_prob=0.8, random_replace_prob=0.1, seed=seed,
    )


def mask_tokens(input_ids, special_tokens_mask, mask_token_id: int, vocab_size: int, mlm_probability: float = 0.15):
    """The same 15% / 80-10-10 dynamic masking as `mlm_collator`, done on the batch's device.

    The trainer masks here, inside the training step, rather than in the DataLoader: on resume the
    Trainer restores the RNG state only after it has collated the first batch, so collator-side
    masking would make a resumed run differ from an uninterrupted one (and on a GPU this is faster).
    Returns (masked input_ids, labels with -100 at unmasked positions).
    """
    import torch

    probabilities = torch.full(input_ids.shape, mlm_probability, device=input_ids.device)
    if special_tokens_mask is not None:
        probabilities.masked_fill_(special_tokens_mask.bool(), 0.0)
    chosen = torch.bernoulli(probabilities).bool()
    labels = input_ids.masked_fill(~chosen, -100)
    replaced = torch.bernoulli(torch.full(input_ids.shape, 0.8, device=input_ids.device)).bool() & chosen
    randomised = torch.bernoulli(torch.full(input_ids.shape, 0.5, device=input_ids.device)).bool() & chosen & ~replaced
    masked = input_ids.masked_fill(replaced, mask_token_id)
    random_words = torch.randint(vocab_size, input_ids.shape, device=input_ids.device, dtype=input_ids.dtype)
    return torch.where(randomised, random_words, masked), labels
