"""The output folder of a run: checked before any loading (a file, not writable), locked against a second run
(a stale lock is taken over), cleared of an earlier run's state by --overwrite_output_dir, and left retryable
after a failure. Unwritable folders that stay unwritable for root: /sys (sysfs refuses new files)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from wid.cli import main
from wid.run_folder import LOCK_NAME, RunError, RunFolder

from distill_fixtures import distill_argv, write_corpus, write_teacher


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("folder")
    return dict(teacher=write_teacher(base / "teacher"), corpus=write_corpus(base / "corpus.txt"))


def _unwritable(tmp_path):
    """A folder no one here can write in: a read-only folder, or (as root, who writes anywhere) a sysfs one."""
    folder = tmp_path / "read-only"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o755)
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return folder
    (folder / "probe").unlink()
    return next(p for p in ("/sys/kernel", "/sys") if os.path.isdir(p))


def _one_line(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return error


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_an_unwritable_output_dir_is_refused_before_the_teacher_loads(files, tmp_path, capsys, monkeypatch):
    import wid.distill

    loaded = []
    monkeypatch.setattr(wid.distill, "load_teacher", lambda *a: loaded.append(a))
    for out in (_unwritable(tmp_path), os.path.join(_unwritable(tmp_path), "new-run")):
        assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out), "--overwrite_output_dir"]) == 2
        assert "cannot write to the output_dir" in _one_line(capsys)
    assert loaded == []


@pytest.mark.parametrize("command", ["evaluate", "attention", "export"])
def test_other_commands_check_where_they_write_before_working(files, tmp_path, capsys, command):
    target = os.path.join(_unwritable(tmp_path), "out")
    argv = {"evaluate": ["evaluate", str(files["teacher"]), "--train_file", "t.csv", "--validation_file", "v.csv",
                         "--output_dir", target],
            "attention": ["attention", str(files["teacher"]), str(files["teacher"]), "--output", f"{target}/figure.png"],
            "export": ["export", str(tmp_path), target]}[command]
    if command == "evaluate":
        for name in ("t.csv", "v.csv"):
            (tmp_path / name).write_text("text,label\nthe model,0\nthe teacher,1\n")
        argv[3], argv[5] = str(tmp_path / "t.csv"), str(tmp_path / "v.csv")
    assert main(argv) == 2
    assert "cannot write to the" in _one_line(capsys)


def test_a_live_run_holds_the_folder(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "earlier"}))
        assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out), "--overwrite_output_dir"]) == 2
        error = _one_line(capsys)
        assert f"in use by another wid distill run (pid {holder.pid}" in error
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # left alone
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_notice_and_released_at_the_end(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    pid = _dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out)]) == 0
    assert f"took over the lock of a run that is gone (pid {pid}" in capsys.readouterr().out
    assert not (out / LOCK_NAME).exists()
    summary = json.loads((out / "wid_summary.json").read_text())
    assert any("took over the lock" in notice for notice in summary["notices"])


def test_an_unreadable_lock_is_named_not_taken_for_a_run(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text("{not json")
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out)]) == 2
    error = _one_line(capsys)
    assert f"unreadable lock file {out / LOCK_NAME}" in error and "pid None" not in error
    assert (out / LOCK_NAME).read_text() == "{not json"


def test_two_folders_cannot_lock_the_same_path(tmp_path):
    with RunFolder(tmp_path / "out"):
        with pytest.raises(RunError, match="in use by another wid distill run"):
            # the same process counts as live: a nested run into the same folder is refused too
            RunFolder(tmp_path / "out", overwrite=True).__enter__()
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_overwrite_output_dir_clears_the_earlier_runs_state(files, tmp_path):
    out = tmp_path / "out"
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out), "--save_widths", "0.75"]) == 0
    (out / "checkpoints" / "checkpoint-99").mkdir()  # a checkpoint the new run must never name or resume
    (out / "notes.txt").write_text("mine")
    argv = distill_argv(files["teacher"], files["corpus"], out, "--overwrite_output_dir")
    argv[argv.index("--max_steps") + 1], argv[argv.index("--save_steps") + 1] = "4", "2"
    assert main(["distill", *argv]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not list(out.glob("student-*pct"))
    assert (out / "notes.txt").read_text() == "mine"  # not the run's: kept


def test_an_overwrite_stopped_early_leaves_no_unrecorded_student(files, tmp_path, monkeypatch):
    """--overwrite_output_dir takes the earlier student with its summary, so a new run that stops before writing its
    own never leaves a student that no summary or checkpoint describes."""
    import wid.distill

    out = tmp_path / "out"
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out)]) == 0
    (out / "notes.txt").write_text("mine")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(wid.distill, "_train_wid", interrupted)
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out, "--overwrite_output_dir")]) == 130
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_failed_run_leaves_nothing_that_blocks_the_retry(files, tmp_path, capsys, monkeypatch):
    import wid.distill

    out = tmp_path / "a" / "b" / "out"

    def fail(*args, **kwargs):
        (out / "checkpoints").mkdir(parents=True)  # what the Trainer makes before its first save
        raise RuntimeError("simulated failure inside training")

    monkeypatch.setattr(wid.distill, "_train_wid", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        main(["distill", *distill_argv(files["teacher"], files["corpus"], out)])
    assert not (tmp_path / "a").exists()
    monkeypatch.undo()
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out)]) == 0


def test_the_teachers_own_folder_is_refused_as_output_dir(files, tmp_path, capsys):
    import shutil

    teacher = shutil.copytree(files["teacher"], tmp_path / "teacher")
    before = sorted(p.name for p in teacher.iterdir())
    argv = distill_argv(teacher, files["corpus"], teacher, "--overwrite_output_dir")
    assert main(["distill", *argv]) == 2
    assert "is the teacher's folder" in _one_line(capsys)
    assert sorted(p.name for p in teacher.iterdir()) == before


def test_an_output_dir_that_is_a_file_is_refused(files, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out)]) == 2
    assert "is a file" in _one_line(capsys)
    assert out.read_text() == "x"
