"""A corpus that is not UTF-8 text (another encoding, binary data, broken JSON lines) is refused with one line
that names the file, where it breaks and the fix, before any teacher is loaded."""
import gzip
import json

import pytest

from wid.cli import main
from wid.data import CorpusError, resolve_corpus

from distill_fixtures import distill_argv, write_corpus, write_teacher


def _latin1(path):
    write_corpus(path)
    with open(path, "ab") as handle:
        handle.write("Café au lait\n".encode("latin-1"))
    return path, f"is not UTF-8 (byte 0xe9 on line {len(path.read_bytes().splitlines())})"


def _binary(path):
    path.write_bytes(bytes(range(256)) * 40)
    return path, "holds NUL bytes"


def _utf16(path):
    path.write_bytes("some text in utf-16\n".encode("utf-16"))
    return path, "iconv -f utf-16 -t utf-8"


def _broken_json_line(path):
    path.write_text(json.dumps({"text": "a good line"}) + '\n{"text": "no closing quote}\n')
    return path, "line 2 of corpus file"


def _json_without_text_string(path):
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps([1, 2]) + "\n")
    return path, 'is not a JSON object with a "text" string'


def _gzip_latin1(path):
    with gzip.open(path, "wb") as handle:
        handle.write(b"Caf\xe9\n")
    return path, "is not UTF-8 (byte 0xe9 on line 1)"


BAD = {"corpus.txt": _latin1, "binary.txt": _binary, "utf16.txt": _utf16, "broken.jsonl": _broken_json_line,
       "list.jsonl": _json_without_text_string, "latin.txt.gz": _gzip_latin1}


@pytest.mark.parametrize("name", sorted(BAD))
def test_resolve_corpus_names_the_file_and_the_problem(tmp_path, name):
    path, fragment = BAD[name](tmp_path / name)
    with pytest.raises(CorpusError) as caught:
        resolve_corpus([str(path)])
    message = str(caught.value)
    assert str(path) in message and fragment in message and len(message.splitlines()) == 1


def test_a_bad_file_inside_a_corpus_directory_is_found(tmp_path):
    write_corpus(tmp_path / "a.txt")
    _binary(tmp_path / "b.txt")
    with pytest.raises(CorpusError, match="b.txt holds NUL bytes"):
        resolve_corpus(str(tmp_path))


def test_good_utf8_and_json_lines_pass(tmp_path):
    text = tmp_path / "ok.txt"
    text.write_text("Zoë’s café — naïve 北京\n", encoding="utf-8")
    lines = tmp_path / "ok.jsonl"
    lines.write_text("\n".join(json.dumps({"text": f"line {i} é"}) for i in range(3)) + "\n\n")
    assert resolve_corpus([str(text), str(lines)]) == [str(text), str(lines)]


@pytest.mark.parametrize("name", ["corpus.txt", "binary.txt", "broken.jsonl"])
def test_wid_distill_stops_with_one_line_and_writes_nothing(tmp_path, capsys, name):
    path, fragment = BAD[name](tmp_path / name)
    teacher, out = write_teacher(tmp_path / "teacher"), tmp_path / "out"
    capsys.readouterr()  # the teacher's own save messages
    assert main(["distill", *distill_argv(teacher, path, out)]) == 2
    error = capsys.readouterr().err.strip()
    assert fragment in error and len(error.splitlines()) == 1
    assert not out.exists()
