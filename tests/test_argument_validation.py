"""`wid distill` refuses nonsense numbers at once: one line naming the fix, exit status 2, nothing written."""
import pytest

from wid.cli import main

from distill_fixtures import distill_argv, write_corpus, write_teacher


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("validation")
    return dict(teacher=write_teacher(base / "teacher"), corpus=write_corpus(base / "corpus.txt"))


@pytest.mark.parametrize("flag, value, fragment", [
    ("--max_steps", "0", "--max_steps must be at least 1"),
    ("--max_steps", "-5", "--max_steps must be at least 1"),
    ("--w_step", "0", "--w_step must be at least 1"),
    ("--head_warmup_steps", "-1", "--head_warmup_steps must be 0 or more"),
    ("--head_warmup_lr", "0", "--head_warmup_lr must be positive"),
    ("--max_seq_length", "2", "--max_seq_length must be at least 3"),
    ("--save_widths", "1.5", "--save_widths takes fractions"),
    ("--save_widths", "0", "--save_widths takes fractions"),
    ("--kd_alpha", "1.5", "--kd_alpha in [0, 1]"),
    ("--kd_temperature", "0", "--kd_temperature must be positive"),
])
def test_a_nonsense_number_is_refused_before_anything_is_written(files, tmp_path, capsys, flag, value, fragment):
    out = tmp_path / "out"
    argv = distill_argv(files["teacher"], files["corpus"], out)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert main(["distill", *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert fragment in error and len(error.splitlines()) == 1
    assert not out.exists()
