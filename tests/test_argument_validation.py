"""`wid distill` refuses nonsense numbers at once: one line naming the fix, exit status 2, nothing written."""
import json

import pytest

from wid.cli import main

from distill_fixtures import distill_argv, write_corpus, write_teacher


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("validation")
    return dict(teacher=write_teacher(base / "teacher"), corpus=write_corpus(base / "corpus.txt"))


def _with(argv, flag, value):
    """argv with `flag` set to `value` (replaced if present)."""
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return argv + [flag, value]


@pytest.mark.parametrize("flag, value, fragment", [
    ("--max_steps", "0", "--max_steps must be at least 1"),
    ("--max_steps", "-5", "--max_steps must be at least 1"),
    ("--w_step", "0", "--w_step must be at least 1"),
    ("--compactor_lr", "nan", "compactor_lr must be a finite number > 0, got nan"),
    ("--teacher_lr", "inf", "teacher_lr must be a finite number >= 0"),
    ("--penalty", "nan", "penalty must be a finite number >= 0, got nan"),
    ("--head_warmup_steps", "-1", "--head_warmup_steps must be 0 or more"),
    ("--head_warmup_lr", "0", "--head_warmup_lr must be positive"),
    ("--max_seq_length", "2", "--max_seq_length must be at least 3"),
    ("--save_widths", "1.5", "--save_widths takes fractions"),
    ("--save_widths", "0", "--save_widths takes fractions"),
    ("--kd_alpha", "1.5", "--kd_alpha in [0, 1]"),
    ("--kd_temperature", "0", "--kd_temperature must be positive"),
    ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be at least 1"),
    ("--per_device_train_batch_size", "0", "--per_device_train_batch_size must be at least 1"),
    ("--learning_rate", "-1", "--learning_rate must be positive"),
])
def test_a_nonsense_number_is_refused_before_anything_is_written(files, tmp_path, capsys, flag, value, fragment):
    out = tmp_path / "out"
    argv = _with(distill_argv(files["teacher"], files["corpus"], out), flag, value)
    assert main(["distill", *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert fragment in error and len(error.splitlines()) == 1
    assert not out.exists()


def test_a_launch_of_several_processes_the_trainer_does_not_join_is_refused(files, tmp_path, capsys, monkeypatch):
    """torchrun on CPUs without --use_cpu: each process would think it is the only one (a fight over the folder, and
    a student without weights from the rank that does not save)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "2 processes were launched" in error and "--use_cpu true --ddp_backend gloo" in error
    assert len(error.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("backend, fragment", [
    ("bogus", "unknown backend in --backend bogus; choose one of auto, reference"),
    ("cuda", "--backend cuda is unavailable here (no GPU in this test); use --backend auto"),
])
def test_a_backend_that_cannot_run_here_is_refused_not_replaced(files, tmp_path, capsys, monkeypatch, backend, fragment):
    import wid_kernels

    status = dict(wid_kernels.available_backends(), cuda="no GPU in this test")
    monkeypatch.setattr(wid_kernels, "available_backends", lambda: status)
    out = tmp_path / "out"
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out), "--backend", backend]) == 2
    error = capsys.readouterr().err.strip()
    assert fragment in error and len(error.splitlines()) == 1 and not out.exists()


def test_a_reporting_integration_that_is_not_installed_is_one_line(files, tmp_path, capsys, monkeypatch):
    import transformers.integrations.integration_utils as integrations

    monkeypatch.setattr(integrations, "is_wandb_available", lambda: False)
    out = tmp_path / "out"
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out), "--report_to", "wandb"]) == 2
    error = capsys.readouterr().err.strip()
    assert "--report_to wandb: WandbCallback requires wandb to be installed" in error and "--report_to none" in error
    assert len(error.splitlines()) == 1 and not out.exists()


def test_the_backend_variable_is_used_when_no_flag_is_given(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WID_BACKEND", "bogus")
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], tmp_path / "out")]) == 2
    assert "unknown backend in WID_BACKEND=bogus" in capsys.readouterr().err  # where the choice came from


@pytest.mark.parametrize("epochs", ["0", "-2"])
def test_a_run_of_no_epochs_is_refused(files, tmp_path, capsys, epochs):
    out = tmp_path / "out"
    argv = distill_argv(files["teacher"], files["corpus"], out)
    del argv[argv.index("--max_steps"):argv.index("--max_steps") + 2]
    assert main(["distill", *argv, "--num_train_epochs", epochs]) == 2
    error = capsys.readouterr().err.strip()
    assert "--num_train_epochs must be positive" in error and len(error.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("extra, fragment", [
    (["--save_widths", "0.25"], "--save_widths 0.25 is below the student's width (6 of 12), so it is never reached; "
                                "pass fractions of at least 0.5 and below 1"),
    (["--max_seq_length", "65"], "beyond the teacher's 64 position embeddings; pass --max_seq_length 64 or less"),
])
def test_a_value_the_teacher_or_target_cannot_reach_is_refused(files, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    argv = _with(distill_argv(files["teacher"], files["corpus"], out), *extra)
    assert main(["distill", *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert fragment in error and len(error.splitlines()) == 1
    assert not out.exists()


def test_more_heads_than_the_teacher_has_says_the_limit(files, tmp_path, capsys):
    argv = _with(distill_argv(files["teacher"], files["corpus"], tmp_path / "out", "--strategy", "head", "--target_heads", "8"),
                 "--target_hidden", "8")
    assert main(["distill", *argv]) == 2
    assert "the teacher has 3 heads; choose at least 1 and at most 3" in capsys.readouterr().err


def test_a_two_step_run_says_nothing_false_about_its_schedule(files, tmp_path, capsys):
    """A schedule that cannot reach the target is reported as such, not as 'at target from step 16'."""
    argv = _with(distill_argv(files["teacher"], files["corpus"], tmp_path / "out"), "--max_steps", "2")
    assert main(["distill", *argv]) == 0
    out = capsys.readouterr().out
    assert "masks never reached the target (cut at once)" in out and "does not fit" not in out
    assert "shorter than the schedule's 4 mask updates" in out
    # the fold itself is exact, but the channels cut at once cost what the student then lacks: reported, not hidden
    summary = json.loads((tmp_path / "out" / "wid_summary.json").read_text())
    assert summary["max_logit_difference_fold"] < 1e-4 < summary["max_logit_difference_to_trained"]
    assert "student vs the model as trained: logits max diff" in out
    assert any(f"logits max diff {summary['max_logit_difference_to_trained']:.3g}" in n for n in summary["notices"])


def test_a_schedule_that_reached_its_target_reports_an_exact_cut(files, tmp_path):
    """The short recipe shrinks the masked entries to 0 by the last step: the student is the model as trained."""
    out = tmp_path / "out"
    assert main(["distill", *distill_argv(files["teacher"], files["corpus"], out)]) == 0
    summary = json.loads((out / "wid_summary.json").read_text())
    assert summary["recipe"] == "short" and summary["schedule_reached_target_at_step"] is not None
    assert summary["max_logit_difference_to_trained"] < 1e-4


@pytest.mark.parametrize("argv, expected", [
    ([], dict(max_steps=160)),
    (["--max_steps", "40"], dict(max_steps=40)),
    (["--max_steps", "800", "--per_device_train_batch_size", "8"], dict(max_steps=800, per_device_train_batch_size=8)),
    (["--num_train_epochs", "2"], dict(max_steps=-1, num_train_epochs=2)),
])
def test_the_built_in_default_run_keeps_its_values_unless_given(monkeypatch, argv, expected):
    """Without --teacher and --corpus, a flag given replaces only its own value of the default run."""
    import wid.distill
    from wid.distill import DEFAULT_RUN

    seen = {}
    monkeypatch.setattr(wid.distill, "run_distillation", lambda args, training_args, callbacks=(): seen.update(
        args=args, training_args=training_args) or {})
    monkeypatch.setattr(wid.distill, "format_summary", lambda summary: "")
    assert main(["distill", *argv]) == 0
    args, training_args = seen["args"], seen["training_args"]
    trainer_values = {name: DEFAULT_RUN[name] for name in ("max_steps", "per_device_train_batch_size", "logging_steps",
                                                            "learning_rate")}
    for name, value in {**trainer_values, **expected}.items():
        assert getattr(training_args, name) == value, name
    assert (args.preset, args.w_step, args.compactor_lr, args.teacher_lr) == (
        DEFAULT_RUN["preset"], DEFAULT_RUN["w_step"], DEFAULT_RUN["compactor_lr"], DEFAULT_RUN["teacher_lr"])


def test_save_widths_the_schedule_passes_at_one_mask_update_are_refused(files, tmp_path, capsys):
    """With --strategy head the hidden width moves by whole heads (12 → 8 → 4 here): 0.6 and 0.5 are both first passed
    at 4, so they would be one student under two names."""
    out = tmp_path / "out"
    argv = _with(_with(distill_argv(files["teacher"], files["corpus"], out, "--strategy", "head", "--target_heads", "1"),
                       "--target_hidden", "4"), "--target_intermediate", "9")
    assert main(["distill", *argv, "--save_widths", "0.6", "0.5"]) == 2
    error = capsys.readouterr().err.strip()
    assert "--save_widths 0.6 and 0.5 are both first passed at hidden width 4 (the schedule's hidden widths are 12, 8, 4 " \
           "of 12)" in error and len(error.splitlines()) == 1
    assert not out.exists()
    assert main(["distill", *argv, "--save_widths", "0.7", "0.5"]) == 0
    assert sorted(p.name for p in out.glob("student-*")) == ["student-50pct", "student-70pct"]


def test_only_the_main_process_prints_the_summary(monkeypatch, capsys):
    import transformers

    import wid.distill

    monkeypatch.setattr(wid.distill, "run_distillation", lambda args, training_args, callbacks=(): {})
    monkeypatch.setattr(wid.distill, "format_summary", lambda summary: "the summary")
    assert main(["distill", "--max_steps", "3"]) == 0
    assert capsys.readouterr().out.strip() == "the summary"
    monkeypatch.setattr(transformers.TrainingArguments, "process_index", property(lambda self: 1))
    assert main(["distill", "--max_steps", "3"]) == 0
    assert capsys.readouterr().out.strip() == ""


def test_warnings_of_the_command_are_one_line_without_source_code():
    import os
    import subprocess
    import sys

    env = dict(os.environ, WID_BACKEND="triton")
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "wid.cli", "info"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "backend 'triton' is unavailable" in line]
    assert warned and warned[0].startswith("wid: UserWarning: wid_kernels: backend 'triton' is unavailable")
    assert "set_backend(" not in result.stderr  # Python's default format would print the warning's source line


def test_a_cpu_run_does_not_ask_for_pinned_memory(monkeypatch):
    """Without an accelerator the Trainer's dataloader_pin_memory=True only warns ("no accelerator is found") on every
    run: the command turns it off there, unless it is given."""
    import wid.cli
    import wid.distill

    seen = {}
    monkeypatch.setattr(wid.distill, "run_distillation", lambda args, training_args, callbacks=(): seen.update(t=training_args) or {})
    monkeypatch.setattr(wid.distill, "format_summary", lambda summary: "")
    monkeypatch.setattr(wid.cli, "_has_accelerator", lambda: False)
    assert main(["distill", "--max_steps", "3"]) == 0
    assert seen["t"].dataloader_pin_memory is False
    assert main(["distill", "--max_steps", "3", "--dataloader_pin_memory", "true"]) == 0
    assert seen["t"].dataloader_pin_memory is True
    monkeypatch.setattr(wid.cli, "_has_accelerator", lambda: True)
    assert main(["distill", "--max_steps", "3"]) == 0
    assert seen["t"].dataloader_pin_memory is True


def test_a_resume_of_the_default_run_keeps_the_checkpoints_w_step(monkeypatch):
    """The default run's w_step is not forced on a resume: the checkpoint's (fitted to a short --max_steps) is kept."""
    import wid.distill

    seen = {}
    monkeypatch.setattr(wid.distill, "run_distillation", lambda args, training_args, callbacks=(): seen.update(args=args) or {})
    monkeypatch.setattr(wid.distill, "format_summary", lambda summary: "")
    assert main(["distill", "--max_steps", "40", "--resume_from_checkpoint", "wid-student"]) == 0
    assert seen["args"].w_step is None
