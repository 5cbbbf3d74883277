"""Checkpoints that are safe to resume from: written atomically, named good only when their weights give a finite
loss, refused in one line when incomplete, damaged or made with other targets or another teacher, and resumed
with the learning rates given now (the advice after a divergence is to lower them)."""
import json
import shutil

import pytest
import transformers

from wid.cli import main
from wid.run_folder import RUN_FILE, STAGING_PREFIX

from distill_fixtures import distill_argv, write_corpus, write_teacher


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("checkpoints")
    teacher, corpus = write_teacher(base / "teacher"), write_corpus(base / "corpus.txt")
    assert main(["distill", *distill_argv(teacher, corpus, base / "run")]) == 0
    return dict(base=base, teacher=teacher, corpus=corpus, run=base / "run")


def _argv(files, out, *extra):
    return ["distill", *distill_argv(files["teacher"], files["corpus"], out), *extra]


def _one_line(capsys) -> str:
    """The run's one error line (stderr also carries transformers' progress bars while the teacher loads)."""
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if line.startswith("wid ")]
    assert len(lines) == 1 and "Traceback" not in error, error
    return lines[0]


def _copy_run(files, tmp_path):
    return shutil.copytree(files["run"], tmp_path / "run")


def test_every_checkpoint_says_what_made_it(files):
    for checkpoint in (files["run"] / "checkpoints").glob("checkpoint-*"):
        record = json.loads((checkpoint / RUN_FILE).read_text())
        assert record["method"] == "wid" and record["teacher"] == str(files["teacher"])
        assert len(record["teacher_fingerprint"]) == 64 and record["wid_config"]["target_hidden"] == 6


