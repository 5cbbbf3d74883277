"""A teacher folder that cannot be distilled (weights missing or truncated, a broken config.json, a wid training
checkpoint) is refused with one line naming the fix, exit status 2, and nothing is written."""
import shutil

import pytest

from wid.cli import main

from distill_fixtures import distill_argv, write_corpus, write_teacher


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("teachers")
    teacher, corpus = write_teacher(base / "teacher"), write_corpus(base / "corpus.txt")
    assert main(["distill", *distill_argv(teacher, corpus, base / "run")]) == 0
    return dict(base=base, teacher=teacher, corpus=corpus, checkpoint=base / "run" / "checkpoints" / "checkpoint-12")


def _truncated_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return "cannot load the teacher's weights"


def _no_weights(folder):
    (folder / "model.safetensors").unlink()
    return "has no weights"


def _broken_config(folder):
    (folder / "config.json").write_text('{"model_type": "bert",\n  "hidden_size": 12,')
    return "config.json is not valid JSON at line"


def _config_not_utf8(folder):
    (folder / "config.json").write_bytes(b'{"model_type": "b\xe9rt"}')
    return "is not valid JSON"


@pytest.mark.parametrize("damage", [_truncated_weights, _no_weights, _broken_config, _config_not_utf8])
def test_a_damaged_teacher_folder_gets_one_line(files, tmp_path, capsys, damage):
    teacher = shutil.copytree(files["teacher"], tmp_path / "teacher")
    fragment = damage(teacher)
    out = tmp_path / "out"
    assert main(["distill", *distill_argv(teacher, files["corpus"], out)]) == 2
    error = capsys.readouterr().err.strip()
    assert fragment in error and len(error.splitlines()) == 1, error
    assert not out.exists()


def test_a_training_checkpoint_as_teacher_points_to_wid_export(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["distill", *distill_argv(files["checkpoint"], files["corpus"], out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "training checkpoint" in error and f"wid export {files['checkpoint']}" in error and len(error.splitlines()) == 1
    assert not out.exists()
