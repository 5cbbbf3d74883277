"""`wid export` never destroys what it reads or overwrites unasked; `wid verify` fails a student that does not match."""
import json

import pytest

from wid.cli import main

from distill_fixtures import distill_argv, write_corpus, write_teacher


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    teacher, corpus = write_teacher(base / "teacher"), write_corpus(base / "corpus.txt")
    assert main(["distill", *distill_argv(teacher, corpus, base / "a")]) == 0
    assert main(["distill", *distill_argv(teacher, corpus, base / "b", "--seed", "3")]) == 0
    return dict(teacher=teacher, checkpoint=base / "a" / "checkpoints" / "checkpoint-12", student=base / "a",
                other_student=base / "b")


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_refuses_a_non_empty_target_unless_overwrite_is_given(run, tmp_path, capsys):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    assert main(["export", str(run["checkpoint"]), str(target)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (target / "notes.txt").read_text() == "mine"
    assert main(["export", str(run["checkpoint"]), str(target), "--overwrite"]) == 0
    assert (target / "config.json").exists() and (target / "model.safetensors").exists()


def test_overwriting_a_student_leaves_nothing_of_the_earlier_one(run, tmp_path):
    """A folder that held a sentence-transformers student (modules, pooling config, a sharded checkpoint, another
    tokenizer's files) holds only the new plain student after the export: no SentenceTransformer of two models."""
    target = tmp_path / "student"
    target.mkdir()
    (target / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "x.Transformer"},
                                                     {"idx": 1, "name": "1", "path": "1_Pooling", "type": "x.Pooling"}]))
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text("{}")
    for name in ("sentence_bert_config.json", "model-00001-of-00002.safetensors", "merges.txt", "config.json"):
        (target / name).write_text("old")
    (target / "notes.txt").write_text("mine")
    assert main(["export", str(run["checkpoint"]), str(target), "--overwrite"]) == 0
    names = sorted(p.name for p in target.iterdir())
    assert "modules.json" not in names and "1_Pooling" not in names and "merges.txt" not in names
    assert not any(name.startswith(("model-", "sentence_")) for name in names)
    assert {"config.json", "model.safetensors", "wid_summary.json", "notes.txt"} <= set(names)
    assert json.loads((target / "config.json").read_text())["hidden_size"] == 6
    assert json.loads((target / "wid_summary.json").read_text())["max_logit_difference_to_trained"] < 1e-4  # short recipe: exact


def test_export_of_a_run_folder_names_its_newest_checkpoint(run, tmp_path, capsys):
    assert main(["export", str(run["student"]), str(tmp_path / "student")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"pass {run['checkpoint']}" in error[0]
    assert not (tmp_path / "student").exists()


@pytest.mark.parametrize("inside", [False, True])
def test_export_never_writes_into_its_source(run, capsys, inside):
    before = _snapshot(run["checkpoint"])
    target = run["checkpoint"] / "student" if inside else run["checkpoint"]
    assert main(["export", str(run["checkpoint"]), str(target), "--overwrite"]) == 2
    error = capsys.readouterr().err.strip()
    assert "inside) the checkpoint" in error and len(error.splitlines()) == 1
    assert _snapshot(run["checkpoint"]) == before


def test_verify_passes_the_student_of_its_checkpoint(run, capsys):
    assert main(["verify", str(run["checkpoint"]), str(run["student"])]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["matches"] and report["tolerance"] == 1e-4


@pytest.mark.parametrize("other", ["teacher", "other_student"])
def test_verify_fails_a_student_that_does_not_match(run, capsys, other):
    assert main(["verify", str(run["checkpoint"]), str(run[other])]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["matches"] is False and "does not match" in captured.err


def test_verify_takes_a_tolerance(run, capsys):
    assert main(["verify", str(run["checkpoint"]), str(run["other_student"]), "--tolerance", "1e9"]) == 0


@pytest.mark.parametrize("tolerance", ["-1", "nan"])
def test_verify_refuses_a_tolerance_no_difference_can_meet(run, capsys, tolerance):
    assert main(["verify", str(run["checkpoint"]), str(run["student"]), "--tolerance", tolerance]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--tolerance must be 0 or more" in error[0]


@pytest.mark.parametrize("compensate", ["off", "on"])
def test_a_checkpoint_without_its_tokenizer_files_is_refused_in_one_line(run, tmp_path, capsys, compensate):
    """transformers builds a 5-token tokenizer for a folder without tokenizer files: the student would ship it and the
    compensation would read the corpus as [UNK]s."""
    import shutil

    from wid.data import TOKENIZER_FILES

    checkpoint = shutil.copytree(run["checkpoint"], tmp_path / "checkpoint-12")
    removed = [name for name in TOKENIZER_FILES if (checkpoint / name).is_file()]
    assert removed
    for name in removed:
        (checkpoint / name).unlink()
    target = tmp_path / "student"
    assert main(["export", str(checkpoint), str(target), "--compensate", compensate]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "tokenizer" in error and "save the tokenizer" in error, error
    assert not target.exists()


def test_export_of_a_checkpoint_before_the_target_says_the_rest_was_cut_at_once(run, tmp_path, capsys):
    checkpoint = run["checkpoint"].parent / "checkpoint-3"  # mask update 3 of the schedule's 4
    assert main(["export", str(checkpoint), str(tmp_path / "early")]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    notice = "the checkpoint's masks had not reached the target (mask update 3 of 4): the remaining channels were cut at once"
    assert any(notice in line for line in report["notices"]) and notice in captured.err
    assert report["max_logit_difference_to_trained"] > 1e-3
    assert main(["export", str(run["checkpoint"]), str(tmp_path / "final")]) == 0
    assert "notices" not in json.loads(capsys.readouterr().out)