def test_a_kill_during_a_save_leaves_no_half_checkpoint(files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original = transformers.Trainer._save_rng_state

    def killed_at_step_6(self, output_dir):
        if self.state.global_step == 6:
            raise SystemExit("killed while saving")  # stands in for SIGKILL: no cleanup of the staging folder
        return original(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", killed_at_step_6)
    with pytest.raises(SystemExit):
        main(_argv(files, out))
    monkeypatch.undo()
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (checkpoints / f"{STAGING_PREFIX}6").is_dir()
    assert main(_argv(files, out, "--resume_from_checkpoint", str(out))) == 0  # newest complete: checkpoint-3
    assert not list(checkpoints.glob(STAGING_PREFIX + "*"))
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-3", "checkpoint-6", "checkpoint-9"]


@pytest.mark.parametrize("remove", ["optimizer.pt", "trainer_state.json", "rng_state.pth"])
def test_an_incomplete_checkpoint_is_refused_naming_an_earlier_one(files, tmp_path, capsys, remove):
    run = _copy_run(files, tmp_path)
    (run / "checkpoints" / "checkpoint-9" / remove).unlink()
    assert main(_argv(files, run, "--resume_from_checkpoint", str(run / "checkpoints" / "checkpoint-9"))) == 2
    error = _one_line(capsys)
    assert f"is incomplete (no {remove})" in error and "resume from" in error and "checkpoint-6" in error


def test_a_folder_given_skips_an_incomplete_newest_checkpoint(files, tmp_path, capsys):
    run = _copy_run(files, tmp_path)
    (run / "checkpoints" / "checkpoint-12" / "scheduler.pt").unlink()
    assert main(_argv(files, run, "--resume_from_checkpoint", str(run))) == 0
    assert f"resuming from {run / 'checkpoints' / 'checkpoint-9'}, the newest complete checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("damaged", ["optimizer.pt", "model.safetensors", "rng_state.pth"])
def test_a_truncated_checkpoint_file_gets_one_line(files, tmp_path, capsys, damaged):
    run = _copy_run(files, tmp_path)
    path = run / "checkpoints" / "checkpoint-9" / damaged
    path.write_bytes(path.read_bytes()[:200])
    assert main(_argv(files, run, "--resume_from_checkpoint", str(path.parent))) == 2
    error = _one_line(capsys)
    assert "truncated or corrupt" in error or "cannot" in error


@pytest.mark.parametrize("flag, value, fragment", [
    ("--target_hidden", "3", "--target_hidden 6 (now 3)"),
    ("--target_intermediate", "5", "--target_intermediate 9 (now 5)"),
    ("--method", "mlm", "--method wid"),
])
def test_a_resume_with_other_targets_is_refused(files, tmp_path, capsys, flag, value, fragment):
    run = _copy_run(files, tmp_path)
    argv = _argv(files, run, "--resume_from_checkpoint", str(run / "checkpoints" / "checkpoint-6"))
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert main(argv) == 2
    error = _one_line(capsys)
    assert "checkpoint-6 was made with" in error and fragment in error


def test_a_resume_with_another_teacher_is_refused(files, tmp_path, capsys):
    run = _copy_run(files, tmp_path)
    other = write_teacher(tmp_path / "other", seed=1)
    capsys.readouterr()
    argv = ["distill", *distill_argv(other, files["corpus"], run), "--resume_from_checkpoint", str(run / "checkpoints" / "checkpoint-6")]
    assert main(argv) == 2
    assert "its weights differ" in _one_line(capsys)


def test_a_resume_on_other_data_is_refused(files, tmp_path, capsys):
    """The checkpoint's data stream (corpus, sequence length) is part of an exact resume."""
    run = _copy_run(files, tmp_path)
    checkpoint = str(run / "checkpoints" / "checkpoint-6")
    other = write_corpus(tmp_path / "other.txt", seed=3)
    argv = ["distill", *distill_argv(files["teacher"], other, run), "--resume_from_checkpoint", checkpoint]
    assert main(argv) == 2
    error = _one_line(capsys)
    assert f"--corpus {files['corpus']} (now {other})" in error
    argv = _argv(files, run, "--resume_from_checkpoint", checkpoint)
    argv[argv.index("--max_seq_length") + 1] = "48"
    assert main(argv) == 2
    assert "--max_seq_length 32 (now 48)" in _one_line(capsys)


def test_a_resume_of_a_finished_run_is_refused_not_trained_past_max_steps(files, tmp_path, capsys):
    run = _copy_run(files, tmp_path)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert main(_argv(files, run, "--resume_from_checkpoint", str(run))) == 2
    error = _one_line(capsys)
    assert "checkpoint-12 is at step 12, at or past --max_steps 12: that training is finished (its student is in" in error
    assert "wid export" in error
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_a_resume_takes_the_learning_rate_given_now(files, tmp_path, capsys, monkeypatch):
    warnings = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda message, *a, **k: warnings.append(str(message)))
    run = _copy_run(files, tmp_path)
    argv = _argv(files, run, "--resume_from_checkpoint", str(run / "checkpoints" / "checkpoint-6"))
    argv[argv.index("--compactor_lr") + 1] = "0.0007"
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "with this run's optimizer settings: group 0 lr 0.0007 (checkpoint 0.01)" in out
    state = json.loads((run / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    logged = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry and entry["step"] > 6]
    assert logged and max(logged) < 0.0007  # the compactor group's decayed lr, never the checkpoint's 0.01
    assert not [w for w in warnings if "missing keys" in w]  # the tied decoder, left out by save_pretrained, is no gap


def test_a_divergence_names_the_last_checkpoint_whose_weights_gave_a_finite_loss(files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv(files, out)
    argv[argv.index("--compactor_lr") + 1], argv[argv.index("--save_steps") + 1] = "1e9", "1"
    assert main(argv) == 2
    error = _one_line(capsys)
    assert "the loss became" in error
    named = error.split("resume from ")[1].split(" with")[0]
    step = int(named.rsplit("-", 1)[1])
    diverged = sorted((out / "checkpoints").glob("diverged-checkpoint-*"))
    assert diverged and all(int(p.name.rsplit("-", 1)[1]) > step for p in diverged)
    # resuming there with a sane learning rate finishes
    argv[argv.index("--compactor_lr") + 1] = "0.01"
    assert main([*argv, "--resume_from_checkpoint", named]) == 0


def test_a_resume_with_a_larger_max_steps_keeps_the_runs_mask_updates(files, tmp_path):
    """Without --w_step the schedule is fitted to --max_steps; a resume to train on keeps the checkpoint's w_step
    (refitting to the new --max_steps would refuse the resume as another schedule). The run logs fewer steps than
    --logging_steps, and its summary still has its final loss (logged at the last step)."""
    out = tmp_path / "out"
    argv = _argv(files, out, "--logging_steps", "50")
    del argv[argv.index("--w_step"):argv.index("--w_step") + 2]
    assert main(argv) == 0
    checkpoint = out / "checkpoints" / "checkpoint-12"
    fitted = json.loads((checkpoint / RUN_FILE).read_text())["wid_config"]["w_step"]
    summary = json.loads((out / "wid_summary.json").read_text())
    assert isinstance(summary["final_mlm_loss"], float) and summary["final_mlm_loss"] > 0
    argv[argv.index("--max_steps") + 1] = "24"
    assert main([*argv, "--resume_from_checkpoint", str(checkpoint)]) == 0
    assert json.loads((out / "checkpoints" / "checkpoint-24" / RUN_FILE).read_text())["wid_config"]["w_step"] == fitted


def test_a_resume_with_another_batch_per_step_is_refused(files, tmp_path, capsys):
    """The Trainer skips the batches a checkpoint has seen by count: another batch per step would resume elsewhere."""
    run = _copy_run(files, tmp_path)
    argv = _argv(files, run, "--resume_from_checkpoint", str(run / "checkpoints" / "checkpoint-6"),
                 "--gradient_accumulation_steps", "2")
    assert main(argv) == 2
    assert "4 sequences per step (now 8; --per_device_train_batch_size × --gradient_accumulation_steps" in _one_line(capsys)


def test_a_resume_on_a_corpus_whose_text_has_changed_is_refused(files, tmp_path, capsys):
    run = _copy_run(files, tmp_path)
    checkpoint = run / "checkpoints" / "checkpoint-6"
    record = json.loads((checkpoint / RUN_FILE).read_text())
    assert len(record["corpus_fingerprint"]) == 64
    record["corpus_fingerprint"] = "0" * 64  # as if the file had been rewritten since
    (checkpoint / RUN_FILE).write_text(json.dumps(record))
    assert main(_argv(files, run, "--resume_from_checkpoint", str(checkpoint))) == 2
    assert f"the corpus {files['corpus']} as it was then (its text has changed since)" in _one_line(capsys)
